"""The on-disk attribution format: shard round trip, resumable sequence numbers, duplicates, skips."""

from __future__ import annotations

import json

import numpy as np
import pytest

from m2ib_lightning.files import atomic_write
from m2ib_lightning.outputs import SHARDS, SKIPPED, Attributions, load_attributions
from m2ib_lightning.outputs.format import next_sequence, write_shard

META = {"format": 1, "backbone": "tiny", "steps": 10, "sides": ["vision", "text"]}


def full_row(sample_id: str, rng: np.random.Generator, similarity: float = 0.25) -> dict:
    return {
        "id": sample_id,
        "similarity": similarity,
        "map_height": 8,
        "map_width": 12,
        "image_map": rng.random((8, 12), dtype=np.float32),
        "grid_height": 2,
        "grid_width": 3,
        "patch_scores": rng.normal(size=6).astype(np.float32) * 50,
        "tokens": ["<|startoftext|>", "a", "red", "circle", "<|endoftext|>"],
        "text_scores": rng.random(5, dtype=np.float32),
    }


def image_only(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("tokens", "text_scores")}


def text_only(row: dict) -> dict:
    keep = ("id", "similarity", "tokens", "text_scores")
    return {k: v for k, v in row.items() if k in keep}


def test_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    rows = [full_row("a", rng, 0.5), image_only(full_row("img", rng, -0.125))]
    rows.append(text_only(full_row("txt", rng)))
    write_shard(tmp_path, rank=0, seq=0, rows=rows, skipped=[], metadata=META)
    attr = load_attributions(tmp_path)
    assert isinstance(attr, Attributions)
    assert len(attr) == 3 and list(attr) == ["a", "img", "txt"]
    assert attr.duplicates == [] and attr.skipped == {}

    full = attr["a"]
    assert full.id == "a"
    assert full.similarity == pytest.approx(0.5)
    assert full.image_map.shape == (8, 12) and full.image_map.dtype == np.float32
    np.testing.assert_allclose(full.image_map, rows[0]["image_map"], atol=1e-3, rtol=0)
    assert full.patch_scores.shape == (2, 3)
    np.testing.assert_array_equal(full.patch_scores, rows[0]["patch_scores"].reshape(2, 3))
    assert full.tokens == rows[0]["tokens"]
    np.testing.assert_array_equal(full.text_scores, rows[0]["text_scores"])

    image = attr["img"]
    assert image.similarity == pytest.approx(-0.125)
    np.testing.assert_allclose(image.image_map, rows[1]["image_map"], atol=1e-3, rtol=0)
    assert image.patch_scores.shape == (2, 3)
    assert image.tokens is None and image.text_scores is None

    text = attr["txt"]
    assert text.image_map is None and text.patch_scores is None
    assert text.tokens == rows[2]["tokens"]
    np.testing.assert_array_equal(text.text_scores, rows[2]["text_scores"])

    with pytest.raises(KeyError):
        attr["missing"]
    assert "a" in attr and "missing" not in attr


def test_image_map_is_row_major(tmp_path):
    # A non-square, non-symmetric map catches a transposed or Fortran-order write.
    grid = np.arange(6, dtype=np.float32).reshape(2, 3) / 8
    row = {**full_row("x", np.random.default_rng(1)), "map_height": 2, "map_width": 3}
    row["image_map"] = np.asfortranarray(grid)
    write_shard(tmp_path, 0, 0, [row], [], META)
    np.testing.assert_array_equal(load_attributions(tmp_path)["x"].image_map, grid)


def test_metadata_round_trips(tmp_path):
    write_shard(tmp_path, 0, 0, [full_row("a", np.random.default_rng(0))], [], META)
    assert load_attributions(tmp_path).metadata == META


def test_next_sequence_appends_per_rank(tmp_path):
    rng = np.random.default_rng(0)
    assert next_sequence(tmp_path, 0) == 0
    write_shard(tmp_path, 0, next_sequence(tmp_path, 0), [full_row("r0-a", rng)], [], META)
    assert next_sequence(tmp_path, 0) == 1
    assert next_sequence(tmp_path, 1) == 0
    # A skip-only shard also takes a sequence number.
    write_shard(tmp_path, 0, next_sequence(tmp_path, 0), [], [{"id": "r0-s", "reason": "bad image"}], META)
    assert next_sequence(tmp_path, 0) == 2
    write_shard(tmp_path, 1, next_sequence(tmp_path, 1), [full_row("r1-a", rng)], [], META)
    assert next_sequence(tmp_path, 1) == 1 and next_sequence(tmp_path, 0) == 2

    # A "second run" continues from the next free number and leaves earlier shards untouched.
    before = {p.name: p.read_bytes() for p in (tmp_path / SHARDS).iterdir()}
    write_shard(tmp_path, 0, next_sequence(tmp_path, 0), [full_row("r0-b", rng)], [], META)
    after = {p.name: p.read_bytes() for p in (tmp_path / SHARDS).iterdir()}
    assert set(after) == set(before) | {"rank00000-000002.parquet"}
    assert all(after[name] == data for name, data in before.items())
    assert next_sequence(tmp_path, 0) == 3

    attr = load_attributions(tmp_path)
    assert set(attr) == {"r0-a", "r0-b", "r1-a"}
    assert attr.skipped == {"r0-s": "bad image"}


def test_next_sequence_ignores_foreign_files(tmp_path):
    (tmp_path / SHARDS).mkdir()
    (tmp_path / SHARDS / "rank00000-000007.parquet.bak").write_text("x")
    (tmp_path / SHARDS / ".tmp-123-rank00000-000009.parquet").write_text("x")
    assert next_sequence(tmp_path, 0) == 0


def test_duplicates_serve_first_copy(tmp_path):
    rng = np.random.default_rng(0)
    write_shard(tmp_path, 0, 0, [full_row("dup", rng, 0.1), full_row("one", rng)], [], META)
    write_shard(tmp_path, 0, 1, [full_row("dup", rng, 0.9), full_row("two", rng)], [], META)
    attr = load_attributions(tmp_path)
    assert len(attr) == 3 and sorted(attr) == ["dup", "one", "two"]
    assert attr.duplicates == ["dup"]
    assert attr["dup"].similarity == pytest.approx(0.1)


def test_skip_manifest_is_read(tmp_path):
    rng = np.random.default_rng(0)
    skips = [{"id": "s1", "reason": "unreadable image: truncated"}, {"id": "s2", "reason": "empty caption"}]
    write_shard(tmp_path, 0, 0, [full_row("ok", rng)], skips, META)
    write_shard(tmp_path, 3, 0, [], [{"id": "s3", "reason": "no image in this row"}], META)
    lines = (tmp_path / SKIPPED / "rank00000-000000.jsonl").read_text().splitlines()
    assert [json.loads(line) for line in lines] == skips
    attr = load_attributions(tmp_path)
    assert attr.skipped == {
        "s1": "unreadable image: truncated", "s2": "empty caption", "s3": "no image in this row",
    }
    assert list(attr) == ["ok"]


def test_damaged_files_are_reported_not_fatal(tmp_path, caplog):
    rng = np.random.default_rng(0)
    write_shard(tmp_path, 0, 0, [full_row("a", rng)], [{"id": "s1", "reason": "empty caption"}], META)
    write_shard(tmp_path, 0, 1, [full_row("b", rng)], [], META)
    damaged = tmp_path / SHARDS / "rank00000-000000.parquet"
    damaged.write_bytes(damaged.read_bytes()[:100])  # e.g. a storage fault
    with (tmp_path / SKIPPED / "rank00000-000000.jsonl").open("a") as f:
        f.write('{"id": "s2", "rea\n')
    attr = load_attributions(tmp_path)
    assert list(attr) == ["b"] and attr.unreadable == [damaged] and attr.metadata == META
    assert attr.skipped == {"s1": "empty caption"} and "a" not in attr.completed()
    assert "cannot be read" in caplog.text and "unreadable line" in caplog.text


def test_skip_only_directory_has_no_records(tmp_path):
    write_shard(tmp_path, 0, 0, [], [{"id": "s", "reason": "r"}], META)
    attr = load_attributions(tmp_path)
    assert len(attr) == 0 and attr.skipped == {"s": "r"} and attr.metadata == {}
    assert not (tmp_path / SHARDS).exists()


def test_atomic_write_cleans_up_on_error(tmp_path):
    target = tmp_path / "out.txt"

    def failing(path):
        path.write_text("half of it")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, failing)
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []

    # An existing target is not replaced by a failed write.
    target.write_text("old")
    with pytest.raises(RuntimeError):
        atomic_write(target, failing)
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_atomic_write_target_appears_only_when_complete(tmp_path):
    target = tmp_path / "out.txt"
    seen = []

    def write(path):
        path.write_text("first half ")
        seen.append(target.exists())
        with path.open("a") as fh:
            fh.write("second half")

    atomic_write(target, write)
    assert seen == [False]
    assert target.read_text() == "first half second half"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "not-there"
    with pytest.raises(FileNotFoundError, match="not-there"):
        load_attributions(missing)


def test_transient_skips_are_retried_and_superseded_by_a_later_record(tmp_path):
    write_shard(tmp_path, 0, 0, [], [{"id": "a", "reason": "timed out", "transient": True},
                                     {"id": "b", "reason": "unreadable image"}], META)
    first = load_attributions(tmp_path)
    assert first.completed() == {"b"} and set(first.skipped) == {"a", "b"}
    write_shard(tmp_path, 0, 1, [full_row("a", np.random.default_rng(0))], [], META)
    second = load_attributions(tmp_path)
    assert set(second) == {"a"} and set(second.skipped) == {"b"} and second.completed() == {"a", "b"}
