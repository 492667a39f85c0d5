"""The stream of one reader (a rank's dataloader worker) and its batches.

:class:`PairStream` turns rows into pairs or skip records; :class:`Collate` batches pairs through
the :class:`~m2ib_lightning.data.preprocess.Preprocessor`, skip records riding along.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import IterableDataset, get_worker_info

from m2ib_lightning.data.fetch import FetchConfig, Fetcher, ordered_map
from m2ib_lightning.data.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, ImageError, read_image
from m2ib_lightning.data.preprocess import Preprocessor, read_caption
from m2ib_lightning.data.recover import Recovery
from m2ib_lightning.data.sharding import BadRows, Item, Part, UnreadableRest, assign, iter_part

__all__ = ["Collate", "PairStream"]

log = logging.getLogger(__name__)


class PairStream(IterableDataset):
    """Yields ``{"id", "image", "caption", "extra", "notes"}`` or ``{"id", "skip": reason[, "transient",
    "duplicate", "source"]}`` per row.

    Each dataloader worker of each rank reads its own part of ``rows`` (:func:`~m2ib_lightning.data.sharding.assign`).
    Rows whose id is in ``exclude`` (samples a previous run already finished) are passed over
    before their image is read. Images are read ``fetch.concurrency`` at a time (threads), in order.

    Where ``datasets``' reader fails inside a file, the file is read on tolerantly
    (:mod:`m2ib_lightning.data.recover`): a bad line, row group or tar sample is one skip with
    ``source`` (file and line / row group / member), keeping its position and derived id. A row
    whose id this reader already yielded is a skip with ``duplicate: True`` (the first one is
    explained); ids in ``exclude`` are passed over silently, never reported as duplicates.
    Duplicates between readers (other ranks or workers) are the run directory's to find.

    Args:
        rows: a streamed ``datasets.IterableDataset`` (anything with ``num_shards``, ``shard`` and ``iter``).
        image_column, text_column, id_column: columns of the image, the caption and the sample id
            (``None``: ids are derived from the position, see :meth:`ImageTextDataModule`).
        id_prefix: prefix of derived ids, e.g. ``"ROCO-radiology-test-"``.
        image_root: folder that relative image paths are resolved against.
        extra_columns: columns carried along untouched (e.g. ground-truth boxes for evaluation).
        exclude: ids to pass over.
        rank, world_size: this process's place in the job.
        limit: read only the first this-many rows of the stream (all ranks together).
        max_image_pixels: larger images (width x height) are skipped without being decoded.
        fetch: how http(s) images are fetched (``None``: defaults).
        local_files: whether image paths on this machine may be opened.
        max_aspect_ratio: images with a long side above this many times the short side are skipped.
        check_duplicates: report rows whose id this reader already yielded (keeps every id of the
            reader's part in memory, about 150 bytes each; derived ids are never checked).
    """

    def __init__(self, rows: Any, image_column: str, text_column: str, id_column: str | None,
                 id_prefix: str, image_root: Path | None, extra_columns: Sequence[str] = (),
                 exclude: Collection[str] = frozenset(), *, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 fetch: FetchConfig | None = None, local_files: bool = True,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO, check_duplicates: bool = True) -> None:
        self.rows = rows
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.id_prefix, self.image_root = id_prefix, image_root
        self.extra_columns, self.exclude = tuple(extra_columns), exclude
        self.rank, self.world_size, self.limit = rank, world_size, limit
        self.max_image_pixels, self.fetch, self.local_files = max_image_pixels, fetch or FetchConfig(), local_files
        self.max_aspect_ratio, self.check_duplicates = max_aspect_ratio, check_duplicates
        self._fetcher: Fetcher | None = None
        self._recovery: Recovery | None = None

    def part(self) -> Part:
        """The rows this process (this dataloader worker, on this rank) reads."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return assign(self.rows.num_shards, self.rank, self.world_size, worker, workers, self.limit)

    def _where(self, shard: int) -> str:
        files = self._recovery.files(shard) if self._recovery is not None else []
        return files[0] if len(files) == 1 else f"shard {shard}"

    def _ids(self, rows: Iterable[tuple[int, int, Item]]) -> Iterator[tuple[str, Item | dict[str, Any], str | None]]:
        # Derived ids name the row by (shard, position in shard): the same whatever the world size,
        # the number of workers or the limit. A single-shard dataset keeps the shorter `{prefix}{row}`.
        single = self.rows.num_shards == 1
        prefix, id_column, exclude, check = self.id_prefix, self.id_column, self.exclude, self.check_duplicates
        # id -> where its first row is (row, or (shard, row)), in this reader's stream; derived ids are unique
        seen: dict[str, int | tuple[int, int]] = {}
        for shard, index, row in rows:
            if row.__class__ is not dict:  # a report from the reader: BadRows or UnreadableRest
                yield from self._report(shard, index, row)
                continue
            note = None
            if id_column is None:
                sample_id = f"{prefix}{index}" if single else f"{prefix}{shard}-{index}"
                if sample_id not in exclude:
                    yield sample_id, row, None
                continue
            value = row.get(id_column)
            if value is None or (isinstance(value, str) and not value.strip()):
                sample_id = f"{prefix}{index}" if single else f"{prefix}{shard}-{index}"
                note = f"empty id in column {id_column!r}; derived id used"
            else:
                sample_id = value if value.__class__ is str else str(value)
            if sample_id in exclude:
                continue
            if not check:
                yield sample_id, row, note
                continue
            here = index if single else (shard, index)
            first = seen.setdefault(sample_id, here)
            if first is not here:  # one dict operation per row on the common path
                yield sample_id, self._duplicate(sample_id, shard, index, first), None
                continue
            yield sample_id, row, note

    def _report(self, shard: int, index: int, row: Item) -> Iterator[tuple[str, Item, None]]:
        """The id of a reader's report: a marker for a lost rest, the row's own id for a bad row."""
        if isinstance(row, UnreadableRest):
            marker = f"{self.id_prefix}shard{shard}-from-row-{index}"
            if marker not in self.exclude:
                yield marker, row, None
            return
        assert isinstance(row, BadRows)
        known = (row.known or {}).get(self.id_column) if self.id_column else None
        if row.count > 1:
            sample_id = f"{self.id_prefix}shard{shard}-rows-{index}-to-{index + row.count - 1}"
        elif known not in (None, ""):
            sample_id = str(known)
        else:
            sample_id = f"{self.id_prefix}{index}" if self.rows.num_shards == 1 else f"{self.id_prefix}{shard}-{index}"
        if sample_id not in self.exclude:
            yield sample_id, row, None

    def _duplicate(self, sample_id: str, shard: int, index: int, first: int | tuple[int, int]) -> dict[str, Any]:
        where = self._where(shard)
        first_shard, first_row = first if isinstance(first, tuple) else (shard, first)
        before = "" if first_shard == shard else f" of {self._where(first_shard)}"
        return {"id": sample_id, "duplicate": True, "source": {"file": where, "row": index},
                "skip": f"duplicate id {sample_id!r}: row {index} of {where}, first seen at row {first_row}{before}"}

    def _sample(self, item: tuple[str, Item, str | None]) -> dict[str, Any]:
        try:
            return self._read(item)
        except Exception as err:  # noqa: BLE001 - last resort: one sample's surprise never ends the job
            log.exception("unexpected error reading sample %s", item[0])
            return {"id": item[0], "skip": f"unexpected error reading this sample: {type(err).__name__}: {err}"}

    def _read(self, item: tuple[str, Item, str | None]) -> dict[str, Any]:
        sample_id, row, id_note = item
        if isinstance(row, UnreadableRest):
            err = row.error
            log.error("shard %d of %s is unreadable from row %d on; going on with the next shard: %s",
                      row.shard, self.id_prefix.rstrip("-"), row.index, err)
            where = f" ({row.where})" if row.where else ""
            return {"id": sample_id, "transient": row.transient,
                    "skip": f"rows {row.index}+ of shard {row.shard}{where} unreadable, the rest of the shard is "
                            f"lost: {type(err).__name__}: {str(err)[:300]}"}
        if isinstance(row, BadRows):
            return {"id": sample_id, "skip": row.reason, "source": row.source, "transient": row.transient}
        if "skip" in row:  # a report made while reading ids (a duplicate)
            return row
        try:
            caption = read_caption(row.get(self.text_column))
        except ValueError as err:
            return {"id": sample_id, "skip": str(err)}
        try:
            loaded = read_image(row.get(self.image_column), self.image_root, max_pixels=self.max_image_pixels,
                                fetch=self._fetcher, local_files=self.local_files,
                                max_aspect_ratio=self.max_aspect_ratio)
        except ImageError as err:
            skip = {"id": sample_id, "skip": str(err)}
            if err.transient:
                skip["transient"] = True
            return skip
        notes = ([id_note] if id_note else []) + loaded.notes
        extra = {c: row.get(c) for c in self.extra_columns}
        return {"id": sample_id, "image": loaded.image, "caption": caption, "extra": extra, "notes": notes}

    def __iter__(self) -> Iterator[dict[str, Any]]:
        part = self.part()
        log.debug("rank %d/%d reads %s", self.rank, self.world_size, part.describe())
        if self._fetcher is None:  # built in the worker process: it holds sockets
            self._fetcher = Fetcher(self.fetch)
        columns = {self.image_column, self.text_column, self.id_column, *self.extra_columns, "__key__"} - {None}
        self._recovery = Recovery.of(self.rows, columns)
        items = self._ids(iter_part(self.rows, part, self._recovery))
        yield from ordered_map(self._sample, items, self.fetch.concurrency)


def skip_entry(sample: dict[str, Any]) -> dict[str, Any]:
    """The ``batch["skipped"]`` entry of a skipped sample: ``{"id", "reason"}``, plus ``"transient": True``,
    ``"duplicate": True`` and ``"source"`` (file and line / row group / member / row) when they apply."""
    entry = {"id": sample["id"], "reason": sample["skip"]}
    for flag in ("transient", "duplicate"):
        if sample.get(flag):
            entry[flag] = True
    if sample.get("source"):
        entry["source"] = sample["source"]
    return entry


class Collate:
    """Batches pairs through the preprocessor; skip records ride along in ``batch["skipped"]``.

    ``batch["image_sizes"]`` holds each image's ``(height, width)`` as read, before the image
    processor resized it. ``batch["repaired"]`` lists ``{"id", "reason"}`` for pairs explained in a repaired form: a
    caption truncated to the model's maximum length, a converted image (see :mod:`m2ib_lightning.data.images`).
    """

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "skip" not in s]
        skipped = [skip_entry(s) for s in samples if "skip" in s]
        try:
            inputs = self.preprocessor([s["image"] for s in good], [s["caption"] for s in good]) if good else {}
        except Exception:  # noqa: BLE001 - find the sample(s) the preprocessor refuses; batch the others
            good, inputs = self._isolate(good, skipped)
        repaired = [{"id": s["id"], "reason": note} for s in good for note in s.get("notes", ())]
        batch: dict[str, Any] = {"ids": [s["id"] for s in good], "skipped": skipped, "repaired": repaired}
        if good and good[0]["extra"]:
            batch["extra"] = {c: [s["extra"][c] for s in good] for c in good[0]["extra"]}
        if good:
            captions = [s["caption"] for s in good]
            batch.update(inputs)
            # (height, width) before preprocessing: what pixel boxes of the dataset refer to.
            batch["image_sizes"] = [(s["image"].height, s["image"].width) for s in good]
            kept = batch["attention_mask"].sum(1).tolist()
            limit = self.preprocessor.max_length
            for s, n in zip(good, self.preprocessor.untruncated_lengths(captions, kept)):
                if n > limit:
                    repaired.append({"id": s["id"], "reason": f"caption truncated from {n} to {limit} tokens"})
        return batch

    def _isolate(self, good: list[dict[str, Any]], skipped: list[dict[str, Any]]
                 ) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """The samples the preprocessor accepts one at a time, and their batch; the others join ``skipped``."""
        ok = []
        for s in good:
            try:
                self.preprocessor([s["image"]], [s["caption"]])
                ok.append(s)
            except Exception as err:  # noqa: BLE001 - this sample's problem only
                log.exception("preprocessing failed for sample %s", s["id"])
                skipped.append({"id": s["id"], "reason": f"preprocessing failed: {type(err).__name__}: {err}"})
        inputs = self.preprocessor([s["image"] for s in ok], [s["caption"] for s in ok]) if ok else {}
        return ok, inputs

