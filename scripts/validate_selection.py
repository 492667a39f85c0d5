"""Does the label-free selection pick an M2IB setting that localises as well as the best one found with labels?

    python scripts/validate_selection.py                    # both worlds, every rule
    python scripts/validate_selection.py --worlds toy --reuse

Per grounded world (``toy``: configs/toy_benchmark.yaml, ``world2``: configs/world2_benchmark.yaml):

1. **Selection, without labels**: ``python -m m2ib_lightning.select`` (the command itself, in this
   process) on ``--pairs`` held-out validation scenes (stream ``validation``, neither the benchmark's
   nor the CLIPs' training streams), the vision side only, with the masks left out of the data
   (``--data.init_args.extra_columns []``).
2. **Labelled sweep**: the same candidate settings on every benchmark pair, with the pointing game of
   each map against its mask (15 px at 224 px, as the benchmark), and the label-free scores too.
3. **Comparison**, for every rule of :data:`m2ib_lightning.select.RULES` that picks one setting (a combining
   rule's pick is scored by ``scripts/benchmark_quality.py`` instead):
   the setting it picks from the validation scenes, that setting's benchmark pointing game ± its
   standard error, the labelled best ± its standard error, and whether the pick is within one
   standard error of the best (``PG(pick) >= PG(best) - SE(best)``). As a check of stability, the
   same question for picks made from the first ``--pairs`` benchmark pairs and from 200 random
   subsets of ``--pairs`` benchmark pairs (the fraction within one SE).

Everything goes to ``--out`` (``validation.md`` and the per-pair scores as JSON; ``--reuse`` reads
those instead of sweeping again). Runs on CPU, one thread by default: about 30 minutes for both
worlds on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

WORLDS = {
    "toy": {"config": ROOT / "configs" / "toy_benchmark.yaml", "pairs": ROOT / "data" / "toy" / "pairs.jsonl"},
    "world2": {"config": ROOT / "configs" / "world2_benchmark.yaml", "pairs": ROOT / "data" / "world2" / "pairs.jsonl"},
}
TOLERANCE = 15.0  # pixels at 224 px, the benchmarks' pointing-game tolerance


def validation_scenes(world: str, out: Path, n: int) -> Path:
    """``n`` scenes of the world's ``validation`` stream, written under ``out``."""
    if world == "toy":
        from m2ib_lightning.assets.scenes import make_benchmark

        return make_benchmark(out / "toy-validation", n=n, seed="validation", prefix="val")
    from m2ib_lightning.assets.world2 import make_world2

    return make_world2(out / "world2-validation", n=n, seed="validation", prefix="val")


def pointing(setting: Any, explanation: Any, batch: dict[str, Any]) -> dict[str, Any]:
    """The labelled scorer: pointing-game hits of each image map against the batch's masks."""
    import torch

    from m2ib_lightning.evaluation import ground_truth
    from m2ib_lightning.evaluation.functional import pointing_hits, tolerance_pixels

    if setting.side != "vision":
        return {}
    maps = explanation.image_maps.float()
    size = tuple(maps.shape[-2:])
    masks = torch.stack([ground_truth(v, size) for v in batch["extra"]["mask"]]).to(maps.device)
    return {"pointing_game": pointing_hits(maps, masks, tolerance_pixels(TOLERANCE, size))}


def sweep(world: str, data_files: Path, limit: int, out: Path, labelled: bool, reuse: bool,
          extra: list[str]) -> dict[str, Any]:
    """Run the select command (vision side) on ``data_files``; its per-pair scores (cached in ``out``)."""
    path = out / f"{world}-{'benchmark' if labelled else 'selection'}.json"
    if reuse and path.exists():
        return json.loads(path.read_text())
    from m2ib_lightning.select import run

    args = ["-c", str(WORLDS[world]["config"]), "--data.init_args.data_files", str(data_files),
            "--model.init_args.sides", "[vision]", "--limit", str(limit), "--scores", str(path),
            "--out", str(path.with_suffix(".yaml")), "--randomisation", "all", *extra]
    if not labelled:
        args += ["--data.init_args.extra_columns", "[]"]  # the masks never reach the selection
    print(f"== {world}: {'labelled sweep on the benchmark' if labelled else 'selection on validation scenes'}",
          flush=True)
    run(args, scorers=[pointing] if labelled else None)
    return json.loads(path.read_text())


def settings_of(record: dict[str, Any]) -> list[Any]:
    from m2ib_lightning.select.candidates import Setting, describe

    return [Setting(v["side"], v["layer"], describe(v["variant"])) for v in record["settings"].values()]


def restrict(scores: dict[str, Any], ids: set[str]) -> dict[str, Any]:
    return {key: {name: {i: v for i, v in per_id.items() if i in ids} for name, per_id in values.items()}
            for key, values in scores.items()}


def side_rows(settings: list[Any], scores: dict[str, Any]) -> list[Any]:
    from m2ib_lightning.select import summarise

    return summarise(settings, scores, resamples=1)["vision"]


def pick(rows: list[Any], rule: Any) -> Any:
    from m2ib_lightning.select import choose

    best, _ = choose(rows, rule)
    return best.setting if best is not None else None


def pointing_table(settings: list[Any], scores: dict[str, Any]) -> dict[str, tuple[float, float, int]]:
    """Per setting key: benchmark pointing game, its standard error, pairs."""
    out = {}
    for s in settings:
        v = np.array(list(scores[s.key]["pointing_game"].values()), dtype=np.float64)
        out[s.key] = (float(v.mean()), float(v.std(ddof=1) / math.sqrt(len(v))), len(v))
    return out


def evaluate(selection: dict[str, Any], benchmark: dict[str, Any], pairs: int, subsets: int = 200) -> dict[str, Any]:
    """One world's record: the benchmark pointing game of every setting, the labelled best, and per rule
    its pick on the validation scenes, on the first ``pairs`` benchmark pairs and the fraction of
    ``subsets`` random ``pairs``-pair benchmark subsets whose pick is within one SE of the best."""
    from m2ib_lightning.select import RULES

    settings = settings_of(benchmark)
    pg = pointing_table(settings, benchmark["scores"])
    best_key = max(pg, key=lambda k: pg[k][0])
    best, best_se, n = pg[best_key]
    ids = sorted(next(iter(benchmark["scores"].values()))["pointing_game"])
    rng = np.random.default_rng(0)
    draws = [set(rng.choice(ids, size=min(pairs, len(ids)), replace=False).tolist()) for _ in range(subsets)]

    def within(s: Any) -> bool | None:
        return None if s is None else pg[s.key][0] >= best - best_se

    on_validation = side_rows(settings, selection["scores"])
    on_first = side_rows(settings, restrict(benchmark["scores"], set(ids[:pairs])))
    on_draws = [side_rows(settings, restrict(benchmark["scores"], d)) for d in draws]
    rules = {}
    for name, rule in RULES.items():
        if rule.combine:  # its pick averages two layers: no single setting of the labelled sweep scores it
            continue
        chosen, first = pick(on_validation, rule), pick(on_first, rule)
        hits = [within(pick(rows, rule)) for rows in on_draws]
        rules[name] = {"pick": chosen.key if chosen else None, "within": within(chosen),
                       "first_pairs_pick": first.key if first else None, "first_pairs_within": within(first),
                       "subsets_within": float(np.mean([bool(h) for h in hits]))}
    shown = ("gap_rank", "gap", "deletion", "insertion", "rand_spearman")
    rows = {r.setting.key: r for r in on_validation}
    table = {s.key: {"label": s.label().split(" ", 1)[1].strip(), "pg": pg[s.key][0], "se": pg[s.key][1],
                     **{k: rows[s.key].mean.get(k) for k in shown}} for s in settings}
    return {"best": {"setting": best_key, "pg": best, "se": best_se, "pairs": n}, "settings": table,
            "rules": rules, "pairs": pairs, "subsets": subsets}


def markdown(records: dict[str, dict[str, Any]]) -> list[str]:
    """The rules' picks on every world side by side, then each world's settings."""
    from m2ib_lightning.select.ranking import DEFAULT_RULE

    worlds = list(records)
    pairs = next(iter(records.values()))["pairs"]

    def cell(world: str, key: str | None, ok: bool | None) -> str:
        if key is None:
            return "none | - | -"
        row = records[world]["settings"][key]
        return f"{row['label']} | {row['pg']:.3f} ± {row['se']:.3f} | {'yes' if ok else '**no**'}"

    lines = ["Labelled best: " + "; ".join(
        f"{w}: {records[w]['settings'][records[w]['best']['setting']]['label']}, pointing game "
        f"{records[w]['best']['pg']:.3f} ± {records[w]['best']['se']:.3f} ({records[w]['best']['pairs']} pairs), "
        f"so within one SE means >= {records[w]['best']['pg'] - records[w]['best']['se']:.3f}" for w in worlds) + ".",
        "", "| rule | " + " | ".join(f"{w}: pick on {pairs} validation scenes | PG ± SE | within 1 SE | "
                                      f"first {pairs} benchmark pairs: within | random subsets: within"
                                      for w in worlds) + " |",
        "|---" * (1 + 5 * len(worlds)) + "|"]
    for name in next(iter(records.values()))["rules"]:
        cells = []
        for w in worlds:
            r = records[w]["rules"][name]
            first = "-" if r["first_pairs_within"] is None else ("yes" if r["first_pairs_within"] else "**no**")
            cells.append(f"{cell(w, r['pick'], r['within'])} | {first} | {r['subsets_within']:.2f}")
        shown = f"**{name}** (default)" if name == DEFAULT_RULE else (
            f"{name} (the default `{DEFAULT_RULE}` without its combining step)"
            if name == DEFAULT_RULE.replace("+combine", "") else name)
        lines.append(f"| {shown} | " + " | ".join(cells) + " |")
    shown = ("gap_rank", "gap", "deletion", "insertion", "rand_spearman")
    for w in worlds:
        lines += ["", f"{w}: each setting's benchmark pointing game, and its label-free scores on the {pairs} "
                      "validation scenes (rand_spearman with every setting checked):", "",
                  "| setting | benchmark PG ± SE | " + " | ".join(shown) + " |", "|---" * (len(shown) + 2) + "|"]
        for row in records[w]["settings"].values():
            cells = [f"{row[k]:.3f}" if row[k] is not None else "n/a" for k in shown]
            lines.append(f"| {row['label']} | {row['pg']:.3f} ± {row['se']:.3f} | " + " | ".join(cells) + " |")
    return lines


def replace_block(path: Path, tag: str, text: str) -> bool:
    """``scripts/benchmark_quality.py``'s: put ``text`` between the tag's begin and end comments in ``path``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_quality", Path(__file__).with_name("benchmark_quality.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.replace_block(path, tag, text)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", nargs="+", choices=sorted(WORLDS), default=list(WORLDS))
    parser.add_argument("--pairs", type=int, default=32, help="pairs the selection sees (32, the command's default)")
    parser.add_argument("--benchmark-limit", type=int, default=100000, help="benchmark pairs for the labelled sweep")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "validate_selection")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--reuse", action="store_true", help="read the sweeps' scores from --out when there")
    parser.add_argument("--no-docs", dest="docs", action="store_false",
                        help="do not write the tables into docs/selection.md")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []  # more options for every select run
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    records = {}
    for world in args.worlds:
        scenes = validation_scenes(world, args.out, args.pairs)
        selection = sweep(world, scenes, args.pairs, args.out, labelled=False, reuse=args.reuse, extra=extra)
        benchmark = sweep(world, WORLDS[world]["pairs"], args.benchmark_limit, args.out, labelled=True,
                          reuse=args.reuse, extra=extra)
        records[world] = evaluate(selection, benchmark, args.pairs)
    text = "\n".join(markdown(records))
    print(text, flush=True)
    (args.out / "validation.md").write_text(text + "\n")
    (args.out / "validation.json").write_text(json.dumps(records, indent=1) + "\n")
    if args.docs and set(records) == set(WORLDS):
        replace_block(ROOT / "docs" / "selection.md", "validation", text)
    return records


if __name__ == "__main__":
    main()
