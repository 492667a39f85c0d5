"""Row-level recovery: a bad line, row group or tar sample costs itself only; duplicate ids are reported.

``datasets`` gives up on a whole file at its first bad block; :mod:`m2ib_lightning.data.recover`
reads it on from there. These tests use the datamodule with the tiny CLIP's preprocessing (the
command line run is in ``test_cli.py``-style at the bottom).
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pyarrow.parquet as pq
import pytest

from m2ib_lightning import ImageTextDataModule, Preprocessor, load_attributions
from m2ib_lightning.data.recover import Recovery
from m2ib_lightning.data.sharding import BadRows, UnreadableRest, iter_part
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def make_dm(backbone, **kwargs) -> ImageTextDataModule:
    dm = ImageTextDataModule(**kwargs)
    dm.preprocessor = Preprocessor.from_backbone(backbone)
    return dm


def outcome(batches: list[dict]) -> tuple[list[str], dict[str, dict]]:
    """(ids of pairs, id -> skip entry), checking that nothing comes out twice."""
    ids = [i for b in batches for i in b["ids"]]
    skipped = [s for b in batches for s in b["skipped"]]
    entries = {s["id"]: s for s in skipped}
    assert len(ids) == len(set(ids)) and len(entries) == len(skipped) and not set(ids) & set(entries)
    return ids, entries


def image_paths(pairs_dir: Path) -> list[str]:
    return sorted(str(p) for p in (pairs_dir / "images").glob("*.png"))


def good_rows(pairs_dir: Path, n: int = 42) -> list[dict]:
    images = image_paths(pairs_dir)
    return [{"id": f"pair-{i:02d}", "image": images[i % len(images)], "caption": f"a red circle number {i}"}
            for i in range(n)]


def issue_jsonl(path: Path, pairs_dir: Path) -> Path:
    """The issue's file: 42 lines, line 21 a truncated JSON object, line 31 a caption in Latin-1 bytes."""
    lines = [json.dumps(r).encode() for r in good_rows(pairs_dir)]
    lines[20] = lines[20][:40]
    lines[30] = json.dumps(good_rows(pairs_dir)[30]).replace("a red circle", "un caf\u00e9").encode("latin-1")
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def issue_csv(path: Path, pairs_dir: Path) -> Path:
    """42 records: line 22 (record 20) has a field too many, line 32 (record 30) is Latin-1."""
    lines = [b"id,image,caption"] + [f"{r['id']},{r['image']},{r['caption']}".encode() for r in good_rows(pairs_dir)]
    lines[21] += b",extra"
    lines[31] = lines[31].replace(b"a red circle", "un caf\u00e9".encode("latin-1"))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("workers", [0, 2])
def test_two_bad_json_lines_cost_two_lines(backbone, tmp_path, pairs_dir, workers):
    path = issue_jsonl(tmp_path / "captions.jsonl", pairs_dir)
    ids, skips = outcome(list(make_dm(backbone, data_files=str(path), batch_size=8,
                                      num_workers=workers).train_dataloader()))
    assert sorted(ids) == [f"pair-{i:02d}" for i in range(42) if i not in (20, 30)]
    assert set(skips) == {"json-train-20", "json-train-30"}  # the derived ids of their positions
    truncated, latin = skips["json-train-20"], skips["json-train-30"]
    assert truncated["reason"].startswith(f"unreadable line 21 of {path}: not valid JSON")
    assert latin["reason"].startswith(f"unreadable line 31 of {path}: not valid UTF-8 (invalid continuation byte at")
    assert truncated["source"] == {"file": str(path), "line": 21, "row": 20}
    assert latin["source"] == {"file": str(path), "line": 31, "row": 30}
    assert not truncated.get("transient") and not latin.get("transient")


def test_two_bad_csv_records_cost_two_records(backbone, tmp_path, pairs_dir):
    path = issue_csv(tmp_path / "pairs.csv", pairs_dir)
    ids, skips = outcome(list(make_dm(backbone, path="csv", data_files=str(path), batch_size=8).train_dataloader()))
    assert sorted(ids) == [f"pair-{i:02d}" for i in range(42) if i not in (20, 30)]
    assert skips["csv-train-20"]["reason"] == f"unreadable line 22 of {path}: expected 3 fields, saw 4"
    assert skips["csv-train-30"]["reason"].startswith(f"unreadable line 32 of {path}: not valid UTF-8")
    assert skips["csv-train-30"]["source"] == {"file": str(path), "line": 32, "row": 30}


def test_an_unclosed_csv_quote_costs_its_line_and_tsv_works_too(backbone, tmp_path, pairs_dir):
    rows = good_rows(pairs_dir, 12)
    lines = [f"{r['caption']}\t{r['image']}" for r in rows]
    lines[2] = '"a caption on\ntwo lines"\t' + rows[2]["image"]  # legitimately quoted: one record
    lines[5] = '"a caption whose quote never closes\t' + rows[5]["image"]  # pandas: "EOF inside string"
    path = tmp_path / "cc.tsv"
    path.write_text("\n".join(lines) + "\n")
    dm = make_dm(backbone, path="csv", data_files=str(path), image_column="image_url", id_column=None,
                 builder_kwargs={"sep": "\t", "column_names": ["caption", "image_url"]}, batch_size=5)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert ids == [f"csv-train-{i}" for i in range(12) if i != 5]
    assert list(skips) == ["csv-train-5"]
    assert skips["csv-train-5"]["reason"] == (f"unreadable line 7 of {path}: unclosed quote (in a record that would "
                                              "span lines 7-13; read on from the next line)")


def test_ids_of_good_rows_do_not_shift_and_do_not_depend_on_ranks(backbone, tmp_path, pairs_dir):
    """Derived ids: the bad lines keep their positions; every rank and worker split gives the same ids."""
    path = issue_jsonl(tmp_path / "captions.jsonl", pairs_dir)
    expected = {f"json-train-{i}" for i in range(42) if i not in (20, 30)}
    for world_size in (1, 2, 3):
        ids, skips = [], {}
        for rank in range(world_size):
            dm = make_dm(backbone, data_files=str(path), id_column=None)
            dm.rank, dm.world_size = rank, world_size
            for sample in dm.dataset():
                if "skip" in sample:
                    skips[sample["id"]] = sample["skip"]
                else:
                    ids.append(sample["id"])
        assert sorted(ids) == sorted(expected) and len(ids) == len(set(ids))
        assert set(skips) == {"json-train-20", "json-train-30"}, world_size


def test_a_resumed_run_passes_over_finished_rows_and_reported_lines_by_derived_id(backbone, tmp_path, pairs_dir):
    path = issue_jsonl(tmp_path / "captions.jsonl", pairs_dir)
    dm = make_dm(backbone, data_files=str(path), id_column=None, batch_size=8)
    dm.pass_over({f"json-train-{i}" for i in range(30)})  # rows 0-29 done, the bad line 21 (row 20) listed
    ids, skips = outcome(list(dm.train_dataloader()))
    assert ids == [f"json-train-{i}" for i in range(31, 42)] and list(skips) == ["json-train-30"]


def test_a_bad_line_after_clean_blocks_is_found_where_it_is(backbone, tmp_path, pairs_dir):
    """datasets delivers the clean blocks before the bad one (4 kB chunks here); the recovery goes on
    from the first row it did not deliver, in two files, each read by one of two workers."""
    files = []
    for f in range(2):
        rows = [json.dumps({**r, "id": f"f{f}-{i:03d}"}) for i, r in enumerate(good_rows(pairs_dir, 150))]
        rows[117 - f] = rows[117 - f][:-5]
        (tmp_path / f"part-{f}.jsonl").write_text("\n".join(rows) + "\n")
        files.append(str(tmp_path / f"part-{f}.jsonl"))
    dm = make_dm(backbone, data_files=files, builder_kwargs={"chunksize": 4096}, batch_size=16, num_workers=2)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert sorted(ids) == sorted(f"f{f}-{i:03d}" for f in range(2) for i in range(150) if i != 117 - f)
    assert {k: v["source"]["line"] for k, v in skips.items()} == {"json-train-0-117": 118, "json-train-1-116": 117}


def damaged_parquet(path: Path, pairs_dir: Path, bad_group: int = 2, n: int = 40, group: int = 8) -> Path:
    images = [Path(p).read_bytes() for p in image_paths(pairs_dir)]
    table = {"id": [f"p-{i:02d}" for i in range(n)], "caption": [f"a square {i}" for i in range(n)],
             "image": [{"bytes": images[i % len(images)], "path": None} for i in range(n)]}
    ds = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    pq.write_table(ds.data.table, path, row_group_size=group)
    meta = pq.ParquetFile(path).metadata.row_group(bad_group).column(0)  # the id column's page header
    data = bytearray(path.read_bytes())
    start = meta.dictionary_page_offset or meta.data_page_offset
    data[start:start + 12] = b"\xff" * 12
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("world_size", [1, 3])
def test_a_damaged_parquet_row_group_costs_that_row_group(backbone, tmp_path, pairs_dir, world_size):
    path = damaged_parquet(tmp_path / "pairs.parquet", pairs_dir)
    ids, skips = [], {}
    for rank in range(world_size):
        dm = make_dm(backbone, path="parquet", data_files=str(path), batch_size=8)
        dm.rank, dm.world_size = rank, world_size
        for sample in dm.dataset():
            if "skip" in sample:
                skips[sample["id"]] = {"id": sample["id"], "reason": sample["skip"], "source": sample["source"],
                                       "transient": sample["transient"]}
            else:
                ids.append(sample["id"])
    assert sorted(ids) == [f"p-{i:02d}" for i in range(40) if not 16 <= i < 24]
    (entry,) = skips.values()
    assert entry["id"] == "parquet-train-shard0-rows-16-to-23"
    assert entry["reason"].startswith(f"unreadable row group 2 (rows 16-23) of {path}: ")
    assert entry["source"] == {"file": str(path), "row_group": 2, "rows": [16, 23]} and not entry.get("transient")


def test_a_damaged_page_in_a_column_the_run_does_not_read_costs_nothing(backbone, tmp_path, pairs_dir):
    path = damaged_parquet(tmp_path / "pairs.parquet", pairs_dir)  # the damage is in the id column
    dm = make_dm(backbone, path="parquet", data_files=str(path), id_column=None, batch_size=8)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert ids == [f"parquet-train-{i}" for i in range(40)] and not skips


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("bad", [1, 7])  # among the first 5 (which datasets infers the columns from) or later
def test_a_webdataset_member_that_does_not_decode_costs_its_sample(backbone, tmp_path, pairs_dir, bad):
    images = [Path(p).read_bytes() for p in image_paths(pairs_dir)]
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            add_member(tar, f"s{i:03d}.png", images[i % len(images)])
            add_member(tar, f"s{i:03d}.txt", "un caf\u00e9 noir".encode("latin-1") if i == bad else b"a shape")
    dm = make_dm(backbone, path="webdataset", data_files=str(path), image_column="png", text_column="txt",
                 id_column="__key__", batch_size=4)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert ids == [f"s{i:03d}" for i in range(10) if i != bad]
    key = f"s{bad:03d}"
    assert list(skips) == [key]  # the id column (the key) could still be read
    assert skips[key]["reason"] == (f"unreadable sample {key!r} of {path}: member {key}.txt: not valid UTF-8 "
                                    "(invalid continuation byte at byte 6)")
    assert skips[key]["source"] == {"file": str(path), "member": f"{key}.txt", "row": bad}


def test_duplicate_ids_are_reported_and_finished_ids_stay_silent(backbone, tmp_path, pairs_dir):
    rows = good_rows(pairs_dir, 8)
    rows[5]["id"] = rows[1]["id"]
    rows[6]["id"] = rows[1]["id"]
    rows[7]["id"] = rows[2]["id"]
    path = tmp_path / "dups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = make_dm(backbone, data_files=str(path), batch_size=3)
    batches = list(dm.train_dataloader())
    ids = [i for b in batches for i in b["ids"]]
    skipped = [s for b in batches for s in b["skipped"]]
    assert ids == [r["id"] for r in rows[:5]]
    assert [(s["id"], s["duplicate"], s["source"]) for s in skipped] == [
        ("pair-01", True, {"file": str(path), "row": 5}), ("pair-01", True, {"file": str(path), "row": 6}),
        ("pair-02", True, {"file": str(path), "row": 7})]
    assert skipped[0]["reason"] == f"duplicate id 'pair-01': row 5 of {path}, first seen at row 1"
    dm.pass_over({"pair-01"})  # finished by an earlier attempt: passed over, all copies, silently
    batches = list(dm.train_dataloader())
    assert [i for b in batches for i in b["ids"]] == ["pair-00", "pair-02", "pair-03", "pair-04"]
    assert [s["id"] for b in batches for s in b["skipped"]] == ["pair-02"]
    unchecked = make_dm(backbone, data_files=str(path), batch_size=3, check_duplicates=False)
    batches = list(unchecked.train_dataloader())
    assert [i for b in batches for i in b["ids"]] == [r["id"] for r in rows]  # as given, copies included


def test_a_network_failure_while_reading_on_is_transient_and_a_parse_error_is_not(tmp_path, pairs_dir,
                                                                                   monkeypatch):
    path = issue_jsonl(tmp_path / "captions.jsonl", pairs_dir)
    rows = datasets.load_dataset("json", data_files=str(path), split="train", streaming=True,
                                 features=datasets.Features({k: datasets.Value("string")
                                                             for k in ("id", "image", "caption")}))
    recovery = Recovery.of(rows)
    assert recovery is not None and recovery.files(0) == [str(path)]
    items = list(recovery(0, 0, ValueError("parse")))
    assert [i.index for i in items if isinstance(i, BadRows)] == [20, 30] and len(items) == 42

    import datasets.utils.file_utils as file_utils

    def offline(*args, **kwargs):
        raise ConnectionError("connection reset by peer")

    monkeypatch.setattr(file_utils, "xopen", offline)
    (lost,) = list(recovery(0, 12, ValueError("parse")))
    assert isinstance(lost, UnreadableRest) and lost.transient and lost.index == 12 and lost.where == str(path)
    part = __import__("m2ib_lightning.data.sharding", fromlist=["assign"]).assign(1)
    assert [type(r).__name__ for _, _, r in iter_part(rows, part, recovery)] == ["UnreadableRest"]


# ------------------------------------------------------------------------------ command line
def fit_args(tmp_path: Path, model_dir: Path, data_file: Path, *extra: str) -> list[str]:
    return ["fit", "-c", str(ROOT / "configs" / "demo.yaml"),
            "--model.init_args.backbone.init_args.model", str(model_dir),
            "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
            "--model.init_args.steps", "1", "--model.init_args.copies", "1",
            "--data.init_args.data_files", str(data_file), "--data.init_args.batch_size", "8",
            "--data.init_args.limit", "null", "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "0",
            *extra]


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_train_py_fit_explains_the_good_lines_and_lists_the_bad_ones(tmp_path, tiny_clip_dir, pairs_dir, fmt):
    data_file = (issue_jsonl if fmt == "jsonl" else issue_csv)(tmp_path / f"captions.{fmt}", pairs_dir)
    extra = ["--data.init_args.path", "csv"] if fmt == "csv" else []
    main(fit_args(tmp_path, tiny_clip_dir, data_file, *extra))
    records = load_attributions(tmp_path / "attributions")
    assert sorted(records) == [f"pair-{i:02d}" for i in range(42) if i not in (20, 30)]
    builder = "json" if fmt == "jsonl" else "csv"
    assert set(records.skipped) == {f"{builder}-train-20", f"{builder}-train-30"}
    manifest = [json.loads(line) for f in sorted((tmp_path / "attributions" / "skipped").glob("*.jsonl"))
                for line in f.read_text().splitlines()]
    lines = sorted(e["source"]["line"] for e in manifest)
    assert lines == ([21, 31] if fmt == "jsonl" else [22, 32])
    assert all(e["reason"].startswith(f"unreadable line {e['source']['line']} of {data_file}") for e in manifest)


def test_skip_entries_keep_their_old_form_and_carry_duplicate_and_source_when_set():
    from m2ib_lightning.records import Skip

    plain = {"id": "a", "reason": "unreadable image: x"}
    assert Skip.from_dict(plain).to_json() == plain
    assert Skip.from_dict({**plain, "transient": True}).to_json() == {**plain, "transient": True}
    line = {"id": "json-train-20", "reason": "unreadable line 21 of f.jsonl: not valid JSON",
            "source": {"file": "f.jsonl", "line": 21, "row": 20}}
    duplicate = {"id": "x", "reason": "duplicate id 'x': row 5 of f.jsonl, first seen at row 1", "duplicate": True,
                 "source": {"file": "f.jsonl", "row": 5}}
    for entry in (line, duplicate):
        skip = Skip.from_dict(entry, "skipped")
        assert skip.to_json() == entry and hash(skip) == hash(Skip.from_dict(entry))
    assert Skip.from_dict(duplicate).duplicate and not Skip.from_dict(line).duplicate


def test_a_gzipped_jsonl_and_a_latin1_csv_are_read_on_too(backbone, tmp_path, pairs_dir):
    import gzip

    path = issue_jsonl(tmp_path / "captions.jsonl", pairs_dir)
    packed = tmp_path / "captions.jsonl.gz"
    packed.write_bytes(gzip.compress(path.read_bytes()))
    ids, skips = outcome(list(make_dm(backbone, data_files=str(packed), batch_size=8).train_dataloader()))
    assert len(ids) == 40 and sorted(s["source"]["line"] for s in skips.values()) == [21, 31]
    # Latin-1 declared: the accented caption is fine, the record with a field too many is not.
    csv = issue_csv(tmp_path / "pairs.csv", pairs_dir)
    dm = make_dm(backbone, path="csv", data_files=str(csv), builder_kwargs={"encoding": "latin-1"}, batch_size=8)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert len(ids) == 41 and list(skips) == ["csv-train-20"]


def test_a_truncated_tar_keeps_the_samples_before_the_cut(backbone, tmp_path, pairs_dir):
    images = [Path(p).read_bytes() for p in image_paths(pairs_dir)]
    path = tmp_path / "shard-00000.tar"
    with tarfile.open(path, "w") as tar:
        for i in range(10):
            add_member(tar, f"s{i:03d}.png", images[i % len(images)])
            add_member(tar, f"s{i:03d}.txt", b"a shape")
    data = path.read_bytes()
    cut = data.index(b"s007.png") + 512 + 200  # inside sample 7's image data
    path.write_bytes(data[:cut])
    dm = make_dm(backbone, path="webdataset", data_files=str(path), image_column="png", text_column="txt",
                 id_column="__key__", batch_size=4)
    ids, skips = outcome(list(dm.train_dataloader()))
    assert ids == [f"s{i:03d}" for i in range(7)]
    (lost,) = skips.values()
    assert lost["id"] == "webdataset-train-shard0-from-row-7" and "the rest of the shard is lost" in lost["reason"]
    assert not lost.get("transient")
