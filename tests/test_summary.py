"""The run directory's duplicate handling, time-based flushes, and the whole run's summary and verdict."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.outputs import SHARDS, SKIPPED, load_attributions
from m2ib_lightning.outputs.rundir import RunDirectory
from m2ib_lightning.outputs.summary import RunCounts, RunSummary, reason_group
from m2ib_lightning.records import Explanation, Skip

META = {"method": "m", "steps": 1}


def batch(*ids: str, skipped: tuple[Skip, ...] = ()) -> Explanation:
    return Explanation(ids=list(ids), similarity=torch.arange(len(ids), dtype=torch.float32), skipped=list(skipped))


def manifest(directory) -> list[dict]:
    return [json.loads(line) for p in sorted((directory / SKIPPED).glob("rank*.jsonl"))
            for line in p.read_text().splitlines()]


@pytest.mark.parametrize("reason, group", [
    ("undecodable caption: not UTF-8 ('utf-8' codec can't decode byte 0xff in position 3: invalid start byte at "
     "byte 3)", "undecodable caption: not UTF-8"),
    ("undecodable caption: not UTF-8 (invalid continuation byte at byte 7)", "undecodable caption: not UTF-8"),
    ("caption truncated from 93 to 77 tokens", "caption truncated from # to # tokens"),
    ("unreadable image: [Errno 2] No such file or directory (/data/images/x-17.png)",
     "unreadable image: [Errno #] No such file or directory"),
    ("unreadable image: cannot identify image file '/data/a.png'", "unreadable image: cannot identify image file …"),
    ("preprocessing failed: ValueError: shapes (3, 4) and (5,) differ", "preprocessing failed: ValueError"),
    ("fetch failed: HTTP 404 Not Found", "fetch failed: HTTP # Not Found"),
    ("image too large: 9000 x 9000 = 81000000 pixels, more than max_image_pixels=50000000",
     "image too large: # x # = # pixels, more than max_image_pixels=#"),
    ("", "(no reason given)"),
])
def test_reasons_are_grouped_by_a_normalised_prefix(reason, group):
    assert reason_group(reason) == group
    assert len(reason_group("x" * 500)) == 72


def test_an_id_attributed_twice_in_one_run_is_written_once_and_listed_as_a_duplicate(tmp_path):
    run = RunDirectory(tmp_path, META, shard_size=2)
    repaired = Skip("b", "caption truncated from 93 to 77 tokens", kind="repaired")
    run.add(batch("a", "b", skipped=(repaired,)))  # a shard: rank00000-000000
    run.add(batch("c", "a"))  # "a" again, from another batch
    run.add(batch("d", "d", "b", skipped=(Skip("e", "unreadable image: x"), repaired)))  # twice in one batch
    run.close()
    records = load_attributions(tmp_path)
    assert sorted(records) == ["a", "b", "c", "d"] and not records.duplicates
    assert records.skipped == {"e": "unreadable image: x"}
    assert records.completed() == {"a", "b", "c", "d", "e"}
    assert records.repaired == {"b": ["caption truncated from 93 to 77 tokens"]}  # the dropped copy's repair too
    entries = [e for e in manifest(tmp_path) if e.get("duplicate")]
    assert sorted(e["id"] for e in entries) == ["a", "b", "d"]
    assert all(e["reason"].startswith("duplicate id") for e in entries)
    kept = {e["id"]: e["reason"] for e in entries}
    assert "shards/rank00000-000000.parquet" in kept["a"] and "shards/rank00000-000001.parquet" in kept["d"]
    assert sorted(records.duplicate_entries) == ["a", "b", "d"]
    assert run.counts.written == 4 and sum(run.counts.duplicates.values()) == 3
    assert run.counts.skipped == Counter({"unreadable image: x": 1})
    assert run.counts.repaired == Counter({"caption truncated from # to # tokens": 1})


def test_a_duplicate_entry_never_makes_an_id_finished(tmp_path):
    # A crash after the manifest entry of a duplicate but before the shard of its first copy: the
    # id must be computed again, not passed over.
    (tmp_path / SKIPPED).mkdir()
    (tmp_path / SKIPPED / "rank00000-000001.jsonl").write_text(
        json.dumps({"id": "a", "reason": "duplicate id: attributed again", "duplicate": True}) + "\n"
        + json.dumps({"id": "b", "reason": "duplicate id: found twice in the data"}) + "\n")
    records = load_attributions(tmp_path)
    assert records.completed() == set() and records.skipped == {}
    assert RunDirectory(tmp_path, META).finished == frozenset()


def test_ids_finished_earlier_are_passed_over_not_duplicates(tmp_path):
    first = RunDirectory(tmp_path, META)
    first.add(batch("a", "b", skipped=(Skip("s", "bad"),)))
    first.close()
    second = RunDirectory(tmp_path, META)
    assert second.finished == {"a", "b", "s"} and (second.earlier_records, second.earlier_skips) == (2, 1)
    second.add(batch("a", "c"))
    second.add(batch("a"))
    second.close()
    records = load_attributions(tmp_path)
    assert sorted(records) == ["a", "b", "c"] and not records.duplicates and not records.duplicate_entries
    assert second.counts.written == 1 and second.counts.redone == 1 and not second.counts.duplicates


def test_ids_written_by_two_ranks_are_found_at_the_end(tmp_path):
    earlier = RunDirectory(tmp_path, META)
    earlier.add(batch("old"))
    earlier.close()
    ranks = [RunDirectory(tmp_path, META, resume=False, shard_size=1) for _ in range(2)]
    for rank, run in enumerate(ranks):
        run.start(rank)
    ranks[0].add(batch("x", "y"))
    ranks[1].add(batch("z", "x", "old"))  # "old" again: resume off, so written anew; not a duplicate of this run
    ranks[1].close()
    ranks[0].flush(wait=True)
    found = ranks[0].record_duplicates_across_ranks({r: run.counts.first_sequence for r, run in enumerate(ranks)})
    ranks[0].close()
    assert found == 1
    records = load_attributions(tmp_path)
    assert sorted(records.duplicates) == ["old", "x"]  # both copies stay on disk; the first is served
    (reason,) = records.duplicate_entries["x"]
    assert reason.startswith("duplicate id") and "rank00000-000001.parquet" in reason
    assert "rank00001-000000.parquet" in reason and set(records.completed()) == {"old", "x", "y", "z"}


def test_a_shard_is_written_every_flush_every_s_seconds(tmp_path):
    run = RunDirectory(tmp_path, META, shard_size=1000, flush_every_s=1.0)
    run.add(batch("a"))
    assert not (tmp_path / SHARDS).exists()  # neither 1000 records nor 1 s: nothing handed to the writer thread
    time.sleep(1.1)
    run.add(batch("b"))  # the first batch after 1 s writes everything buffered
    run.flush(wait=True)  # (nothing buffered now: waits for the shard)
    assert len(list((tmp_path / SHARDS).glob("rank*.parquet"))) == 1
    assert sorted(load_attributions(tmp_path)) == ["a", "b"]
    run.close()
    with pytest.raises(ConfigError, match="flush_every_s must be"):
        RunDirectory(tmp_path, META, flush_every_s=0)
    RunDirectory(tmp_path, META, flush_every_s=None)


def summary(written=0, skipped=(), earlier=(0, 0), **kwargs) -> RunSummary:
    counts = RunCounts(written=written, skipped=Counter(dict(skipped)))
    return RunSummary("/out", 1, counts, earlier[0], earlier[1], **kwargs)


def test_verdicts():
    bad = {"unreadable image: No such file or directory": 7, "empty or missing caption": 1}
    message = summary(0, bad).problem()
    assert message.startswith("the run wrote no attribution record: all 8 rows it had were skipped")
    assert "7 x unreadable image: No such file or directory; 1 x empty or missing caption" in message
    assert summary(0, bad).problem(1.0) is not None  # no limit on the share, but nothing written
    too_many = summary(3, {"fetch failed: HTTP # Not Found": 4})
    assert "skipped 4 of its 7 rows (57.1%), more than data.init_args.max_skip_fraction = 0.5" in too_many.problem()
    assert too_many.problem(0.6) is None and too_many.problem(1.0) is None
    assert summary(4, {"x": 4}).problem() is None  # exactly half: allowed
    assert summary(0, {}, earlier=(10, 2)).problem(0.0) is None  # a rerun of a finished run: nothing to do
    assert summary(0, {"x": 3}, stopped_early=True).problem() is None  # requeued: judged by the job that finishes
    # The tail of a resumed run, all bad: the run as a whole wrote records and skipped few.
    assert summary(0, {"x": 2}, earlier=(20, 0)).problem() is None
    assert "skipped 12 of its 22 rows" in summary(0, {"x": 2}, earlier=(10, 10)).problem()


def test_the_summary_text():
    counts = RunCounts(written=12, skipped=Counter({f"reason {chr(97 + i)}": 10 - i for i in range(7)}),
                       repaired=Counter({"caption truncated from # to # tokens": 2}),
                       duplicates=Counter({"duplicate id: attributed again in this run by rank #": 1}))
    text = RunSummary("/out/attributions", 2, counts, 5, 1, across_ranks=1).text()
    print(text)
    lines = text.splitlines()
    assert lines[0] == "M2IB summary (2 ranks) of /out/attributions:"
    assert lines[1] == "  records written:   12"
    assert lines[2] == "  finished earlier:  6 passed over (5 records, 1 skipped)"
    assert lines[3] == "  skipped:           49 of 61 rows (80.3%); whole run: 50 of 67 (74.6%)"
    assert lines[4:10] == ["         10  reason a", "          9  reason b", "          8  reason c",
                           "          7  reason d", "          6  reason e", "          9  (2 other reasons)"]
    assert lines[10:12] == ["  repaired:          2", "          2  caption truncated from # to # tokens"]
    assert lines[12].startswith("  duplicate ids:     2 (1 not written again; 1 written by two ranks")
