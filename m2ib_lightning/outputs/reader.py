"""Reading an attribution output directory: :func:`load_attributions` and :class:`Attributions`."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator, Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from m2ib_lightning.outputs.format import (
    SCHEMA,
    SHARDS,
    SKIPPED,
    AttributionRecord,
    decode_record,
    is_duplicate,
    shard_files,
)

__all__ = ["Attributions", "load_attributions"]

log = logging.getLogger(__name__)


class Attributions(Mapping[str, AttributionRecord]):
    """Read-only mapping ``id -> AttributionRecord`` over an output directory.

    Only the ``id`` columns are read up front; a shard is read when one of its records is asked for
    (the last few shards are cached), so millions of records cost little memory.

    Attributes:
        skipped: ``id -> reason`` from the skip manifest, for ids without a record (a transient
            failure that a resumed run retried successfully is no longer a skip).
        repaired: ``id -> [reason, ...]`` for records explained in a repaired form (e.g. a caption
            truncated to the model's maximum length).
        duplicates: ids found more than once (a replayed sample, or an id written by two ranks of
            one run); the first copy is served.
        duplicate_entries: ``id -> [reason, ...]`` of the manifest's ``duplicate id`` entries: rows
            whose id was attributed already in the same run (not written again, or written by two
            ranks). They never count as skipped.
        metadata: run settings stored in the shards' footers (from the first shard).
    """

    def __init__(self, directory: str | os.PathLike, cache_shards: int = 8) -> None:
        self.directory = Path(directory)
        if not self.directory.is_dir():
            raise FileNotFoundError(f"attribution directory {self.directory} does not exist")
        self._index: dict[str, tuple[int, int]] = {}
        self.duplicates: list[str] = []
        self.metadata: dict[str, Any] = {}
        self.unreadable: list[Path] = []
        self._files = []
        for path in shard_files(self.directory, SHARDS):
            try:
                ids = pq.read_table(path, columns=["id"]).column("id").to_pylist()
                meta = pq.read_schema(path).metadata or {}
            except (OSError, pa.ArrowException) as err:
                # Damaged (e.g. by a storage fault): its samples count as not done, so a resumed
                # run computes them again; the writer moves the file aside.
                log.warning("attribution shard %s cannot be read (%s); its samples count as not done", path, err)
                self.unreadable.append(path)
                continue
            f_idx = len(self._files)
            self._files.append(path)
            if f_idx == 0:
                self.metadata = json.loads(meta.get(b"m2ib", b"{}"))
            for r_idx, sample_id in enumerate(ids):
                if sample_id in self._index:
                    self.duplicates.append(sample_id)
                else:
                    self._index[sample_id] = (f_idx, r_idx)
        self.skipped: dict[str, str] = {}
        self.repaired: dict[str, list[str]] = {}
        self.duplicate_entries: dict[str, list[str]] = {}
        self._transient_skips: set[str] = set()
        for path in shard_files(self.directory, SKIPPED):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    log.warning("skip manifest %s: an unreadable line is ignored: %.80r", path, line)
                    entry = None
                if isinstance(entry, dict) and "id" in entry and "reason" in entry:
                    if is_duplicate(entry):  # the id's first copy decides; this entry finishes nothing
                        self.duplicate_entries.setdefault(entry["id"], []).append(entry["reason"])
                    elif entry.get("kind") == "repaired":
                        self.repaired.setdefault(entry["id"], []).append(entry["reason"])
                    elif entry["id"] not in self._index:  # a later success supersedes a skip
                        self.skipped.setdefault(entry["id"], entry["reason"])
                        if entry.get("transient"):
                            self._transient_skips.add(entry["id"])
        self._rows = lru_cache(maxsize=cache_shards)(self._read_shard)

    def _read_shard(self, f_idx: int) -> list[dict[str, Any]]:
        return pq.read_table(self._files[f_idx]).to_pylist()

    def __getitem__(self, sample_id: str) -> AttributionRecord:
        f_idx, r_idx = self._index[sample_id]
        return decode_record(self._rows(f_idx)[r_idx])

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)

    def column(self, name: str) -> dict[str, Any]:
        """``id -> value`` of one column for every record, reading only that column of each shard
        (e.g. ``column("similarity")`` over millions of records without loading any map)."""
        if name not in SCHEMA.names:
            raise KeyError(f"no column {name!r}; the columns are {SCHEMA.names}")
        values: dict[str, Any] = {}
        for f_idx, path in enumerate(self._files):
            present = name in pq.read_schema(path).names  # older shards may lack a newer column
            table = pq.read_table(path, columns=["id", name] if present else ["id"])
            ids = table.column("id").to_pylist()
            column = table.column(name).to_pylist() if present else [None] * len(ids)
            for r_idx, (sample_id, value) in enumerate(zip(ids, column)):
                if self._index[sample_id] == (f_idx, r_idx):  # the copy this mapping serves
                    values[sample_id] = dict(value or ()) if name == "metrics" else value
        return values

    def completed(self) -> set[str]:
        """Ids with a final outcome: a record, or a skip that a retry would not change. A resumed run
        passes over them; transient skips (a URL that timed out, a 5xx) are tried again."""
        return set(self._index) | (set(self.skipped) - self._transient_skips)

    def __repr__(self) -> str:
        return (f"Attributions({str(self.directory)!r}: {len(self)} records, {len(self.skipped)} skipped, "
                f"{len(self._files)} shards)")


def load_attributions(path: str | os.PathLike) -> Attributions:
    """Open an attribution output directory: a mapping ``id -> AttributionRecord``.

    Example::

        >>> attr = load_attributions("outputs/demo/attributions")  # doctest: +SKIP
        >>> rec = attr["demo-000"]                                  # doctest: +SKIP
        >>> rec.image_map.shape, rec.tokens[:3], rec.text_scores[:3]  # doctest: +SKIP
    """
    return Attributions(path)
