"""Image-text pairs streamed with Hugging Face ``datasets``, sharded across ranks, robust to bad samples.

Rows come from ``datasets.load_dataset(..., streaming=True)`` (:mod:`m2ib_lightning.data.rows`): a
hub id, or a builder (``json``, ``parquet``, ``csv``, ``imagefolder``, ``webdataset``) with local
``data_files``, so nothing is copied into a cache and datasets of any size stream. An image may be
embedded bytes or a PIL image, a local path, or an http(s) URL fetched concurrently
(:mod:`m2ib_lightning.data.fetch`).

Each row becomes a pair (id, RGB image, caption) or a skip record (id, reason) that travels with its
batch to the writer, so a bad sample is counted and listed in the skip manifest, never fatal and
never silently lost (:mod:`m2ib_lightning.data.images` says what is repaired and what is skipped).
Repairs that change what the model sees (a caption truncated to the model's maximum length, a
16-bit image rescaled) are listed too, as ``repaired`` entries.

Across ranks and dataloader workers every row is read by exactly one reader, and every rank yields
the same number of batches (:mod:`m2ib_lightning.data.sharding`).

Preprocessing comes from the backbone (its tokenizer and image processor), connected in
:meth:`ImageTextDataModule.setup` from the Trainer's LightningModule, never repeated in configs.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from torch.utils.data import DataLoader

from m2ib_lightning.data.fetch import FetchConfig
from m2ib_lightning.data.images import DEFAULT_MAX_ASPECT_RATIO, DEFAULT_MAX_PIXELS, url_scheme
from m2ib_lightning.data.preprocess import Preprocessor
from m2ib_lightning.data.rows import open_rows
from m2ib_lightning.data.sharding import EvenBatches
from m2ib_lightning.data.stream import Collate, PairStream
from m2ib_lightning.errors import ConfigError, DataFileNotFoundError

__all__ = ["ImageTextDataModule"]


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
        max_skip_fraction: the largest share of the run's rows that may be skipped; above it the CLI
            ends the run with exit status 3 and the top reasons (``1.0``: no limit; a run that had
            rows and wrote no record fails whatever this says).
        check_duplicates: with an ``id_column``, a row whose id this reader (rank and dataloader
            worker) already yielded is not explained again but listed as a duplicate. Each reader
            keeps the ids of its part in memory (about 150 bytes per id); turn this off for tens
            of millions of rows per reader whose ids are known to be unique. Duplicates across
            readers are found by the run directory.

    Attributes:
        exclude_ids: ids to pass over (given by :meth:`pass_over`: samples a run directory already finished).
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
        max_skip_fraction: float = 0.5,
        check_duplicates: bool = True,
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
        if isinstance(max_skip_fraction, bool) or not isinstance(max_skip_fraction, int | float) \
                or not 0 <= max_skip_fraction <= 1:
            raise ConfigError(f"max_skip_fraction must be a number in [0, 1], got {max_skip_fraction!r}")
        self.max_skip_fraction = float(max_skip_fraction)
        self.path, self.data_files, self.name, self.split, self.revision = path, data_files, name, split, revision
        self.image_column, self.text_column, self.id_column = image_column, text_column, id_column
        self.image_root = image_root
        self.batch_size, self.num_workers, self.limit = batch_size, num_workers, limit
        self.extra_columns = list(extra_columns or [])
        self.max_image_pixels, self.max_aspect_ratio = max_image_pixels, max_aspect_ratio
        self.fetch = fetch or FetchConfig()
        self.builder_kwargs = dict(builder_kwargs or {})
        self.check_duplicates = bool(check_duplicates)
        self.preprocessor: Preprocessor | None = None
        self.exclude_ids: Collection[str] = frozenset()
        self.rank, self.world_size = 0, 1
        self.save_hyperparameters()

    def pass_over(self, ids: Collection[str]) -> None:
        """Pass over these ids (a run directory's ``finished`` ids: samples a previous attempt already
        wrote or skipped for good), before their image is read."""
        self.exclude_ids = frozenset(ids)

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
        for f in self._files():
            if url_scheme(f) is None and not any(c in f for c in "*?[") and not Path(f).expanduser().exists():
                raise DataFileNotFoundError(f"data file {f} does not exist (data.data_files)")
        # Decode images ourselves (image_column stays undecoded): one corrupt image is a skip, not an
        # exception in the stream.
        ds = open_rows(self.path, self.data_files, name=self.name, split=self.split, revision=self.revision,
                       image_column=self.image_column, builder_kwargs=self.builder_kwargs)
        features = getattr(ds, "features", None) or {}
        for column in (self.image_column, self.text_column, self.id_column, *self.extra_columns):
            if column is not None and features and column not in features:
                raise ConfigError(f"column {column!r} not in dataset {self.path!r}; columns: {sorted(features)}")
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
                          fetch=self.fetch, local_files=root is not None, max_aspect_ratio=self.max_aspect_ratio,
                          check_duplicates=self.check_duplicates)

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
