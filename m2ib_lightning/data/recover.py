"""Reading a shard on after ``datasets``' reader failed in it: a bad line, row group or tar sample costs itself only.

``datasets`` reads fast, in blocks, and stops at the first block it cannot parse, taking the rest of
the file with it. The fast reader stays in charge while a file is clean (nothing here runs then);
when it raises inside shard ``k`` after delivering ``r`` rows, :class:`Recovery` opens the shard's
file(s) again with a tolerant reader of the same format, passes over the ``r`` rows already
delivered and goes on from there:

* JSON lines and CSV / TSV (:mod:`m2ib_lightning.data.textrows`, :mod:`m2ib_lightning.data.csvrows`):
  a line that does not parse or is not UTF-8 costs that line;
* parquet: each row group is read alone; a damaged one costs its rows (one report per row group);
* webdataset tars: a member that does not decode (a ``.txt`` that is not UTF-8, a ``.json`` that does
  not parse) costs its sample; a broken tar structure costs the rest of the archive.

Every row keeps its position (a bad line is still counted), so derived ids do not shift, and the
re-read is deterministic, so every reader of the shard sees the same rows and reports (the split of
:mod:`m2ib_lightning.data.sharding` stays exact). A failure that may not repeat (a network error
while re-reading) is marked transient, so a resumed run tries again; a parse error is not.

Formats and options without a tolerant reader (imagefolder, hub loading scripts, CSV with
``skiprows``, parquet with ``filters``, ...) keep ``datasets``' behaviour: the rest of the shard is
lost and recorded once (:class:`~m2ib_lightning.data.sharding.UnreadableRest`).
"""

from __future__ import annotations

import gzip
import logging
import tarfile
from collections.abc import Collection, Iterator
from typing import Any

import pyarrow as pa

from m2ib_lightning.data.csvrows import csv_rows, csv_supported
from m2ib_lightning.data.sharding import BadRows, Item, UnreadableRest
from m2ib_lightning.data.textrows import Bad, Lost, Reader, json_line_rows, json_lines_schema, rows_of

__all__ = ["Recovery", "is_transient", "tolerant_features"]

log = logging.getLogger(__name__)


def is_transient(err: BaseException) -> bool:
    """Whether a failure may not repeat (a network or I/O error: a resumed run tries again), rather
    than damaged data (a parse or decode error).

    Connection errors and timeouts are transient; so is any other ``OSError``, except those that
    describe the data: pyarrow reports a corrupt page as a plain ``OSError`` raised from its own
    status check (an error of the Python file object it reads from keeps its own type and origin),
    and a broken gzip stream is a ``BadGzipFile``.
    """
    if isinstance(err, ConnectionError | TimeoutError):
        return True
    if not isinstance(err, OSError) or isinstance(err, pa.ArrowException | gzip.BadGzipFile):
        return False
    tb, last = err.__traceback__, None
    while tb is not None:
        last, tb = tb, tb.tb_next
    return last is None or not last.tb_frame.f_code.co_filename.endswith("error.pxi")


def _base_iterable(dataset: Any) -> Any:
    ex = getattr(dataset, "_ex_iterable", None)
    while ex is not None and not hasattr(ex, "kwargs") and hasattr(ex, "ex_iterable"):
        ex = ex.ex_iterable
    return ex if ex is not None and isinstance(getattr(ex, "kwargs", None), dict) else None


def _builder(ex: Any) -> Any:
    fn = getattr(ex, "generate_tables_fn", None) or getattr(ex, "generate_examples_fn", None)
    return getattr(fn, "__self__", None)


class Recovery:
    """Re-reads shards of a streamed ``datasets.IterableDataset`` tolerantly (see the module docstring).

    Use :meth:`of`, which returns ``None`` for a dataset whose format has no tolerant reader. Calling
    the object, ``recovery(shard, index, error)``, gives the items of ``shard`` from position ``index``
    on (the ``resume`` of :func:`~m2ib_lightning.data.sharding.iter_part`), or ``None``.
    """

    #: ``datasets`` builder class -> the keyword argument of its generator that lists the shard's files
    FORMATS = {"Json": "files_iterables", "Csv": "files_iterables", "Parquet": "files", "WebDataset": "tar_paths"}

    def __init__(self, dataset: Any, kind: str, columns: Collection[str] | None = None) -> None:
        self.dataset, self.kind = dataset, kind
        features = getattr(dataset, "features", None)
        if features is not None and columns is not None:
            import datasets

            features = datasets.Features({k: v for k, v in features.items() if k in columns})
        self.features = features

    @classmethod
    def of(cls, dataset: Any, columns: Collection[str] | None = None) -> Recovery | None:
        """The recovery of ``dataset``'s shards, or ``None`` if its format has none. With ``columns``,
        re-read rows hold only those columns, so a value of the wrong type in a column the caller
        does not use costs nothing."""
        ex = _base_iterable(dataset)
        builder = _builder(ex) if ex is not None else None
        kind = type(builder).__name__ if builder is not None else ""
        if kind not in cls.FORMATS or cls.FORMATS[kind] not in ex.kwargs:
            return None
        return cls(dataset, kind, columns)

    def _shard(self, shard: int) -> tuple[Any, dict[str, Any]]:
        n = self.dataset.num_shards
        part = self.dataset.shard(num_shards=n, index=shard, contiguous=True) if n > 1 else self.dataset
        ex = _base_iterable(part)
        return _builder(ex), ex.kwargs

    def files(self, shard: int) -> list[str]:
        """The shard's file(s) as ``datasets`` names them (for messages); ``[]`` if unknown."""
        try:
            _, kwargs = self._shard(shard)
            listed = kwargs.get("base_files") or kwargs.get(self.FORMATS[self.kind]) or []
            return [str(f) for f in listed if isinstance(f, str)]
        except Exception:  # noqa: BLE001 - only for messages
            return []

    def __call__(self, shard: int, index: int, error: BaseException) -> Iterator[Item] | None:
        try:
            builder, kwargs = self._shard(shard)
            why = self._unsupported(builder)
        except Exception as err:  # noqa: BLE001 - datasets internals changed: behave as without recovery
            why = f"{type(err).__name__}: {err}"
        if why is not None:
            log.warning("shard %d cannot be read on past its error (%s)", shard, why)
            return None
        log.warning("shard %d: the reader failed after %d rows (%s: %.200s); reading on tolerantly", shard, index,
                    type(error).__name__, error)
        return self._items(shard, index, builder, kwargs)

    def _unsupported(self, builder: Any) -> str | None:
        config = builder.config
        if self.kind == "Json":
            if config.field is not None or config.encoding not in ("utf-8", "utf8", "UTF-8"):
                return "a JSON file read with `field` or a non-UTF-8 encoding"
        elif self.kind == "Csv":
            return csv_supported(config)
        elif self.kind == "Parquet" and getattr(config, "filters", None) is not None:
            return "parquet with filters"
        return None

    def _files(self, kwargs: dict[str, Any]) -> list[tuple[str, Any]]:
        """(file, row groups or None) of the shard, in the order the builder reads them."""
        if self.kind in ("Json", "Csv"):
            return [(str(f), None) for files in kwargs["files_iterables"] for f in files]
        if self.kind == "Parquet":
            groups = kwargs.get("row_groups_list") or [None] * len(kwargs["files"])
            return [(str(f), g) for f, g in zip(kwargs["files"], groups)]
        return [(str(f), None) for f in kwargs["tar_paths"]]

    def _reader(self, builder: Any, stream: Any, path: str, skip: int, groups: Any) -> Reader:
        if self.kind == "Json":
            return json_line_rows(stream, path, skip, self.features)
        if self.kind == "Csv":
            return csv_rows(stream, path, skip, builder.config, self.features)
        if self.kind == "Parquet":
            return parquet_rows(stream, path, skip, groups, getattr(builder.config, "columns", None), self.features)
        return tar_rows(stream, path, skip, type(builder).DECODERS, self.features)

    def _items(self, shard: int, index: int, builder: Any, kwargs: dict[str, Any]) -> Iterator[Item]:
        from datasets.utils.file_utils import xopen

        at, skip = index, index  # the shard position of the next item; rows still to pass over
        for path, groups in self._files(kwargs):
            try:
                with xopen(path, "rb") as stream:
                    reader = self._reader(builder, stream, path, skip, groups)
                    while True:
                        try:
                            item = next(reader)
                        except StopIteration as stop:
                            skip -= stop.value or 0
                            break
                        if isinstance(item, Lost):
                            log.error("%s unreadable from row %d on: %s", path, at, item.error)
                            yield UnreadableRest(shard, at, item.error, path, item.transient)
                            return
                        if isinstance(item, Bad):
                            source = {**item.source, "row": at} if item.count == 1 else item.source
                            yield BadRows(shard, at, item.count, item.reason, source, item.known, item.transient)
                            at += item.count
                        else:
                            yield item
                            at += 1
            except Exception as err:  # noqa: BLE001 - cannot open or read on: the rest of the shard is lost
                log.error("%s unreadable from row %d on: %s: %s", path, at, type(err).__name__, err)
                yield UnreadableRest(shard, at, err, path, is_transient(err))
                return


# ------------------------------------------------------------------------------------- parquet
def parquet_rows(stream: Any, path: str, skip: int, groups: Any, columns: Any, features: Any) -> Reader:
    """The rows of a parquet file after the first ``skip``, one row group at a time."""
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(stream)
    except Exception as err:  # noqa: BLE001 - footer unreadable: nothing of the file can be located
        yield Lost(err, is_transient(err))
        return 0
    # Only the columns the rows need: a damaged page in another column costs nothing.
    names = [n for n in pf.schema_arrow.names
             if (columns is None or n in columns) and (features is None or n in features)]
    start = 0
    for g in groups if groups is not None else range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        first = max(skip - start, 0)
        if first < n:
            try:
                rows = rows_of(pf.read_row_group(g, columns=names).slice(first), features)
            except Exception as err:  # noqa: BLE001 - this row group's data is damaged
                last = start + n - 1
                yield Bad(f"unreadable row group {g} (rows {start}-{last}) of {path}: {type(err).__name__}: "
                          f"{str(err)[:300]}", {"file": path, "row_group": g, "rows": [start, last]},
                          count=n - first, transient=is_transient(err))
            else:
                yield from rows
        start += n
    return min(skip, start)


# --------------------------------------------------------------------------------- webdataset
def _split_name(name: str) -> tuple[str | None, str | None]:
    """``dir/key.ext.gz`` -> ``("dir/key", "ext.gz")`` as webdataset (and ``datasets``) split names."""
    import re

    match = re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
    return (match.group(1), match.group(2)) if match else (None, None)


def tar_samples(stream: Any, decoders: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any], list[str]]]:
    """``(key, fields, problems)`` per sample of a webdataset tar, in order; a member that does not
    decode is a problem of its sample, not an exception. A broken archive raises ``tarfile`` errors."""
    import os

    key: str | None = None
    fields: dict[str, Any] = {}
    problems: list[str] = []
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            name = info.name
            if not info.isreg() or os.path.basename(name).startswith((".", "__")):
                continue
            base, field = _split_name(name)
            if base is None:
                continue
            if key is not None and base != key:
                yield key, fields, problems
                fields, problems = {}, []
            key = base
            data = tar.extractfile(info).read()
            ext = field.rsplit(".", 1)[-1].lower()
            if ext in ("gz", "bz2", "xz", "zst"):
                problems.append(f"member {name}: compressed members are not re-read")
                continue
            if field in fields:
                problems.append(f"member {name}: duplicate field {field!r}")
                continue
            try:
                fields[field] = decoders[ext](data) if ext in decoders else data
            except Exception as err:  # noqa: BLE001 - this member only
                reason = (f"not valid UTF-8 ({err.reason} at byte {err.start})" if isinstance(err, UnicodeDecodeError)
                          else f"{type(err).__name__}: {str(err)[:200]}")
                problems.append(f"member {name}: {reason}")
                fields[field] = None
            tar.members = []  # stream mode keeps every TarInfo otherwise
    if key is not None:
        yield key, fields, problems


def tar_rows(stream: Any, path: str, skip: int, decoders: dict[str, Any], features: Any) -> Reader:
    """The samples of a webdataset tar after the first ``skip``; a sample with a bad member is reported."""
    import datasets
    from datasets.features.features import cast_to_python_objects

    images = {n for n, f in (features or {}).items() if isinstance(f, datasets.Image)}
    seen = 0
    try:
        for key, fields, problems in tar_samples(stream, decoders):
            seen += 1
            if seen <= skip:
                continue
            if problems:
                yield Bad(f"unreadable sample {key!r} of {path}: {'; '.join(problems)}",
                          {"file": path, "member": problems[0].split(":", 1)[0].removeprefix("member ")},
                          known={"__key__": key})
                continue
            example = {**{n: None for n in features or ()}, **fields, "__key__": key, "__url__": path}
            for name in images & set(fields):
                example[name] = {"path": f"{key}.{name}", "bytes": fields[name]}
            try:
                (row,) = rows_of(pa.Table.from_pylist(cast_to_python_objects([example], only_1d_for_numpy=True)),
                                 features)
            except Exception as err:  # noqa: BLE001 - a value that does not fit the dataset's columns
                yield Bad(f"unreadable sample {key!r} of {path}: {type(err).__name__}: {str(err)[:200]}",
                          {"file": path, "member": key}, known={"__key__": key})
                continue
            yield row
    except (tarfile.TarError, EOFError, OSError, ValueError) as err:
        yield Lost(err, is_transient(err))
    return min(seen, skip)


# ------------------------------------------------------------------------- opening a dataset
def _first_file(data_files: Any) -> str | None:
    import glob
    import os

    first = data_files[0] if isinstance(data_files, list | tuple) and data_files else data_files
    if not isinstance(first, str) or "://" in first:
        return None
    pattern = os.path.expanduser(first)
    matches = sorted(glob.glob(pattern, recursive=True)) if any(c in pattern for c in "*?[") else [pattern]
    return next((m for m in matches if os.path.isfile(m)), None)


def tolerant_features(path: str, data_files: Any) -> Any:
    """The ``datasets.Features`` of a JSON-lines or webdataset dataset, inferred from the rows of its
    first file that can be read, or ``None``.

    ``datasets`` infers them when the dataset is opened, from the first block of the first file (10 MB
    of JSON lines, 5 tar samples), and fails to open the dataset at all if one of those rows is bad.
    Passing these features to ``load_dataset`` skips that step; the bad rows are then found, and cost
    themselves only, while the data streams (:class:`Recovery`).
    """
    import datasets

    first = _first_file(data_files)
    if first is None or path not in ("json", "webdataset"):
        return None
    with open(first, "rb") as stream:
        if path == "json":
            schema = json_lines_schema(stream)
            return datasets.Features.from_arrow_schema(schema) if schema is not None else None
        from datasets.features.features import cast_to_python_objects
        from datasets.packaged_modules.webdataset.webdataset import WebDataset

        examples = []
        for key, fields, problems in tar_samples(stream, WebDataset.DECODERS):
            if not problems:
                examples.append({**fields, "__key__": key, "__url__": first})
            if len(examples) == WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE:
                break
    if not examples:
        return None
    tables = [pa.Table.from_pylist(cast_to_python_objects([e], only_1d_for_numpy=True)) for e in examples]
    features = datasets.Features.from_arrow_schema(pa.concat_tables(tables, promote_options="default").schema)
    for name in examples[0]:
        if name.rsplit(".", 1)[-1].lower() in WebDataset.IMAGE_EXTENSIONS:
            features[name] = datasets.Image()
    return features
