"""Opening a dataset as a stream of rows: the one place ``datasets.load_dataset`` is called.

:class:`~m2ib_lightning.data.ImageTextDataModule` streams its rows from :func:`open_rows`, and so
can readers outside a run (the HTML report finds a run's samples in its data): the same builders,
the same error for a dataset that cannot be opened, and the image column left undecoded, so that
a corrupt image is the caller's to handle (:func:`~m2ib_lightning.data.read_image`), not an
exception in the stream.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m2ib_lightning.data.recover import tolerant_features
from m2ib_lightning.errors import ConfigError, DatasetOpenError

__all__ = ["FILE_BUILDERS", "data_source", "open_rows"]

#: ``datasets`` builder of a local data file, by suffix
FILE_BUILDERS: dict[str, str] = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def open_rows(
    path: str,
    data_files: str | list[str] | None = None,
    *,
    name: str | None = None,
    split: str = "train",
    revision: str | None = None,
    image_column: str | None = None,
    builder_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """The rows of a dataset as a streamed ``datasets.IterableDataset`` (iterating it gives dicts).

    Nothing is copied into a cache, so datasets of any size stream.

    Args:
        path, data_files, name, split, revision, builder_kwargs: as ``datasets.load_dataset`` takes
            them (see :class:`~m2ib_lightning.data.ImageTextDataModule`).
        image_column: a ``datasets.Image`` column of this name is cast to ``decode=False``: its
            values stay ``{"bytes": ..., "path": ...}`` for :func:`~m2ib_lightning.data.read_image`.

    Raises:
        DatasetOpenError: the dataset could not be opened; the message names it (and offline mode).
    """
    import datasets

    kwargs = dict(builder_kwargs or {})
    try:
        try:
            ds = datasets.load_dataset(path, name=name, data_files=data_files, split=split, revision=revision,
                                       streaming=True, **kwargs)
        except Exception:
            # A bad row among those `datasets` infers the columns from fails the whole dataset; infer
            # them from the rows that can be read, and let the stream report the bad ones.
            features = None if "features" in kwargs else tolerant_features(path, data_files)
            if features is None:
                raise
            ds = datasets.load_dataset(path, name=name, data_files=data_files, split=split, revision=revision,
                                       streaming=True, features=features, **kwargs)
    except Exception as err:  # datasets raises many types; name what could not be opened
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")
        hint = " (offline mode is on: HF_HUB_OFFLINE=1)" if offline else ""
        raise DatasetOpenError(
            f"could not open dataset {path!r} (data_files={data_files!r}, split={split!r})"
            f"{hint}: {type(err).__name__}: {err}"
        ) from err
    features = getattr(ds, "features", None) or {}
    if image_column in features and isinstance(features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))
    return ds


def data_source(data: str | os.PathLike) -> tuple[str, str | None]:
    """A local data file, a dataset directory or a hub id -> :func:`open_rows`'s ``(path, data_files)``.

    ``pairs.jsonl`` gives ``("json", "pairs.jsonl")`` (:data:`FILE_BUILDERS`); anything that is not a
    file is passed on as the dataset's ``path``.

    Raises:
        ConfigError: ``data`` is a file of another kind.
    """
    file = Path(data).expanduser()
    if not file.is_file():
        return str(data), None
    if file.suffix not in FILE_BUILDERS:
        raise ConfigError(f"{data}: expected a .jsonl, .json, .parquet or .csv file")
    return FILE_BUILDERS[file.suffix], str(file)
