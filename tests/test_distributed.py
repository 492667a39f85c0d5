"""Multi-process runs (2 gloo processes on CPU): per-rank masks are independent and exact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m2ib_lightning import load_attributions

DRIVER = Path(__file__).with_name("ddp_driver.py")
pytestmark = pytest.mark.slow


def run(tiny_clip_dir, data_file, out, devices, strategy, sides="vision,text", batch_size=1):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(DRIVER), str(tiny_clip_dir), str(data_file), str(out), str(devices), strategy, sides,
           str(batch_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return load_attributions(out)


def max_difference(a, b, text=True):
    """Largest difference of the raw float32 scores (patch capacities, token scores) of two runs."""
    assert sorted(a) == sorted(b)
    diff = 0.0
    for key in a:
        diff = max(diff, float(np.abs(a[key].patch_scores - b[key].patch_scores).max()))
        if text:
            diff = max(diff, float(np.abs(a[key].text_scores - b[key].text_scores).max()))
    return diff


def rank_parts(double_dir: Path, data_file: Path, out: Path) -> list[Path]:
    """One data file per rank of a 2-rank run, holding that rank's samples in its order."""
    rows = {}
    for line in data_file.read_text().splitlines():
        row = json.loads(line)
        row["image"] = str((data_file.parent / row["image"]).resolve())
        rows[row["id"]] = row
    parts = []
    for rank in range(2):
        ids = pq.read_table(double_dir / "shards" / f"rank{rank:05d}-000000.parquet", columns=["id"])
        part = out / f"rank{rank}.jsonl"
        part.write_text("".join(json.dumps(rows[i]) + "\n" for i in ids.column("id").to_pylist()))
        parts.append(part)
    return parts


def merged(*runs):
    return {key: run[key] for run in runs for key in run}


def test_two_ranks_equal_one_rank_exactly_and_a_gradient_leak_would_show(tmp_path, tiny_clip_dir, pairs_dir):
    data_file = pairs_dir / "pairs.jsonl"
    # One sample per batch: the whole data on 1 process and on 2 gives the same batches.
    single = run(tiny_clip_dir, data_file, tmp_path / "single", 1, "single")
    double = run(tiny_clip_dir, data_file, tmp_path / "double", 2, "independent")
    shards = sorted(p.name for p in (tmp_path / "double" / "shards").iterdir())
    assert shards == ["rank00000-000000.parquet", "rank00001-000000.parquet"]
    assert len(single) == 6 and not double.duplicates
    assert max_difference(single, double) == 0.0

    # Three samples per batch, captions of different lengths: each rank's maps equal those of one
    # process given exactly that rank's samples (the same batches), so the ranks never interact.
    batched = run(tiny_clip_dir, data_file, tmp_path / "batched", 2, "independent", batch_size=3)
    parts = rank_parts(tmp_path / "batched", data_file, tmp_path)
    alone = merged(*(run(tiny_clip_dir, part, tmp_path / f"alone{r}", 1, "single", batch_size=3)
                     for r, part in enumerate(parts)))
    assert max_difference(alone, batched) == 0.0

    # The same comparison with mask gradients averaged across ranks (what DDP would do; vision only,
    # where both ranks' masks have one shape): Adam's per-element normalisation makes the effect
    # tiny, but an exact comparison sees it. Gradients pass through a strategy only on the optimiser
    # path (the default Adam is a functional step a strategy never sees), so both runs take that path.
    vision_alone = merged(*(run(tiny_clip_dir, part, tmp_path / f"v-alone{r}", 1, "single-eager", "vision", 3)
                            for r, part in enumerate(parts)))
    leaky = run(tiny_clip_dir, data_file, tmp_path / "leaky", 2, "leaky", "vision", 3)
    leak = max_difference(vision_alone, leaky, text=False)
    print(f"max raw-score difference caused by averaging mask gradients across 2 ranks: {leak:.3e}")
    assert leak > 0.0
    # ... and without the leak that path gives the functional step's maps
    functional = merged(*(run(tiny_clip_dir, part, tmp_path / f"f-alone{r}", 1, "single", "vision", 3)
                          for r, part in enumerate(parts)))
    scale = max(float(np.abs(rec.patch_scores).max()) for rec in functional.values())  # raw scores, ~70
    assert max_difference(functional, vision_alone, text=False) < 1e-6 * scale  # float rounding


def test_strategy_auto_on_two_devices_is_m2ib_ddp_and_plain_ddp_is_refused(tmp_path, tiny_clip_dir, pairs_dir):
    """``python train.py fit -c configs/demo.yaml --trainer.devices 2``, no strategy given: Lightning
    would choose plain DDP (refused); the CLI resolves ``strategy: auto`` to m2ib_ddp first."""
    from test_cli import fit_args, input_ids

    root = Path(__file__).resolve().parents[1]
    data_file = pairs_dir / "pairs.jsonl"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def train(out, *extra):
        cmd = [sys.executable, str(root / "train.py"), *fit_args(out, tiny_clip_dir, data_file, *extra)]
        return subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)

    proc = train(tmp_path / "auto", "--trainer.devices", "2")
    assert proc.returncode == 0, proc.stderr[-4000:]
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if "using m2ib_ddp" in line]
    assert len(said) == 1 and "trainer.strategy auto on 2 device(s)" in said[0]
    shards = sorted(p.name for p in (tmp_path / "auto" / "attributions" / "shards").iterdir())
    assert shards == ["rank00000-000000.parquet", "rank00001-000000.parquet"]
    records = load_attributions(tmp_path / "auto" / "attributions")
    assert sorted(records) == sorted(input_ids(data_file)) and not records.duplicates

    refused = train(tmp_path / "ddp", "--trainer.devices", "2", "--trainer.strategy", "ddp")
    assert refused.returncode == 2
    assert "use `--trainer.strategy m2ib_ddp`" in refused.stderr and "Traceback" not in refused.stderr
    assert not (tmp_path / "ddp" / "attributions").exists()
