"""The report's command line: ``python -m m2ib_lightning.report OUTPUT_DIR [--data FILE] [-o report.html]``.

Every option is a :func:`~m2ib_lightning.report.build_report` argument (docs/report.md).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from m2ib_lightning.report.build import build_report

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> Path:
    """``python -m m2ib_lightning.report OUTPUT_DIR [--data FILE] [-o report.html]``."""
    parser = argparse.ArgumentParser(prog="python -m m2ib_lightning.report",
                                     description="Write a self-contained HTML report of an M2IB run.")
    parser.add_argument("output_dir", help="attribution output directory (writer.output_dir)")
    parser.add_argument("-o", "--out", help="HTML file to write (default: OUTPUT_DIR/report.html)")
    parser.add_argument("--data", help="the run's data file (.jsonl/.parquet/.csv) or dataset id, for images, "
                                       "captions and ground truth")
    parser.add_argument("--split", default="train", help="dataset split of --data")
    parser.add_argument("--id-column", default="id")
    parser.add_argument("--image-column", default="image")
    parser.add_argument("--text-column", default="caption")
    parser.add_argument("--metrics", help="JSON lines of per-sample numbers: {\"id\": ..., \"name\": value}")
    parser.add_argument("--model", help="checkpoint directory for the image processor (default: the run's backbone)")
    parser.add_argument("--limit", type=int, default=500, help="most samples in the report (0: all)")
    parser.add_argument("--per-page", type=int, default=24, help="samples per page")
    parser.add_argument("--per-file", type=int, default=500,
                        help="samples per HTML file; more make the report an index of page files")
    parser.add_argument("--select", default="store",
                        help="order samples enter the report in, from the whole run: store, similarity "
                             "(lowest first), -similarity (highest first), or [-]NAME of a --metrics number")
    parser.add_argument("--image-size", type=int, default=224, help="longest side of embedded images (0: map size)")
    parser.add_argument("--tolerance", type=float, default=15.0,
                        help="pointing-game tolerance: pixels of a 224-px map, scaled to the map's size (default)")
    parser.add_argument("--tolerance-units", choices=["relative", "pixels"], default="relative",
                        help="relative: --tolerance is at 224 px and scales with the map; pixels: of the map itself")
    parser.add_argument("--title", help="page title")
    args = parser.parse_args(argv)
    path = build_report(
        args.output_dir, args.out, args.data, split=args.split, id_column=args.id_column,
        image_column=args.image_column, text_column=args.text_column, metrics=args.metrics, model=args.model,
        limit=args.limit or None, per_page=args.per_page, per_file=args.per_file, select=args.select,
        image_size=args.image_size or None,
        tolerance=args.tolerance, tolerance_units=args.tolerance_units, title=args.title,
    )
    pages = sorted(path.with_name(f"{path.stem}-pages").glob("page-*.html"))
    size = sum(p.stat().st_size for p in [path, *pages]) / 1e6
    print(f"wrote {path} ({size:.1f} MB" + (f", index of {len(pages)} page files)" if pages else ")"))
    return path

