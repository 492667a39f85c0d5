"""On-disk format of attribution outputs, and its reader.

An output directory holds::

    shards/rank00000-000000.parquet   attribution records, one row per sample
    skipped/rank00000-000000.jsonl    skip manifest: {"id": ..., "reason": ...} per line
    overlays/<id>.png                 optional overlays of the first samples

The skip manifest also lists pairs that were explained in a repaired form, as
``{"id": ..., "reason": "caption truncated from 93 to 77 tokens", "kind": "repaired"}``; those have
records too. Entries without ``kind`` are skips.

Shards are written whole under a temporary name and renamed, so a reader (or a resumed run) never
sees a half-written file. Every rank writes its own shards with increasing sequence numbers and a
resumed run appends new ones; nothing is ever rewritten. There is no separate index file: the
``id`` column of every shard (a cheap column read) is the index, so the index cannot disagree with
the data.

Columns of a shard (``None`` where a side was not explained):

==================  ====================  ===================================================
``id``              string                sample id
``similarity``      float32               clean image-text cosine similarity
``map_height``      int32                 ``H`` of the image map (the model's input size)
``map_width``       int32                 ``W``
``image_map``       binary                ``H * W`` little-endian float16, row-major, in [0, 1]
``grid_height``     int32                 patch grid ``h``
``grid_width``      int32                 patch grid ``w``
``patch_scores``    list<float32>         raw (unnormalised) capacity per patch, ``h * w``
``tokens``          list<string>          the caption's tokens, BOS and EOS included
``text_scores``     list<float32>         one score per token in [0, 1]
``metrics``         map<string, float64>  the evaluation's per-sample values (``image/...``,
                                          ``text/...``), when it ran; absent ones undefined
==================  ====================  ===================================================

Shards written before the ``metrics`` column existed read as records without metrics.

The parquet footer holds the run settings as JSON under the key ``m2ib``.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

log = logging.getLogger(__name__)

SHARDS, SKIPPED, OVERLAYS = "shards", "skipped", "overlays"
_NAME = re.compile(r"^rank(\d{5})-(\d{6})\.(parquet|jsonl)$")

SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("similarity", pa.float32()),
        ("map_height", pa.int32()),
        ("map_width", pa.int32()),
        ("image_map", pa.binary()),
        ("grid_height", pa.int32()),
        ("grid_width", pa.int32()),
        ("patch_scores", pa.list_(pa.float32())),
        ("tokens", pa.list_(pa.string())),
        ("text_scores", pa.list_(pa.float32())),
        ("metrics", pa.map_(pa.string(), pa.float64())),
    ]
)


@dataclass
class AttributionRecord:
    """The outputs for one sample.

    Attributes:
        id: sample id.
        similarity: clean image-text cosine similarity.
        image_map: ``(H, W)`` float32 in [0, 1], or ``None``.
        patch_scores: ``(h, w)`` float32 raw capacity per patch, or ``None``.
        tokens: caption tokens (BOS and EOS included), or ``None``.
        text_scores: ``(len(tokens),)`` float32 in [0, 1], or ``None``.
        metrics: the evaluation's per-sample values by name (``{}`` when it did not run), in the
            units of ``results.json`` (percent for the confidence metrics).
    """

    id: str
    similarity: float
    image_map: np.ndarray | None
    patch_scores: np.ndarray | None
    tokens: list[str] | None
    text_scores: np.ndarray | None
    metrics: dict[str, float] = field(default_factory=dict)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: readers see all of it or nothing.

    The file's data reaches the disk before the rename, and the rename before this returns, so a
    machine that crashes right after cannot leave an empty or partial file under the final name.
    """
    tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
    try:
        write(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory
        pass
    finally:
        os.close(fd)


def next_sequence(directory: Path, rank: int) -> int:
    """The first unused shard sequence number of ``rank`` in ``directory`` (shards + skips)."""
    seen = [-1]
    for sub in (SHARDS, SKIPPED):
        for p in (directory / sub).glob(f"rank{rank:05d}-*"):
            m = _NAME.match(p.name)
            if m:
                seen.append(int(m.group(2)))
    return max(seen) + 1


def remove_stale_temporaries(directory: Path, rank: int) -> int:
    """Delete half-written files a killed run of ``rank`` left behind; returns how many."""
    stale = [p for sub in (SHARDS, SKIPPED) for p in (directory / sub).glob(f".tmp-*-rank{rank:05d}-*")]
    for p in stale:
        p.unlink(missing_ok=True)
    return len(stale)


def records_table(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    """A shard table from row dicts with the columns of :data:`SCHEMA` (numpy arrays allowed)."""
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for row in rows:
        image = row.get("image_map")
        if image is not None:
            row = {**row, "image_map": np.ascontiguousarray(image, dtype="<f2").tobytes()}
        for name in SCHEMA.names:
            value = row.get(name)
            columns[name].append(value.tolist() if isinstance(value, np.ndarray) else value)
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata({"m2ib": json.dumps(metadata, sort_keys=True, default=str)})


def write_shard(directory: Path, rank: int, seq: int, rows: list[dict[str, Any]],
                skipped: list[dict[str, str]], metadata: dict[str, Any]) -> None:
    """Write one records shard and/or one skip shard, each atomically."""
    name = f"rank{rank:05d}-{seq:06d}"
    if rows:
        (directory / SHARDS).mkdir(parents=True, exist_ok=True)
        table = records_table(rows, metadata)
        atomic_write(directory / SHARDS / f"{name}.parquet", lambda p: pq.write_table(table, p))
    if skipped:
        (directory / SKIPPED).mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(s, sort_keys=True) + "\n" for s in skipped)
        atomic_write(directory / SKIPPED / f"{name}.jsonl", lambda p: p.write_text(text))


def _shards(directory: Path, sub: str) -> list[Path]:
    return sorted(p for p in (directory / sub).glob("rank*") if _NAME.match(p.name))


def _record(row: dict[str, Any]) -> AttributionRecord:
    image = patches = scores = None
    if row["image_map"] is not None:
        image = np.frombuffer(row["image_map"], dtype="<f2").astype(np.float32)
        image = image.reshape(row["map_height"], row["map_width"])
        patches = np.asarray(row["patch_scores"], dtype=np.float32).reshape(row["grid_height"], row["grid_width"])
    if row["text_scores"] is not None:
        scores = np.asarray(row["text_scores"], dtype=np.float32)
    return AttributionRecord(
        id=row["id"], similarity=float(row["similarity"]), image_map=image, patch_scores=patches,
        tokens=row["tokens"], text_scores=scores, metrics=dict(row.get("metrics") or ()),
    )


class Attributions(Mapping[str, AttributionRecord]):
    """Read-only mapping ``id -> AttributionRecord`` over an output directory.

    Only the ``id`` columns are read up front; a shard is read when one of its records is asked for
    (the last few shards are cached), so millions of records cost little memory.

    Attributes:
        skipped: ``id -> reason`` from the skip manifest, for ids without a record (a transient
            failure that a resumed run retried successfully is no longer a skip).
        repaired: ``id -> [reason, ...]`` for records explained in a repaired form (e.g. a caption
            truncated to the model's maximum length).
        duplicates: ids found more than once (a replayed sample); the first copy is served.
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
        for path in _shards(self.directory, SHARDS):
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
        self._transient_skips: set[str] = set()
        for path in _shards(self.directory, SKIPPED):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:
                    log.warning("skip manifest %s: an unreadable line is ignored: %.80r", path, line)
                    entry = None
                if isinstance(entry, dict) and "id" in entry and "reason" in entry:
                    if entry.get("kind") == "repaired":
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
        return _record(self._rows(f_idx)[r_idx])

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
