"""The ONE owner of a run's output directory.

:class:`RunDirectory` is opened once per process, by the CLI and by :func:`m2ib_lightning.explain`
alike, before anything is computed. It

* refuses settings that differ from those of the maps already there (the reader could not tell two
  kinds of maps apart), and an evaluation protocol that differs from the stored values';
* knows which ids are finished (a record, or a skip a retry would not change) and their stored
  metric values, so that a resumed or requeued run passes over them and still reports on them;
* writes this rank's records and skip-manifest entries as shards, in a background thread, each file
  atomically, so a crash never leaves a partial file and never loses a finished shard; a shard is
  written when ``shard_size`` records wait and at least every ``flush_every_s`` seconds, so a crash
  loses at most a few minutes of work;
* never writes an id twice in one run: a row of an id finished earlier is passed over, a row of an
  id this rank already attributed in this run goes into the manifest as a ``duplicate id``, and at
  the end the global rank 0 finds ids that two ranks wrote (:meth:`RunDirectory.record_duplicates_across_ranks`);
* counts what it wrote (:class:`~m2ib_lightning.outputs.summary.RunCounts`, for the run's summary);
* writes the evaluation protocol and the results JSON.

Nothing else in the package writes into a run directory.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.files import atomic_write
from m2ib_lightning.methods.noise import LEGACY_NOISE
from m2ib_lightning.outputs.format import (
    DUPLICATE_ID,
    OVERLAYS,
    SHARDS,
    explanation_rows,
    is_duplicate,
    next_sequence,
    overlay_name,
    remove_stale_temporaries,
    shard_files,
    write_shard,
)
from m2ib_lightning.outputs.reader import Attributions
from m2ib_lightning.outputs.summary import RunCounts, reason_group
from m2ib_lightning.records import Explanation, Skip

__all__ = ["RunDirectory", "run_metadata"]

log = logging.getLogger(__name__)

#: settings that do not change the maps (or, for the backbone's name, are checked by its weights);
#: ``chunk``: RISE's masks per forward pass; ``text_bucket``: M2IB's caption padding (masked out)
SETTINGS_FREE_TO_CHANGE = frozenset({"format", "chunk_size", "chunk", "torch_compile", "backbone", "text_bucket"})
#: settings recorded since some version, with the value that outputs written before then had: stored
#: settings without the key compare as that value (M2IB's noise function; runs of before drew the noise
#: from a torch.Generator per sample, so their maps must not be mixed with today's)
IMPLIED_SETTINGS = {"noise": LEGACY_NOISE}
#: where classes named in stored settings live now (the package was reorganised into subpackages)
MOVED = {
    "m2ib_lightning.module.": "m2ib_lightning.methods.m2ib.",
    "m2ib_lightning.bottlenecks.": "m2ib_lightning.methods.bottlenecks.reference.",
    "m2ib_lightning.variants.PerTokenM2IB": "m2ib_lightning.methods.bottlenecks.per_token.PerTokenM2IB",
    "m2ib_lightning.variants.": "m2ib_lightning.methods.bottlenecks.iba.",
    "m2ib_lightning.baselines.RandomMap": "m2ib_lightning.methods.baselines.random.RandomMap",
    "m2ib_lightning.baselines.GradientSaliency": "m2ib_lightning.methods.baselines.saliency.GradientSaliency",
    "m2ib_lightning.baselines.GradCAM": "m2ib_lightning.methods.baselines.gradcam.GradCAM",
    "m2ib_lightning.baselines.AttentionRollout": "m2ib_lightning.methods.baselines.rollout.AttentionRollout",
    "m2ib_lightning.baselines.RISE": "m2ib_lightning.methods.baselines.rise.RISE",
}
EVALUATION_FILE, RESULTS_FILE = "evaluation.json", "results.json"


def _current_names(value: Any) -> Any:
    """``value`` with class paths of the package's old flat layout replaced by today's."""
    if isinstance(value, str):
        for old, new in MOVED.items():
            if value.startswith(old):
                return new + value[len(old):]
        return value
    if isinstance(value, dict):
        return {k: _current_names(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_current_names(v) for v in value]
    return value


def run_metadata(pl_module: Any, precision: str) -> dict[str, Any]:
    """What a run directory stores and compares for an attribution module (its ``settings()``) run at
    ``precision`` (``"32-true"``, ``"bf16-mixed"``, ...)."""
    settings = getattr(pl_module, "settings", None)
    return {
        "format": 1,
        "precision": str(precision),
        **(settings() if settings is not None else {
            "backbone": getattr(pl_module.backbone, "source", type(pl_module.backbone).__name__),
            **{k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}}),
    }


class RunDirectory:
    """A run's output directory, opened for this run's settings.

    Args:
        path: the directory (created if missing).
        metadata: this run's settings, JSON-ready (the method's :meth:`settings` plus the precision);
            stored in every shard's footer and compared with what the directory holds.
        resume: pass over the samples the directory already finished. False recomputes everything
            (new shards are appended; the reader serves the first copy of an id).
        shard_size: records buffered before a shard is written (and at :meth:`flush`).
        flush_every_s: also write what is buffered when this many seconds have passed since the last
            shard (checked as each batch is added); ``None``: by ``shard_size`` only.

    Attributes:
        finished: ids passed over (a record, or a skip a retry would not change), from earlier runs.
        earlier_records, earlier_skips: how many of ``finished`` are records and skips.
        counts: what this rank did in this run (records written, skips and repairs by reason,
            duplicates, rows of finished ids handed over again).

    Raises:
        ConfigError: the directory holds maps made with other settings.
    """

    def __init__(self, path: str | os.PathLike, metadata: Mapping[str, Any], *, resume: bool = True,
                 shard_size: int = 1024, flush_every_s: float | None = 300.0) -> None:
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if flush_every_s is not None and (not isinstance(flush_every_s, int | float) or not flush_every_s > 0):
            raise ConfigError(f"flush_every_s must be a number of seconds > 0 (or null), got {flush_every_s!r}")
        self.directory = Path(path).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.metadata = json.loads(json.dumps(dict(metadata), sort_keys=True, default=str))
        self.resume, self.shard_size, self.flush_every_s = resume, shard_size, flush_every_s
        self._existing = Attributions(self.directory)
        if len(self._existing):
            self._check_settings(self._existing.metadata)
        #: ids this run passes over: a record, or a skip that a retry would not change
        self.finished: frozenset[str] = frozenset(self._existing.completed()) if resume else frozenset()
        self.earlier_records = len(self._existing) if resume else 0
        self.earlier_skips = len(self.finished) - self.earlier_records
        self.rank: int | None = None
        self.counts = RunCounts()
        self._rows: list[dict[str, Any]] = []
        self._skips: list[dict[str, Any]] = []
        self._pending: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self._redone: set[str] = set()
        #: id -> sequence number of the shard its record went (or goes) to, for this run's records
        self._attributed: dict[str, int] = {}
        self._last_flush = time.monotonic()

    # ------------------------------------------------------------------------- what is there
    def _check_settings(self, stored: dict[str, Any]) -> None:
        ours = self.metadata
        stored = _current_names(stored)
        if "weights" not in stored or "weights" not in ours:  # outputs of an older version: names only
            ours = {k: v for k, v in ours.items() if k != "weights"}
            stored = {k: v for k, v in stored.items() if k != "weights"}
        # The backbone's name may change (a moved or re-downloaded checkpoint) when its weights'
        # fingerprint is there to compare; without one, the name is all there is.
        free = SETTINGS_FREE_TO_CHANGE if "weights" in ours else SETTINGS_FREE_TO_CHANGE - {"backbone"}
        stored = {**{k: v for k, v in IMPLIED_SETTINGS.items() if k in ours}, **stored}
        clash = {k: (stored[k], v) for k, v in ours.items() if k not in free and k in stored and stored[k] != v}
        if clash:
            detail = "; ".join(f"{k}: stored {a!r}, this run {b!r}" for k, (a, b) in sorted(clash.items()))
            raise ConfigError(
                f"writer.output_dir {self.directory} already holds maps made with other settings ({detail}). "
                "Adding to it would mix maps that load_attributions cannot tell apart: give this run another "
                "writer.output_dir (or trainer.default_root_dir)"
            )

    def stored_metrics(self) -> dict[str, dict[str, float]]:
        """``{id: {metric: value}}`` stored with the records this run passes over (``{}`` for a record
        evaluated with the evaluation off)."""
        column = self._existing.column("metrics")
        return {i: v for i, v in column.items() if i in self.finished}

    def check_evaluation(self, protocol: Mapping[str, Any], before: Mapping[str, Any] | None = None) -> None:
        """Refuse to add values measured another way to the ones stored with the records.

        ``before``: what a key meant in a stored protocol that lacks it (written before the key existed).
        """
        path = self.directory / EVALUATION_FILE
        if not path.is_file() or not any(self._existing.column("metrics").values()):
            return
        ours = json.loads(json.dumps(dict(protocol)))
        stored = {**json.loads(json.dumps(dict(before or {}))), **json.loads(path.read_text())}
        clash = {k: (stored.get(k), v) for k, v in ours.items() if stored.get(k) != v}
        if clash:
            detail = "; ".join(f"{k}: stored {a!r}, this run {b!r}" for k, (a, b) in sorted(clash.items()))
            raise ConfigError(f"the records in {self.directory} were evaluated with other settings ({detail}); "
                              "use the same evaluation settings, or another writer.output_dir")

    def record_evaluation(self, protocol: Mapping[str, Any]) -> None:
        """Keep this run's evaluation protocol beside the records (one process writes it)."""
        text = json.dumps(dict(protocol), indent=2, sort_keys=True) + "\n"
        atomic_write(self.directory / EVALUATION_FILE, lambda p: p.write_text(text))

    def write_results(self, results: Mapping[str, Any], path: str | os.PathLike | None = None) -> Path:
        """Write the results JSON (default ``results.json`` here); returns its path."""
        target = Path(path).expanduser() if path else self.directory / RESULTS_FILE
        target.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(dict(results), indent=2, sort_keys=True, default=str) + "\n"
        atomic_write(target, lambda p: p.write_text(text))
        return target

    def overlay_path(self, sample_id: str) -> Path:
        """Where the PNG overlay of ``sample_id`` goes (a file name safe on every file system)."""
        target = self.directory / OVERLAYS
        target.mkdir(exist_ok=True)
        return target / overlay_name(sample_id)

    # --------------------------------------------------------------------------- writing
    def start(self, rank: int = 0) -> None:
        """Begin writing as ``rank``: clear what a killed run of this rank left half-written, set aside
        its unreadable shards (their samples are not finished, so they are computed again)."""
        if self._pool is not None:
            return
        self.rank = rank
        if remove_stale_temporaries(self.directory, rank):
            log.warning("removed half-written shard(s) of rank %d left by an interrupted run", rank)
        for path in self._existing.unreadable:  # kept for inspection under another name
            if path.name.startswith(f"rank{rank:05d}-"):
                os.replace(path, path.with_name(f"unreadable-{path.name}"))
                log.warning("moved the unreadable shard %s aside (unreadable-%s); its samples are computed again",
                            path, path.name)
        self._seq = self.counts.first_sequence = next_sequence(self.directory, rank)
        self._last_flush = time.monotonic()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2ib-writer")

    def will_write(self, ids: list[str]) -> list[bool]:
        """For each id of a batch, whether :meth:`add` would write its record (not finished earlier, not
        attributed already in this run, not repeated earlier in the same batch)."""
        seen: set[str] = set()
        out = []
        for sample_id in ids:
            out.append(sample_id not in self.finished and sample_id not in self._attributed and sample_id not in seen)
            seen.add(sample_id)
        return out

    def add(self, explanation: Explanation) -> None:
        """Buffer a batch's records and manifest entries; write a shard when ``shard_size`` records wait
        or ``flush_every_s`` seconds have passed since the last one.

        A row of an id finished earlier is passed over (a caller that did not give its data the
        finished ids); a row of an id attributed already in this run is not written again but
        listed in the manifest as a ``duplicate id`` naming the shard of the kept record."""
        if self._pool is None:
            self.start(0)
        rows, dropped, redone = [], set(), 0
        for row in explanation_rows(explanation):
            sample_id = row["id"]
            if sample_id in self.finished:
                dropped.add(sample_id)
                if sample_id not in self._redone:
                    self._redone.add(sample_id)
                    redone += 1
            elif sample_id in self._attributed:
                dropped.add(sample_id)
                kept = f"{SHARDS}/rank{self.rank:05d}-{self._attributed[sample_id]:06d}.parquet"
                self._duplicate(sample_id, f"{DUPLICATE_ID}: attributed again in this run by rank {self.rank}; "
                                           f"the first record ({kept}) is kept")
            else:
                self._attributed[sample_id] = self._seq
                rows.append(row)
        if redone:  # a caller that did not pass `finished` to its data: never store an id twice
            self.counts.redone += redone
            log.warning("%d sample(s) already finished in %s were explained again and are not written twice "
                        "(give the data the run directory's finished ids, as the CLI does)", redone, self.directory)
        self._rows.extend(rows)
        self.counts.written += len(rows)
        for skip in explanation.skipped:
            if skip.kind == "repaired" and skip.id in dropped:
                continue  # the repair of a row that is not written
            if is_duplicate(skip):
                self.counts.duplicates[reason_group(skip.reason)] += 1
            elif skip.kind == "repaired":
                self.counts.repaired[reason_group(skip.reason)] += 1
            else:
                self.counts.skipped[reason_group(skip.reason)] += 1
                log.warning("skipped sample %s: %s", skip.id, skip.reason)
            self._skips.append(skip.to_json())
        if len(self._rows) >= self.shard_size or self._due():
            self.flush()

    def _due(self) -> bool:
        return (self.flush_every_s is not None and bool(self._rows or self._skips)
                and time.monotonic() - self._last_flush >= self.flush_every_s)

    def _duplicate(self, sample_id: str, reason: str) -> None:
        self._skips.append({"id": sample_id, "reason": reason, "duplicate": True})
        self.counts.duplicates[reason_group(reason)] += 1
        log.warning("%s: %s", sample_id, reason)

    def add_skips(self, skips: list[Skip]) -> None:
        """Manifest entries of rows that never reached a method."""
        self.add(Explanation.empty(skips))

    def flush(self, wait: bool = False) -> None:
        """Hand what is buffered to the writer thread; with ``wait``, until every shard is on disk.
        A failed write raises here: it must fail the run, not vanish."""
        if self._pool is None:
            return
        if self._rows or self._skips:
            rows, skips = self._rows, self._skips
            self._rows, self._skips = [], []
            seq, self._seq = self._seq, self._seq + 1
            self._pending.append(self._pool.submit(write_shard, self.directory, self.rank, seq, rows, skips,
                                                   self.metadata))
            self._last_flush = time.monotonic()
        still = []
        for job in self._pending:
            if wait or job.done():
                job.result()
            else:
                still.append(job)
        self._pending = still

    def record_duplicates_across_ranks(self, first_sequences: Mapping[int, int]) -> int:
        """Find ids that several ranks wrote in this run, list each extra copy in the manifest as a
        ``duplicate id``, and return how many there were.

        Called by one process (the global rank 0) after every rank has flushed; reads only the id
        columns of the shards this run wrote (``first_sequences``: each rank's first sequence number
        in this run). The copies stay on disk (nothing is rewritten); the reader serves the first.
        """
        where: dict[str, list[str]] = {}
        for path in shard_files(self.directory, SHARDS):
            rank, seq = int(path.name[4:9]), int(path.name[10:16])
            if rank in first_sequences and seq >= first_sequences[rank]:
                for sample_id in pq.read_table(path, columns=["id"]).column("id").to_pylist():
                    where.setdefault(sample_id, []).append(f"{SHARDS}/{path.name}")
        found = 0
        for sample_id, places in where.items():
            for extra in places[1:]:
                found += 1
                self._skips.append({"id": sample_id, "duplicate": True, "reason": (
                    f"{DUPLICATE_ID}: written by more than one rank in this run ({', '.join(places)}); "
                    f"the reader serves {places[0]}, {extra} is the extra copy")})
        if found:
            log.warning("%d id(s) were written by more than one rank (listed as duplicate ids in the manifest)",
                        found)
            self.flush(wait=True)
        return found

    def close(self) -> None:
        """Write everything buffered and stop the writer thread."""
        if self._pool is None:
            return
        try:
            self.flush(wait=True)
        finally:
            self._pool.shutdown(wait=True)
            self._pool = None

    def __repr__(self) -> str:
        return f"RunDirectory({str(self.directory)!r}: {len(self.finished)} finished, rank {self.rank})"
