"""Tolerant reading of CSV / TSV: a record that does not parse costs that record (its first line if it spans several).

Records are split with Python's ``csv`` module (quoted fields may span lines) on the raw bytes and
parsed in blocks by pandas with the builder's own options, as ``datasets`` does; see
:mod:`m2ib_lightning.data.textrows` for the block-and-halve scheme and the reader protocol.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections import deque
from collections.abc import Iterator
from typing import Any, BinaryIO

import pyarrow as pa

from m2ib_lightning.data.textrows import Bad, Reader, blocks, parse_blocks, rows_of, short, utf8_problem

__all__ = ["csv_rows", "csv_supported"]


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
        return Bad(f"unreadable {where} of {path}: {type(err).__name__}: {short(message)}", source)

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
                        reason = utf8_problem(raw)
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
                yield Bad(f"unreadable {where} of {path}: {short(str(err))}", source)

    for block in blocks(records()):  # type: ignore[arg-type]
        if isinstance(block, Bad):
            yield block
        else:
            yield from parse_blocks(block, parse, problem)
    return skipped
