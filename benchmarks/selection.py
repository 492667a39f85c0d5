"""How long ``python -m m2ib_lightning.select`` takes to sweep every layer of a ViT-B/32-sized CLIP.

The model is transformers' ``CLIPConfig()`` (ViT-B/32 at 224 px, 12 + 12 blocks, random weights) with
the demo tokenizer, built locally as ``benchmarks/throughput.py`` builds it; the pairs are synthetic
demo pairs. The command runs in this process on ``--pairs`` pairs (16), both sides, every layer
(``-1`` .. ``11``), the reference bottleneck only (``--variants M2IB``), with the default scores and
rule. Printed: the wall-clock time of the whole command (model loading included), the time of each
setting, the CPU threads and the load average before and after (on a machine shared with other jobs
the times include theirs). Nothing is asserted.

Usage::

    python benchmarks/selection.py                  # CPU, the whole sweep (tens of minutes)
    python benchmarks/selection.py --threads 2 --pairs 16
    python benchmarks/selection.py --quick          # tiny model, seconds (tests/test_benchmarks.py)
    python benchmarks/selection.py -- --no-randomisation   # options after -- go to the command
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).resolve().parent


def build_assets(root: Path, quick: bool, pairs: int) -> tuple[Path, Path]:
    """The throughput benchmark's model (ViT-B/32 geometry, random weights; tiny with ``quick``) and pairs."""
    spec = importlib.util.spec_from_file_location("throughput_benchmark", HERE / "throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    return throughput.build_assets(root, quick, pairs)


def config(root: Path, model_dir: Path, pairs_dir: Path) -> Path:
    import yaml

    path = root / "selection.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "precision": "32-true"},
        "model": {"class_path": "m2ib_lightning.M2IBAttribution",
                  "init_args": {"backbone": {"class_path": "m2ib_lightning.CLIPBackbone",
                                             "init_args": {"model": str(model_dir)}},
                                # swept over every block; the configured ones must only exist (the tiny model has 3)
                                "vision_layer": 0, "text_layer": 0, "steps": 10, "copies": 10, "seed": 0}},
        "data": {"class_path": "m2ib_lightning.ImageTextDataModule",
                 "init_args": {"path": "json", "data_files": str(pairs_dir / "pairs.jsonl"), "batch_size": 16}},
    }))
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=16)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--quick", action="store_true", help="tiny model and 2 pairs (seconds)")
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)

    import torch

    from m2ib_lightning.select import run

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    pairs = 2 if args.quick else args.pairs
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir, pairs_dir = build_assets(root, args.quick, pairs)
        load = os.getloadavg()
        start, cpu = time.perf_counter(), time.process_time()
        quick = ["--model.init_args.steps", "2", "--model.init_args.copies", "2"] if args.quick else []
        result = run(["-c", str(config(root, model_dir, pairs_dir)), "--limit", str(pairs), "--variants", "M2IB",
                      "--out", str(root / "selected.yaml"), *quick, *extra])
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu
        after = os.getloadavg()
    settings = result["seconds"]
    print(f"\nsweep: {len(settings)} settings (vision and text, every layer, reference bottleneck) on "
          f"{result['pairs']} pairs of the {'tiny' if args.quick else 'ViT-B/32-sized'} CLIP")
    for key, seconds in settings.items():
        print(f"  {key:<32} {seconds:7.1f} s")
    print(f"select: {wall:.1f} s wall ({wall / 60:.1f} min), {cpu:.1f} s CPU; {torch.get_num_threads()} threads on "
          f"{os.cpu_count()} cores; load average {load[0]:.1f} before, {after[0]:.1f} after")
    return {"wall_s": wall, "cpu_s": cpu, "settings": settings, "load": (load[0], after[0])}


if __name__ == "__main__":
    main()
