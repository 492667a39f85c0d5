"""World 2 of the grounded benchmark: choose M2IB's vision layer on validation scenes, then measure.

    python scripts/world2_benchmark.py sweep      # M2IB at every vision layer, 64 validation scenes
    python scripts/world2_benchmark.py measure    # M2IB at every vision layer and the baselines, 200 scenes

Both run ``python train.py fit -c configs/world2_benchmark.yaml`` (in this process, through the same
CLI) with the model replaced per run, collect each run's ``results.json`` and print a markdown
table with the pointing game by caption kind (also written to ``<out>/<command>.md`` and
``.json``). ``sweep`` writes its scenes from the ``validation`` stream of
:mod:`m2ib_lightning.assets.world2` (neither the benchmark's nor the CLIP's training or held-out
streams) and maps the vision side only; ``measure`` runs on ``data/world2`` with every metric, one
run at a time, one CPU thread by default.

Arguments after ``--`` go to every run's CLI (e.g. ``-- --data.init_args.limit 8``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
CONFIG = ROOT / "configs" / "world2_benchmark.yaml"
MODEL = "data/world2/world2-clip"
VISION_LAYERS = list(range(6))
COLUMNS = [  # (metric, header, higher is better)
    ("image/pointing_game", "Pointing game", True),
    ("image/energy_pointing_game", "Energy PG", True),
    ("image/mask_auroc", "Mask AUROC", True),
    ("image/deletion_auc", "Deletion AUC", False),
    ("image/insertion_auc", "Insertion AUC", True),
]


def backbone(model: str = MODEL) -> dict[str, Any]:
    return {"class_path": "m2ib_lightning.CLIPBackbone", "init_args": {"model": model}}


def m2ib(vision_layer: int, model: str = MODEL) -> dict[str, Any]:
    """M2IB with the reference bottleneck, as the config but at ``vision_layer``."""
    return {"class_path": "m2ib_lightning.M2IBAttribution",
            "init_args": {"backbone": backbone(model), "vision_layer": vision_layer, "text_layer": -1, "steps": 10,
                          "copies": 10, "seed": 0}}


def baselines(gradcam_layer: int, model: str = MODEL) -> dict[str, dict[str, Any]]:
    """The baselines with the toy benchmark's settings (Grad-CAM at M2IB's layer, as there)."""
    path = "m2ib_lightning.methods.baselines."
    return {
        "rollout": {"class_path": path + "AttentionRollout", "init_args": {"backbone": backbone(model),
                                                                           "start_layer": 0}},
        "rise": {"class_path": path + "RISE", "init_args": {"backbone": backbone(model), "masks": 500, "grid": 7,
                                                            "p": 0.5, "text_masks": 256}},
        "gradcam": {"class_path": path + "GradCAM", "init_args": {"backbone": backbone(model),
                                                                  "vision_layer": gradcam_layer,
                                                                  "text_layer": gradcam_layer}},
        "saliency": {"class_path": path + "GradientSaliency", "init_args": {"backbone": backbone(model),
                                                                            "text_layer": -1}},
        "random": {"class_path": path + "RandomMap", "init_args": {"backbone": backbone(model)}},
    }


def config_vision_layer() -> int:
    """The vision layer ``configs/world2_benchmark.yaml`` uses."""
    import yaml

    return int(yaml.safe_load(CONFIG.read_text())["model"]["init_args"]["vision_layer"])


KINDS = ("single", "count", "relation")


def by_kind(directory: Path, pairs: Path, metric: str = "image/pointing_game") -> dict[str, float]:
    """Mean of ``metric`` over the samples of each caption kind (from the records' per-sample values)."""
    from m2ib_lightning import load_attributions

    kinds = {row["id"]: row["kind"] for row in map(json.loads, pairs.read_text().splitlines())}
    records = load_attributions(directory)
    values: dict[str, list[float]] = {k: [] for k in KINDS}
    for sample_id in records:
        values[kinds[sample_id]].append(records[sample_id].metrics[metric])
    return {k: sum(v) / len(v) for k, v in values.items() if v}


PLACES = ("referent", "same attribute", "same shape", "anchor", "same phrase", "other object", "background")


def peak_on(directory: Path, pairs: Path, margin: int = 8) -> dict[str, float]:
    """Where each image map's maximum lands, as fractions of the samples: on (the box, ``margin`` px
    around, of) a referent, an object sharing only the named colour or fill, only the named shape,
    a relation's anchor, another object of the referent's phrase, another object, or the background."""
    import numpy as np

    from m2ib_lightning import load_attributions

    rows = {row["id"]: row for row in map(json.loads, pairs.read_text().splitlines())}
    records = load_attributions(directory)
    counts = dict.fromkeys(PLACES, 0)
    for sample_id in records:
        row, image_map = rows[sample_id], records[sample_id].image_map
        y, x = np.unravel_index(int(image_map.argmax()), image_map.shape)
        hit = next((i for i, o in enumerate(row["objects"]) if o["box"][0] - margin <= x <= o["box"][2] + margin
                    and o["box"][1] - margin <= y <= o["box"][3] + margin), None)
        attribute, shape = row["caption"].split()[1:3]  # "a|two|the <attribute> <shape(s)> ..."
        if hit is None:
            place = "background"
        elif hit in row["referents"]:
            place = "referent"
        elif hit == row["anchor"]:
            place = "anchor"
        else:
            obj = row["objects"][hit]
            same_shape = shape in (obj["shape"], obj["shape"] + "s", obj["shape"] + "es")
            same_attribute = attribute in (obj["colour"], obj["fill"])
            place = ("same phrase" if same_shape and same_attribute else "same shape" if same_shape
                     else "same attribute" if same_attribute else "other object")
        counts[place] += 1
    return {k: v / len(records) for k, v in counts.items()}


def run(name: str, model: dict[str, Any], out: Path, extra: list[str], pairs: Path) -> dict[str, Any]:
    from m2ib_lightning.run.cli import main

    run_dir = out / name
    if run_dir.exists():  # the writer passes over finished samples: start clean
        shutil.rmtree(run_dir)
    args = ["fit", "-c", str(CONFIG), f"--model={json.dumps(model)}", "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--writer.overlays", "0"]
    print(f"== {name}", flush=True)
    start = time.perf_counter()
    main(args + extra)
    results = json.loads((run_dir / "attributions" / "results.json").read_text())
    results["run_wall_s"] = round(time.perf_counter() - start, 1)
    results["pointing_game_by_kind"] = by_kind(run_dir / "attributions", pairs)
    results["peak_on"] = peak_on(run_dir / "attributions", pairs)
    return results


def table(results: dict[str, dict[str, Any]], metrics: list[str]) -> str:
    heads = [f"{h} {'↑' if up else '↓'}" for m, h, up in COLUMNS if m in metrics]
    heads += [f"PG {k}" for k in KINDS]
    lines = ["| Method | " + " | ".join(heads) + " | Method time (s) |", "|---" * (len(heads) + 2) + "|"]
    for name, res in results.items():
        cells = [f"{res['metrics'][m]:.3f}" for m, _, _ in COLUMNS if m in metrics]
        cells += [f"{res['pointing_game_by_kind'].get(k, float('nan')):.3f}" for k in KINDS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {res.get('explain_s', float('nan')):.1f} |")
    lines += ["", "Where the map's maximum lands (fraction of the scenes):", "",
              "| Method | " + " | ".join(PLACES) + " |", "|---" * (len(PLACES) + 1) + "|"]
    for name, res in results.items():
        lines.append(f"| {name} | " + " | ".join(f"{res['peak_on'][p]:.3f}" for p in PLACES) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["sweep", "measure"])
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "world2_benchmark")
    parser.add_argument("--scenes", type=int, default=64, help="validation scenes (sweep)")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="measure: runs to do, of m2ib_layer0..5, rollout, rise, gradcam, saliency, random")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []  # more CLI arguments for every run
    args = parser.parse_args(argv[: len(argv) - len(extra) - (1 if extra or "--" in argv else 0)])
    args.extra = extra

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, Any]] = {}
    if args.command == "sweep":
        from m2ib_lightning.assets.world2 import make_world2

        pairs = make_world2(args.out / "validation-scenes", n=args.scenes, seed="validation", prefix="val")
        metrics = [m for m, _, _ in COLUMNS[:3]]
        for layer in VISION_LAYERS:
            results[f"M2IB vision layer {layer}"] = run(
                f"sweep/layer{layer}", m2ib(layer), args.out,
                ["--data.init_args.data_files", str(pairs), "--model.init_args.sides", "[vision]",
                 "--evaluation.metrics", json.dumps(metrics), *args.extra], pairs)
    else:
        metrics = [m for m, _, _ in COLUMNS]
        chosen = config_vision_layer()
        runs = {f"m2ib_layer{layer}": m2ib(layer) for layer in VISION_LAYERS} | baselines(chosen)
        for name in args.methods or list(runs):
            results[name] = run(f"measure/{name}", runs[name], args.out, args.extra, ROOT / "data" / "world2" /
                                "pairs.jsonl")
    text = table(results, metrics)
    print(text)
    (args.out / f"{args.command}.md").write_text(text + "\n")
    (args.out / f"{args.command}.json").write_text(json.dumps(results, indent=2) + "\n")
    return results


if __name__ == "__main__":
    main()
