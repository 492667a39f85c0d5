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


def test_open_rows_streams_dicts_with_images_undecoded(parquet_file, pairs_dir, tmp_path):
    from m2ib_lightning.data import data_source, open_rows
    from m2ib_lightning.errors import ConfigError, DatasetOpenError

    assert data_source(parquet_file) == ("parquet", str(parquet_file))
    assert data_source("org/some-dataset") == ("org/some-dataset", None)  # not a file: a dataset id or folder
    rows = list(open_rows(*data_source(parquet_file), image_column="image"))
    assert [r["id"] for r in rows] == ["p0", "p1", "p2", "p3", "p4"]
    assert rows[2]["image"]["bytes"] == b"corrupt bytes, not a png"  # undecoded: the caller reads it
    first = next(iter(open_rows(*data_source(pairs_dir / "pairs.jsonl"))))
    assert first == json.loads((pairs_dir / "pairs.jsonl").read_text().splitlines()[0])
    (tmp_path / "pairs.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"pairs.txt: expected a .jsonl, .json, .parquet or .csv file"):
        data_source(tmp_path / "pairs.txt")
    with pytest.raises(DatasetOpenError, match=r"could not open dataset 'json' \(data_files='.*nowhere\*.jsonl'"):
        next(iter(open_rows("json", str(tmp_path / "nowhere*.jsonl"))))


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
    dm.pass_over({rows[0]["id"], rows[3]["id"]})
    batches = iterate(dm)
    ids = [i for b in batches for i in b["ids"]]
    assert ids == [r["id"] for r in rows if r["id"] not in dm.exclude_ids]
    boxes = [box for b in batches for box in b["extra"]["bbox"]]
    assert boxes == [r["bbox"] for r in rows if r["id"] not in dm.exclude_ids]


# ----------------------------------------------------------------------------- repairs and skips
def encoded(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels but whose data is tiny (a decompression bomb)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def test_unusual_modes_become_rgb_and_lossy_repairs_are_noted():
    from m2ib_lightning.data.images import read_image

    gradient = np.tile(np.arange(0, 4096, 64, dtype=np.uint16), (8, 1))  # 12-bit data in a 16-bit PNG
    palette = Image.new("P", (6, 4), 1)
    palette.putpalette([0, 0, 0, 250, 10, 10] + [0] * 762)
    palette.info["transparency"] = 0
    cases = {
        "I;16": (encoded(Image.fromarray(gradient)), "rescaled from 0..4032 to 8 bits"),
        "F": (encoded(Image.fromarray(np.linspace(-1, 1, 32, dtype=np.float32).reshape(4, 8)), "TIFF"),
              "rescaled from -1..1 to 8 bits"),
        "CMYK": (encoded(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG"), "CMYK"),
        "P": (encoded(palette), None),
        "LA": (encoded(Image.new("LA", (5, 5), (120, 200))), None),
        "1": (encoded(Image.new("1", (5, 5), 1)), None),
        "L": (encoded(Image.new("L", (5, 5), 90), "JPEG"), None),
    }
    for mode, (data, note) in cases.items():
        loaded = read_image(data)
        assert loaded.image.mode == "RGB", mode
        if note is None:
            assert loaded.notes == [], (mode, loaded.notes)
        else:
            assert len(loaded.notes) == 1 and note in loaded.notes[0], (mode, loaded.notes)
    sixteen = np.asarray(read_image(cases["I;16"][0]).image)[0, :, 0]
    assert sixteen[0] == 0 and sixteen[-1] == 255 and np.all(np.diff(sixteen.astype(int)) > 0)  # not clipped white
    assert read_image(cases["CMYK"][0]).image.getpixel((0, 0))[0] > 200  # cyan-free magenta+yellow: red


def test_bombs_zero_size_and_foreign_formats_are_skipped():
    from m2ib_lightning.data.images import ImageError, read_image

    with pytest.raises(ImageError, match=r"image too large: 5000 x 4000 = 20000000 pixels, more than "
                                         r"max_image_pixels=1000000"):
        read_image(png_header_only(5000, 4000), max_pixels=1_000_000)
    with pytest.raises(ImageError, match=r"zero-size image \(0 x 5\)"):
        read_image(Image.new("RGB", (0, 5)))
    with pytest.raises(ImageError, match="unreadable image"):  # PIL knows EPS; we do not hand it Ghostscript
        read_image(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n")
    with pytest.raises(ImageError, match="unreadable image"):
        read_image(png_header_only(0, 10))
    with pytest.raises(ImageError, match="no image in this row"):
        read_image(b"")
    # CLIP scales the short side to the input size: a 1 x 3000 strip would become 224 x 672000.
    with pytest.raises(ImageError, match=r"extreme aspect ratio: 3000 x 1, more than max_aspect_ratio=20"):
        read_image(encoded(Image.new("RGB", (3000, 1))))
    assert read_image(encoded(Image.new("RGB", (300, 20))), max_aspect_ratio=20).image.size == (300, 20)


def test_a_sample_the_preprocessor_refuses_is_skipped_and_the_batch_goes_on(backbone):
    from m2ib_lightning.data import Collate

    real = Preprocessor.from_backbone(backbone)

    class Picky(Preprocessor):
        def __call__(self, images, captions):
            if any(c == "poison" for c in captions):
                raise RuntimeError("cannot process this one")
            return super().__call__(images, captions)

    collate = Collate(Picky(real.tokenizer, real.image_processor, real.max_length))
    image = Image.new("RGB", (20, 20), (10, 200, 10))
    samples = [{"id": i, "image": image, "caption": c, "extra": {}} for i, c in
               (("a", "a green square"), ("b", "poison"), ("c", "another green square"))]
    batch = collate(samples + [{"id": "d", "skip": "unreadable image: x"}])
    assert batch["ids"] == ["a", "c"] and batch["pixel_values"].shape[0] == 2
    assert [s["id"] for s in batch["skipped"]] == ["d", "b"]
    assert "preprocessing failed: RuntimeError: cannot process this one" in batch["skipped"][1]["reason"]


def test_local_paths_are_refused_when_the_dataset_is_remote(tmp_path):
    from m2ib_lightning.data.images import ImageError, read_image

    (tmp_path / "x.png").write_bytes(png_bytes())
    assert read_image("x.png", tmp_path).image.size == (40, 30)
    with pytest.raises(ImageError, match="local path .* but the dataset is remote; set image_root"):
        read_image(str(tmp_path / "x.png"), local_files=False)


@pytest.mark.parametrize(
    "value, message",
    [
        (b"\xff\xfe caption", "undecodable caption: not UTF-8"),
        ("broken \ud800 surrogate", "undecodable caption: invalid character at position 7"),
        (42, "not text: got int '42'"),
        (["a", "list"], "not text: got list"),
        (None, "empty or missing caption (None)"),
        (" \n\t", "empty or missing caption"),
    ],
)
def test_unreadable_captions_give_reasons(value, message):
    from m2ib_lightning.data import read_caption

    with pytest.raises(ValueError) as info:
        read_caption(value)
    assert message in str(info.value)


def test_read_caption_decodes_and_strips():
    from m2ib_lightning.data import read_caption

    assert read_caption("  a red circle \n") == "a red circle"
    assert read_caption("une épée".encode()) == "une épée"


def test_caption_problems_and_truncation_in_a_stream(backbone, tmp_path):
    words = "a red circle on the left and a blue square on the right".split()
    long_caption = " ".join(words * 12)  # about 130 tokens with BOS/EOS
    captions = [long_caption.encode(), b"a red circle", b"bad \xff\xfe bytes", None, b"no id here"]
    table = {
        "id": ["long", "ok", "latin", "none", None],
        "image": [png_bytes(size=(20 + i, 30)) for i in range(5)],
        "caption": captions,  # a binary column: captions as stored bytes, one of them not UTF-8
    }
    path = tmp_path / "captions.parquet"
    datasets.Dataset.from_dict(table).to_parquet(str(path))
    batches = iterate(make_dm(backbone, path="parquet", data_files=str(path), batch_size=8))
    ids, reasons = outcome(batches)
    assert ids == ["long", "ok", "parquet-train-4"]
    assert "undecodable caption: not UTF-8" in reasons["latin"] and "empty or missing caption" in reasons["none"]
    (batch,) = batches
    limit = Preprocessor.from_backbone(backbone).max_length
    assert batch["input_ids"].shape[1] == limit
    full = len(backbone.tokenizer(long_caption)["input_ids"])
    assert full > limit
    repaired = {r["id"]: r["reason"] for r in batch["repaired"]}
    assert repaired["long"] == f"caption truncated from {full} to {limit} tokens"
    assert "empty id in column 'id'" in repaired[ids[2]]
    assert "ok" not in repaired


def test_a_line_the_reader_cannot_parse_costs_that_line_only(backbone, tmp_path, pairs_dir):
    image = str(pairs_dir / "images" / "demo-000.png")
    good = tmp_path / "a.jsonl"
    write_jsonl(good, [{"id": f"a{i}", "image": image, "caption": "a red circle"} for i in range(3)])
    broken = tmp_path / "b.jsonl"
    # A lone surrogate escape: Python's json reads it, pyarrow's reader (used by datasets) refuses the file.
    broken.write_text(json.dumps({"id": "b0", "image": image, "caption": "bad \ud800 text"}) + "\n"
                      + json.dumps({"id": "b1", "image": image, "caption": "a fine one"}) + "\n")
    batches = iterate(make_dm(backbone, data_files=[str(good), str(broken)], batch_size=2))
    ids, reasons = outcome(batches)
    assert ids == ["a0", "a1", "a2", "b1"]
    assert reasons == {"json-train-1-0": f"unreadable line 1 of {broken}: ArrowInvalid: JSON parse error: "
                                         "The surrogate pair in string is invalid."}
    (entry,) = [s for b in batches for s in b["skipped"]]
    assert entry["source"] == {"file": str(broken), "line": 1, "row": 0} and "transient" not in entry


def test_without_a_tolerant_reader_the_rest_of_the_shard_is_recorded_and_the_stream_goes_on(
        backbone, tmp_path, pairs_dir, monkeypatch):
    import m2ib_lightning.data.stream as stream

    monkeypatch.setattr(stream.Recovery, "of", classmethod(lambda cls, *args: None))
    image = str(pairs_dir / "images" / "demo-000.png")
    good = tmp_path / "a.jsonl"
    write_jsonl(good, [{"id": f"a{i}", "image": image, "caption": "a red circle"} for i in range(3)])
    broken = tmp_path / "b.jsonl"
    broken.write_text(json.dumps({"id": "b0", "image": image, "caption": "bad \ud800 text"}) + "\n")
    batches = iterate(make_dm(backbone, data_files=[str(good), str(broken)], batch_size=2))
    ids, reasons = outcome(batches)
    assert ids == ["a0", "a1", "a2"]
    (lost,) = reasons
    assert lost == "json-train-shard1-from-row-0"
    assert "rows 0+ of shard 1 unreadable, the rest of the shard is lost" in reasons[lost]


def test_setup_takes_rank_and_world_size_from_the_trainer(backbone):
    from types import SimpleNamespace

    dm = ImageTextDataModule()
    dm.trainer = SimpleNamespace(global_rank=1, world_size=3, lightning_module=SimpleNamespace(backbone=backbone))
    dm.setup("fit")
    assert (dm.rank, dm.world_size) == (1, 3) and dm.preprocessor.max_length == 77


@pytest.mark.parametrize("workers", [0, 2])
def test_workers_split_a_single_file_by_rows_without_loss(backbone, messy_jsonl, workers):
    path, expected = messy_jsonl
    batches = iterate(make_dm(backbone, data_files=str(path), batch_size=2, num_workers=workers))
    ids, reasons = outcome(batches)
    assert sorted(ids) == sorted(k for k, v in expected.items() if v is None)
    assert set(reasons) == {k for k, v in expected.items() if v is not None}
