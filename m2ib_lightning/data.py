"""Image-text pairs streamed with Hugging Face ``datasets``, sharded across ranks, robust to bad samples.

Rows come from ``datasets.load_dataset(..., streaming=True)``: a hub id, or a builder (``json``,
``parquet``, ``csv``, ``imagefolder``, ``webdataset``) with local ``data_files``, so nothing is
copied into a cache and datasets of any size stream. An image may be embedded bytes or a PIL
image, a local path, or an http(s) URL fetched concurrently (:mod:`m2ib_lightning.fetch`).

Each row becomes a pair (id, RGB image, caption) or a skip record (id, reason) that travels with its
batch to the writer, so a bad sample is counted and listed in the skip manifest, never fatal and
never silently lost (:mod:`m2ib_lightning.images` says what is repaired and what is skipped).
Repairs that change what the model sees (a caption truncated to the model's maximum length, a
16-bit image rescaled) are listed too, as ``repaired`` entries.

Across ranks and dataloader workers every row is read by exactly one reader, and every rank yields
the same number of batches (:mod:`m2ib_lightning.sharding`).

Preprocessing comes from the backbone (its tokenizer and image processor), connected in
:meth:`ImageTextDataModule.setup` from the Trainer's LightningModule, never repeated in configs.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from m2ib_lightning.errors import ConfigError, DataFileNotFoundError, DatasetOpenError
from m2ib_lightning.fetch import FetchConfig, Fetcher, ordered_map
from m2ib_lightning.images import (
    DEFAULT_MAX_ASPECT_RATIO,
    DEFAULT_MAX_PIXELS,
    ImageError,
    load_image,
    read_image,
    url_scheme,
)
from m2ib_lightning.sharding import EvenBatches, Part, UnreadableRest, assign, iter_part

__all__ = ["Collate", "ImageTextDataModule", "PairStream", "Preprocessor", "load_image", "read_caption"]

log = logging.getLogger(__name__)


@dataclass
class Preprocessor:
    """Turns a list of (image, caption) into model inputs, batched.

    Attributes:
        tokenizer: a transformers tokenizer (pads to the longest caption, truncates to ``max_length``).
        image_processor: a transformers image processor giving ``pixel_values`` ``(B, C, H, W)``.
        max_length: the text tower's maximum number of tokens.
    """

    tokenizer: Any
    image_processor: Any
    max_length: int

    @classmethod
    def from_backbone(cls, backbone: Any) -> Preprocessor:
        limit = getattr(backbone.tokenizer, "model_max_length", None)
        positions = getattr(getattr(backbone, "model", None), "config", None)
        if positions is not None:
            positions = positions.text_config.max_position_embeddings
        candidates = [v for v in (limit, positions) if isinstance(v, int) and 0 < v < 100_000]
        return cls(backbone.tokenizer, backbone.image_processor, min(candidates) if candidates else 77)

    def __call__(self, images: list[Image.Image], captions: list[str]) -> dict[str, torch.Tensor]:
        text = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        return {"pixel_values": pixels, "input_ids": text["input_ids"], "attention_mask": text["attention_mask"]}

    def untruncated_lengths(self, captions: list[str], kept: Sequence[int]) -> list[int]:
        """Token counts of ``captions`` before truncation, given ``kept`` (their counts after it).

        Only captions that reached ``max_length`` can have been cut, so only those are tokenised again.
        """
        full = list(kept)
        cut = [i for i, n in enumerate(kept) if n >= self.max_length]
        if cut:
            encoded = self.tokenizer([captions[i] for i in cut], truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(cut, encoded):
                full[i] = len(ids)
        return full


def read_caption(value: Any) -> str:
    """The caption of a row, stripped; raises ``ValueError`` with the skip reason.

    Bytes are decoded as UTF-8 (strictly: a caption we cannot read is not explained with guessed
    characters); text that cannot be encoded as UTF-8 (lone surrogates from a broken JSON escape)
    is refused for the same reason, and because the tokenizer would refuse it mid-batch.
    """
    if isinstance(value, bytes | bytearray):
        try:
            value = bytes(value).decode("utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"undecodable caption: not UTF-8 ({err.reason} at byte {err.start})") from None
    if value is not None and not isinstance(value, str):
        raise ValueError(f"empty or missing caption (not text: got {type(value).__name__} {str(value)[:60]!r})")
    if value is None or not value.strip():
        raise ValueError(f"empty or missing caption ({value!r})")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"undecodable caption: invalid character at position {err.start}") from None
    return value.strip()


class PairStream(IterableDataset):
    """Yields ``{"id", "image", "caption", "extra", "notes"}`` or ``{"id", "skip": reason}`` per row.

    Each dataloader worker of each rank reads its own part of ``rows`` (:func:`~m2ib_lightning.sharding.assign`).
    Rows whose id is in ``exclude`` (samples a previous run already finished) are passed over
    before their image is read. Images are read ``fetch.concurrency`` at a time (threads), in order.

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
    """

    def __init__(self, rows: Any, image_column: str, text_column: str, id_column: str | None,
                 id_prefix: str, image_root: Path | None, extra_columns: Sequence[str] = (),
                 exclude: Collection[str] = frozenset(), *, rank: int = 0, world_size: int = 1,
                 limit: int | None = None, max_image_pixels: int = DEFAULT_MAX_PIXELS,
                 fetch: FetchConfig | None = None, local_files: bool = True,
                 max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO) -> None:
        self.rows = rows
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.id_prefix, self.image_root = id_prefix, image_root
        self.extra_columns, self.exclude = tuple(extra_columns), exclude
        self.rank, self.world_size, self.limit = rank, world_size, limit
        self.max_image_pixels, self.fetch, self.local_files = max_image_pixels, fetch or FetchConfig(), local_files
        self.max_aspect_ratio = max_aspect_ratio
        self._fetcher: Fetcher | None = None

    def part(self) -> Part:
        """The rows this process (this dataloader worker, on this rank) reads."""
        info = get_worker_info()
        workers, worker = (info.num_workers, info.id) if info is not None else (1, 0)
        return assign(self.rows.num_shards, self.rank, self.world_size, worker, workers, self.limit)

    def _ids(self, rows: Iterable[tuple[int, int, dict[str, Any] | UnreadableRest]]
             ) -> Iterator[tuple[str, dict[str, Any] | UnreadableRest, str | None]]:
        # Derived ids name the row by (shard, position in shard): the same whatever the world size,
        # the number of workers or the limit. A single-shard dataset keeps the shorter `{prefix}{row}`.
        single = self.rows.num_shards == 1
        for shard, index, row in rows:
            if isinstance(row, UnreadableRest):
                marker = f"{self.id_prefix}shard{shard}-from-row-{index}"
                if marker not in self.exclude:
                    yield marker, row, None
                continue
            derived = f"{self.id_prefix}{index}" if single else f"{self.id_prefix}{shard}-{index}"
            note = None
            if self.id_column is None:
                sample_id = derived
            else:
                value = row.get(self.id_column)
                if value is None or (isinstance(value, str) and not value.strip()):
                    sample_id, note = derived, f"empty id in column {self.id_column!r}; derived id used"
                else:
                    sample_id = str(value)
            if sample_id not in self.exclude:
                yield sample_id, row, note

    def _sample(self, item: tuple[str, dict[str, Any] | UnreadableRest, str | None]) -> dict[str, Any]:
        try:
            return self._read(item)
        except Exception as err:  # noqa: BLE001 - last resort: one sample's surprise never ends the job
            log.exception("unexpected error reading sample %s", item[0])
            return {"id": item[0], "skip": f"unexpected error reading this sample: {type(err).__name__}: {err}"}

    def _read(self, item: tuple[str, dict[str, Any] | UnreadableRest, str | None]) -> dict[str, Any]:
        sample_id, row, id_note = item
        if isinstance(row, UnreadableRest):
            err = row.error
            log.error("shard %d of %s is unreadable from row %d on; going on with the next shard: %s",
                      row.shard, self.id_prefix.rstrip("-"), row.index, err)
            return {"id": sample_id, "transient": isinstance(err, OSError),
                    "skip": f"rows {row.index}+ of shard {row.shard} unreadable, the rest of the shard is lost: "
                            f"{type(err).__name__}: {str(err)[:300]}"}
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
        items = self._ids(iter_part(self.rows, part))
        yield from ordered_map(self._sample, items, self.fetch.concurrency)


class Collate:
    """Batches pairs through the preprocessor; skip records ride along in ``batch["skipped"]``.

    ``batch["image_sizes"]`` holds each image's ``(height, width)`` as read, before the image
    processor resized it. ``batch["repaired"]`` lists ``{"id", "reason"}`` for pairs explained in a repaired form: a
    caption truncated to the model's maximum length, a converted image (see :mod:`m2ib_lightning.images`).
    """

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "skip" not in s]
        skipped = [{"id": s["id"], "reason": s["skip"], **({"transient": True} if s.get("transient") else {})}
                   for s in samples if "skip" in s]
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


class ImageTextDataModule(pl.LightningDataModule):
    """Streams image-caption pairs from a hub dataset or local files.

    Args:
        path: what ``datasets.load_dataset`` takes first: a hub id (``eltorio/ROCO-radiology``), a
            builder name with local ``data_files`` (``json``, ``parquet``, ``csv``, ``imagefolder``,
            ``webdataset``) or a local dataset directory.
        data_files: file(s) or glob for builder names, e.g. ``data/demo/pairs.jsonl``.
        name: dataset configuration name, if any.
        split: which split to stream.
        revision: hub revision to pin.
        image_column: column holding the image: embedded bytes / PIL image, a path (relative paths
            are resolved against ``image_root``) or an http(s) URL (fetched, see ``fetch``).
        text_column: column holding the caption.
        id_column: column with a unique sample id; ``None`` derives ``{dataset}-{split}-{row}``
            (``{dataset}-{split}-{shard}-{row}`` when the dataset has several shards, i.e. files),
            the same whatever the number of ranks and workers.
        image_root: folder that relative image paths are resolved against (default: the folder of
            the first local data file). Paths are only opened for local data or when this is set.
        batch_size: pairs per optimisation batch (skip records count towards it).
        num_workers: DataLoader worker processes per rank.
        limit: stop after this many rows (``None``: all).
        extra_columns: columns passed through to ``batch["extra"][column]`` (lists of B values), e.g.
            ground-truth boxes for evaluation metrics.
        max_image_pixels: images with more pixels (width x height) are skipped before decoding,
            so a decompression bomb costs nothing. Above 89M, raise ``PIL.Image.MAX_IMAGE_PIXELS`` too.
        max_aspect_ratio: images whose long side is more than this many times the short side are
            skipped (the image processor would scale the short side to the input size: a 1 x 3000
            image costs seconds and gigabytes).
        fetch: timeouts, retries, size cap and concurrency for http(s) images.
        builder_kwargs: extra keyword arguments of ``datasets.load_dataset`` for the builder, e.g.
            ``{sep: "\\t", column_names: [caption, url]}`` for the Conceptual Captions TSV files.

    Attributes:
        exclude_ids: ids to pass over (set by the writer on resume: samples already written or skipped).
        rank, world_size: this process's place in the job; filled from the Trainer in ``setup``.
    """

    def __init__(
        self,
        path: str = "json",
        data_files: str | list[str] | None = None,
        name: str | None = None,
        split: str = "train",
        revision: str | None = None,
        image_column: str = "image",
        text_column: str = "caption",
        id_column: str | None = "id",
        image_root: str | None = None,
        batch_size: int = 8,
        num_workers: int = 0,
        limit: int | None = None,
        extra_columns: list[str] | None = None,
        max_image_pixels: int = DEFAULT_MAX_PIXELS,
        max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
        fetch: FetchConfig | None = None,
        builder_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be >= 0 or null, got {limit!r}")
        if not isinstance(max_image_pixels, int) or max_image_pixels < 1:
            raise ConfigError(f"max_image_pixels must be an int >= 1, got {max_image_pixels!r}")
        if not isinstance(max_aspect_ratio, int | float) or not max_aspect_ratio >= 1:
            raise ConfigError(f"max_aspect_ratio must be a number >= 1, got {max_aspect_ratio!r}")
        self.path, self.data_files, self.name, self.split, self.revision = path, data_files, name, split, revision
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.image_root = image_root
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.extra_columns = list(extra_columns or [])
        self.max_image_pixels, self.max_aspect_ratio = max_image_pixels, max_aspect_ratio
        self.fetch = fetch or FetchConfig()
        self.builder_kwargs = dict(builder_kwargs or {})
        self.preprocessor: Preprocessor | None = None
        self.exclude_ids: Collection[str] = frozenset()
        self.rank, self.world_size = 0, 1
        self.save_hyperparameters()

    def _files(self) -> list[str]:
        files = self.data_files
        if files is None:
            return []
        return [files] if isinstance(files, str) else list(files)

    def _root(self) -> Path | None:
        if self.image_root is not None:
            return Path(self.image_root).expanduser()
        files = self._files()
        if files and url_scheme(files[0]) is None:
            return Path(files[0]).expanduser().parent
        if Path(self.path).is_dir():
            return Path(self.path)
        return None

    def _rows(self) -> Any:
        import datasets

        for f in self._files():
            if url_scheme(f) is None and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                raise DataFileNotFoundError(f"data file {f} does not exist (data.data_files)")
        try:
            ds = datasets.load_dataset(
                self.path, name=self.name, data_files=self.data_files, split=self.split,
                revision=self.revision, streaming=True, **self.builder_kwargs,
            )
        except Exception as err:  # datasets raises many types; name what could not be opened
            offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
            hint = " (offline mode is on: HF_HUB_OFFLINE=1)" if offline else ""
            raise DatasetOpenError(
                f"could not open dataset {self.path!r} (data_files={self.data_files!r}, split={self.split!r})"
                f"{hint}: {type(err).__name__}: {err}"
            ) from err
        features = getattr(ds, "features", None) or {}
        for column in (self.image_column, self.text_column, self.id_column, *self.extra_columns):
            if column is not None and features and column not in features:
                raise ConfigError(f"column {column!r} not in dataset {self.path!r}; columns: {sorted(features)}")
        if self.image_column in features and isinstance(features[self.image_column], datasets.Image):
            # Decode ourselves so that one corrupt image is a skip, not an exception in the stream.
            ds = ds.cast_column(self.image_column, datasets.Image(decode=False))
        return ds

    def setup(self, stage: str) -> None:
        if self.trainer is not None:
            self.rank, self.world_size = self.trainer.global_rank, self.trainer.world_size
        if self.preprocessor is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "backbone"):
                raise RuntimeError("ImageTextDataModule needs a preprocessor: set .preprocessor or attach it to a "
                                   "Trainer whose LightningModule has a backbone")
            self.preprocessor = Preprocessor.from_backbone(module.backbone)

    def dataset(self) -> PairStream:
        """This rank's stream of pairs and skip records."""
        prefix = f"{Path(self.path).name}-{self.split}-"
        root = self._root()
        return PairStream(self._rows(), self.image_column, self.text_column, self.id_column, prefix, root,
                          extra_columns=self.extra_columns, exclude=self.exclude_ids, rank=self.rank,
                          world_size=self.world_size, limit=self.limit, max_image_pixels=self.max_image_pixels,
                          fetch=self.fetch, local_files=root is not None, max_aspect_ratio=self.max_aspect_ratio)

    def train_dataloader(self) -> DataLoader | EvenBatches:
        """This rank's batches; with several ranks, wrapped so that every rank yields as many batches."""
        if self.preprocessor is None:
            raise RuntimeError("ImageTextDataModule has no preprocessor: call setup() with a Trainer, or set "
                               ".preprocessor = Preprocessor.from_backbone(backbone)")
        device = getattr(getattr(self.trainer, "strategy", None), "root_device", None) if self.trainer else None
        loader = DataLoader(
            self.dataset(), batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=Collate(self.preprocessor), persistent_workers=False,
            pin_memory=getattr(device, "type", None) == "cuda",
        )
        return EvenBatches(loader) if self.world_size > 1 else loader
