"""The IB family against the baselines on both grounded worlds: validation sweeps, then the benchmark.

    python scripts/ib_variants.py validate --world toy --runs m2ib@0 smooth@0 ...   # 64 validation scenes
    python scripts/ib_variants.py measure --world world2 --runs rollout legrad m2ib@0 ...   # benchmark scenes
    python scripts/ib_variants.py table --world toy --split benchmark              # print what is cached

A run is named ``<method>`` (a baseline) or ``<variant>@<vision layer>`` (an IB configuration; a
multi-layer one ``<variant>@0+1+2``); :data:`VARIANTS` lists the IB configurations by name, with their
bottleneck settings. Every run goes through ``python train.py fit -c configs/<world>_benchmark.yaml``
(in this process, through the same CLI) with the model replaced; its ``results.json`` is kept under
``--out/<world>/<split>/<run>/`` and a run whose directory already holds one is not run again (delete
the directory to redo it). ``validate`` maps the vision side only on 64 scenes of the world's
``validation`` stream (neither the benchmark's nor the CLIPs' training or held-out streams): design
decisions are taken there; ``measure`` maps both sides on the benchmark scenes with every metric.

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

WORLDS = {
    "toy": {"config": "configs/toy_benchmark.yaml", "model": "data/toy/toy-clip", "pairs": "data/toy/pairs.jsonl",
            "layers": 4},
    "world2": {"config": "configs/world2_benchmark.yaml", "model": "data/world2/world2-clip",
               "pairs": "data/world2/pairs.jsonl", "layers": 6},
}
# Rescaled twins (``python scripts/ib_variants.py twin``): the same CLIP with its residual stream 10
# times larger, same embeddings; a scale-free beta must give them the maps of the original.
for _world in ("toy", "world2"):
    WORLDS[f"{_world}_x10"] = {**WORLDS[_world], "model": f"outputs/ib_variants/twins/{_world}-x10"}
COLUMNS = [  # (metric, header, higher is better)
    ("image/pointing_game", "PG", True),
    ("image/energy_pointing_game", "EPG", True),
    ("image/mask_auroc", "Mask AUROC", True),
    ("image/deletion_auc", "Deletion AUC", False),
    ("image/insertion_auc", "Insertion AUC", True),
    ("text/confidence_drop", "Txt drop", False),
    ("text/confidence_increase", "Txt incr.", True),
]
VALIDATION_METRICS = [m for m, _, _ in COLUMNS[:3]]
BASELINE = "m2ib_lightning.methods.baselines."
BOTTLENECKS = "m2ib_lightning."

# name -> (class_path, init_args) of the vision bottleneck; the text side gets the same class with the
# text-side settings of TEXT (where present) at text layer -1.
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "m2ib": ("M2IB", {}),
    "m2ib_b1": ("M2IB", {"beta": 1.0}),
    "m2ib_b0.3": ("M2IB", {"beta": 0.3}),
    "m2ib_b3": ("M2IB", {"beta": 3.0}),
    "per_token": ("PerTokenM2IB", {}),
    "per_token_b1": ("PerTokenM2IB", {"beta": 1.0}),
}
for _beta in (0.1, 0.3, 1.0, 2.0, 3.0, 10.0):
    for _sigma in (0.5, 1.0, 2.0):
        VARIANTS[f"smooth_s{_sigma:g}_b{_beta:g}"] = ("SmoothM2IB", {"sigma": _sigma, "beta": _beta})
    VARIANTS[f"scaled_b{_beta:g}"] = ("ScaledM2IB", {"beta": _beta})
    VARIANTS[f"m2ib_b{_beta:g}"] = ("M2IB", {"beta": _beta})
    VARIANTS[f"iba_b{_beta:g}"] = ("IBAStyleM2IB", {"beta": _beta})
    VARIANTS[f"per_token_b{_beta:g}"] = ("PerTokenM2IB", {"beta": _beta})
    VARIANTS[f"spt_b{_beta:g}"] = ("ScaledPerTokenM2IB", {"beta": _beta})
    for _init in (0.0, 2.0):
        VARIANTS[f"spt_b{_beta:g}_i{_init:g}"] = ("ScaledPerTokenM2IB", {"beta": _beta, "init_alpha": _init})
    for _init in (0.0, 2.0):
        VARIANTS[f"scaled_b{_beta:g}_i{_init:g}"] = ("ScaledM2IB", {"beta": _beta, "init_alpha": _init})


def backbone(world: str) -> dict[str, Any]:
    return {"class_path": "m2ib_lightning.CLIPBackbone", "init_args": {"model": WORLDS[world]["model"]}}


def bottleneck(name: str) -> dict[str, Any]:
    cls, args = VARIANTS[name]
    return {"class_path": cls if "." in cls else BOTTLENECKS + cls, "init_args": dict(args)}


def ib_model(world: str, name: str, layers: list[int], seed: int) -> dict[str, Any]:
    """An IB configuration: one vision layer (``M2IBAttribution``) or several (``MultiLayerM2IB``)."""
    init = {"backbone": backbone(world), "text_layer": -1, "steps": 10, "copies": 10, "seed": seed,
            "vision_bottleneck": bottleneck(name), "text_bottleneck": bottleneck(name)}
    if len(layers) == 1:
        return {"class_path": "m2ib_lightning.M2IBAttribution", "init_args": {**init, "vision_layer": layers[0]}}
    init.pop("text_layer")
    return {"class_path": "m2ib_lightning.MultiLayerM2IB", "init_args": {**init, "vision_layers": layers,
                                                                         "text_layers": [-1]}}


def baseline_model(world: str, name: str, seed: int) -> dict[str, Any]:
    """The baselines with the toy benchmark's settings (configs/method/*.yaml), Grad-CAM at layer 0."""
    b = backbone(world)
    runs = {
        "rollout": (BASELINE + "AttentionRollout", {"start_layer": 0}),
        "legrad": (BASELINE + "LeGrad", {"start_layer": 0, "readout": "pooled"}),
        "grad_eclip": (BASELINE + "GradECLIP", {}),
        "rise": (BASELINE + "RISE", {"masks": 500, "grid": 7, "p": 0.5, "text_masks": 256, "seed": seed}),
        "gradcam": (BASELINE + "GradCAM", {"vision_layer": 0, "text_layer": 0}),
        "saliency": (BASELINE + "GradientSaliency", {"text_layer": -1}),
        "random": (BASELINE + "RandomMap", {"seed": seed}),
    }
    cls, args = runs[name]
    return {"class_path": cls, "init_args": {"backbone": b, **args}}


def model_for(world: str, run: str, seed: int) -> dict[str, Any]:
    """``run`` is ``<baseline>``, ``<variant>@<layers>`` or either with module options after ``#``,
    e.g. ``spt_b1@-1#steps=30#copies=20``."""
    run, *options = run.split("#")
    model = model_for_plain(world, run, seed)
    for option in options:
        key, value = option.split("=")
        model["init_args"][key] = json.loads(value)
    return model


def model_for_plain(world: str, run: str, seed: int) -> dict[str, Any]:
    if "@" not in run:
        return baseline_model(world, run, seed)
    name, layers = run.split("@")
    if layers.startswith("J"):  # one mask shared by the layers, one forward pass (JointM2IB)
        model = ib_model(world, name, [int(x) for x in layers[1:].split("+")], seed)
        model["class_path"] = "m2ib_lightning.JointM2IB"
        return model
    if name.startswith("nib"):  # nib@<vision layer>, text at -1; nib<steps>@<layer>
        steps = int(name[3:] or 10)
        return {"class_path": "m2ib_lightning.NIBAttribution",
                "init_args": {"backbone": backbone(world), "vision_layer": int(layers), "text_layer": -1,
                              "steps": steps}}
    return ib_model(world, name, [int(x) for x in layers.split("+")], seed)


def make_twin(world: str, scale: float = 10.0) -> Path:
    """Save the world's CLIP with its residual stream ``scale`` times larger (both towers): the vision
    pre-norm and the text token and position embeddings scaled, and every block's two residual
    branches (attention and MLP outputs). Pre-norm blocks and the final norms do not see the scale
    (up to their ``eps``), so the embeddings are the original's; the hidden states are ``scale`` x."""
    import torch
    from transformers import CLIPModel, CLIPProcessor

    source = ROOT / WORLDS[world]["model"]
    out = ROOT / WORLDS[f"{world}_x10"]["model"]
    model = CLIPModel.from_pretrained(source)
    with torch.no_grad():
        vision, text = model.vision_model, model.text_model
        for p in (vision.pre_layrnorm.weight, vision.pre_layrnorm.bias, text.embeddings.token_embedding.weight,
                  text.embeddings.position_embedding.weight):
            p.mul_(scale)
        for tower in (vision, text):
            for layer in tower.encoder.layers:
                for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                    linear.weight.mul_(scale)
                    linear.bias.mul_(scale)
    model.save_pretrained(out)
    CLIPProcessor.from_pretrained(source).save_pretrained(out)
    return out


def validation_pairs(out: Path, world: str, split: str = "validation") -> Path:
    """Scenes of the ``validation`` stream (not the benchmark's): where settings are chosen.

    ``validation``: its scenes 0-63 (the screening set); ``validation2``: its scenes 64-191, a second,
    larger set on which the finalists of the screening are confirmed.
    """
    world = world.removesuffix("_x10")
    folder = out / world / f"{split}-scenes"
    if (folder / "pairs.jsonl").is_file():
        return folder / "pairs.jsonl"
    first, stop = (0, 64) if split == "validation" else (64, 192)
    if world == "toy":
        from m2ib_lightning.assets.scenes import make_benchmark

        pairs = make_benchmark(folder, n=stop, seed="validation", prefix="val")
    else:
        from m2ib_lightning.assets.world2 import make_world2

        pairs = make_world2(folder, n=stop, seed="validation", prefix="val")
    lines = pairs.read_text().splitlines()[first:]
    pairs.write_text("\n".join(lines) + "\n")
    return pairs


def run_one(out: Path, world: str, split: str, run: str, seed: int, extra: list[str]) -> dict[str, Any]:
    from m2ib_lightning.run.cli import main

    run_dir = out / world / split / (run if seed == 0 else f"{run}~seed{seed}")
    done = run_dir / "attributions" / "results.json"
    if done.is_file():
        return json.loads(done.read_text())
    if run_dir.exists():  # an unfinished run: the writer would pass over its samples
        shutil.rmtree(run_dir)
    args = ["fit", "-c", str(ROOT / WORLDS[world]["config"]), f"--model={json.dumps(model_for(world, run, seed))}",
            "--seed_everything", str(seed), "--trainer.default_root_dir", str(run_dir),
            "--trainer.enable_progress_bar", "false", "--writer.overlays", "0"]
    if split.startswith("validation"):
        sides = ["vision"]
        args += ["--data.init_args.data_files", str(validation_pairs(out, world, split)),
                 "--evaluation.metrics", json.dumps(VALIDATION_METRICS)]
        args += ["--model.init_args.sides", json.dumps(sides)]
    print(f"== {world} {split} {run} seed {seed}", flush=True)
    start = time.perf_counter()
    main(args + extra)
    results = json.loads(done.read_text())
    results["run_wall_s"] = round(time.perf_counter() - start, 1)
    done.write_text(json.dumps(results, indent=2) + "\n")
    return results


def by_kind(run_dir: Path, pairs: Path) -> dict[str, float]:
    """World 2: the pointing game of each caption kind (single, count, relation), from the records."""
    from m2ib_lightning import load_attributions

    kinds = {row["id"]: row.get("kind") for row in map(json.loads, pairs.read_text().splitlines())}
    records = load_attributions(run_dir / "attributions")
    values: dict[str, list[float]] = {}
    for sample_id in records:
        values.setdefault(str(kinds[sample_id]), []).append(records[sample_id].metrics["image/pointing_game"])
    return {k: sum(v) / len(v) for k, v in sorted(values.items())}


def table(out: Path, world: str, split: str, runs: list[str] | None = None, kinds: bool = False) -> str:
    folder = out / world / split
    found: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(folder.glob("*/attributions/results.json")):
        name = path.parent.parent.name.split("~seed")[0]
        if runs is None or name in runs:
            found.setdefault(name, []).append(json.loads(path.read_text()))
    names = runs if runs is not None else sorted(found)
    metrics = [c for c in COLUMNS if any(c[0] in r["metrics"] for rs in found.values() for r in rs)]
    heads = [f"{h} {'↑' if up else '↓'}" for _, h, up in metrics]
    pairs = (validation_pairs(out, world, split) if split.startswith("validation")
             else ROOT / WORLDS[world]["pairs"])
    kind_names = ["single", "count", "relation"] if kinds else []
    heads += [f"PG {k}" for k in kind_names]
    lines = ["| run | seeds | " + " | ".join(heads) + " | method s |", "|---" * (len(heads) + 3) + "|"]
    for name in names:
        if name not in found:
            continue
        rs = found[name]
        cells = []
        for m, _, _ in metrics:
            values = [r["metrics"][m] for r in rs if m in r["metrics"]]
            cells.append(f"{sum(values) / len(values):.3f}" if values else "-")
        if kind_names:
            dirs = [folder / (name if i == 0 else f"{name}~seed{i}") for i in range(len(rs))]
            per = [by_kind(d, pairs) for d in dirs if (d / "attributions").is_dir()]
            cells += [f"{sum(p.get(k, float('nan')) for p in per) / len(per):.3f}" for k in kind_names]
        secs = sum(r.get("explain_s", float("nan")) for r in rs) / len(rs)
        lines.append(f"| {name} | {len(rs)} | " + " | ".join(cells) + f" | {secs:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["validate", "confirm", "measure", "table", "twin"])
    parser.add_argument("--world", choices=sorted(WORLDS), required=True)
    parser.add_argument("--runs", nargs="*", default=None)
    parser.add_argument("--seeds", type=int, nargs="*", default=[0])
    parser.add_argument("--split", default=None, help="table: validation or benchmark")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "ib_variants")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--kinds", action="store_true", help="world 2: the pointing game per caption kind")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.command == "twin":
        print(make_twin(args.world))
        return
    split = args.split or {"validate": "validation", "confirm": "validation2"}.get(args.command, "benchmark")
    if args.command != "table":
        for run in args.runs or []:
            for seed in args.seeds:
                run_one(args.out, args.world, split, run, seed, extra)
    print(table(args.out, args.world, split, args.runs, kinds=args.kinds), flush=True)


if __name__ == "__main__":
    main()
