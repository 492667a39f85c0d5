"""What a run did, all ranks together: counts, reasons grouped, duplicates, and whether it did its job.

Every rank's :class:`~m2ib_lightning.outputs.rundir.RunDirectory` keeps a :class:`RunCounts` of what
it wrote; at the end of the run the sink gathers them (one collective), and :class:`RunSummary`
adds them up, prints one block for the whole run and, through :meth:`RunSummary.problem`, says
whether the run failed at its job: it had rows to attribute and wrote no record, or it skipped a
larger share of its rows than ``data.max_skip_fraction`` allows.

Skip and repair reasons are grouped by :func:`reason_group`, a normalised prefix, so that reasons
that differ only in a byte offset, a size or a path count together.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

__all__ = ["RunCounts", "RunSummary", "reason_group"]

#: reasons shown per breakdown; the others are counted on one line
TOP = 5
_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_PATH = re.compile(r"\S*[/\\]\S*")
_NUMBER = re.compile(r"(?<![\w.-])[-+]?\d+(?:\.\d+)?(?![\w.])")
_SPACES = re.compile(r"\s+")


def reason_group(reason: str, width: int = 72) -> str:
    """The group a skip or repair reason is counted in: the text before a parenthesis, at most two
    ``:``-separated parts, quoted strings and paths as ``…``, numbers as ``#``.

    ``"undecodable caption: not UTF-8 (... at byte 3)"`` and ``"... at byte 7"`` both give
    ``"undecodable caption: not UTF-8"``; ``"caption truncated from 93 to 77 tokens"`` gives
    ``"caption truncated from # to # tokens"``.
    """
    text = reason.split(" (", 1)[0]
    text = ":".join(text.split(":")[:2])
    text = _NUMBER.sub("#", _PATH.sub("…", _QUOTED.sub("…", text)))
    text = _SPACES.sub(" ", text).strip() or "(no reason given)"
    return text if len(text) <= width else text[: width - 1].rstrip() + "…"


@dataclass
class RunCounts:
    """What one rank did in this run (picklable: gathered from every rank at the end).

    Attributes:
        written: records written.
        skipped: manifest entries of rows not explained, by :func:`reason_group`.
        repaired: manifest entries of rows explained in a repaired form, by group.
        duplicates: rows whose id this rank had already attributed in this run (not written again),
            and the data's own ``duplicate id`` entries, by group.
        redone: rows handed to the writer although the directory had finished them earlier (data
            not told the finished ids); passed over, not written again.
        first_sequence: the first shard sequence number this rank wrote in this run.
    """

    written: int = 0
    skipped: Counter[str] = field(default_factory=Counter)
    repaired: Counter[str] = field(default_factory=Counter)
    duplicates: Counter[str] = field(default_factory=Counter)
    redone: int = 0
    first_sequence: int = 0

    @classmethod
    def total(cls, counts: Iterable[RunCounts]) -> RunCounts:
        """The sum over ranks (``first_sequence`` is per rank and not summed)."""
        out = cls()
        for c in counts:
            out.written += c.written
            out.redone += c.redone
            out.skipped.update(c.skipped)
            out.repaired.update(c.repaired)
            out.duplicates.update(c.duplicates)
        return out


@dataclass
class RunSummary:
    """The whole run's outcome (every rank's counts added up).

    Attributes:
        directory: the output directory.
        ranks: how many ranks took part.
        counts: this run's counts, summed over the ranks.
        earlier_records, earlier_skips: samples the directory had finished before this run (a
            record, or a skip a retry would not change); passed over.
        across_ranks: ids written by more than one rank in this run (both copies are on disk; the
            reader serves the first; each is listed in the manifest as a ``duplicate id``).
        stopped_early: the run was stopped before the end of its data (a SLURM requeue); it is not
            judged, the job that finishes the data is.
    """

    directory: str
    ranks: int
    counts: RunCounts
    earlier_records: int = 0
    earlier_skips: int = 0
    across_ranks: int = 0
    stopped_early: bool = False

    @property
    def skipped(self) -> int:
        return sum(self.counts.skipped.values())

    @property
    def rows(self) -> int:
        """Rows this run attributed or skipped (duplicates and rows finished earlier aside)."""
        return self.counts.written + self.skipped

    def skip_share(self) -> tuple[int, int]:
        """(skipped, rows) over the whole run: this run's plus what the directory finished earlier."""
        skipped = self.skipped + self.earlier_skips
        return skipped, skipped + self.counts.written + self.earlier_records

    def problem(self, max_skip_fraction: float = 0.5) -> str | None:
        """Why the run failed at its job, or ``None``: it had rows to attribute and no record exists
        (none written now or earlier), or more than ``max_skip_fraction`` of the whole run's rows
        were skipped (``1.0``: never). A run with nothing left to do (a rerun of a finished run),
        or one stopped early, is not judged."""
        if self.stopped_early or self.rows == 0:
            return None
        reasons = "; ".join(f"{n} x {r}" for r, n in self.counts.skipped.most_common(TOP)) or "none listed"
        where = f"the skip manifest in {self.directory}/skipped lists every one"
        if self.counts.written + self.earlier_records == 0:
            return (f"the run wrote no attribution record: all {self.skipped} rows it had were skipped "
                    f"(top reasons: {reasons}); {where}")
        skipped, rows = self.skip_share()
        if skipped > max_skip_fraction * rows:
            return (f"the run skipped {skipped} of its {rows} rows ({100 * skipped / rows:.1f}%), more than "
                    f"data.init_args.max_skip_fraction = {max_skip_fraction:g} allows (top reasons: {reasons}); "
                    f"the {self.counts.written + self.earlier_records} records written are kept; {where}")
        return None

    def text(self) -> str:
        """The block printed at the end of the run (by the global rank 0)."""
        c = self.counts
        skipped, rows = self.skip_share()
        lines = [f"M2IB summary ({self.ranks} rank{'s' if self.ranks != 1 else ''}) of {self.directory}:",
                 f"  records written:   {c.written}"]
        finished = self.earlier_records + self.earlier_skips
        if finished:
            lines.append(f"  finished earlier:  {finished} passed over ({self.earlier_records} records, "
                         f"{self.earlier_skips} skipped)")
        share = f" ({100 * self.skipped / self.rows:.1f}%)" if self.rows else ""
        whole = f"; whole run: {skipped} of {rows} ({100 * skipped / rows:.1f}%)" if finished and rows else ""
        lines.append(f"  skipped:           {self.skipped} of {self.rows} rows{share}{whole}")
        lines += _breakdown(c.skipped)
        lines.append(f"  repaired:          {sum(c.repaired.values())}")
        lines += _breakdown(c.repaired)
        dropped = sum(c.duplicates.values())
        detail = ""
        if dropped or self.across_ranks:
            detail = (f" ({dropped} not written again; {self.across_ranks} written by two ranks, the reader "
                      "serves the first copy)")
        lines.append(f"  duplicate ids:     {dropped + self.across_ranks}{detail}")
        lines += _breakdown(c.duplicates)
        if self.stopped_early:
            lines.append("  stopped early (requeued): not judged; the job that finishes the data is")
        return "\n".join(lines)


def _breakdown(counter: Counter[str]) -> list[str]:
    top = counter.most_common(TOP)
    lines = [f"    {n:>7}  {reason}" for reason, n in top]
    rest = counter.most_common()[TOP:]
    if rest:
        lines.append(f"    {sum(n for _, n in rest):>7}  ({len(rest)} other reasons)")
    return lines
