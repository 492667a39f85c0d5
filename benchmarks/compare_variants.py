"""Compare the bottleneck variants on the grounded synthetic benchmark, with the trained toy CLIP.

Every variant runs the evaluation issue's protocol, ``python train.py fit -c configs/toy_benchmark.yaml``
(toy CLIP, 128 held-out scenes with the named shape's mask, bottleneck block, steps, copies, seed and
evaluation settings as there), with only the bottleneck changed: one extra config per variant,
run in-process through :func:`m2ib_lightning.cli.main`. The script prints a markdown table of the
runs' ``results.json`` and writes it to ``--out/variants.md``. ``RandomMap`` is the chance level.

Usage (the toy CLIP and the benchmark ship under ``data/toy``; about 5 minutes per variant on 2 CPU
cores)::

    python benchmarks/compare_variants.py --out outputs/variants
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parents[1]

VARIANTS: dict[str, dict[str, Any]] = {
    "M2IB (reference)": {},
    "PerTokenM2IB": {"vision_bottleneck": {"class_path": "m2ib_lightning.PerTokenM2IB"},
                     "text_bottleneck": {"class_path": "m2ib_lightning.PerTokenM2IB"}},
    "IBAStyleM2IB": {"vision_bottleneck": {"class_path": "m2ib_lightning.IBAStyleM2IB",
                                           "init_args": {"stats_file": "@OUT@/stats/vision.safetensors"}},
                     "text_bottleneck": {"class_path": "m2ib_lightning.IBAStyleM2IB",
                                         "init_args": {"stats_file": "@OUT@/stats/text.safetensors"}}},
    "RandomMap (chance)": {"class_path": "m2ib_lightning.baselines.RandomMap"},
}

COLUMNS = [
    ("image/pointing_game", "pointing", True), ("image/energy_pointing_game", "energy in mask", True),
    ("image/mask_auroc", "mask AUROC", True), ("image/deletion_auc", "deletion AUC", False),
    ("image/insertion_auc", "insertion AUC", True), ("image/confidence_drop", "img conf. drop", False),
    ("image/confidence_increase", "img conf. incr.", True), ("text/confidence_drop", "txt conf. drop", False),
    ("text/confidence_increase", "txt conf. incr.", True),
]


def run_variant(name: str, model: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    from m2ib_lightning.cli import main

    out = Path(args.out) / name.split()[0]
    out.mkdir(parents=True, exist_ok=True)
    if "class_path" in model:  # a baseline: its own class on the same backbone
        section = {"class_path": model["class_path"], "init_args": {"backbone": {
            "class_path": "m2ib_lightning.CLIPBackbone", "init_args": {"model": str(args.model)}}}}
    else:
        section = {"init_args": model}
    path = out / "variant.json"  # JSON is YAML
    path.write_text(json.dumps({"model": section}).replace("@OUT@", str(out)))
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when sys.argv holds other arguments
    try:
        main(["fit", "-c", str(args.config), "-c", str(path),
              "--model.init_args.backbone.init_args.model", str(args.model),
              "--model.init_args.seed", str(args.seed), "--data.init_args.data_files", str(args.data),
              *(["--data.init_args.limit", str(args.limit)] if args.limit else []),
              "--trainer.default_root_dir", str(out), "--writer.overlays", "0"])
    finally:
        sys.argv = argv
    return json.loads((out / "attributions" / "results.json").read_text())


def table(results: dict[str, dict[str, Any]]) -> str:
    head = "| variant | " + " | ".join(f"{label} {'↑' if up else '↓'}" for _, label, up in COLUMNS) + " | s/pair |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, res in results.items():
        values = [res["metrics"].get(key) for key, _, _ in COLUMNS]
        cells = ["-" if v is None else f"{v:.3f}" for v in values]
        n = max(res["samples"].values(), default=0) or 1
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res['explain_s'] / n:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "toy_benchmark.yaml", help="the protocol")
    parser.add_argument("--model", type=Path, default=ROOT / "data" / "toy" / "toy-clip")
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "toy" / "pairs.jsonl")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "variants")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N pairs only")
    parser.add_argument("--only", nargs="*", help="variant names to run (default: all)")
    args = parser.parse_args()
    results = {name: run_variant(name, model, args) for name, model in VARIANTS.items()
               if not args.only or name.split()[0] in args.only}
    text = table(results)
    n = max((max(r["samples"].values(), default=0) for r in results.values()), default=0)
    hp = next(iter(results.values()))["hparams"]
    text += (f"\n\n{n} pairs of {args.data}, model {args.model}, protocol {args.config.name} (layers "
             f"{hp.get('vision_layer')}/{hp.get('text_layer')}, {hp.get('steps')} steps x {hp.get('copies')} "
             f"copies), seed {args.seed}.\n")
    (args.out / "variants.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
