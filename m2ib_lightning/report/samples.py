"""Which samples enter the report, in which order, with which numbers, and their rows in the data.

``select`` orders the whole run (by similarity or a per-sample number, reading only that column,
never the maps) before ``limit`` cuts it; the data is then streamed ONCE through the data layer
(:func:`m2ib_lightning.data.open_rows`) and each selected sample's row is handed on as the stream
reaches it, so one data row is in memory at a time however large the data.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from m2ib_lightning.data import data_source, open_rows

log = logging.getLogger(__name__)

__all__ = ["find_rows", "read_metrics", "select_ids"]


def read_metrics(path: str | os.PathLike) -> dict[str, dict[str, float]]:
    """A JSON-lines file of ``{"id": ..., name: number, ...}`` -> ``{id: {name: number}}`` (other values left out)."""
    path = Path(path)
    out: dict[str, dict[str, float]] = {}
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        entry = json.loads(line)
        if "id" not in entry:
            raise ValueError(f"{path}:{number}: expected an object with an 'id' key, got keys {sorted(entry)}")
        out.setdefault(str(entry.pop("id")), {}).update(
            {k: float(v) for k, v in entry.items() if isinstance(v, int | float) and not isinstance(v, bool)})
    return out


def select_ids(records: Any, extra: Mapping[str, Mapping[str, float]], select: str) -> list[str]:
    """All record ids in ``select`` order: ``"store"`` (as written), ``"[-]similarity"`` or
    ``"[-]NAME"`` of a per-sample number in ``extra`` (``-``: highest first); samples without the
    number come last, ties keep the store's order."""
    if select == "store":
        return list(records)
    key = select.removeprefix("-")
    if key == "similarity":
        values = records.column("similarity")
    elif any(key in numbers for numbers in extra.values()):
        values = {i: numbers.get(key) for i, numbers in extra.items()}
    else:
        names = sorted({k for numbers in extra.values() for k in numbers})
        raise ValueError(f"select must be 'store', '[-]similarity' or '[-]NAME' for a per-sample number of "
                         f"the run's evaluation or the metrics file {names}, got {select!r}")
    sign = -1.0 if select.startswith("-") else 1.0

    def order(sample_id: str) -> tuple[bool, float]:
        value = values.get(sample_id)
        missing = value is None or not np.isfinite(value)
        return missing, 0.0 if missing else sign * float(value)

    return sorted(records, key=order)  # stable: ties keep the store's order


def find_rows(data: str, wanted: set[str], split: str, id_column: str,
              image_column: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """``(id, row)`` for the rows of ``data`` (a local data file or a dataset,
    :func:`~m2ib_lightning.data.data_source`) whose id is in ``wanted`` (the first row of each id),
    as the stream reaches them; the stream stops once all are found. Images stay undecoded. The ids
    never found are warned about."""
    found: set[str] = set()
    if not wanted:
        return
    path, data_files = data_source(data)
    for row in open_rows(path, data_files, split=split, image_column=image_column):
        sample_id = str(row.get(id_column))
        if sample_id in wanted and sample_id not in found:
            found.add(sample_id)
            yield sample_id, row
            if len(found) == len(wanted):
                break
    if wanted - found:
        log.warning("report: %d of %d samples are not in %s (column %r)", len(wanted - found), len(wanted),
                    data, id_column)
