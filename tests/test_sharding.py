"""Sharding across ranks and workers, and equal batch counts per rank.

Fast tests check the split rule (:func:`m2ib_lightning.data.sharding.assign`) exhaustively on small
cases. The ``slow`` tests run 2 gloo processes on CPU: once with plain ``torch.distributed`` (the
datamodule's rank / world_size set by hand), once through Lightning's fit loop with the
``m2ib_ddp`` strategy and the writer. This file is also the script those processes run
(``python tests/test_sharding.py plain|lightning ...``).
"""

from __future__ import annotations

import io
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from m2ib_lightning.data.sharding import (
    BadRows,
    EvenBatches,
    Part,
    UnreadableRest,
    assign,
    iter_part,
    padding_batch,
)


# --------------------------------------------------------------------------------- the split rule
class FakeSource:
    """A sharded source with ``sizes[s]`` rows in shard ``s`` (rows are ``{"s": shard, "i": row}``)."""

    def __init__(self, sizes: list[int], fail: tuple[int, int] | None = None) -> None:
        self.sizes, self.fail = sizes, fail

    @property
    def num_shards(self) -> int:
        return len(self.sizes)

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> FakeSource:
        assert num_shards == len(self.sizes) and contiguous
        one = FakeSource([self.sizes[index]], self.fail if self.fail and self.fail[0] == index else None)
        one.origin = index
        return one

    def iter(self, batch_size: int):
        # Batches of 2 whatever is asked: a failure then loses its batch, not the whole shard.
        origin, batch_size = getattr(self, "origin", 0), 2
        rows = [{"s": origin, "i": i} for i in range(self.sizes[0])]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start : start + batch_size]
            for row in chunk:
                if self.fail and row["i"] == self.fail[1]:
                    raise ValueError(f"cannot parse row {row['i']}")
            yield {"s": [r["s"] for r in chunk], "i": [r["i"] for r in chunk]}


SIZES = [5, 0, 3, 7, 1, 4]


@pytest.mark.parametrize("num_shards", range(1, 7))
@pytest.mark.parametrize("limit", [None, 0, 6, 100])
def test_every_row_is_read_by_exactly_one_reader(num_shards, limit):
    source = FakeSource(SIZES[:num_shards])
    everything = [(s, i) for s, n in enumerate(source.sizes) for i in range(n)]
    expected = everything if limit is None else everything[:limit]
    for world_size, workers in itertools.product(range(1, 5), range(1, 4)):
        seen = []
        for rank, worker in itertools.product(range(world_size), range(workers)):
            part = assign(num_shards, rank, world_size, worker, workers, limit)
            rows = [(s, i) for s, i, row in iter_part(source, part)]
            assert all(row == {"s": s, "i": i} for s, i, row in iter_part(source, part))
            seen += rows
        assert sorted(seen) == sorted(expected), (num_shards, world_size, workers, limit)


def test_whole_shards_when_the_count_divides_otherwise_rows():
    assert assign(4, rank=1, world_size=2) == Part((1, 3))
    assert assign(4, rank=1, world_size=2, worker=1, num_workers=2) == Part((3,))
    assert assign(4, rank=1, world_size=2, worker=0, num_workers=3) == Part((1, 3), stride=3, offset=0)
    assert assign(3, rank=1, world_size=2) == Part((0, 1, 2), stride=2, offset=1)
    assert assign(3, rank=1, world_size=2, worker=2, num_workers=3) == Part((0, 1, 2), stride=6, offset=5)
    assert assign(4, rank=0, world_size=2, limit=10) == Part((0, 1, 2, 3), stride=2, offset=0, limit=10)
    assert "every 6th row from 5" in assign(3, 1, 2, 2, 3).describe()


@pytest.mark.parametrize(
    "args, message",
    [
        ((0,), "num_shards must be an int >= 1, got 0"),
        ((2, 0, 0), "world_size must be an int >= 1, got 0"),
        ((2, 2, 2), r"rank must be in \[0, 1\], got 2"),
        ((2, 0, 1, 1, 1), r"worker must be in \[0, 0\], got 1"),
    ],
)
def test_assign_validates(args, message):
    with pytest.raises(ValueError, match=message):
        assign(*args)


def test_a_reader_failure_is_reported_once_and_the_next_shard_is_read():
    source = FakeSource([4, 6, 3], fail=(1, 2))
    reports = []
    rows = []
    for rank, worker in itertools.product(range(2), range(2)):
        for s, i, row in iter_part(source, assign(3, rank, 2, worker, 2)):
            (reports if isinstance(row, UnreadableRest) else rows).append((s, i))
    assert reports == [(1, 2)]
    assert sorted(rows) == sorted([(0, i) for i in range(4)] + [(1, 0), (1, 1)] + [(2, i) for i in range(3)])


def resume_with_bad_units(source: FakeSource):
    """A tolerant re-read of the failing shard from the failing row: row 3 is one bad line, rows 5-7 a
    bad unit of 3 rows (a row group), the rest are rows; a shard other than 1 cannot be re-read."""

    def resume(shard, index, error):
        if shard != 1:
            return None

        def items():
            i = index
            while i < source.sizes[shard]:
                if i == 3:
                    yield BadRows(shard, i, 1, "bad line", {"line": 4})
                elif i == 5:
                    yield BadRows(shard, i, 3, "bad row group", {"rows": [5, 7]})
                    i += 2
                else:
                    yield {"s": shard, "i": i}
                i += 1
        return items()

    return resume


@pytest.mark.parametrize("limit", [None, 9, 14])
def test_a_tolerant_re_read_keeps_positions_and_every_row_or_report_comes_out_once(limit):
    source = FakeSource([4, 10, 3], fail=(1, 2))
    resume = resume_with_bad_units(source)
    positions = [(0, i) for i in range(4)] + [(1, i) for i in range(10)] + [(2, i) for i in range(3)]
    expected = positions if limit is None else positions[:limit]
    expected = [p for p in expected if p not in {(1, 6), (1, 7)}]  # covered by the report of (1, 5)
    for world_size, workers in itertools.product(range(1, 4), range(1, 3)):
        seen, reports = [], []
        for rank, worker in itertools.product(range(world_size), range(workers)):
            for s, i, row in iter_part(source, assign(3, rank, world_size, worker, workers, limit), resume):
                seen.append((s, i))
                if isinstance(row, BadRows):
                    reports.append((s, i, row.count))
                else:
                    assert row == {"s": s, "i": i}
        assert sorted(seen) == sorted(expected), (world_size, workers, limit)
        assert sorted(reports) == [r for r in [(1, 3, 1), (1, 5, 3)] if (r[0], r[1]) in expected]


def test_a_failing_re_read_loses_the_rest_of_that_shard_only():
    source = FakeSource([4, 10, 3], fail=(1, 2))

    def resume(shard, index, error):
        def items():
            yield {"s": shard, "i": index}
            raise OSError("connection reset")
        return items()

    out = list(iter_part(source, assign(3), resume))
    assert [(s, i) for s, i, _ in out] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3),
                                           (2, 0), (2, 1), (2, 2)]
    lost = out[7][2]
    assert isinstance(lost, UnreadableRest) and lost.transient and str(lost.error) == "connection reset"


def test_even_batches_needs_a_process_group():
    with pytest.raises(RuntimeError, match="needs torch.distributed to be initialised"):
        list(EvenBatches([{"ids": ["a"]}]))
    assert padding_batch() == {"ids": [], "skipped": [], "repaired": [], "padding": True}


# ------------------------------------------------------------------------ 2 gloo processes on CPU
def png(colour: tuple[int, int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (12, 10), colour).save(buf, format="PNG")
    return buf.getvalue()


def write_parquet(path: Path, ids: list[str], corrupt: set[str] = frozenset()) -> None:
    import datasets

    data = {
        "id": ids,
        "image": [{"bytes": b"junk" if i in corrupt else png((7 * n % 256, 40, 90)), "path": None}
                  for n, i in enumerate(ids)],
        "caption": ["" if i.endswith("-e") else f"a square {i}" for i in ids],
    }
    datasets.Dataset.from_dict(data).cast_column("image", datasets.Image()).to_parquet(str(path))


def run_ranks(mode: str, spec: dict[str, Any], tmp_path: Path, world_size: int = 2, timeout: int = 120) -> None:
    """Start ``world_size`` copies of this file as ranks of one gloo group; fail with their stderr."""
    spec_path = tmp_path / f"{mode}-spec.json"
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    if mode == "lightning":  # Lightning's launcher starts rank 1 itself (m2ib_ddp re-runs this command)
        commands = [[sys.executable, __file__, mode, str(spec_path)]]
    else:
        commands = [[sys.executable, __file__, mode, str(spec_path), str(rank), str(world_size)]
                    for rank in range(world_size)]
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c in commands]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]


@pytest.mark.slow
def test_plain_gloo_every_id_once_and_equal_batch_counts(tmp_path, tiny_clip_dir):
    """Several layouts x workers x batch sizes; 2 ranks iterate their EvenBatches in lockstep."""
    four = [tmp_path / f"four-{f}.parquet" for f in range(4)]  # 4 files / 2 ranks: whole files per rank
    sizes = (9, 2, 5, 0)
    for f, path in enumerate(four):
        write_parquet(path, [f"f{f}-{i}" + ("-e" if (f, i) == (2, 1) else "") for i in range(sizes[f])],
                      corrupt={"f0-3"})
    three = [tmp_path / f"three-{f}.parquet" for f in range(3)]  # 3 files / 2 ranks: rows
    for f, path in enumerate(three):
        write_parquet(path, [f"t{f}-{i}" for i in range(4 + 3 * f)])
    all_four = [f"f{f}-{i}" + ("-e" if (f, i) == (2, 1) else "") for f in range(4) for i in range(sizes[f])]
    all_three = [f"t{f}-{i}" for f in range(3) for i in range(4 + 3 * f)]
    cases = [
        {"files": [str(p) for p in four], "batch_size": 3, "num_workers": 0, "expect": all_four},
        {"files": [str(p) for p in four], "batch_size": 2, "num_workers": 2, "expect": all_four},
        {"files": [str(p) for p in three], "batch_size": 4, "num_workers": 0, "expect": all_three},
        {"files": [str(p) for p in three], "batch_size": 5, "num_workers": 2, "expect": all_three},
        # Resume: a third of the ids done already, so the ranks' counts differ even more.
        {"files": [str(p) for p in three], "batch_size": 1, "num_workers": 0, "exclude": all_three[::3],
         "expect": [i for i in all_three if i not in all_three[::3]]},
        {"files": [str(p) for p in three], "batch_size": 2, "num_workers": 0, "limit": 7, "expect": all_three[:7]},
        # Fewer rows than ranks x batch: one rank has nothing at all.
        {"files": [str(three[0])], "batch_size": 8, "num_workers": 0, "limit": 1, "expect": all_three[:1]},
    ]
    run_ranks("plain", {"model": str(tiny_clip_dir), "cases": cases, "out": str(tmp_path)}, tmp_path)
    for n, case in enumerate(cases):
        ranks = [json.loads((tmp_path / f"case{n}-rank{r}.json").read_text()) for r in range(2)]
        counts = [len(batches) for batches in ranks]
        assert counts[0] == counts[1], (n, counts)
        pairs = [i for batches in ranks for b in batches for i in b["ids"]]
        skips = [i for batches in ranks for b in batches for i in b["skipped"]]
        assert sorted(pairs + skips) == sorted(case["expect"]), n  # every id exactly once
        assert len(pairs + skips) == len(set(pairs + skips)), n
        if case["files"] == [str(p) for p in four]:
            assert sorted(skips) == ["f0-3", "f2-1-e"], n
        for batches in ranks:
            padded = [b for b in batches if b["padding"]]
            assert all(not b["ids"] and not b["skipped"] for b in padded), n
            # Padding only comes after a rank has run out, never in the middle of its data.
            flags = [b["padding"] for b in batches]
            assert flags == sorted(flags), n
            assert all(len(b["ids"]) + len(b["skipped"]) <= case["batch_size"] for b in batches), n
    assert any(b["padding"] for r in range(2) for b in json.loads((tmp_path / f"case0-rank{r}.json").read_text()))


@pytest.mark.slow
def test_lightning_fit_two_ranks_pads_and_writes_every_id_once(tmp_path, tiny_clip_dir, pairs_dir):
    """Lightning fit loop, m2ib_ddp strategy, 2 ranks with unequal parts: the padding is never written."""
    from m2ib_lightning import load_attributions

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    rows = [{**r, "image": str(pairs_dir / r["image"])} for r in rows]
    rows += [{"id": "bad-image", "image": str(pairs_dir / "nope.png"), "caption": "a red circle"},
             {"id": "bad-caption", "image": rows[0]["image"], "caption": " "},
             {**rows[1], "id": "extra-1"}]  # 9 rows: rank 0 reads 5, rank 1 reads 4
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    spec = {"model": str(tiny_clip_dir), "data": str(data), "out": str(out), "batch_size": 2, "num_workers": 2}
    run_ranks("lightning", spec, tmp_path, timeout=240)

    records = load_attributions(out)
    good = {r["id"] for r in rows} - {"bad-image", "bad-caption"}
    assert set(records) == good and not records.duplicates
    assert set(records.skipped) == {"bad-image", "bad-caption"}
    ranks = [json.loads((out / f"batches-rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["batches"] == ranks[1]["batches"] == 3
    assert ranks[0]["padding"] == 0 and ranks[1]["padding"] == 1
    assert ranks[0]["skipped_metric"] == ranks[1]["skipped_metric"] == 2.0  # summed over ranks


# ---------------------------------------------------------------- the processes the slow tests run
def _plain(spec_path: str, rank: int, world_size: int) -> None:
    import torch.distributed as dist
    from transformers import AutoImageProcessor, AutoTokenizer

    from m2ib_lightning import ImageTextDataModule, Preprocessor

    spec = json.loads(Path(spec_path).read_text())
    store = Path(spec["out"]) / "gloo-store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    try:
        pre = Preprocessor(AutoTokenizer.from_pretrained(spec["model"]),
                           AutoImageProcessor.from_pretrained(spec["model"]), 77)
        for n, case in enumerate(spec["cases"]):
            dm = ImageTextDataModule(path="parquet", data_files=case["files"], batch_size=case["batch_size"],
                                     num_workers=case["num_workers"], limit=case.get("limit"))
            dm.preprocessor, dm.rank, dm.world_size = pre, rank, world_size
            dm.pass_over(case.get("exclude", ()))
            batches = [{"ids": b["ids"], "skipped": [s["id"] for s in b["skipped"]], "padding": b.get("padding", False)}
                       for b in dm.train_dataloader()]
            (Path(spec["out"]) / f"case{n}-rank{rank}.json").write_text(json.dumps(batches))
    finally:
        dist.destroy_process_group()


def _lightning(spec_path: str) -> None:
    import lightning.pytorch as pl

    from m2ib_lightning import AttributionWriter, CLIPBackbone, ImageTextDataModule, M2IBAttribution
    from m2ib_lightning.methods.strategy import IndependentDDPStrategy

    spec = json.loads(Path(spec_path).read_text())

    class CountBatches(pl.Callback):
        def __init__(self) -> None:
            self.batches = self.padding = 0

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            self.padding += int(bool(batch.get("padding")))

        def on_train_end(self, trainer, pl_module) -> None:
            result = {"batches": self.batches, "padding": self.padding,
                      "skipped_metric": float(trainer.callback_metrics["skipped"])}
            (Path(spec["out"]) / f"batches-rank{trainer.global_rank}.json").write_text(json.dumps(result))

    module = M2IBAttribution(CLIPBackbone(spec["model"]), vision_layer=1, text_layer=1, steps=1, copies=1,
                             sides=["vision"])
    data = ImageTextDataModule(path="json", data_files=spec["data"], batch_size=spec["batch_size"],
                               num_workers=spec["num_workers"])
    trainer = pl.Trainer(accelerator="cpu", devices=2, strategy=IndependentDDPStrategy(process_group_backend="gloo"),
                         max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False,
                         callbacks=[AttributionWriter(output_dir=spec["out"]), CountBatches()])
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    if sys.argv[1] == "plain":
        _plain(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
    elif sys.argv[1] == "lightning":
        _lightning(sys.argv[2])
    else:
        raise SystemExit(f"usage: {sys.argv[0]} plain SPEC RANK WORLD_SIZE | lightning SPEC (got {sys.argv[1:]})")
