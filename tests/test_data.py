"""The data module: every row comes out once (as a pair or a skip), bad rows never crash the stream."""

from __future__ import annotations

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning import ImageTextDataModule, Preprocessor
from m2ib_lightning.data import load_image

SIZE = 64  # the tiny CLIP's input size (conftest.IMAGE_SIZE)


def png_bytes(mode: str = "RGB", size: tuple[int, int] = (40, 30), colour=None) -> bytes:
    if colour is None:
        colour = {"RGB": (200, 30, 60), "L": 90, "RGBA": (20, 200, 40, 128)}[mode]
    buf = io.BytesIO()
    Image.new(mode, size, colour).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def iterate(dm: ImageTextDataModule) -> list[dict]:
    return list(dm.train_dataloader())


def outcome(batches: list[dict]) -> tuple[list[str], dict[str, str]]:
    """(ids of pairs in order, id -> skip reason), checking that nothing comes out twice."""
    ids = [i for b in batches for i in b["ids"]]
    skipped = [s for b in batches for s in b["skipped"]]
    reasons = {s["id"]: s["reason"] for s in skipped}
    assert len(ids) == len(set(ids)) and len(reasons) == len(skipped)
    assert not set(ids) & set(reasons)
    return ids, reasons


def make_dm(backbone, **kwargs) -> ImageTextDataModule:
    dm = ImageTextDataModule(**kwargs)
    dm.preprocessor = Preprocessor.from_backbone(backbone)
    return dm


@pytest.fixture
def messy_jsonl(tmp_path, pairs_dir) -> tuple[Path, dict[str, str | None]]:
    """A jsonl of good and bad rows; returns it with ``id -> expected skip word`` (None: a pair)."""
    img = tmp_path / "img"
    img.mkdir()
    good = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:3]
    rows = [{"id": r["id"], "image": str(pairs_dir / r["image"]), "caption": r["caption"]} for r in good]
    expected: dict[str, str | None] = {r["id"]: None for r in rows}

    (img / "corrupt.png").write_bytes(b"\x00\x01definitely not an image" * 20)
    whole = png_bytes(size=(64, 64), colour=(10, 20, 30))
    (img / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (img / "gray.png").write_bytes(png_bytes("L"))
    (img / "rgba.png").write_bytes(png_bytes("RGBA"))
    (img / "fine.png").write_bytes(png_bytes("RGB"))

    def add(sample_id, image, caption, skip):
        rows.append({"id": sample_id, "image": image, "caption": caption})
        expected[sample_id] = skip

    add("corrupt", "img/corrupt.png", "a red circle", "image")
    add("truncated", "img/truncated.png", "a red circle", "image")
    add("missing", "img/not-there.png", "a red circle", "image")
    add("gray", "img/gray.png", "a blue square on the right", None)
    add("empty-caption", "img/fine.png", "", "caption")
    add("blank-caption", "img/fine.png", "   \t ", "caption")
    add("null-caption", "img/fine.png", None, "caption")
    add("rgba", "img/rgba.png", "a green circle", None)
    add("fine", "img/fine.png", "  a red square  ", None)
    return write_jsonl(tmp_path / "messy.jsonl", rows), expected


def test_every_row_is_a_pair_or_a_skip(backbone, messy_jsonl):
    path, expected = messy_jsonl
    batches = iterate(make_dm(backbone, data_files=str(path), batch_size=3))
    assert len(batches) == 4  # 12 rows
    ids, reasons = outcome(batches)
    assert set(ids) | set(reasons) == set(expected)
    assert ids == [k for k, v in expected.items() if v is None]  # stream order is kept
    for sample_id, word in expected.items():
        if word is not None:
            assert sample_id in reasons, sample_id
            assert word in reasons[sample_id].lower(), (sample_id, reasons[sample_id])

    tok = backbone.tokenizer
    captions = {json.loads(line)["id"]: json.loads(line)["caption"] for line in path.read_text().splitlines()}
    for batch in batches:
        n = len(batch["ids"])
        if n == 0:
            assert "pixel_values" not in batch and "input_ids" not in batch
            continue
        assert batch["pixel_values"].shape == (n, 3, SIZE, SIZE)
        assert batch["pixel_values"].dtype == torch.float32
        length = batch["input_ids"].shape[1]
        assert batch["input_ids"].shape == batch["attention_mask"].shape == (n, length)
        for i, sample_id in enumerate(batch["ids"]):
            alone = tok(captions[sample_id].strip())["input_ids"]
            valid = batch["attention_mask"][i].bool()
            assert batch["input_ids"][i][valid].tolist() == alone
        assert batch["attention_mask"].sum(1).max() == length  # padded to the longest, no further


def test_grayscale_and_rgba_are_converted(backbone, messy_jsonl):
    path, _ = messy_jsonl
    batches = iterate(make_dm(backbone, data_files=str(path), batch_size=16))
    (batch,) = batches
    proc = backbone.image_processor
    mean = torch.tensor(proc.image_mean).view(3, 1, 1)
    std = torch.tensor(proc.image_std).view(3, 1, 1)
    gray = batch["pixel_values"][batch["ids"].index("gray")] * std + mean
    torch.testing.assert_close(gray, torch.full_like(gray, 90 / 255), atol=2e-2, rtol=0)
    rgba = batch["pixel_values"][batch["ids"].index("rgba")] * std + mean
    target = torch.tensor([20, 200, 40]).view(3, 1, 1) / 255
    torch.testing.assert_close(rgba, target.expand_as(rgba), atol=2e-2, rtol=0)


def test_relative_paths_resolve_against_the_data_file(backbone, pairs_dir):
    batches = iterate(make_dm(backbone, data_files=str(pairs_dir / "pairs.jsonl"), batch_size=4))
    ids, reasons = outcome(batches)
    assert reasons == {} and ids == [f"demo-{i:03d}" for i in range(6)]


def test_image_root_overrides_the_data_file_folder(backbone, pairs_dir, tmp_path):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:2]
    path = write_jsonl(tmp_path / "elsewhere.jsonl", rows)
    ids, reasons = outcome(iterate(make_dm(backbone, data_files=str(path))))
    assert ids == [] and set(reasons) == {r["id"] for r in rows}
    ids, reasons = outcome(iterate(make_dm(backbone, data_files=str(path), image_root=str(pairs_dir))))
    assert ids == [r["id"] for r in rows] and reasons == {}


@pytest.fixture
def parquet_file(tmp_path) -> Path:
    images = [png_bytes(size=(20 + i, 30)) for i in range(4)]
    images.insert(2, b"corrupt bytes, not a png")
    data = {
        "id": [f"p{i}" for i in range(5)],
        "image": [{"bytes": b, "path": None} for b in images],
        "caption": ["a red circle", "a blue square", "a green triangle", "a red square", "a blue circle"],
    }
    path = tmp_path / "pairs.parquet"
    datasets.Dataset.from_dict(data).cast_column("image", datasets.Image()).to_parquet(str(path))
    return path


def test_parquet_with_embedded_bytes_and_a_corrupt_row(backbone, parquet_file):
    batches = iterate(make_dm(backbone, path="parquet", data_files=str(parquet_file), batch_size=2))
    ids, reasons = outcome(batches)
    assert ids == ["p0", "p1", "p3", "p4"]
    assert list(reasons) == ["p2"] and "image" in reasons["p2"]
    assert sum(b["pixel_values"].shape[0] for b in batches if b["ids"]) == 4
    assert all(b["pixel_values"].shape[1:] == (3, SIZE, SIZE) for b in batches if b["ids"])


def test_derived_ids_are_stable_and_distinct(backbone, parquet_file):
    dm = make_dm(backbone, path="parquet", data_files=str(parquet_file), id_column=None, batch_size=2)
    ids, reasons = outcome(iterate(dm))
    again, reasons_again = outcome(iterate(dm))
    assert again == ids and list(reasons_again) == list(reasons)
    every = ids + list(reasons)
    assert len(every) == 5 and len(set(every)) == 5
    assert not {"p0", "p1", "p2", "p3", "p4"} & set(every)  # not the id column
    # The corrupt third row keeps the id of its position.
    assert list(reasons) == [sorted(every, key=lambda s: int(s.rsplit("-", 1)[1]))[2]]


def test_limit(backbone, messy_jsonl, parquet_file):
    path, expected = messy_jsonl
    ids, reasons = outcome(iterate(make_dm(backbone, data_files=str(path), limit=5, batch_size=2)))
    assert ids + list(reasons) != [] and set(ids) | set(reasons) == set(list(expected)[:5])
    assert iterate(make_dm(backbone, data_files=str(path), limit=0)) == []
    ids, reasons = outcome(iterate(make_dm(backbone, path="parquet", data_files=str(parquet_file), limit=2)))
    assert ids == ["p0", "p1"] and reasons == {}


def test_missing_data_file_is_named(backbone, tmp_path):
    missing = tmp_path / "nowhere" / "pairs.jsonl"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        iterate(make_dm(backbone, data_files=str(missing)))


@pytest.mark.parametrize("column", ["image_column", "text_column", "id_column"])
def test_wrong_column_lists_the_columns(backbone, messy_jsonl, column):
    path, _ = messy_jsonl
    with pytest.raises(ValueError, match=r"'nope'.*columns: \['caption', 'id', 'image'\]"):
        iterate(make_dm(backbone, data_files=str(path), **{column: "nope"}))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_size": 0}, "batch_size must be an int >= 1, got 0"),
        ({"num_workers": -1}, "num_workers must be an int >= 0, got -1"),
        ({"limit": -1}, "limit must be >= 0 or null, got -1"),
    ],
)
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ImageTextDataModule(**kwargs)


def test_load_image_sources(tmp_path):
    data = png_bytes("L", size=(7, 5))
    (tmp_path / "g.png").write_bytes(data)
    loaded = [
        load_image(data, None),
        load_image(bytearray(data), None),
        load_image({"bytes": data, "path": None}, None),
        load_image({"bytes": None, "path": "g.png"}, tmp_path),
        load_image("g.png", tmp_path),
        load_image(tmp_path / "g.png", None),
        load_image(str(tmp_path / "g.png"), Path("/somewhere/else")),  # absolute wins over root
        load_image(Image.open(io.BytesIO(data)), None),
    ]
    for image in loaded:
        assert image.mode == "RGB" and image.size == (7, 5)
        assert np.asarray(image).tolist() == [[[90, 90, 90]] * 7] * 5


@pytest.mark.parametrize(
    "value, message",
    [
        (b"not an image", "unreadable image"),
        ({"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}, "unreadable image"),
        ("missing.png", "unreadable image"),
        (None, "no image"),
        ("", "no image"),
        ({"bytes": None, "path": None}, "no image"),
        (12, "no image"),
    ],
)
def test_load_image_failures_are_value_errors(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        load_image(value, tmp_path)


def test_decompression_bomb_is_a_value_error(monkeypatch):
    data = png_bytes(size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # 4096 px > 2 x limit: PIL refuses
    with pytest.raises(ValueError, match="unreadable image"):
        load_image(data, None)


def test_extra_columns_ride_along_and_excluded_ids_are_passed_over(backbone, pairs_dir):
    dm = make_dm(backbone, data_files=str(pairs_dir / "pairs.jsonl"), extra_columns=["bbox"], batch_size=2)
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    dm.exclude_ids = {rows[0]["id"], rows[3]["id"]}
    batches = iterate(dm)
    ids = [i for b in batches for i in b["ids"]]
    assert ids == [r["id"] for r in rows if r["id"] not in dm.exclude_ids]
    boxes = [box for b in batches for box in b["extra"]["bbox"]]
    assert boxes == [r["bbox"] for r in rows if r["id"] not in dm.exclude_ids]
