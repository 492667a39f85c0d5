"""Tolerant reading of text formats: a line that does not parse costs that line only (JSON lines here, CSV in
:mod:`m2ib_lightning.data.csvrows`).

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
import io
import json
import re
from collections import Counter
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO

import pyarrow as pa

__all__ = ["Bad", "Lost", "blocks", "json_line_rows", "json_lines_schema", "parse_blocks", "rows_of", "short",
           "utf8_problem"]

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


def short(text: str, limit: int = 200) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def parse_blocks(records: list[tuple[Any, bytes]], parse: Callable[[list[bytes]], list[dict[str, Any]]],
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
        yield from parse_blocks(records[:mid], parse, problem)
        yield from parse_blocks(records[mid:], parse, problem)
        return
    yield from rows


def blocks(items: Iterator[tuple[Any, bytes] | Bad]) -> Iterator[list[tuple[Any, bytes]] | Bad]:
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


def utf8_problem(raw: bytes) -> str | None:
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
        reason = utf8_problem(raw)
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
                          else f"{type(err).__name__}: {short(message)}")
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
        for block in blocks(records()):
            yield from parse_blocks(block, parse, problem)  # type: ignore[arg-type]
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
    for item in parse_blocks(raws, parse, lambda line, raw, err: Bad("", {})):  # type: ignore[arg-type]
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
