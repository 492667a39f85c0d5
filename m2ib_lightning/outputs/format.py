"""On-disk format of attribution outputs, and its reader.

An output directory holds::

    shards/rank00000-000000.parquet   attribution records, one row per sample
    skipped/rank00000-000000.jsonl    skip manifest: {"id": ..., "reason": ...} per line
    overlays/<id>.png                 optional overlays of the first samples

The skip manifest also lists pairs that were explained in a repaired form, as
``{"id": ..., "reason": "caption truncated from 93 to 77 tokens", "kind": "repaired"}``; those have
records too. Entries without ``kind`` are skips, except duplicates: a row whose id was already
attributed in the same run is not written again but listed as
``{"id": ..., "reason": "duplicate id: ...", "duplicate": true}`` (the reason names where the kept
record is); such an entry never makes an id count as skipped or finished.

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
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from m2ib_lightning.files import atomic_write
from m2ib_lightning.records import Explanation

log = logging.getLogger(__name__)

SHARDS, SKIPPED, OVERLAYS = "shards", "skipped", "overlays"
#: how the reason of a manifest entry for a duplicated id starts (its entry also has ``"duplicate": true``)
DUPLICATE_ID = "duplicate id"
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


def is_duplicate(entry: Any) -> bool:
    """Whether a manifest entry (a dict, or a :class:`~m2ib_lightning.records.Skip`) is about a
    duplicated id: ``"duplicate": true``, or a reason starting with ``duplicate id``."""
    if isinstance(entry, dict):
        flagged, reason = entry.get("duplicate"), entry.get("reason")
    else:
        flagged, reason = getattr(entry, "duplicate", False), getattr(entry, "reason", None)
    return bool(flagged) or (isinstance(reason, str) and reason.startswith(DUPLICATE_ID))


def explanation_rows(explanation: Explanation) -> list[dict[str, Any]]:
    """One row dict per sample of ``explanation``, with the columns of :data:`SCHEMA` (numpy arrays
    where the column is a list or a map; ``image_map`` still a float array)."""
    out = explanation
    rows = []
    for i, sample_id in enumerate(out.ids):
        row: dict[str, Any] = {"id": sample_id, "similarity": float(out.similarity[i])}
        if out.image_maps is not None:
            m = out.image_maps[i].numpy()
            gh, gw = out.grid
            row.update(map_height=m.shape[0], map_width=m.shape[1], image_map=m,
                       grid_height=gh, grid_width=gw, patch_scores=out.patch_scores[i].float().numpy())
        if out.text_scores is not None:
            row.update(tokens=out.tokens[i], text_scores=out.text_scores[i].numpy())
        if out.metrics:  # the evaluation's per-sample values, NaN (undefined) left out
            values = {name: float(v[i]) for name, v in out.metrics.items()}
            row["metrics"] = {name: v for name, v in values.items() if v == v}
        rows.append(row)
    return rows


def encode_row(row: dict[str, Any]) -> dict[str, Any]:
    """A row as stored: the image map as little-endian float16 bytes, arrays as float32 lists."""
    image = row.get("image_map")
    if image is not None and not isinstance(image, bytes):
        row = {**row, "image_map": np.ascontiguousarray(image, dtype="<f2").tobytes()}
    return {name: (v.tolist() if isinstance(v, np.ndarray) else v) for name, v in row.items()}


def records(explanation: Explanation) -> list[AttributionRecord]:
    """The records a run would write for ``explanation``, exactly as reading them back gives them
    (the image map quantised to float16), without going through a file."""
    return [decode_record({name: None for name in SCHEMA.names} | encode_row(row))
            for row in explanation_rows(explanation)]


def records_table(rows: list[dict[str, Any]], metadata: dict[str, Any]) -> pa.Table:
    """A shard table from row dicts with the columns of :data:`SCHEMA` (numpy arrays allowed)."""
    columns: dict[str, list[Any]] = {name: [] for name in SCHEMA.names}
    for row in rows:
        row = encode_row(row)
        for name in SCHEMA.names:
            columns[name].append(row.get(name))
    table = pa.table(columns, schema=SCHEMA)
    return table.replace_schema_metadata({"m2ib": json.dumps(metadata, sort_keys=True, default=str)})


def write_shard(directory: Path, rank: int, seq: int, rows: list[dict[str, Any]],
                skipped: list[dict[str, Any]], metadata: dict[str, Any]) -> None:
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


def overlay_name(sample_id: str) -> str:
    """The file name of a sample's overlay under ``overlays/``: the id with every character outside
    ``A-Za-z0-9._-`` replaced by ``_`` (safe on every file system), plus ``.png``."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", sample_id) + ".png"


def shard_files(directory: Path, sub: str) -> list[Path]:
    """The shard (``sub="shards"``) or manifest (``sub="skipped"``) files of ``directory``, in name order."""
    return sorted(p for p in (directory / sub).glob("rank*") if _NAME.match(p.name))


def decode_record(row: dict[str, Any]) -> AttributionRecord:
    """The :class:`AttributionRecord` of a stored row (a dict with the columns of :data:`SCHEMA`)."""
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

