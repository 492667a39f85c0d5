"""Image-text pairs streamed with Hugging Face ``datasets``.

Rows come from ``datasets.load_dataset(..., streaming=True)`` (a hub id, or a builder such as
``json`` / ``parquet`` with local ``data_files``), so nothing is copied into a cache and datasets
of any size stream. Each row becomes a pair (id, RGB image, caption) or, when the image cannot be
read or the caption is empty, a skip record (id, reason) that travels with its batch to the
writer: a bad sample is counted and listed, never fatal and never silently lost.

Preprocessing comes from the backbone (its tokenizer and image processor), connected in
:meth:`ImageTextDataModule.setup` from the Trainer's LightningModule, never repeated in configs.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset

from m2ib_lightning.errors import ConfigError, DataFileNotFoundError, DatasetOpenError

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


def load_image(value: Any, root: Path | None) -> Image.Image:
    """An RGB ``PIL.Image`` from a PIL image, ``{"bytes": ..., "path": ...}``, raw bytes or a path.

    Raises ``ValueError`` with the reason when the image cannot be decoded.
    """
    try:
        if isinstance(value, Image.Image):
            image = value
        elif isinstance(value, dict) and (value.get("bytes") or value.get("path")):
            data = value.get("bytes")
            image = Image.open(io.BytesIO(data)) if data else Image.open(_local(value["path"], root))
        elif isinstance(value, bytes | bytearray):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str | os.PathLike) and str(value):
            image = Image.open(_local(value, root))
        else:
            raise ValueError(f"no image in this row (got {type(value).__name__})")
        image.load()
        if image.width == 0 or image.height == 0:
            raise ValueError("zero-size image")
        return image.convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as err:
        # PIL names in-memory sources by their repr (a memory address); keep reasons reproducible.
        detail = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", str(err))
        raise ValueError(f"unreadable image: {detail}") from err


def _local(path: str | os.PathLike, root: Path | None) -> Path:
    p = Path(path).expanduser()
    return p if p.is_absolute() or root is None else root / p


class PairStream(IterableDataset):
    """Yields ``{"id", "image", "caption", "extra"}`` or ``{"id", "skip": reason}`` per row of ``rows``.

    Rows whose id is in ``exclude`` (samples a previous run already finished) are passed over
    before their image is decoded. ``extra_columns`` are carried along untouched (e.g. ground-truth
    boxes for evaluation).
    """

    def __init__(self, rows: Any, image_column: str, text_column: str, id_column: str | None,
                 id_prefix: str, image_root: Path | None, extra_columns: Sequence[str] = (),
                 exclude: Collection[str] = frozenset()) -> None:
        self.rows = rows
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.id_prefix, self.image_root = id_prefix, image_root
        self.extra_columns, self.exclude = tuple(extra_columns), exclude

    def __iter__(self):
        for row in self.rows:
            sample_id = str(row[self.id_column]) if self.id_column else f"{self.id_prefix}{row['__row__']}"
            if sample_id in self.exclude:
                continue
            caption = row.get(self.text_column)
            if not isinstance(caption, str) or not caption.strip():
                yield {"id": sample_id, "skip": f"empty or missing caption ({caption!r})"}
                continue
            try:
                image = load_image(row.get(self.image_column), self.image_root)
            except ValueError as err:
                yield {"id": sample_id, "skip": str(err)}
                continue
            extra = {c: row.get(c) for c in self.extra_columns}
            yield {"id": sample_id, "image": image, "caption": caption.strip(), "extra": extra}


class Collate:
    """Batches pairs through the preprocessor; skip records ride along in ``batch["skipped"]``."""

    def __init__(self, preprocessor: Preprocessor) -> None:
        self.preprocessor = preprocessor

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        good = [s for s in samples if "skip" not in s]
        skipped = [{"id": s["id"], "reason": s["skip"]} for s in samples if "skip" in s]
        batch: dict[str, Any] = {"ids": [s["id"] for s in good], "skipped": skipped}
        if good and good[0]["extra"]:
            batch["extra"] = {c: [s["extra"][c] for s in good] for c in good[0]["extra"]}
        if good:
            batch.update(self.preprocessor([s["image"] for s in good], [s["caption"] for s in good]))
        return batch


class ImageTextDataModule(pl.LightningDataModule):
    """Streams image-caption pairs from a hub dataset or local files.

    Args:
        path: what ``datasets.load_dataset`` takes first: a hub id (``eltorio/ROCO-radiology``), a
            builder name with local ``data_files`` (``json``, ``parquet``, ``csv``, ``imagefolder``)
            or a local dataset directory.
        data_files: file(s) or glob for builder names, e.g. ``data/demo/pairs.jsonl``.
        name: dataset configuration name, if any.
        split: which split to stream.
        revision: hub revision to pin.
        image_column: column holding the image: embedded bytes / PIL image, or a path (relative
            paths are resolved against ``image_root``).
        text_column: column holding the caption.
        id_column: column with a unique sample id; ``None`` derives ``{split}-{row}`` stably.
        image_root: folder that relative image paths are resolved against (default: the folder of
            the first local data file).
        batch_size: pairs per optimisation batch.
        num_workers: DataLoader worker processes.
        limit: stop after this many rows (``None``: all).
        extra_columns: columns passed through to ``batch["extra"][column]`` (lists of B values), e.g.
            ground-truth boxes for evaluation metrics.

    Attributes:
        exclude_ids: ids to pass over (set by the writer on resume: samples already written or skipped).
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
    ) -> None:
        super().__init__()
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
        if not isinstance(num_workers, int) or num_workers < 0:
            raise ConfigError(f"num_workers must be an int >= 0, got {num_workers!r}")
        if limit is not None and limit < 0:
            raise ConfigError(f"limit must be >= 0 or null, got {limit!r}")
        self.path, self.data_files, self.name, self.split, self.revision = path, data_files, name, split, revision
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.image_root = image_root
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.extra_columns = list(extra_columns or [])
        self.preprocessor: Preprocessor | None = None
        self.exclude_ids: Collection[str] = frozenset()
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
        if files and "://" not in files[0]:
            return Path(files[0]).expanduser().parent
        if Path(self.path).is_dir():
            return Path(self.path)
        return None

    def _rows(self) -> Any:
        import datasets
        from datasets.distributed import split_dataset_by_node

        for f in self._files():
            if "://" not in f and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                raise DataFileNotFoundError(f"data file {f} does not exist (data.data_files)")
        try:
            ds = datasets.load_dataset(
                self.path, name=self.name, data_files=self.data_files, split=self.split,
                revision=self.revision, streaming=True,
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
        if self.id_column is None:
            ds = ds.map(lambda _, i: {"__row__": i}, with_indices=True)
        if self.limit is not None:
            ds = ds.take(self.limit)
        if self.trainer is not None and self.trainer.world_size > 1:
            ds = split_dataset_by_node(ds, rank=self.trainer.global_rank, world_size=self.trainer.world_size)
        return ds

    def setup(self, stage: str) -> None:
        if self.preprocessor is None:
            module = self.trainer.lightning_module if self.trainer is not None else None
            if module is None or not hasattr(module, "backbone"):
                raise RuntimeError("ImageTextDataModule needs a preprocessor: set .preprocessor or attach it to a "
                                   "Trainer whose LightningModule has a backbone")
            self.preprocessor = Preprocessor.from_backbone(module.backbone)

    def dataset(self) -> PairStream:
        prefix = f"{Path(self.path).name}-{self.split}-"
        return PairStream(self._rows(), self.image_column, self.text_column, self.id_column, prefix, self._root(),
                          extra_columns=self.extra_columns, exclude=self.exclude_ids)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.dataset(), batch_size=self.batch_size, num_workers=self.num_workers,
            collate_fn=Collate(self.preprocessor), persistent_workers=False,
        )
