"""Tolerant readers of text formats (JSON lines, CSV / TSV): a line that does not parse costs that line only.

``datasets`` parses these formats in large blocks (10 MB of JSON lines, 10 000 CSV records) and gives
up on a whole file at its first bad line. When that happens, :mod:`m2ib_lightning.data.recover`
reads the file on with these readers, from the first row that was not yet delivered. They parse
blocks of lines with the same fast parsers (pyarrow for JSON lines, pandas for CSV, so values come
out typed as ``datasets`` types them) and split a block that fails in halves until the lines at
fault are alone: a clean block costs one parse, a bad line about ``2 log2(block)`` small ones.

Each reader is a generator over ``(stream, path, skip, ...)``: it passes over the first ``skip``
rows (counting them as ``datasets`` does: blank lines and a CSV header are not rows), then yields
``dict`` rows and :class:`Bad` units in file order, and returns how many rows it passed over. A
:class:`Lost` item ends the file early (a JSON array rather than lines, an option we cannot
mirror).
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from collections import Counter, deque
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa

__all__ = ["Bad", "Lost", "csv_rows", "json_line_rows", "rows_of"]

#: lines per parse while reading tolerantly (and the most a bad line can cost in extra parsing)
BLOCK_LINES = 1024
#: bytes per parse, whichever comes first
BLOCK_BYTES = 1 << 20


@dataclass
class Bad:
    """``count`` rows (from the reader's current position) that could not be read, and why."""

    reason: str
    source: dict[str, Any]
    count: int = 1
    known: dict[str, Any] | None = None
    transient: bool = False


@dataclass
class Lost:
    """The rest of the file cannot be read."""

    error: BaseException
    transient: bool = False


Item = dict[str, Any] | Bad | Lost
Reader = Generator[Item, None, int]


def rows_of(table: pa.Table, features: Any) -> list[dict[str, Any]]:
    """Python rows of ``table`` as ``datasets`` gives them: cast to ``features`` (missing columns null,
    others dropped) and decoded by them; raises, naming the column, if a value does not fit it."""
    if features is None:
        return table.to_pylist()
    from datasets.table import table_cast

    schema = features.arrow_schema
    columns = [table.column(f.name) if f.name in table.column_names else pa.nulls(len(table), f.type)
               for f in schema]
    try:
        table = table_cast(pa.Table.from_arrays(columns, names=schema.names), schema)
    except Exception as err:
        for field, column in zip(schema, columns):
            try:
                table_cast(pa.Table.from_arrays([column], names=[field.name]), pa.schema([field]))
            except Exception:  # noqa: BLE001 - this is the column at fault
                raise ValueError(f"column {field.name!r} holds {column.type}, not {field.type}") from err
        raise
    batch = features.decode_batch(table.to_pydict())
    names = list(batch)
    return [dict(zip(names, values)) for values in zip(*batch.values())]


def _short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _parse_blocks(records: list[tuple[Any, bytes]], parse: Callable[[list[bytes]], list[dict[str, Any]]],
                  problem: Callable[[Any, bytes, BaseException], Bad]) -> Iterator[dict[str, Any] | Bad]:
    """Rows of ``records`` in order, parsed ``parse(raws)`` at a time; a failing block is halved until the
    records at fault are alone, each then reported by ``problem(key, raw, error)``."""
    try:
        rows = parse([raw for _, raw in records])
    except Exception as err:  # noqa: BLE001 - any parser complaint: find the record(s) at fault
        if len(records) == 1:
            yield problem(records[0][0], records[0][1], err)
            return
        mid = len(records) // 2
        yield from _parse_blocks(records[:mid], parse, problem)
        yield from _parse_blocks(records[mid:], parse, problem)
        return
    yield from rows


def _blocks(items: Iterator[tuple[Any, bytes] | Bad]) -> Iterator[list[tuple[Any, bytes]] | Bad]:
    """Groups records into blocks of at most :data:`BLOCK_LINES` / :data:`BLOCK_BYTES`; a :class:`Bad`
    in between closes the block (order is kept)."""
    block: list[tuple[Any, bytes]] = []
    size = 0
    for item in items:
        if isinstance(item, Bad):
            if block:
                yield block
                block, size = [], 0
            yield item
            continue
        block.append(item)
        size += len(item[1])
        if len(block) >= BLOCK_LINES or size >= BLOCK_BYTES:
            yield block
            block, size = [], 0
    if block:
        yield block


def _utf8_problem(raw: bytes) -> str | None:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return f"not valid UTF-8 ({err.reason} at byte {err.start})"
    return None


# ------------------------------------------------------------------------------------ JSON lines
def json_line_rows(stream: BinaryIO, path: str, skip: int, features: Any) -> Reader:
    """The rows of a JSON-lines file after the first ``skip`` (blank lines are not rows, as for pyarrow)."""
    import pyarrow.json as paj

    def parse(raws: list[bytes]) -> list[dict[str, Any]]:
        data = b"\n".join(raws)
        table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(use_threads=False,
                                                                            block_size=len(data) + 1))
        if table.num_rows != len(raws):  # e.g. two objects on one line: positions would shift
            raise ValueError("a line holds more or less than one JSON object")
        return rows_of(table, features)

    def problem(line: int, raw: bytes, err: BaseException) -> Bad:
        reason = _utf8_problem(raw)
        if reason is None:
            try:
                value = json.loads(raw)
            except ValueError as json_err:
                msg, col = getattr(json_err, "msg", json_err), getattr(json_err, "colno", "?")
                reason = f"not valid JSON: {msg} (column {col})"
            else:
                # pyarrow numbers rows within the block it was given: meaningless here
                message = re.sub(r" in row \d+$", "", str(err).strip())
                reason = (f"not a JSON object (a {type(value).__name__})" if not isinstance(value, dict)
                          else f"{type(err).__name__}: {_short(message)}")
        return Bad(f"unreadable line {line} of {path}: {reason}", {"file": path, "line": line})

    skipped = 0

    def records() -> Iterator[tuple[int, bytes]]:
        nonlocal skipped
        for line, raw in enumerate(stream, 1):
            if line == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
                if raw.lstrip().startswith(b"["):
                    raise _NotLines()
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            if skipped < skip:
                skipped += 1
                continue
            yield line, raw

    try:
        for block in _blocks(records()):
            yield from _parse_blocks(block, parse, problem)  # type: ignore[arg-type]
    except _NotLines:
        yield Lost(ValueError(f"{path} is a JSON array, not JSON lines: it cannot be read past a bad value"))
    return skipped


class _NotLines(Exception):
    pass


def json_lines_schema(stream: BinaryIO, limit: int = 10 << 20) -> pa.Schema | None:
    """The schema pyarrow infers from the lines that parse among the first ``limit`` bytes of a JSON-lines
    file (what ``datasets`` infers from its first block, which fails whole if one line is bad).

    Where lines disagree on a column's type (a number where the others hold lists), the type most of
    them hold wins: the others then do not fit the dataset's columns and are reported line by line.
    """
    import pyarrow.json as paj

    tables: list[pa.Table] = []

    def parse(raws: list[bytes]) -> list[pa.Table]:
        data = b"\n".join(raws)
        table = paj.read_json(io.BytesIO(data), read_options=paj.ReadOptions(use_threads=False,
                                                                            block_size=len(data) + 1))
        if table.num_rows != len(raws):
            raise ValueError("a line holds more or less than one JSON object")
        return [table]

    raws, size = [], 0
    for line, raw in enumerate(stream, 1):
        raw = raw.removeprefix(codecs.BOM_UTF8) if line == 1 else raw
        if raw.strip():
            raws.append((line, raw.rstrip(b"\r\n")))
            size += len(raw)
        if size >= limit:
            break
    for item in _parse_blocks(raws, parse, lambda line, raw, err: Bad("", {})):  # type: ignore[arg-type]
        if isinstance(item, pa.Table):
            tables.append(item)
    votes: dict[str, Counter[pa.DataType]] = {}
    for table in tables:
        for field in table.schema:
            counts = votes.setdefault(field.name, Counter())
            counts[field.type] += 0 if pa.types.is_null(field.type) else table.num_rows
    if not votes:
        return None
    return pa.schema([(name, counts.most_common(1)[0][0]) for name, counts in votes.items()])


# -------------------------------------------------------------------------------------------- CSV
#: ``datasets.packaged_modules.csv.CsvConfig`` options we mirror; any other set to a non-default value
#: (``skiprows``, ``comment``, ``usecols``, ...) makes the file too different to re-split by hand
_CSV_FREE = {"sep", "delimiter", "header", "names", "column_names", "quotechar", "quoting", "doublequote",
             "escapechar", "skipinitialspace", "skip_blank_lines", "encoding", "encoding_errors", "chunksize",
             "features", "na_values", "keep_default_na", "na_filter", "true_values", "false_values", "decimal",
             "thousands", "float_precision", "date_format", "engine", "on_bad_lines", "verbose",
             "mangle_dupe_cols", "memory_map", "dialect", "warn_bad_lines", "error_bad_lines", "lineterminator"}


def csv_supported(config: Any) -> str | None:
    """Why a CSV builder config cannot be read tolerantly (``None``: it can)."""
    from datasets.packaged_modules.csv.csv import CsvConfig

    default = CsvConfig()
    for name in ("skiprows", "nrows", "skipfooter", "comment", "usecols", "index_col", "converters", "prefix",
                 "dialect", "lineterminator"):
        if getattr(config, name, None) != getattr(default, name, None):
            return f"the CSV option {name} is set"
    sep = config.sep
    if not isinstance(sep, str) or len(sep) != 1 or not sep.isascii() or not str(config.quotechar).isascii():
        return f"separator {sep!r} is not a single ASCII character"
    if config.header not in ("infer", 0, None):
        return f"header={config.header!r}"
    if config.encoding is not None and _codec(config.encoding) not in _SPLITTABLE:
        return f"encoding {config.encoding!r}"
    return None


#: encodings in which a separator, quote or newline byte is always that character, so that records
#: split the same on the bytes (UTF-8 and single-byte ASCII supersets)
_SPLITTABLE = {"utf-8", "utf-8-sig", "ascii", "iso8859-1", "iso8859-15", "cp1252"}


def _codec(encoding: str) -> str:
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        return encoding


class _Lines:
    """A binary stream's lines, numbered, with lines pushed back to be read again (a record re-split)."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream, self.number = stream, 0
        self.pending: deque[tuple[int, bytes]] = deque()
        self.taken: list[tuple[int, bytes]] = []

    def __iter__(self) -> _Lines:
        return self

    def __next__(self) -> str:
        if self.pending:
            item = self.pending.popleft()
        else:
            raw = self.stream.readline()
            if not raw:
                raise StopIteration
            self.number += 1
            item = (self.number, raw.removeprefix(codecs.BOM_UTF8) if self.number == 1 else raw)
        self.taken.append(item)
        # Latin-1 maps bytes 1:1, and UTF-8 never hides an ASCII separator or quote inside a character:
        # records split the same as the bytes would, whatever the encoding problems inside them.
        return item[1].decode("latin-1")

    def take(self) -> list[tuple[int, bytes]]:
        out, self.taken = self.taken, []
        return out

    def push_back(self, lines: list[tuple[int, bytes]]) -> None:
        self.pending.extendleft(reversed(lines))


def _strict_record(raw: bytes, dialect: dict[str, Any]) -> bool:
    """Whether a record spanning lines is one well-formed record (a quote closing a field is followed by
    a separator or the end of the line). pandas and the ``csv`` module accept ``"a"b`` within a line;
    across lines it is how a stray quote swallows the lines after it."""
    try:
        return len(list(csv.reader(io.StringIO(raw.decode("latin-1"), newline=""), strict=True, **dialect))) == 1
    except csv.Error:
        return False


def csv_rows(stream: BinaryIO, path: str, skip: int, config: Any, features: Any) -> Reader:
    """The records of a CSV / TSV file after the first ``skip`` (header and blank lines are not rows).

    Records are split with Python's ``csv`` module (quoted fields may span lines) and parsed in
    blocks by pandas with the builder's options, as ``datasets`` does. A record with more fields
    than the header, an unclosed quote or bytes that are not UTF-8 is bad; a bad record spanning
    several lines (an unclosed quote swallows the lines after it) is reported by its first line,
    and splitting starts again on the next one, so it costs that line only.
    """
    import pandas as pd

    kwargs = {k: v for k, v in dict(config.pd_read_csv_kwargs).items() if k not in ("chunksize", "iterator")}
    names = config.names
    has_header = config.header == 0 or (config.header == "infer" and names is None)
    dialect = {"delimiter": config.sep, "quotechar": config.quotechar or '"', "doublequote": config.doublequote,
               "escapechar": config.escapechar, "skipinitialspace": config.skipinitialspace,
               "quoting": config.quoting}
    quote = (config.quotechar or '"').encode()
    check_utf8 = config.encoding is None or _codec(config.encoding) in ("utf-8", "utf-8-sig")
    lines = _Lines(stream)
    header = b""
    ncols = len(names) if names else 0
    if has_header:
        reader = csv.reader(lines, **dialect)
        fields = next(reader, None)
        header = b"".join(raw for _, raw in lines.take())
        if fields is None:
            return 0
        ncols = ncols or len(fields)
        if not header.endswith(b"\n"):
            header += b"\n"

    def parse(raws: list[bytes]) -> list[dict[str, Any]]:
        data = header + b"".join(r if r.endswith(b"\n") else r + b"\n" for r in raws)
        df = pd.read_csv(io.BytesIO(data), **kwargs)
        if len(df) != len(raws):
            raise ValueError(f"{len(raws)} record(s) read as {len(df)}")
        return rows_of(pa.Table.from_pandas(df, preserve_index=False), features)

    def span(taken: list[tuple[int, bytes]]) -> tuple[str, dict[str, Any]]:
        first, last = taken[0][0], taken[-1][0]
        where = f"line {first}" if first == last else f"lines {first}-{last}"
        return where, {"file": path, "line": first, **({"last_line": last} if last != first else {})}

    def problem(taken: list[tuple[int, bytes]], raw: bytes, err: BaseException) -> Bad:
        where, source = span(taken)
        message = str(err).replace("Error tokenizing data. C error: ", "")
        return Bad(f"unreadable {where} of {path}: {type(err).__name__}: {_short(message)}", source)

    skipped = 0

    def records() -> Iterator[tuple[list[tuple[int, bytes]], bytes] | Bad]:
        nonlocal skipped
        while True:
            reader = csv.reader(lines, **dialect)
            try:
                for fields in reader:
                    taken = lines.take()
                    raw = b"".join(r for _, r in taken)
                    if config.skip_blank_lines and not raw.strip():
                        continue
                    reason = None
                    if len(fields) > ncols:
                        reason = f"expected {ncols} fields, saw {len(fields)}"
                    elif not config.escapechar and raw.count(quote) % 2:
                        reason = "unclosed quote"
                    elif len(taken) > 1 and not _strict_record(raw, dialect):
                        reason = "stray quote"
                    elif check_utf8:
                        reason = _utf8_problem(raw)
                    if reason is not None and len(taken) > 1:
                        # Most likely a stray quote that joined the lines after it: the first line is at fault.
                        lines.push_back(taken[1:])
                        taken, reason = taken[:1], f"{reason} (in a record that would span lines "\
                                                   f"{taken[0][0]}-{taken[-1][0]}; read on from the next line)"
                    if skipped < skip:
                        skipped += 1
                        continue
                    if reason is not None:
                        where, source = span(taken)
                        yield Bad(f"unreadable {where} of {path}: {reason}", source)
                    else:
                        yield taken, raw
                return
            except csv.Error as err:  # e.g. a NUL byte; start again after the line at fault
                taken = lines.take()
                if len(taken) > 1:
                    lines.push_back(taken[1:])
                if skipped < skip:
                    skipped += 1
                    continue
                where, source = span(taken[:1])
                yield Bad(f"unreadable {where} of {path}: {_short(str(err))}", source)

    for block in _blocks(records()):  # type: ignore[arg-type]
        if isinstance(block, Bad):
            yield block
        else:
            yield from _parse_blocks(block, parse, problem)
    return skipped
