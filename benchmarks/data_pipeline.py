"""Throughput of the data pipeline alone, next to the attribution throughput on the same machine.

The pipeline is :class:`m2ib_lightning.ImageTextDataModule` end to end: ``datasets`` streaming,
decoding, the backbone's image processor and tokenizer, batching (everything up to the model).
It is timed on two local formats holding the same pairs:

* ``parquet``: images embedded as JPEG bytes in 4 parquet files (the layout of ROCO on the hub);
* ``folder``: a folder of JPEG files + ``captions.jsonl`` (``configs/local_folder.yaml``).

With ``--rows N`` it times instead the row stream alone (reading, sharding, sample ids and the
duplicate check; no image is decoded) on clean JSON-lines, CSV and parquet files of ``N`` rows,
next to ``datasets``' own reading of the same files (the floor), and the same files with one bad
line (row group) near the start, which ``datasets`` gives up on and the tolerant reader of
:mod:`m2ib_lightning.data.recover` reads on from: the recovery must cost nothing while a file is
clean.

The images are synthetic photographs (shapes, a gradient and sensor-like noise, JPEG quality 90) of
``--image-size`` pixels, about the size of ROCO's; captions are about 20 words. Attribution is
:class:`m2ib_lightning.M2IBAttribution` with the reference settings (10 steps, 10 copies, both
sides) on a CLIP with the ViT-B/32 geometry and random weights (compute does not depend on the
weights), on the same pairs. Measurements are interleaved over ``--rounds`` rounds and the median
is printed, so a busy machine slows both alike. The script prints numbers; it asserts nothing.

Usage::

    python benchmarks/data_pipeline.py                        # a few minutes on 2 CPU cores
    python benchmarks/data_pipeline.py --workers 0 2 4 8      # worker counts to time
    python benchmarks/data_pipeline.py --device cuda --precision bf16 --attr-batch 64
    python benchmarks/data_pipeline.py --quick                # tiny model, seconds (used by a test)
    python benchmarks/data_pipeline.py --rows 200000          # the row stream alone, clean vs one bad line
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from m2ib_lightning import CLIPBackbone, ImageTextDataModule, M2IBAttribution, Preprocessor  # noqa: E402
from m2ib_lightning.assets.tiny_models import build_tiny_clip  # noqa: E402
from m2ib_lightning.data.recover import Recovery  # noqa: E402
from m2ib_lightning.data.sharding import iter_part, shard_rows  # noqa: E402

WORDS = ("a chest radiograph showing a small opacity in the right upper lobe with no pleural effusion and "
         "a normal cardiac silhouette mild degenerative changes of the thoracic spine are seen").split()


# --------------------------------------------------------------------------------------- set-up
def build_model(root: Path, quick: bool) -> Path:
    """A random CLIP with the ViT-B/32 geometry (a tiny one with ``quick``), saved with its preprocessing."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model_dir = root / "model"
    captions = [" ".join(WORDS)]
    if quick:
        return build_tiny_clip(model_dir, captions=captions, hidden_size=32, num_layers=3, num_heads=2,
                               intermediate_size=64, projection_dim=16, image_size=64, patch_size=16)
    # The demo tokenizer and a 224 px CLIP image processor, then the model replaced by CLIPConfig()
    # defaults (ViT-B/32, 12 + 12 blocks) with the tokenizer's special ids (pooling looks for EOS).
    build_tiny_clip(model_dir, captions=captions, hidden_size=32, num_layers=1, num_heads=2,
                    intermediate_size=64, projection_dim=16, image_size=224, patch_size=32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=ids)).save_pretrained(model_dir, safe_serialization=True)
    return model_dir


def photo(seed: int, size: int) -> bytes:
    """A JPEG with the entropy of a photograph: shapes on a gradient plus per-pixel noise."""
    rng = np.random.default_rng(seed)
    base = np.linspace(40, 200, size)[None, :, None] + np.linspace(0, 40, size)[:, None, None]
    image = Image.fromarray(np.clip(base + rng.normal(0, 18, (size, size, 3)), 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(4):
        x, y, r = (int(v) for v in rng.integers(0, size, 3) // (1, 1, 4))
        draw.ellipse((x - r, y - r, x + r, y + r), fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def build_data(root: Path, pairs: int, image_size: int, distinct: int = 32) -> dict[str, dict[str, Any]]:
    """The same ``pairs`` pairs as parquet (4 files, embedded bytes) and as a folder + captions.jsonl."""
    import datasets

    datasets.disable_progress_bars()
    images = [photo(k, image_size) for k in range(distinct)]  # decoding cost does not need unique pixels
    rng = np.random.default_rng(0)
    captions = [" ".join(rng.choice(WORDS, size=20)) for _ in range(pairs)]
    ids = [f"pair-{i:06d}" for i in range(pairs)]
    folder = root / "folder"
    (folder / "images").mkdir(parents=True)
    for k, data in enumerate(images):
        (folder / "images" / f"{k:03d}.jpg").write_bytes(data)
    lines = [json.dumps({"id": i, "image": f"images/{n % distinct:03d}.jpg", "caption": c})
             for n, (i, c) in enumerate(zip(ids, captions))]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    files = []
    for f in range(4):
        rows = range(f, pairs, 4)
        table = {"id": [ids[n] for n in rows], "caption": [captions[n] for n in rows],
                 "image": [{"bytes": images[n % distinct], "path": None} for n in rows]}
        path = root / f"pairs-{f}.parquet"
        datasets.Dataset.from_dict(table).cast_column("image", datasets.Image()).to_parquet(str(path))
        files.append(str(path))
    return {"parquet": {"path": "parquet", "data_files": files},
            "folder": {"path": "json", "data_files": str(folder / "captions.jsonl")}}


# ------------------------------------------------------------------------------------ measuring
def pipeline_rate(source: dict[str, Any], preprocessor: Preprocessor, workers: int, batch_size: int) -> float:
    """Pairs per second through the whole data module, worker start-up included."""
    dm = ImageTextDataModule(**source, batch_size=batch_size, num_workers=workers)
    dm.preprocessor = preprocessor
    start = time.perf_counter()
    n = sum(len(b["ids"]) for b in dm.train_dataloader())
    return n / (time.perf_counter() - start)


def attribution_rate(module: M2IBAttribution, batch: dict[str, Any], device: torch.device, precision: str) -> float:
    """Pairs per second of one ``explain_batch`` (the whole M2IB optimisation of a batch)."""
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with autocast:
        module.explain_batch(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return len(batch["ids"]) / (time.perf_counter() - start)


# ------------------------------------------------------------------------------ the row stream
def build_rows(root: Path, rows: int, damaged: bool) -> dict[str, dict[str, Any]]:
    """JSON lines, CSV and parquet files of ``rows`` rows (id, image path, caption); with ``damaged``,
    row 5 is a line that does not parse (parquet: its row group's page header is overwritten)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(1)
    captions = [" ".join(rng.choice(WORDS, size=20)) for _ in range(min(rows, 1000))]
    table = pa.table({"id": [f"pair-{i:07d}" for i in range(rows)],
                      "image": [f"images/{i % 32:03d}.jpg" for i in range(rows)],
                      "caption": [captions[i % len(captions)] for i in range(rows)]})
    tag = "bad" if damaged else "clean"
    jsonl = root / f"{tag}.jsonl"
    with open(jsonl, "w") as f:
        for i, row in enumerate(table.to_pylist()):
            f.write(("{" if damaged and i == 5 else json.dumps(row)) + "\n")
    csv = root / f"{tag}.csv"
    with open(csv, "w") as f:
        f.write("id,image,caption\n")
        for i, (sample, image, caption) in enumerate(zip(*(table.column(c).to_pylist() for c in table.column_names))):
            f.write(f"{sample},{image},{caption}{',extra' if damaged and i == 5 else ''}\n")
    parquet = root / f"{tag}.parquet"
    pq.write_table(table, parquet, row_group_size=max(rows // 20, 1))
    if damaged:
        meta = pq.ParquetFile(parquet).metadata.row_group(0).column(0)
        data = bytearray(parquet.read_bytes())
        start = meta.dictionary_page_offset or meta.data_page_offset
        data[start:start + 12] = b"\xff" * 12
        parquet.write_bytes(bytes(data))
    return {"jsonl": {"path": "json", "data_files": str(jsonl)}, "csv": {"path": "csv", "data_files": str(csv)},
            "parquet": {"path": "parquet", "data_files": str(parquet)}}


def row_rates(source: dict[str, Any]) -> tuple[float, ...]:
    """Rows per CPU second (this process, all threads: other jobs on the machine do not count) of
    ``datasets``' reading alone (the rows as dicts), and of the datamodule's row stream as it was
    before row-level recovery (no recovery, no duplicate check), with recovery armed, and as it is
    (recovery armed, duplicates checked). The stream is the reading, this reader's part and the
    sample ids; no image is decoded."""
    rates = []
    for variant in ("datasets", "plain", "recovery", "ours"):
        dm = ImageTextDataModule(**source, check_duplicates=variant == "ours")
        stream = dm.dataset()
        columns = {stream.image_column, stream.text_column, stream.id_column}
        start = time.process_time()
        try:
            if variant == "datasets":
                n = sum(1 for _ in shard_rows(stream.rows, 0))
            else:
                resume = Recovery.of(stream.rows, columns) if variant != "plain" else None
                n = sum(1 for _ in stream._ids(iter_part(stream.rows, stream.part(), resume)))
        except Exception:  # noqa: BLE001 - a damaged file: datasets stops there
            n = 0
        rates.append(n / max(time.process_time() - start, 1e-9))
    return tuple(rates)


def rows_main(rows: int, rounds: int) -> dict[str, Any]:
    import logging

    import datasets

    datasets.disable_progress_bars()
    quiet = logging.getLogger("m2ib_lightning")  # the bad rows' reports; restored after (tests run this in-process)
    level, quiet.level = quiet.level, logging.CRITICAL
    try:
        return _rows_main(rows, rounds)
    finally:
        quiet.setLevel(level)


def _rows_main(rows: int, rounds: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="m2ib-rows-bench-") as tmp:
        clean, bad = build_rows(Path(tmp), rows, False), build_rows(Path(tmp), rows, True)
        for source in (*clean.values(), *bad.values()):  # warm-up: page cache, datasets' file resolution
            row_rates(source)
        measured: dict[str, list[tuple[float, ...]]] = {f: [] for f in clean}
        for _ in range(rounds):
            for fmt in clean:
                measured[fmt].append((*row_rates(clean[fmt]), row_rates(bad[fmt])[3]))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {os.cpu_count()} CPU cores, load average {load:.1f} at the end; {rows} rows per file, "
          f"rows per CPU second, medians of {rounds} interleaved rounds")
    print(f"  {'format':<8} {'datasets':>10} {'plain':>10} {'+recovery':>10} {'+duplicates':>12} "
          f"{'one bad row':>12}")
    out = {}
    for fmt, values in measured.items():
        floor, plain, armed, ours, recovered = (statistics.median(v[k] for v in values) for k in range(5))
        out[fmt] = {"datasets": floor, "plain": plain, "recovery": armed, "stream": ours, "recovered": recovered}
        print(f"  {fmt:<8} {floor:>10,.0f} {plain:>10,.0f} {armed:>10,.0f} {ours:>12,.0f} {recovered:>12,.0f}")
    print("  plain: the row stream without recovery or duplicate check (as before row-level recovery); +recovery:\n"
          "  recovery armed; +duplicates: and ids checked for duplicates (the default); one bad row: the default\n"
          "  on the same file with row 5 bad (parquet: row group 0), which datasets gives up on")
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=256, help="pairs streamed per pipeline measurement")
    parser.add_argument("--image-size", type=int, default=512, help="side of the JPEG images, in pixels")
    parser.add_argument("--batch-size", type=int, default=32, help="pipeline batch size (configs use 16-32)")
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="DataLoader worker counts to time (default: 0, the datamodule default, and 2)")
    parser.add_argument("--attr-batch", type=int, default=8, help="pairs per attribution batch")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; medians are printed")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--quick", action="store_true", help="tiny model and data: checks that the script runs")
    parser.add_argument("--rows", type=int, default=None,
                        help="time the row stream alone on clean files of this many rows, and with one bad row")
    args = parser.parse_args(argv)
    if args.rows:
        return rows_main(args.rows, args.rounds)
    if args.quick:
        args.pairs, args.image_size, args.attr_batch, args.rounds = 24, 96, 4, 1
        args.workers = args.workers or [0]
    workers = args.workers or [ImageTextDataModule().num_workers, 2]
    default_workers = ImageTextDataModule().num_workers
    if default_workers not in workers:
        workers = [default_workers, *workers]
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory(prefix="m2ib-data-bench-") as tmp:
        root = Path(tmp)
        model_dir = build_model(root, args.quick)
        sources = build_data(root, args.pairs, args.image_size)
        backbone = CLIPBackbone(str(model_dir))
        preprocessor = Preprocessor.from_backbone(backbone)
        layers = {"vision_layer": 1, "text_layer": 1, "steps": 2, "copies": 2} if args.quick else {}
        module = M2IBAttribution(backbone, **layers).to(device)
        first = ImageTextDataModule(**sources["folder"], batch_size=args.attr_batch)
        first.preprocessor = preprocessor
        batch = next(iter(first.train_dataloader()))
        batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
        attribution_rate(module, batch, device, args.precision)  # warm-up: allocator, kernels
        for source in sources.values():  # warm-up: page cache, datasets' file resolution
            pipeline_rate(source, preprocessor, 0, args.batch_size)

        rates: dict[tuple[str, int], list[float]] = {(f, w): [] for f in sources for w in workers}
        attr: list[float] = []
        for _ in range(args.rounds):
            for (fmt, w), values in rates.items():
                values.append(pipeline_rate(sources[fmt], preprocessor, w, args.batch_size))
            attr.append(attribution_rate(module, batch, device, args.precision))

    medians = {key: statistics.median(v) for key, v in rates.items()}
    attr_rate = statistics.median(attr)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    model = "tiny CLIP (quick)" if args.quick else "CLIP ViT-B/32 geometry, random weights"
    settings = "steps 2, copies 2" if args.quick else "reference settings: 10 steps, 10 copies, layer 9"
    print(f"machine: {os.cpu_count()} CPU cores, torch threads {torch.get_num_threads()}, device {device}, "
          f"load average {load:.1f} at the end")
    print(f"data pipeline: {args.pairs} pairs of {args.image_size} x {args.image_size} JPEG, ~20-word captions, "
          f"batch {args.batch_size}, preprocessing of the model below")
    print(f"  {'format':<10} {'workers':>7} {'pairs/s':>9} {'x attribution':>14}")
    for (fmt, w), rate in medians.items():
        mark = "  <- default workers" if w == default_workers else ""
        print(f"  {fmt:<10} {w:>7} {rate:>9.1f} {rate / attr_rate:>13.1f}x{mark}")
    print(f"attribution: M2IBAttribution, {model}, {settings}, both sides, batch {args.attr_batch}, "
          f"{args.device} {args.precision}: {attr_rate:.2f} pairs/s")
    worst = min(medians[(f, default_workers)] for f in sources) / attr_rate
    verdict = "met" if worst >= 5 else "NOT met"
    print(f"target (pipeline >= 5x attribution with the default {default_workers} workers): {verdict}, "
          f"worst format {worst:.1f}x")
    return {"pipeline": {f"{f}/{w}": r for (f, w), r in medians.items()}, "attribution": attr_rate, "ratio": worst}


if __name__ == "__main__":
    main()
