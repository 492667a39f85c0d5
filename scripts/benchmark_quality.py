"""Quality benchmark: M2IB against every baseline on the grounded synthetic benchmark, one command.

    python scripts/benchmark_quality.py

For every method config under ``configs/methods/`` and every seed it runs
``python train.py fit -c configs/toy_benchmark.yaml -c configs/methods/<method>.yaml`` (in this
process, through the same CLI) with the evaluation callback on, collects each run's
``results.json``, and prints a markdown table of mean +- std over seeds with the method's own wall
time. The table is written to ``<out>/results.md`` (and everything to ``<out>/results.json``), and
replaces the blocks between ``<!-- results:begin -->`` / ``<!-- results:end -->`` (full table) in
``docs/evaluation.md`` and ``<!-- results-short:begin -->`` / ``<!-- results-short:end -->`` in
``README.md``; the bottleneck variants' rows (reference, per-token, IBA-style, and the random
chance level) also fill ``<!-- variants:begin -->`` in ``docs/variants.md``. It also sweeps
M2IB's bottleneck layer and beta on validation scenes (another scene stream) and runs the
cascading model-parameter randomisation check of every method (blocks ``sweep`` and ``sanity`` of
``docs/evaluation.md``); ``--no-sweep`` / ``--no-sanity`` skip them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

METHODS = ["m2ib", "m2ib_layer2", "m2ib_per_token", "m2ib_iba", "gradcam", "rollout", "rise", "saliency", "random"]
# The bottleneck variants' comparison (docs/variants.md): same protocol, only the bottleneck changes.
VARIANTS = ["m2ib", "m2ib_per_token", "m2ib_iba", "random"]
NAMES = {"m2ib": "M2IB (layer 0)", "m2ib_layer2": "M2IB (layer 2)", "m2ib_per_token": "PerTokenM2IB (layer 0)",
         "m2ib_iba": "IBAStyleM2IB (layer 0)", "gradcam": "Grad-CAM (layer 0)",
         "rollout": "Chefer et al. rollout", "rise": "RISE (500 masks)", "saliency": "Gradient saliency",
         "random": "Random"}
COLUMNS = [  # (metric, header, higher is better)
    ("image/pointing_game", "Pointing game", True),
    ("image/energy_pointing_game", "Energy PG", True),
    ("image/mask_auroc", "Mask AUROC", True),
    ("image/deletion_auc", "Deletion AUC", False),
    ("image/insertion_auc", "Insertion AUC", True),
    ("image/confidence_drop", "Img drop", False),
    ("image/confidence_increase", "Img incr.", True),
    ("text/confidence_drop", "Txt drop", False),
    ("text/confidence_increase", "Txt incr.", True),
]
SHORT = ["image/pointing_game", "image/energy_pointing_game", "image/mask_auroc", "image/deletion_auc",
         "image/insertion_auc"]


def run_one(method: str, seed: int, out: Path, limit: int | None, extra: list[str]) -> dict[str, Any]:
    from m2ib_lightning.cli import main

    run_dir = out / method / f"seed{seed}"
    if run_dir.exists():  # the writer appends and a rerun would pass over finished samples
        shutil.rmtree(run_dir)
    args = ["fit", "-c", str(ROOT / "configs" / "toy_benchmark.yaml"), "-c", str(ROOT / "configs" / "methods" /
                                                                                    f"{method}.yaml"),
            "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--writer.overlays", "4" if seed == 0 else "0"]
    if limit is not None:
        args += ["--data.init_args.limit", str(limit)]
    start = time.perf_counter()
    main(args + extra)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "attributions" / "results.json").read_text())
    results["run_wall_s"] = round(wall, 2)
    return results


def sweep(out: Path, layers: list[int], betas: list[float], scenes: int = 64, seed: int = 0) -> str:
    """M2IB's vision map across bottleneck layers and betas, on VALIDATION scenes (another scene
    stream than the benchmark's, so choosing the layer here does not tune on the test scenes)."""
    from m2ib_lightning.cli import main
    from m2ib_lightning.synthetic import make_benchmark

    validation = make_benchmark(out / "validation-scenes", n=scenes, seed="validation", prefix="val")

    metrics = ["image/pointing_game", "image/energy_pointing_game", "image/mask_auroc"]
    lines = ["| vision layer | beta | Pointing game ↑ | Energy PG ↑ | Mask AUROC ↑ |", "|---|---|---|---|---|"]
    for layer in layers:
        for beta in betas:
            run_dir = out / "sweep" / f"layer{layer}-beta{beta}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            bottleneck = json.dumps({"class_path": "m2ib_lightning.M2IB", "init_args": {"beta": beta}})
            args = ["fit", "-c", str(ROOT / "configs" / "toy_benchmark.yaml"), "-c", str(ROOT / "configs" / "methods" /
                                                                                            "m2ib.yaml"),
                    "--model.init_args.sides", "[vision]", "--model.init_args.vision_layer", str(layer),
                    "--model.init_args.vision_bottleneck", bottleneck, "--model.init_args.seed", str(seed),
                    "--evaluation.metrics", json.dumps(metrics), "--trainer.default_root_dir", str(run_dir),
                    "--trainer.enable_progress_bar", "false", "--writer.overlays", "0",
                    "--data.init_args.data_files", str(validation)]
            print(f"== sweep layer {layer} beta {beta}", flush=True)
            main(args)
            values = json.loads((run_dir / "attributions" / "results.json").read_text())["metrics"]
            lines.append(f"| {layer} | {beta:g} | " + " | ".join(f"{values[m]:.3f}" for m in metrics) + " |")
    return "\n".join(lines)


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(runs: dict[str, list[dict[str, Any]]], columns: list[tuple[str, str, bool]], with_time: bool) -> str:
    header = ["Method", *[f"{h} {'↑' if up else '↓'}" for _, h, up in columns]]
    if with_time:
        header += ["Method time (s)", "Pairs/s"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    for method, results in runs.items():
        cells = [NAMES.get(method, method)]
        for metric, _, _ in columns:
            values = [r["metrics"][metric] for r in results if r["metrics"].get(metric) is not None]
            percent = "confidence" in metric
            cells.append(fmt(values, 2 if percent else 3))
        if with_time:
            times = [r["explain_s"] for r in results]
            samples = results[0]["samples"].get("image/pointing_game") or max(results[0]["samples"].values())
            cells += [fmt(times, 1), f"{samples / statistics.fmean(times):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_block(path: Path, tag: str, text: str) -> bool:
    if not path.exists():
        return False
    content = path.read_text()
    # The block may be empty (begin and end on consecutive lines) or hold an earlier table.
    pattern = re.compile(rf"(<!-- {tag}:begin -->\n).*?(<!-- {tag}:end -->)", re.S)
    if not pattern.search(content):
        return False
    path.write_text(pattern.sub(lambda m: m.group(1) + text.rstrip("\n") + "\n" + m.group(2), content))
    return True


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=METHODS, help="method configs under configs/methods/")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="method seeds")
    parser.add_argument("--limit", type=int, default=None, help="first N scenes only (default: all 128)")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "benchmark", help="run directories")
    parser.add_argument("--no-sanity", dest="sanity", action="store_false",
                        help="skip the cascading model-parameter randomisation check")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the sweep of M2IB's vision layer and beta on validation scenes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/evaluation.md and README.md")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more CLI overrides for every run")
    args = parser.parse_args(argv)
    extra = [a for a in args.extra if a != "--"]
    here = os.getcwd()
    os.chdir(ROOT)  # the configs name their files relative to the repository root
    try:
        return run(args, extra)
    finally:
        os.chdir(here)


def run(args: argparse.Namespace, extra: list[str]) -> dict[str, Any]:

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {}
    for method in args.methods:
        runs[method] = []
        for seed in args.seeds:
            print(f"== {method} seed {seed}", flush=True)
            runs[method].append(run_one(method, seed, args.out, args.limit, extra))
    full = table(runs, COLUMNS, with_time=True)
    short = table(runs, [c for c in COLUMNS if c[0] in SHORT], with_time=False)
    first = runs[args.methods[0]][0]
    samples = max(first["samples"].values())
    ev = first["evaluation"]  # the protocol as the runs applied it (overrides after -- included)
    footer = (f"{samples} scenes of `data/toy`, seeds {args.seeds} (mean ± std over seeds), toy CLIP "
              f"`{first['backbone']}`; pointing game with a {ev['tolerance']:g} px tolerance; deletion to the "
              f"{ev['deletion_baseline']} image, insertion from the {ev['insertion_baseline']} image, "
              f"{ev['steps']} steps; confidence drop/increase in %. Method time: the "
              f"method's own time for all scenes (data loading, writing and metrics excluded), "
              f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, torch "
              f"{torch.__version__}. Wall time of this table's runs {time.perf_counter() - started:.0f} s (the sweep "
              f"and the sanity check come on top). "
              f"Regenerate: `python scripts/benchmark_quality.py`.")
    report: dict[str, Any] = {"runs": runs, "table": full, "short_table": short, "footer": footer}
    if args.sanity:
        from m2ib_lightning.evaluation import sanity_table

        # The variants' randomisation behaves like the reference's; their pre-pass is not rerun here.
        report["sanity"] = sanity_table([m for m in args.methods if m not in ("m2ib_per_token", "m2ib_iba")],
                                        ROOT, limit=16)
        report["sanity_table"] = report["sanity"]["table"]
    if args.sweep:
        report["sweep_table"] = sweep(args.out, [0, 1, 2], [0.01, 0.1, 1.0])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = full + "\n\n" + footer
    if args.sanity:
        text += "\n\n" + report["sanity_table"]
    if args.sweep:
        text += "\n\n" + report["sweep_table"]
    (args.out / "results.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    if not args.no_docs:
        blocks = [(ROOT / "docs" / "evaluation.md", "results", full + "\n\n" + footer),
                  (ROOT / "README.md", "results-short", short)]
        variants = {m: runs[m] for m in VARIANTS if m in runs}
        if len(variants) > 1:
            blocks.append((ROOT / "docs" / "variants.md", "variants",
                           table(variants, COLUMNS, with_time=True) + "\n\n" + footer))
        for path, tag, block in blocks:
            if replace_block(path, tag, block):
                print(f"updated {path.relative_to(ROOT)}")
        if args.sanity:
            replace_block(ROOT / "docs" / "evaluation.md", "sanity", report["sanity_table"])
        if args.sweep:
            replace_block(ROOT / "docs" / "evaluation.md", "sweep", report["sweep_table"])
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
