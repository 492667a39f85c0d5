"""Local formats through ``datasets``' builders: webdataset tars, imagefolder + metadata, TSV, sharded parquet.

Also: every rank's and worker's part, read without any process group, covers every row once, and
derived ids do not depend on the split.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import pytest
from PIL import Image

from m2ib_lightning import ImageTextDataModule, Preprocessor


def png(colour=(200, 30, 60), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def make_dm(backbone, **kwargs) -> ImageTextDataModule:
    dm = ImageTextDataModule(**kwargs)
    dm.preprocessor = Preprocessor.from_backbone(backbone)
    return dm


def outcome(batches: list[dict]) -> tuple[list[str], dict[str, str]]:
    ids = [i for b in batches for i in b["ids"]]
    reasons = {s["id"]: s["reason"] for b in batches for s in b["skipped"]}
    assert len(ids) == len(set(ids)) and not set(ids) & set(reasons)
    return ids, reasons


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_webdataset_tar_shards(backbone, tmp_path):
    """Two tar shards of (png, txt, json) samples, one corrupt image and one empty caption among them."""
    for s in range(2):
        with tarfile.open(tmp_path / f"shard-{s:05d}.tar", "w") as tar:
            for i in range(3):
                key = f"s{s}-{i:03d}"
                image = b"corrupt" * 9 if key == "s1-001" else png((40 * i, 80 * s, 90))
                add(tar, f"{key}.png", image)
                add(tar, f"{key}.txt", b"" if key == "s0-002" else f"a square, sample {key}".encode())
                add(tar, f"{key}.json", json.dumps({"source": f"tar {s}"}).encode())
    dm = make_dm(backbone, path="webdataset", data_files=str(tmp_path / "shard-*.tar"), image_column="png",
                 text_column="txt", id_column="__key__", extra_columns=["json"], batch_size=2, num_workers=2)
    batches = list(dm.train_dataloader())
    ids, reasons = outcome(batches)
    assert sorted(ids) == ["s0-000", "s0-001", "s1-000", "s1-002"]
    assert set(reasons) == {"s0-002", "s1-001"}
    assert "caption" in reasons["s0-002"] and "unreadable image" in reasons["s1-001"]
    extras = {i: e for b in batches if b["ids"] for i, e in zip(b["ids"], b["extra"]["json"])}
    assert extras["s1-002"] == {"source": "tar 1"}


def test_imagefolder_with_metadata_and_derived_ids(backbone, tmp_path):
    folder = tmp_path / "my_images"
    (folder / "imgs").mkdir(parents=True)
    rows = []
    for i in range(4):
        (folder / "imgs" / f"{i}.png").write_bytes(png((0, 50 * i, 0)))
        rows.append({"file_name": f"imgs/{i}.png", "caption": f"green square number {i}"})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    by_builder = make_dm(backbone, path="imagefolder", data_files=str(folder / "**"), id_column=None, batch_size=3)
    ids, reasons = outcome(list(by_builder.train_dataloader()))
    assert ids == [f"imagefolder-train-{i}" for i in range(4)] and reasons == {}
    by_folder = make_dm(backbone, path=str(folder), id_column=None, batch_size=3)  # a local dataset directory
    ids, reasons = outcome(list(by_folder.train_dataloader()))
    assert ids == [f"my_images-train-{i}" for i in range(4)] and reasons == {}


def test_conceptual_captions_style_tsv_with_builder_kwargs(backbone, tmp_path):
    """Google's CC files are header-less TSV (caption, url); here with local paths instead of URLs."""
    (tmp_path / "a.png").write_bytes(png())
    lines = ["a red square\ta.png", "the same square again\ta.png", "\ta.png", "a missing one\tnope.png"]
    path = tmp_path / "cc.tsv"
    path.write_text("\n".join(lines) + "\n")
    dm = make_dm(backbone, path="csv", data_files=str(path), image_column="image_url", id_column=None,
                 builder_kwargs={"sep": "\t", "column_names": ["caption", "image_url"]}, batch_size=4)
    ids, reasons = outcome(list(dm.train_dataloader()))
    assert ids == ["csv-train-0", "csv-train-1"]
    assert "caption" in reasons["csv-train-2"] and "unreadable image" in reasons["csv-train-3"]


@pytest.fixture(scope="module")
def parquet_shards(tmp_path_factory) -> list[str]:
    """Three parquet files of 7, 5 and 6 rows (ids p<file>-<row>), one corrupt image in the second."""
    root = tmp_path_factory.mktemp("parquet-shards")
    files = []
    for f, n in enumerate((7, 5, 6)):
        images = [b"junk" if (f, i) == (1, 2) else png((10 * i, 20 * f, 0), size=(8 + i, 8)) for i in range(n)]
        data = {
            "id": [f"p{f}-{i}" for i in range(n)],
            "image": [{"bytes": b, "path": None} for b in images],
            "caption": [f"square {f} {i}" for i in range(n)],
        }
        path = root / f"part-{f}.parquet"
        datasets.Dataset.from_dict(data).cast_column("image", datasets.Image()).to_parquet(str(path))
        files.append(str(path))
    return files


def rank_outcomes(backbone, world_size: int, **kwargs) -> list[tuple[list[str], dict[str, str]]]:
    """Each rank's (ids, skips), reading each rank's part in turn (no process group needed)."""
    results = []
    for rank in range(world_size):
        dm = make_dm(backbone, **kwargs)
        dm.rank, dm.world_size = rank, world_size
        stream = dm.dataset()
        samples = list(stream)
        results.append(([s["id"] for s in samples if "skip" not in s], {s["id"]: s["skip"] for s in samples
                                                                        if "skip" in s}))
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("id_column", ["id", None])
def test_rank_parts_cover_every_row_once_and_ids_do_not_depend_on_the_split(backbone, parquet_shards, world_size,
                                                                           id_column):
    kwargs = {"path": "parquet", "data_files": parquet_shards, "id_column": id_column}
    parts = rank_outcomes(backbone, world_size, **kwargs)
    ids = [i for part_ids, _ in parts for i in part_ids]
    skips = {k: v for _, part_skips in parts for k, v in part_skips.items()}
    assert len(ids) == len(set(ids)) == 17 and len(skips) == 1
    (single_ids, single_skips), = rank_outcomes(backbone, 1, **kwargs)
    assert sorted(ids) == sorted(single_ids) and skips == single_skips
    if id_column is None:
        assert list(skips) == ["parquet-train-1-2"]  # (shard 1, row 2), whatever the world size
    if world_size == 3:  # 3 files, 3 ranks: each rank reads one whole file
        file_of = (lambda i: i.split("-")[0][1:]) if id_column else (lambda i: i.split("-")[2])
        assert [sorted({file_of(i) for i in part_ids}) for part_ids, _ in parts] == [["0"], ["1"], ["2"]]


def test_limit_is_global_across_ranks(backbone, parquet_shards):
    parts = rank_outcomes(backbone, 2, path="parquet", data_files=parquet_shards, limit=9)
    ids = sorted(i for part_ids, skips in parts for i in [*part_ids, *skips])
    assert ids == sorted([f"p0-{i}" for i in range(7)] + ["p1-0", "p1-1"])


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
@pytest.mark.parametrize("workers", [0, 2, 3])  # 2: rows per worker; 3: one whole file per worker
def test_dataloader_workers_cover_every_row_once(backbone, parquet_shards, workers):
    dm = make_dm(backbone, path="parquet", data_files=parquet_shards, batch_size=4, num_workers=workers)
    ids, reasons = outcome(list(dm.train_dataloader()))
    assert len(ids) == 17 and list(reasons) == ["p1-2"]


def test_train_dataloader_needs_a_preprocessor(tmp_path: Path):
    with pytest.raises(RuntimeError, match="no preprocessor"):
        ImageTextDataModule(data_files=str(tmp_path / "x.jsonl")).train_dataloader()
