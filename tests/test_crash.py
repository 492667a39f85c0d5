"""Crash consistency of the whole CLI: SIGKILL during a batch, a shard write or a checkpoint, five
times on one output directory, then a run to the end: every input id is in the outputs or the skip
manifest exactly once, and the maps are those of an uninterrupted run, bit for bit."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from m2ib_lightning import load_attributions
from m2ib_lightning.outputs import SHARDS, SKIPPED

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).with_name("crash_driver.py")
pytestmark = pytest.mark.slow

#: kill points: (kind, n) for the n-th relevance pass (two per batch here: 1 update x 2 sides) / output file
#: write / checkpoint save
RANGES = {"batch": (3, 15), "shard": (1, 4), "checkpoint": (1, 3)}


def kill_plan(seed: int = 16, kills: int = 5) -> list[tuple[str, int]]:
    """Every kind at least once, in a seeded order, each at a seeded point."""
    rng = random.Random(seed)
    kinds = [*RANGES, *rng.choices(list(RANGES), k=kills - len(RANGES))]
    rng.shuffle(kinds)
    return [(kind, rng.randint(*RANGES[kind])) for kind in kinds]


def command(model_dir: Path, data_file: Path, out: Path) -> list[str]:
    return [
        sys.executable, str(DRIVER), "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(model_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        # One pair per batch: a pair's maps do not depend on which others share its batch, so a
        # resumed run (other batches) must reproduce the uninterrupted run's maps exactly.
        "--data.init_args.data_files", str(data_file), "--data.init_args.batch_size", "1",
        "--data.init_args.limit", "null",
        "--trainer.default_root_dir", str(out), "--trainer.enable_progress_bar", "false",
        "--writer.shard_size", "2", "--writer.overlays", "0",
    ]


def dataset(pairs_dir: Path, out: Path) -> tuple[Path, list[str]]:
    """24 pairs (the fixture's images under 4 ids each) and 2 bad rows, one file."""
    base = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    rows = [{**r, "id": f"c{k}-{r['id']}", "image": str(pairs_dir / r["image"])} for k in range(4) for r in base]
    rows.insert(5, {"id": "bad-image", "image": str(pairs_dir / "images" / "nope.png"), "caption": "a red circle"})
    rows.insert(17, {"id": "bad-caption", "image": rows[0]["image"], "caption": "  "})
    path = out / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, [r["id"] for r in rows]


def stored_ids(directory: Path) -> tuple[list[str], list[str]]:
    """Every id as stored: the id column of every shard, and every skip entry of the manifest."""
    records = [i for p in sorted((directory / SHARDS).glob("rank*.parquet"))
               for i in pq.read_table(p, columns=["id"]).column("id").to_pylist()]
    entries = [json.loads(line) for p in sorted((directory / SKIPPED).glob("rank*.jsonl"))
               for line in p.read_text().splitlines()]
    return records, [e["id"] for e in entries if e.get("kind") != "repaired"]


def test_kill_9_at_random_points_then_finish_every_id_once_and_maps_bit_identical(tmp_path, tiny_clip_dir, pairs_dir):
    data_file, ids = dataset(pairs_dir, tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("M2IB_TEST_KILL", None)
    reference = subprocess.run(command(tiny_clip_dir, data_file, tmp_path / "reference"), env=env,
                               capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-3000:]

    out = tmp_path / "crashed"
    attributions = out / "attributions"
    progress = []
    for kind, n in kill_plan():
        proc = subprocess.run(command(tiny_clip_dir, data_file, out), env={**env, "M2IB_TEST_KILL": f"{kind}:{n}"},
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == -signal.SIGKILL, (kind, n, proc.returncode, proc.stderr[-3000:])
        if kind == "shard":  # killed between writing a file's temporary and renaming it
            assert list(attributions.rglob(".tmp-*")), "the shard kill left no temporary file"
        done = load_attributions(attributions) if attributions.is_dir() else {}
        progress.append((kind, n, len(done)))
        assert not getattr(done, "unreadable", None), "a kill left a partial file under a final name"
    print("kills (kind, n, records after):", progress)
    assert progress[-1][2] < 24, "the kills left nothing to do for the final run; kill earlier"
    assert (out / "crash-test.ckpt").is_file()

    final = subprocess.run(command(tiny_clip_dir, data_file, out), env=env, capture_output=True, text=True,
                           timeout=300)
    assert final.returncode == 0, final.stderr[-3000:]
    assert final.stdout.count("M2IB summary (1 rank)") == 1

    # Every input id exactly once, in the records or the manifest, as stored (not only as the reader serves it).
    records, skips = stored_ids(attributions)
    assert sorted(records + skips) == sorted(ids)
    assert sorted(skips) == ["bad-caption", "bad-image"]
    crashed = load_attributions(attributions)
    assert not crashed.duplicates and not crashed.duplicate_entries and not crashed.unreadable
    assert not list(attributions.rglob(".tmp-*")) and not list(attributions.rglob("unreadable-*"))

    # The maps of the interrupted and resumed run are those of the uninterrupted one, bit for bit.
    expected = load_attributions(tmp_path / "reference" / "attributions")
    assert sorted(expected) == sorted(crashed) and expected.skipped == crashed.skipped
    for sample_id in expected:
        a, b = expected[sample_id], crashed[sample_id]
        assert a.similarity == b.similarity and a.tokens == b.tokens, sample_id
        for name in ("image_map", "patch_scores", "text_scores"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), (sample_id, name)
    assert np.isfinite(np.stack([expected[i].image_map for i in expected])).all()
