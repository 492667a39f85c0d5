"""A run killed mid-way and rerun with the same command ends with every id exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from m2ib_lightning import load_attributions

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def command(tiny_clip_dir, data_file, out):
    return [
        sys.executable, str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        # Enough steps that a batch takes a noticeable time, so the kill lands mid-run.
        "--model.init_args.steps", "80", "--model.init_args.copies", "4",
        "--data.init_args.data_files", str(data_file), "--data.init_args.batch_size", "1",
        "--trainer.default_root_dir", str(out), "--writer.shard_size", "1", "--writer.overlays", "0",
    ]


def test_kill_then_rerun_finishes_every_id_once(tmp_path, tiny_clip_dir, pairs_dir):
    data_file = pairs_dir / "pairs.jsonl"
    ids = [json.loads(line)["id"] for line in data_file.read_text().splitlines()]
    shards = tmp_path / "attributions" / "shards"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(command(tiny_clip_dir, data_file, tmp_path), env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if shards.is_dir() and len(list(shards.glob("rank*.parquet"))) >= 2:
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed; make the batches slower"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    done_before = load_attributions(tmp_path / "attributions")
    assert 2 <= len(done_before) < len(ids)

    rerun = subprocess.run(command(tiny_clip_dir, data_file, tmp_path), env=env, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"{len(done_before)} samples already done are passed over" in rerun.stderr + rerun.stdout
    final = load_attributions(tmp_path / "attributions")
    assert sorted(final) == sorted(ids) and not final.duplicates and not final.skipped
    # The finished samples were not recomputed: their shards are untouched and no id was written twice.
    assert not list(shards.glob(".tmp-*"))
    assert len(list(shards.glob("rank*.parquet"))) == len(ids)
