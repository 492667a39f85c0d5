"""Quality benchmark: the IB family against every baseline on a grounded synthetic world, one command.

    python scripts/benchmark_quality.py                  # data/toy (128 scenes, the 4-block toy CLIP)
    python scripts/benchmark_quality.py --world world2   # data/world2 (200 scenes, the 6-block world-2 CLIP)

For every method fragment under ``configs/method/`` and every seed it runs
``python train.py fit -c configs/<world>_benchmark.yaml -c configs/method/<method>.yaml`` (in this
process, through the same CLI) with the evaluation on, collects each run's ``results.json``, and
prints a markdown table of mean +- standard error over seeds with the method's own time per pair.

With ``--selection`` (the default) it first runs the label-free selection, ``python -m
m2ib_lightning.select`` with its defaults, on the first 32 scenes of the world's ``validation``
stream (other scenes than the benchmark's, masks left out), and adds the fragment it writes as one
more method (``select``, the same seeds); the table then closes with the pick next to the best IB
row found with labels (the highest pointing game) and whether the pick is within one standard
error of it.

The table is written to ``<out>/<world>/results.md`` (and everything to ``results.json``), and
replaces the blocks between ``<!-- results:begin -->`` / ``<!-- results:end -->`` (toy) or
``<!-- world2-results:begin -->`` (world 2) in ``docs/evaluation.md`` and ``<!-- results-short:begin -->``
(``results-short-world2``) in ``README.md``; the bottleneck variants' rows fill ``<!-- variants:begin -->``
(``variants-world2``) in ``docs/variants.md``. On the toy world it also sweeps M2IB's bottleneck layers and
beta on validation scenes, vision and text separately, with the text metric of fixed keep-one-word rules
beside the text sweep, and runs the cascading model-parameter randomisation check of every method (blocks
``sweep``, ``text-sweep`` and ``sanity`` of ``docs/evaluation.md``); ``--no-sweep`` / ``--no-sanity`` skip
them (world 2 has its own sweep: ``scripts/world2_benchmark.py sweep``).
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

WORLDS = {"toy": {"config": "configs/toy_benchmark.yaml", "results": "results", "short": "results-short",
                  "variants": "variants", "label": "`data/toy`"},
          "world2": {"config": "configs/world2_benchmark.yaml", "results": "world2-results",
                     "short": "results-short-world2", "variants": "variants-world2", "label": "`data/world2`"}}
# The IB family (the reference first), then the baselines.
IB = ["m2ib", "m2ib_layer2", "m2ib_per_token", "m2ib_iba", "m2ib_smooth", "m2ib_scaled", "m2ib_scaled_per_token",
      "m2ib_multilayer", "m2ib_joint", "nib"]
METHODS = [*IB, "gradcam", "rollout", "legrad", "grad_eclip", "rise", "saliency", "random"]
# The bottleneck variants' comparison (docs/variants.md): same protocol, only the bottleneck (or the IB module) changes.
VARIANTS = [*IB, "random"]
# "layers v / t": the vision and text bottleneck layers (-1: the token embeddings).
NAMES = {"m2ib": "M2IB (layers 0 / -1)", "m2ib_layer2": "M2IB (layers 2 / 2)",
         "m2ib_per_token": "PerTokenM2IB (layers 0 / -1)", "m2ib_iba": "IBAStyleM2IB (layers 0 / -1)",
         "m2ib_smooth": "SmoothM2IB (layers 0 / -1)", "m2ib_scaled": "ScaledM2IB (layers 0 / -1)",
         "m2ib_scaled_per_token": "ScaledPerTokenM2IB (layers 0 / -1)",
         "m2ib_multilayer": "MultiLayerM2IB, ScaledPerToken (layers -1+0 / -1)",
         "m2ib_joint": "JointM2IB, ScaledPerToken (layers -1,0,1 / -1)", "nib": "NIB, narrowing (layers 0 / -1)",
         "select": "**label-free pick** (`m2ib_lightning.select`)",
         "gradcam": "Grad-CAM (layer 0)",
         "rollout": "Chefer et al. rollout", "legrad": "LeGrad", "grad_eclip": "Grad-ECLIP",
         "rise": "RISE (500 masks)", "saliency": "Gradient saliency",
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
# README's short table: the label-free pick, the reference, the best single variant and every baseline
HEADLINE = ["select", "m2ib", "m2ib_scaled_per_token", "m2ib_multilayer", "rollout", "legrad", "grad_eclip", "rise",
            "gradcam", "saliency", "random"]
SHORT = ["image/pointing_game", "image/energy_pointing_game", "image/mask_auroc", "image/deletion_auc",
         "image/insertion_auc"]


def method_config(method: str, out: Path) -> list[str]:
    """The ``-c`` options of a method: its fragment, or for ``select`` the m2ib fragment and the pick."""
    if method == "select":
        return ["-c", str(ROOT / "configs" / "method" / "m2ib.yaml"), "-c", str(out / "selected.yaml")]
    return ["-c", str(ROOT / "configs" / "method" / f"{method}.yaml")]


def run_one(method: str, seed: int, out: Path, limit: int | None, extra: list[str], world: str = "toy",
            reuse: bool = False) -> dict[str, Any]:
    from m2ib_lightning.run.cli import main

    run_dir = out / method / f"seed{seed}"
    done = run_dir / "attributions" / "results.json"
    if reuse and done.exists():
        return {**json.loads(done.read_text()), "reused": True}
    if run_dir.exists():  # the writer appends and a rerun would pass over finished samples
        shutil.rmtree(run_dir)
    args = ["fit", "-c", str(ROOT / WORLDS[world]["config"]), *method_config(method, out),
            "--seed_everything", str(seed), "--model.init_args.seed", str(seed),
            "--trainer.default_root_dir", str(run_dir), "--trainer.enable_progress_bar", "false",
            "--writer.overlays", "4" if seed == 0 else "0"]
    if limit is not None:
        args += ["--data.init_args.limit", str(limit)]
    if method == "m2ib_iba" and world != "toy":  # the fragment's statistics caches are the toy CLIP's
        for side, layer in (("vision", "layer0"), ("text", "embeddings")):
            args += [f"--model.init_args.{side}_bottleneck.init_args.stats_file",
                     str(ROOT / "outputs" / "benchmark" / "iba_stats" / f"{world}-clip-{layer}-{side}.safetensors")]
    start = time.perf_counter()
    main(args + extra)
    wall = time.perf_counter() - start
    results = json.loads((run_dir / "attributions" / "results.json").read_text())
    results["run_wall_s"] = round(wall, 2)
    return results


SWEEP_METRICS = {"vision": ["image/pointing_game", "image/energy_pointing_game", "image/mask_auroc"],
                 "text": ["text/confidence_drop", "text/confidence_increase"]}
# A toy caption is "a <colour> <shape>": its three words, in order.
WORDS = ["article", "colour", "shape"]


def validation_scenes(out: Path, scenes: int = 64, world: str = "toy") -> Path:
    """Scenes of another stream than the benchmark's, so choosing settings on them does not tune on the test scenes."""
    if world == "world2":
        from m2ib_lightning.assets.world2 import make_world2

        return make_world2(out / "validation-scenes", n=scenes, seed="validation", prefix="val")
    from m2ib_lightning.assets.scenes import make_benchmark

    return make_benchmark(out / "validation-scenes", n=scenes, seed="validation", prefix="val")


def select(out: Path, world: str, pairs: int = 32, reuse: bool = False) -> tuple[str, float]:
    """The label-free pick: ``python -m m2ib_lightning.select`` with its defaults (every layer of both sides,
    every variant that needs no extra input) on ``pairs`` validation scenes, masks left out; writes
    ``out/selected.yaml`` and returns what it chose and the seconds it took (``reuse``: an earlier run's)."""
    from m2ib_lightning.select import main as select_main

    scenes = validation_scenes(out, pairs, world)
    fragment, timing = out / "selected.yaml", out / "selection-seconds.txt"
    if not (reuse and fragment.exists() and timing.exists()):
        start = time.perf_counter()
        select_main(["-c", str(ROOT / WORLDS[world]["config"]), "--data.init_args.data_files", str(scenes),
                     "--data.init_args.extra_columns", "[]", "--limit", str(pairs), "--out", str(fragment),
                     "--scores", str(out / "selection-scores.json"), "--quiet"])
        timing.write_text(f"{time.perf_counter() - start:.1f}\n")
    model = yaml_load(fragment).get("model", {}).get("init_args", {})
    parts = []
    for side in ("vision", "text"):
        layers = model.get(f"{side}_layers")
        layer = "+".join(map(str, layers)) if layers else model.get(f"{side}_layer", "as configured")
        cls = (model.get(f"{side}_bottleneck") or {}).get("class_path", "as configured").rsplit(".", 1)[-1]
        parts.append(f"{side} layer {layer} {cls}")
    return ", ".join(parts), float(timing.read_text())


def yaml_load(path: Path) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(path.read_text()) or {}


def word_stats(directory: Path) -> list[float]:
    """The mean score of a caption's words (on the [0, 1] scale that BOS and EOS share), then the
    fraction of captions whose highest-scoring word is the article, the colour or the shape."""
    from m2ib_lightning import load_attributions

    records = load_attributions(directory)
    counts = dict.fromkeys(WORDS, 0)
    total = 0.0
    for sample_id in records:
        scores = records[sample_id].text_scores[1:-1]  # BOS and EOS off: the three words
        if len(scores) != len(WORDS):
            raise ValueError(f"word_stats expects captions of exactly three words; {sample_id} has {len(scores)}")
        counts[WORDS[int(scores.argmax())]] += 1
        total += float(scores.mean())
    return [total / len(records), *(c / len(records) for c in counts.values())]


def sweep(out: Path, side: str, layers: list[int], betas: list[float], scenes: int = 64, seed: int = 0) -> str:
    """M2IB's ``side`` map across bottleneck layers and betas, on validation scenes."""
    from m2ib_lightning.run.cli import main

    validation = validation_scenes(out, scenes)
    metrics = SWEEP_METRICS[side]
    headers = [f"{side} layer", "beta", *(f"{h} {'↑' if up else '↓'}" for m, h, up in COLUMNS if m in metrics)]
    if side == "text":
        headers += ["mean word score", *(f"top word: {w}" for w in WORDS)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] * len(headers)) + "|"]
    for layer in layers:
        for beta in betas:
            run_dir = out / f"sweep-{side}" / f"{'embeddings' if layer < 0 else f'layer{layer}'}-beta{beta}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            bottleneck = json.dumps({"class_path": "m2ib_lightning.M2IB", "init_args": {"beta": beta}})
            args = ["fit", "-c", str(ROOT / "configs" / "toy_benchmark.yaml"), "-c", str(ROOT / "configs" / "method" /
                                                                                            "m2ib.yaml"),
                    "--model.init_args.sides", f"[{side}]", f"--model.init_args.{side}_layer", str(layer),
                    f"--model.init_args.{side}_bottleneck", bottleneck, "--model.init_args.seed", str(seed),
                    "--evaluation.metrics", json.dumps(metrics), "--trainer.default_root_dir", str(run_dir),
                    "--trainer.enable_progress_bar", "false", "--writer.overlays", "0",
                    "--data.init_args.data_files", str(validation)]
            print(f"== sweep {side} layer {layer} beta {beta}", flush=True)
            main(args)
            values = json.loads((run_dir / "attributions" / "results.json").read_text())["metrics"]
            cells = [str(layer), f"{beta:g}", *(f"{values[m]:.{2 if 'confidence' in m else 3}f}" for m in metrics)]
            if side == "text":
                cells += [f"{v:.2f}" for v in word_stats(run_dir / "attributions")]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def word_rules(out: Path, scenes: int = 64) -> str:
    """The text metric for fixed rules that keep one word of every caption (the article, the colour or
    the shape), on the validation scenes: what the metric rewards on this benchmark, method aside."""
    import torch
    from PIL import Image

    from m2ib_lightning import CLIPBackbone, Preprocessor
    from m2ib_lightning.evaluation import similarity
    from m2ib_lightning.evaluation.metrics import confidence_drop, confidence_increase
    from m2ib_lightning.methods.baselines import drop_tokens

    pairs = validation_scenes(out, scenes)
    rows = [json.loads(line) for line in pairs.read_text().splitlines()]
    backbone = CLIPBackbone(str(ROOT / "data" / "toy" / "toy-clip"))
    batch = Preprocessor.from_backbone(backbone)([Image.open(pairs.parent / r["image"]).convert("RGB") for r in rows],
                                                 [r["caption"] for r in rows])
    lengths = batch["attention_mask"].sum(1)
    if not bool((lengths == len(WORDS) + 2).all()):
        raise ValueError("word_rules expects captions of exactly three words")
    lines = ["| rule | Txt drop ↓ | Txt incr. ↑ |", "|---|---|---|"]
    with torch.no_grad():
        image = backbone.embed("vision", {"pixel_values": batch["pixel_values"]}).float()
        text_inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        s = similarity(backbone, "text", text_inputs, image)
        for i, word in enumerate(WORDS):
            keep = torch.ones_like(batch["input_ids"], dtype=torch.bool)
            keep[:, 1:1 + len(WORDS)] = False
            keep[:, 1 + i] = True
            ids = drop_tokens(batch["input_ids"], keep)
            masked = similarity(backbone, "text", {**text_inputs, "input_ids": ids}, image)
            lines.append(f"| keep only the {word} | {float(confidence_drop(s, masked)):.2f} | "
                         f"{float(confidence_increase(s, masked)):.2f} |")
    return "\n".join(lines)


def mean_se(values: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for one value)."""
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int) -> str:
    if not values:
        return "-"
    mean, se = mean_se(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def table(runs: dict[str, list[dict[str, Any]]], columns: list[tuple[str, str, bool]], with_time: bool) -> str:
    header = ["Method", *[f"{h} {'↑' if up else '↓'}" for _, h, up in columns]]
    if with_time:
        header += ["Method time (s)", "s / pair"]
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
            cells += [fmt(times, 1), f"{statistics.fmean(times) / samples:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def wall_text(runs: dict[str, list[dict[str, Any]]], seconds: float) -> str:
    """This invocation's wall time, saying so when some runs were reused from an earlier one (``--reuse``)."""
    reused = sum(1 for results in runs.values() for r in results if r.get("reused"))
    if not reused:
        return f"{seconds:.0f} s"
    total = sum(len(results) for results in runs.values())
    return (f"not measured ({reused} of {total} runs reused from an earlier invocation with --reuse; "
            f"{seconds:.0f} s for the rest)")


def comparison(runs: dict[str, list[dict[str, Any]]], picked: str, seconds: float) -> str:
    """The label-free pick next to the best IB row by pointing game (the choice one would make with labels).

    The standard error here is the scenes' (``sqrt(p (1 - p) / n)`` for a pointing game ``p`` over ``n``
    scenes, seeds averaged): how far another draw of scenes could move the figure, the uncertainty a
    choice between settings has to beat. The seeds' standard error in the tables is far smaller on
    these benchmarks (the noise moves a map little) and says nothing about the scenes."""
    pg = "image/pointing_game"

    def stats(method: str) -> tuple[float, float]:
        mean = mean_se([r["metrics"][pg] for r in runs[method]])[0]
        n = runs[method][0].get("samples", {}).get(pg) or 0
        return mean, (mean * (1 - mean) / n) ** 0.5 if n else 0.0

    ib = [m for m in runs if m in IB]  # the configurations one could choose from with labels
    best = max(ib, key=lambda m: stats(m)[0]) if ib else "select"
    (p, p_se), (b, b_se) = stats("select"), stats(best)
    within = p >= b - b_se
    baselines = [m for m in runs if m not in IB and m not in ("select", "random")]
    top = max(baselines, key=lambda m: stats(m)[0]) if baselines else None
    lines = ["| | setting | Pointing game ± SE over scenes |", "|---|---|---|",
             f"| label-free pick ({seconds:.0f} s on 32 validation scenes, no masks) | {picked} "
             f"| {p:.3f} ± {p_se:.3f} |",
             f"| best IB row with labels | {NAMES.get(best, best)} | {b:.3f} ± {b_se:.3f} |"]
    if top is not None:
        t, t_se = stats(top)
        lines.append(f"| best baseline | {NAMES.get(top, top)} | {t:.3f} ± {t_se:.3f} |")
    verdict = "within" if within else "NOT within"
    return "\n".join(lines) + (f"\n\nThe pick is {verdict} one standard error of the labelled best "
                                f"(PG >= {b - b_se:.3f}).")


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
    parser.add_argument("--world", choices=sorted(WORLDS), default="toy", help="the grounded world (default toy)")
    parser.add_argument("--methods", nargs="+", default=METHODS, help="method fragments under configs/method/")
    parser.add_argument("--no-selection", dest="selection", action="store_false",
                        help="leave out the label-free pick (python -m m2ib_lightning.select on validation scenes)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="method seeds")
    parser.add_argument("--limit", type=int, default=None, help="first N scenes only (default: all)")
    parser.add_argument("--out", type=Path, default=None, help="run directories (default outputs/benchmark/<world>)")
    parser.add_argument("--no-sanity", dest="sanity", action="store_false",
                        help="skip the cascading model-parameter randomisation check")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the sweeps of M2IB's layers and beta on validation scenes")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--reuse", action="store_true",
                        help="keep the runs whose results.json is already under --out (an interrupted table)")
    parser.add_argument("--no-docs", action="store_true", help="do not update docs/evaluation.md and README.md")
    parser.add_argument("extra", nargs=argparse.REMAINDER, help="after --: more CLI overrides for every run")
    args = parser.parse_args(argv)
    args.out = args.out or ROOT / "outputs" / "benchmark" / args.world
    if args.world != "toy":  # the layer/beta sweeps and the word rules are the toy world's
        args.sweep = False
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
    world = WORLDS[args.world]
    methods = list(args.methods)
    picked = None
    if args.selection:
        print("== select (label-free, 32 validation scenes)", flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        picked, picked_s = select(args.out, args.world, reuse=args.reuse)
        methods.insert(0, "select")
    runs: dict[str, list[dict[str, Any]]] = {}
    for method in methods:
        runs[method] = []
        for seed in args.seeds:
            print(f"== {method} seed {seed}", flush=True)
            runs[method].append(run_one(method, seed, args.out, args.limit, extra, args.world, args.reuse))
    full = table(runs, COLUMNS, with_time=True)
    headline = {m: r for m, r in runs.items() if m in HEADLINE} or runs  # README: the headline rows only
    short = table(headline, [c for c in COLUMNS if c[0] in SHORT], with_time=False)
    first = runs[methods[0]][0]
    samples = max(first["samples"].values())
    ev = first["evaluation"]  # the protocol as the runs applied it (overrides after -- included)
    rule = " at 224 px, scaled to the map's size" if ev.get("tolerance_units", "pixels") == "relative" else ""
    footer = (f"{samples} scenes of {world['label']}, seeds {args.seeds} (mean ± standard error over seeds), CLIP "
              f"`{first['backbone']}`; IB rows name their bottleneck layers (vision / text), -1 being the "
              f"token embeddings; pointing game with a {ev['tolerance']:g} px tolerance{rule}; deletion to the "
              f"{ev['deletion_baseline']} image, insertion from the {ev['insertion_baseline']} image, "
              f"{ev['steps']} steps; confidence drop/increase in %. Method time: the "
              f"method's own time for all scenes (data loading, writing and metrics excluded), "
              f"{torch.get_num_threads()} CPU threads, {platform.processor() or platform.machine()}, torch "
              f"{torch.__version__}. Wall time of this table's runs "
              f"{wall_text(runs, time.perf_counter() - started)} (the sweep "
              f"and the sanity check come on top). "
              f"Regenerate: `python scripts/benchmark_quality.py --world {args.world}`.")
    report: dict[str, Any] = {"runs": runs, "table": full, "short_table": short, "footer": footer}
    if picked is not None:
        report["selection"] = comparison(runs, picked, picked_s)
        full += "\n\n" + report["selection"]
        short += "\n\n" + report["selection"]
    if args.sanity:
        from m2ib_lightning.assets.quality import sanity_table

        # The variants' randomisation behaves like the reference's; their pre-pass is not rerun here.
        report["sanity"] = sanity_table([m for m in args.methods if m in ("m2ib", "m2ib_layer2") or m not in IB],
                                        ROOT, limit=16)
        report["sanity_table"] = report["sanity"]["table"]
    if args.sweep:
        report["sweep_table"] = sweep(args.out, "vision", [-1, 0, 1, 2], [0.01, 0.1, 1.0])
        report["text_sweep_table"] = (sweep(args.out, "text", [-1, 0, 1, 2], [0.01, 0.1, 1.0]) + "\n\n"
                                      + word_rules(args.out))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    text = full + "\n\n" + footer
    if args.sanity:
        text += "\n\n" + report["sanity_table"]
    if args.sweep:
        text += "\n\n" + report["sweep_table"] + "\n\n" + report["text_sweep_table"]
    (args.out / "results.md").write_text(text + "\n")
    print("\n" + text, flush=True)
    if not args.no_docs:
        blocks = [(ROOT / "docs" / "evaluation.md", world["results"], full + "\n\n" + footer),
                  (ROOT / "README.md", world["short"], short)]
        variants = {m: runs[m] for m in VARIANTS if m in runs}
        if len(variants) > 1:
            blocks.append((ROOT / "docs" / "variants.md", world["variants"],
                           table(variants, COLUMNS, with_time=True) + "\n\n" + footer))
        for path, tag, block in blocks:
            if replace_block(path, tag, block):
                print(f"updated {path.relative_to(ROOT)}")
        if args.sanity:
            replace_block(ROOT / "docs" / "evaluation.md", "sanity", report["sanity_table"])
        if args.sweep:
            replace_block(ROOT / "docs" / "evaluation.md", "sweep", report["sweep_table"])
            replace_block(ROOT / "docs" / "evaluation.md", "text-sweep", report["text_sweep_table"])
    return report


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
