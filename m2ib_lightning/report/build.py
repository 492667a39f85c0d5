"""Assembling the report's HTML files: one self-contained file, or an index and page files.

``build_report`` writes ONE file for a run: images and overlays are inlined as base64 PNGs, tokens
are highlighted with inline styles, paging, filtering and sorting are a few lines of plain
JavaScript, and nothing is fetched from the network, so the file can be mailed, archived or opened
offline. A report of more samples than ``per_file`` (large runs) is split: ``report.html`` becomes
an index (means, evaluation, settings, skips, a table of files) linking self-contained page files
in ``report-pages/``. The data is read once: each card is made as the stream reaches its row
(:mod:`.samples`, :mod:`.cards`), kept in a spool file beside the report, and the HTML files are
rendered (:mod:`.render`) one at a time, so memory stays bounded.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from m2ib_lightning.outputs import load_attributions
from m2ib_lightning.outputs.overlays import colour_ramp
from m2ib_lightning.report.cards import CardMaker, image_processor
from m2ib_lightning.report.render import render
from m2ib_lightning.report.samples import find_rows, read_metrics, select_ids

__all__ = ["build_report"]


def build_report(
    output_dir: str | os.PathLike,
    out: str | os.PathLike | None = None,
    data: str | None = None,
    *,
    split: str = "train",
    id_column: str = "id",
    image_column: str = "image",
    text_column: str = "caption",
    metrics: str | os.PathLike | None = None,
    model: str | None = None,
    limit: int | None = 500,
    per_page: int = 24,
    per_file: int = 500,
    select: str = "store",
    image_size: int | None = 224,
    tolerance: float = 15.0,
    tolerance_units: str = "relative",
    title: str | None = None,
) -> Path:
    """Write the HTML report of the run in ``output_dir``; returns its path.

    Args:
        output_dir: an attribution output directory (:func:`~m2ib_lightning.load_attributions`).
        out: the HTML file to write (default: ``<output_dir>/report.html``).
        data: the run's data (a ``.jsonl`` / ``.parquet`` / ``.csv`` file or a dataset id) for the
            original images, captions and ground truth (``bbox`` / ``mask`` columns).
        split, id_column, image_column, text_column: how to read ``data``, as the datamodule does.
        metrics: a JSON-lines file of per-sample numbers, ``{"id": ..., "name": value, ...}``.
        model: directory of the checkpoint's image processor (default: the run's backbone, when it is
            a local directory); without one, CLIP's centre crop is assumed.
        limit: most samples in the report (the first ones in ``select`` order; ``None``: all). Every
            sample adds its images, about 50-150 kB for photos.
        per_page: samples per page (JavaScript paging inside a file).
        per_file: samples per HTML file; more make ``out`` an index of page files (module doc).
        select: the order samples are taken in from the whole run: ``"store"`` (as written),
            ``"similarity"`` (lowest first) or ``"-similarity"`` (highest first), or a per-sample
            number of the run's evaluation or of the ``metrics`` file, e.g. ``"-image/deletion_auc"``;
            samples without it come last.
        image_size: longest side of the embedded images in pixels (``None``: the map's size).
        tolerance: pointing-game tolerance, for runs that stored no evaluation values (as the
            evaluation's): in pixels of a 224-px map, scaled to the map's size, or with
            ``tolerance_units="pixels"`` in pixels of the map.
        tolerance_units: ``"relative"`` or ``"pixels"``, see ``tolerance``.
        title: page title (default: the output directory's name).
    """
    from m2ib_lightning.evaluation.functional import TOLERANCE_UNITS

    if tolerance_units not in TOLERANCE_UNITS or not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0 and tolerance_units one of {list(TOLERANCE_UNITS)}, got "
                         f"{tolerance!r} {tolerance_units!r}")
    for name, value in (("per_page", per_page), ("per_file", per_file)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    records = load_attributions(output_dir)
    directory = Path(output_dir)
    target = Path(out) if out is not None else directory / "report.html"
    # Per-sample numbers: the evaluation's, stored with the records when it ran, then the file's.
    extra = {i: v for i, v in records.column("metrics").items() if v}
    for sample_id, numbers in (read_metrics(metrics) if metrics is not None else {}).items():
        extra.setdefault(sample_id, {}).update(numbers)
    ids = select_ids(records, extra, select)[: limit if limit is not None else None]
    processor = image_processor(model, records.metadata) if data is not None else None
    root = Path(data).expanduser().parent if data is not None and Path(data).expanduser().is_file() else None
    card = CardMaker(records, directory, extra, image_column=image_column, text_column=text_column, root=root,
                     processor=processor, image_size=image_size, tolerance=tolerance,
                     tolerance_units=tolerance_units)
    results_file = directory / "results.json"  # written by the run's sink when the evaluation ran
    results = json.loads(results_file.read_text()) if results_file.is_file() else None
    title = title or directory.resolve().name
    target.parent.mkdir(parents=True, exist_ok=True)
    chunks = [ids[a : a + per_file] for a in range(0, len(ids), per_file)]
    pages_dir = target.with_name(f"{target.stem}-pages")
    for stale in sorted(pages_dir.glob("page-*.html")):  # of an earlier, longer report
        stale.unlink()

    # ONE pass over the data makes every card into a spool file, and each HTML file reads its cards
    # back in the report's order: the data may be far larger than memory, and a pass per page file
    # would read it many times over. The spool sits beside the report, not in a /tmp that may be RAM.
    with tempfile.TemporaryFile(dir=target.parent, prefix=f".{target.stem}-", suffix=".spool") as spool:
        rows = find_rows(data, set(ids), split, id_column, image_column) if data is not None else iter(())
        spans = spool_cards(spool, ids, rows, card)
        shared = run_context(records, ids, card.totals, results, data=data, select=select, per_page=per_page)

        def page(**context: Any) -> str:
            return render("page.html.j2", **{**shared, **context})

        def cards(chunk: Sequence[str]) -> list[dict[str, Any]]:
            out = []
            for sample_id in chunk:
                offset, length = spans[sample_id]
                spool.seek(offset)
                out.append(json.loads(spool.read(length).decode("utf-8")))
            return out

        if len(chunks) <= 1:
            target.write_text(page(title=title, cards=cards(ids)), encoding="utf-8")
            return target
        pages_dir.mkdir(exist_ok=True)
        names = [f"page-{n:05d}.html" for n in range(1, len(chunks) + 1)]
        for n, chunk in enumerate(chunks):
            nav = {"index": f"../{target.name}", "number": n + 1, "previous": names[n - 1] if n > 0 else None,
                   "next": names[n + 1] if n + 1 < len(names) else None}
            start = n * per_file
            text = page(title=f"{title} - file {n + 1} of {len(chunks)}", cards=cards(chunk), nav=nav, index=False,
                        shown=f"samples {start + 1}-{start + len(chunk)} of the report's {len(ids)}")
            (pages_dir / names[n]).write_text(text, encoding="utf-8")
    files = {"per_file": per_file, "rows": [{"href": f"{pages_dir.name}/{name}", "count": len(chunk),
                                             "first": chunk[0], "last": chunk[-1]}
                                            for name, chunk in zip(names, chunks)]}
    target.write_text(page(title=title, files=files), encoding="utf-8")
    return target


def spool_cards(spool: Any, ids: Sequence[str], rows: Iterator[tuple[str, Mapping[str, Any]]],
                card: Callable[[str, Mapping[str, Any] | None], dict[str, Any]]) -> dict[str, tuple[int, int]]:
    """Write ``card(id, row)`` as UTF-8 JSON into ``spool`` for each ``(id, row)`` of ``rows`` as it
    comes (one data row in memory at a time), then ``card(id, None)`` for the ids it did not yield;
    return each card's ``(offset, length)``."""
    spans: dict[str, tuple[int, int]] = {}

    def put(sample_id: str, row: Mapping[str, Any] | None) -> None:
        encoded = json.dumps(card(sample_id, row)).encode("utf-8")
        spans[sample_id] = (spool.tell(), len(encoded))
        spool.write(encoded)

    for sample_id, row in rows:
        put(sample_id, row)
    for sample_id in ids:
        if sample_id not in spans:
            put(sample_id, None)
    return spans


def run_context(records: Any, ids: Sequence[str], totals: Mapping[str, list[float]],
                results: Mapping[str, Any] | None, *, data: str | None, select: str, per_page: int) -> dict[str, Any]:
    """What ``templates/page.html.j2`` shows in every HTML file of the report; a file sets its
    ``title`` and may replace ``cards`` (the samples it shows, with their paging bar), ``files``
    (the index's table of page files), ``nav`` (a page file's links), ``index`` (whether it shows
    the means, the evaluation, the settings and the skips) and ``shown`` (the count of samples under
    the title). ``totals`` holds every number of the report's cards (means, sort keys)."""
    first = "high" if select.startswith("-") else "low"
    order = "" if select == "store" else f", by {select.removeprefix('-')} ({first} first)"
    shown = f"{len(ids)} of {len(records)} records" + (
        f" (first {len(ids)}{order})" if len(ids) < len(records) else order)
    evaluation = []
    if results and results.get("metrics"):
        better, counts = results.get("higher_is_better", {}), results.get("samples", {})
        evaluation = [{"name": k, "better": "up" if better.get(k) else "down" if k in better else "",
                       "value": None if v is None else float(v), "count": str(counts.get(k, "?"))}
                      for k, v in results["metrics"].items()]
    meta = {k: v for k, v in records.metadata.items()
            if isinstance(v, str | int | float | bool | list | dict) or v is None}
    ramp = ", ".join(f"rgb{tuple(int(c) for c in colour_ramp(np.array([[v]]))[0, 0])}" for v in np.linspace(0, 1, 9))
    return {
        "cards": (), "files": None, "nav": None, "index": True, "shown": shown, "data": data,
        "means": [(k, float(np.mean(v)), len(v)) for k, v in totals.items()], "evaluation": evaluation,
        "settings": [(str(k), v) for k, v in sorted(meta.items())], "skipped": records.skipped,
        "repaired": getattr(records, "repaired", {}),  # explained in a repaired form (e.g. caption truncated)
        "per_page": per_page, "sort_keys": list(totals), "ramp": ramp,
        "start": "store order" if select == "store" else f"report order ({select})",
    }
