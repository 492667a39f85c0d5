"""Fuzzing the data layer: 200 corrupted variants of a small dataset through the datamodule and the tiny CLIP.

Each case takes 10 good pairs, writes them as JSON lines, CSV or parquet (or keeps the data file
clean and damages the images), and corrupts them one way, chosen by a fixed seed: bit flips,
truncations, inserted or deleted bytes, swapped columns, values of the wrong type, huge values,
duplicated rows, odd line endings. Every batch goes through the tiny CLIP's towers. A case passes
when nothing crashes (a file that cannot be opened at all may be refused with the documented
``DatasetOpenError`` / ``ConfigError``), it ends within a time bound, and every row is accounted
for exactly once: explained, or listed with a reason (with derived ids, position by position
against the rows the file holds).

The cases are plain seeded draws (``random.Random(seed)``) rather than hypothesis examples: each
case is one pytest id (``test_fuzz[jsonl-17]``), reproducible alone, and the suite needs no
extra dependency.
"""

from __future__ import annotations

import io
import json
import random
import re
import shutil
import signal
import struct
import zlib
from collections import Counter
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from m2ib_lightning import ImageTextDataModule, Preprocessor
from m2ib_lightning.errors import ConfigError, DatasetOpenError

pytestmark = pytest.mark.slow

CASES = 200
ROWS = 10
#: seconds one case may take (a healthy one takes well under a second)
TIME_LIMIT = 60
FORMATS = ("jsonl", "csv", "parquet", "images")
BYTE_MUTATIONS = ("bitflip", "truncate", "insert", "delete", "latin1")
ROW_MUTATIONS = ("swap", "types", "huge", "duplicates", "layout")


class CaseTimeout(Exception):
    pass


def base_rows(image_names: list[str]) -> list[dict]:
    return [{"id": f"r{i:02d}", "image": f"images/{image_names[i % len(image_names)]}",
             "caption": f"a red circle number {i}", "bbox": [1, 2, 30, 40]} for i in range(ROWS)]


# ------------------------------------------------------------------------------ byte mutations
def mutate_bytes(data: bytes, how: str, rng: random.Random) -> bytes:
    data = bytearray(data)
    if how == "bitflip":
        for _ in range(rng.randint(1, 6)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif how == "truncate":
        del data[rng.randrange(1, len(data)):]
    elif how == "insert":
        junk = rng.choice([b"\x00", b"\xff\xfe", b'"', b"\n", b"{", b",", b"\xe9", rng.randbytes(rng.randint(1, 16))])
        i = rng.randrange(len(data))
        data[i:i] = junk
    elif how == "delete":
        i = rng.randrange(len(data))
        del data[i:i + rng.randint(1, 40)]
    elif how == "latin1":  # an accented caption character in Latin-1 bytes
        spots = [m.start() for m in re.finditer(rb"circle", bytes(data))]
        if spots:
            data[rng.choice(spots) + 1] = 0xE9
    return bytes(data)


# ------------------------------------------------------------------------------- row mutations
def mutate_rows(rows: list[dict], how: str, rng: random.Random) -> list[dict]:
    rows = [dict(r) for r in rows]
    picked = rng.sample(range(len(rows)), rng.randint(1, 3))
    for i in picked:
        row = rows[i]
        if how == "swap":
            a, b = rng.sample(["id", "image", "caption", "bbox"], 2)
            row[a], row[b] = row[b], row[a]
        elif how == "types":
            row[rng.choice(["id", "image", "caption", "bbox"])] = rng.choice(
                [5, -1.5, True, None, [], {}, ["x", 1], {"a": {"b": 2}}, 10**30, "", "   "])
        elif how == "huge":
            column, value = rng.choice([("caption", "word " * rng.randint(2_000, 200_000)),
                                        ("image", "x" * 100_000), ("bbox", list(range(50_000))),
                                        ("id", "i" * 10_000), ("caption", 10**300)])
            row[column] = value
    if how == "duplicates":
        for i in picked:
            rows.insert(rng.randrange(len(rows) + 1), dict(rows[i]))
    return rows


def jsonl_bytes(rows: list[dict], rng: random.Random, layout: bool) -> bytes:
    lines = [json.dumps(r).encode() for r in rows]
    if not layout:
        return b"\n".join(lines) + b"\n"
    out = rng.choice([b"\xef\xbb\xbf", b""])
    for line in lines:
        out += line + rng.choice([b"\n", b"\r\n", b"\n\n", b"\n   \n"])
    return out


def csv_bytes(rows: list[dict], rng: random.Random, layout: bool) -> bytes:
    import csv

    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=rng.choice(["\n", "\r\n"]) if layout else "\n")
    writer.writerow(["id", "image", "caption"])
    for r in rows:
        writer.writerow([r.get("id"), r.get("image"), r.get("caption")])
    text = buf.getvalue()
    if layout:
        text = text.replace("\n", "\n\n", 2)
    return text.encode("utf-8", "surrogatepass")


def parquet_bytes(rows: list[dict], images: dict[str, bytes], rng: random.Random) -> bytes:
    def image_of(value):
        if isinstance(value, str) and value.startswith("images/") and value[7:] in images:
            return {"bytes": images[value[7:]], "path": None}
        return {"bytes": None, "path": value if isinstance(value, str) else None}

    def column(name):
        values = [r.get(name) for r in rows]
        try:
            return pa.array(values)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):  # mixed types: store them as text
            return pa.array([None if v is None else json.dumps(v) for v in values])

    table = pa.table({"id": column("id"), "caption": column("caption"),
                      "image": pa.array([image_of(r.get("image")) for r in rows],
                                        pa.struct([("bytes", pa.binary()), ("path", pa.string())]))})
    table = table.replace_schema_metadata({"huggingface": json.dumps(
        {"info": {"features": {"image": {"_type": "Image"}}}})})
    buf = io.BytesIO()
    pq.write_table(table, buf, row_group_size=rng.choice([2, 3, 5, 100]),
                   compression=rng.choice(["snappy", "none", "zstd"]))
    return buf.getvalue()


# ------------------------------------------------------------------------------ image mutations
def huge_png_header(width: int = 100_000, height: int = 100_000) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    return b"\x89PNG\r\n\x1a\n" + struct.pack(">I", len(ihdr)) + chunk + struct.pack(">I", zlib.crc32(chunk))


def mutate_image(data: bytes, rng: random.Random) -> bytes:
    how = rng.choice(["bitflip", "truncate", "text", "empty", "huge", "insert"])
    if how == "text":
        return b"this is not an image at all"
    if how == "empty":
        return b""
    if how == "huge":
        return huge_png_header()
    return mutate_bytes(data, {"bitflip": "bitflip", "truncate": "truncate", "insert": "insert"}[how], rng)


# ------------------------------------------------------------------------------------ one case
def build_case(seed: int, root: Path, pairs_dir: Path) -> dict:
    """Writes case ``seed``'s files under ``root``; returns what the datamodule and the checks need."""
    rng = random.Random(seed)
    fmt = FORMATS[seed % len(FORMATS)]
    (root / "images").mkdir()
    images = {}
    for p in sorted((pairs_dir / "images").glob("*.png")):
        images[p.name] = p.read_bytes()
    rows = base_rows(sorted(images))
    mutation = rng.choice(BYTE_MUTATIONS + ROW_MUTATIONS) if fmt != "images" else "images"
    if mutation in ROW_MUTATIONS and mutation != "layout":
        rows = mutate_rows(rows, mutation, rng)
    if fmt == "images" or rng.random() < 0.2:
        for name in rng.sample(sorted(images), rng.randint(1, 3)):
            images[name] = mutate_image(images[name], rng)
    for name, data in images.items():
        (root / "images" / name).write_bytes(data)
    data_fmt = rng.choice(["jsonl", "parquet"]) if fmt == "images" else fmt
    if data_fmt == "jsonl":
        data = jsonl_bytes(rows, rng, mutation == "layout")
    elif data_fmt == "csv":
        data = csv_bytes(rows, rng, mutation == "layout")
    else:
        data = parquet_bytes(rows, images, rng)
    if mutation in BYTE_MUTATIONS:
        data = mutate_bytes(data, mutation, rng)
    path = root / f"pairs.{data_fmt}"
    path.write_bytes(data)
    id_column = "id" if rng.random() < 0.3 else None
    return {"fmt": data_fmt, "mutation": mutation, "path": path, "id_column": id_column,
            "workers": 2 if rng.random() < 0.05 else 0, "batch_size": rng.choice([1, 3, 4, 8])}


def rows_in_file(case: dict) -> int | None:
    """How many rows the damaged file holds, where that is known without the code under test."""
    data = case["path"].read_bytes()
    if case["fmt"] == "jsonl":
        lines = data.removeprefix(b"\xef\xbb\xbf").split(b"\n")
        return sum(1 for line in lines if line.strip())
    if case["fmt"] == "parquet":
        try:
            return pq.ParquetFile(case["path"]).metadata.num_rows
        except Exception:  # noqa: BLE001 - footer damaged: the file cannot be located at all
            return None
    return None


def positions_of(entry_id: str, prefix: str) -> tuple[list[int], int | None]:
    """(positions an id accounts for, position from which the rest is lost or None), for derived ids."""
    rest = entry_id.removeprefix(prefix)
    if m := re.fullmatch(r"shard0-from-row-(\d+)", rest):
        return [], int(m.group(1))
    if m := re.fullmatch(r"shard0-rows-(\d+)-to-(\d+)", rest):
        return list(range(int(m.group(1)), int(m.group(2)) + 1)), None
    assert rest.isdigit(), entry_id
    return [int(rest)], None


def check_accounting(case: dict, batches: list[dict]) -> None:
    pairs = [i for b in batches for i in b["ids"]]
    skips = [s for b in batches for s in b["skipped"]]
    assert all(isinstance(s["reason"], str) and s["reason"] for s in skips)
    assert len(pairs) == len(set(pairs)), "a pair came out twice"
    assert not set(pairs) & {s["id"] for s in skips if not s.get("duplicate")}, "explained and skipped"
    assert all(s["reason"].startswith("duplicate id") for s in skips if s.get("duplicate"))
    total = rows_in_file(case)
    if case["id_column"] is not None:
        if not any("-from-row-" in s["id"] for s in skips) and total is not None and case["fmt"] == "jsonl":
            assert len(pairs) + len(skips) == total
        return
    prefix = {"jsonl": "json", "csv": "csv", "parquet": "parquet"}[case["fmt"]] + "-train-"
    seen: Counter[int] = Counter()
    lost = None
    for entry_id in pairs + [s["id"] for s in skips]:
        positions, rest = positions_of(entry_id, prefix)
        seen.update(positions)
        lost = rest if rest is not None else lost
    assert all(n == 1 for n in seen.values()), f"positions accounted for twice: {seen.most_common(3)}"
    upper = lost if lost is not None else max(seen, default=-1) + 1
    assert set(seen) == set(range(upper)), "a row was neither explained nor listed"
    if total is not None and lost is None:
        assert upper == total, f"{upper} rows accounted for, the file holds {total}"
    if lost is not None:
        assert not [p for p in seen if p >= lost]


def run_case(case: dict, backbone) -> list[dict] | None:
    """The case's batches, each through the tiny CLIP; ``None`` if the dataset was refused at open."""
    dm = ImageTextDataModule(path="json" if case["fmt"] == "jsonl" else case["fmt"], data_files=str(case["path"]),
                             id_column=case["id_column"], batch_size=case["batch_size"],
                             num_workers=case["workers"], extra_columns=[])
    dm.preprocessor = Preprocessor.from_backbone(backbone)
    try:
        loader = dm.train_dataloader()
    except (DatasetOpenError, ConfigError):
        return None
    batches = []
    with torch.no_grad():
        for batch in loader:
            if batch["ids"]:
                image = backbone.embed("vision", {"pixel_values": batch["pixel_values"]})
                text = backbone.embed("text", {"input_ids": batch["input_ids"],
                                               "attention_mask": batch["attention_mask"]})
                assert image.shape[0] == text.shape[0] == len(batch["ids"])
                assert torch.isfinite(image).all() and torch.isfinite(text).all()
            batches.append(batch)
    return batches


def _alarm(signum, frame):
    raise CaseTimeout(f"case took more than {TIME_LIMIT} s")


@pytest.fixture(scope="module")
def quiet_datasets():
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    yield


@pytest.mark.parametrize("seed", range(CASES), ids=[f"{FORMATS[s % len(FORMATS)]}-{s}" for s in range(CASES)])
def test_fuzz(seed, tmp_path, pairs_dir, backbone, quiet_datasets):
    case = build_case(seed, tmp_path, pairs_dir)
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIME_LIMIT)
    try:
        batches = run_case(case, backbone)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    if batches is None:  # refused at open: only when the damage reaches what datasets opens the file with
        assert case["mutation"] in BYTE_MUTATIONS, f"{case['mutation']} data refused"
        return
    check_accounting(case, batches)
    shutil.rmtree(tmp_path / "images", ignore_errors=True)
