"""The one sink callback: evaluate each batch's explanation (if enabled), then write it.

:class:`AttributionWriter` receives every batch's :class:`~m2ib_lightning.records.Explanation` from
``training_step``, scores it with :meth:`AttributionEvaluator.evaluate`
(:mod:`m2ib_lightning.evaluation.evaluator`, a pure function), adds the per-sample values to the
explanation and to the run's totals, and hands the explanation to the
:class:`~m2ib_lightning.outputs.rundir.RunDirectory`, which writes records and manifest entries. At
the end of the epoch it writes ``results.json`` (all ranks' totals plus the values stored with the
records of earlier attempts). At the end of the run it gathers every rank's counts (one collective),
has the global rank 0 look for ids that two ranks wrote, and prints ONE summary for the whole run
(:class:`~m2ib_lightning.outputs.summary.RunSummary`, kept as :attr:`AttributionWriter.summary` for
the CLI to judge). It reads no other callback and sets no other component's attributes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_info

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.evaluation import AttributionEvaluator
from m2ib_lightning.evaluation.evaluator import MetricTotals
from m2ib_lightning.outputs.overlays import overlay, pixels_to_image
from m2ib_lightning.outputs.rundir import RunDirectory, run_metadata
from m2ib_lightning.outputs.summary import RunCounts, RunSummary
from m2ib_lightning.records import Explanation

__all__ = ["AttributionWriter"]

log = logging.getLogger(__name__)


class AttributionWriter(pl.Callback):
    """Evaluates (optionally) and writes each rank's results through the run directory.

    Args:
        output_dir: where outputs go; ``None`` means ``<trainer.default_root_dir>/attributions``.
        shard_size: records per shard (a shard is written when this many are buffered, and at the end).
        flush_every_s: also write what is buffered once this many seconds have passed since the last
            shard (checked at each batch's end), so a crash loses at most about this much work;
            ``None``: by ``shard_size`` only.
        overlays: write PNG overlays of the image map for the first this-many samples of each rank.
        resume: pass over samples that ``output_dir`` already holds (as records or in the skip
            manifest), so rerunning a killed or preempted job continues where it stopped. Set False
            to recompute everything (new shards are appended; the reader serves the first copy).
        evaluation: the evaluation settings (the CLI's ``evaluation:`` group); ``None``: none.

    Everything buffered is flushed whenever a checkpoint is saved (including the SLURM checkpoint
    before a requeue) and when a run ends or fails. The run directory comes from :meth:`use` (the
    CLI opens it before the data is read, and gives the data its finished ids); a writer used
    without one opens its own in ``setup``.
    """

    def __init__(self, output_dir: str | None = None, shard_size: int = 1024, overlays: int = 0,
                 resume: bool = True, evaluation: AttributionEvaluator | None = None,
                 flush_every_s: float | None = 300.0) -> None:
        super().__init__()
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if flush_every_s is not None and (not isinstance(flush_every_s, int | float) or not flush_every_s > 0):
            raise ConfigError(f"flush_every_s must be a number of seconds > 0 (or null), got {flush_every_s!r}")
        if not isinstance(overlays, int) or overlays < 0:
            raise ConfigError(f"overlays must be an int >= 0, got {overlays!r}")
        self.output_dir = output_dir
        self.shard_size, self.overlays, self.resume, self.flush_every_s = shard_size, overlays, resume, flush_every_s
        self.evaluation = evaluation if evaluation is not None and evaluation.enabled else None
        self.run_directory: RunDirectory | None = None
        self.totals: MetricTotals | None = None
        self.results: dict[str, Any] = {}
        #: the whole run's summary (every rank's counts), set at the end of a run that trained
        self.summary: RunSummary | None = None
        self._overlaid = 0
        self._explain_s = self._eval_s = 0.0
        self._batch_start: float | None = None
        self._train_start: float | None = None
        self._epoch_start = self._start_s = 0.0

    def directory_for(self, default_root_dir: str | Path) -> Path:
        """The output directory this writer uses under a trainer's ``default_root_dir``."""
        return Path(self.output_dir or Path(default_root_dir) / "attributions").expanduser()

    def open(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> RunDirectory:
        """Open the run directory for this trainer and module (settings and evaluation checked)."""
        run = RunDirectory(self.directory_for(trainer.default_root_dir), run_metadata(pl_module, trainer.precision),
                           resume=self.resume, shard_size=self.shard_size, flush_every_s=self.flush_every_s)
        if self.evaluation is not None:
            run.check_evaluation(self.evaluation.protocol(), self.evaluation.PROTOCOL_BEFORE)
        return run

    def use(self, run_directory: RunDirectory) -> None:
        """Write through ``run_directory`` (opened by the caller, who gave the data its finished ids)."""
        self.run_directory = run_directory

    @property
    def directory(self) -> Path | None:
        return None if self.run_directory is None else self.run_directory.directory

    # ---------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.run_directory is None:
            self.run_directory = self.open(trainer, pl_module)
        run = self.run_directory
        run.start(trainer.global_rank)
        if run.finished:
            rank_zero_info(f"M2IB: resuming in {run.directory}: {len(run.finished)} samples already done are "
                           "passed over")
        if self.evaluation is not None:
            self.totals = self.evaluation.totals().to(pl_module.device)
            missing = self.totals.add_earlier(run.stored_metrics())
            if missing:
                log.warning("evaluation: %d of the %d records already in %s have no metrics (evaluated with "
                            "evaluation off?); results.json covers the others", missing,
                            self.totals.earlier_records, run.directory)
            if trainer.is_global_zero:
                run.record_evaluation(self.evaluation.protocol())

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.totals is not None:
            self.totals.reset()
        self._explain_s = self._eval_s = 0.0
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        if self._train_start is not None:  # the first batch: what came before it (e.g. a statistics pre-pass)
            self._start_s, self._train_start = self._batch_start - self._train_start, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        start = time.perf_counter()
        if self._batch_start is not None:
            self._explain_s += start - self._batch_start
        explanation: Explanation | None = (outputs or {}).get("explanation")
        if explanation is None:
            return
        if self.evaluation is not None and len(explanation):
            context = (trainer.precision_plugin.forward_context() if self.evaluation.autocast
                       else torch.autocast(device_type=pl_module.device.type, enabled=False))
            with context:
                values = self.evaluation.evaluate(pl_module.backbone, explanation, batch)
            # Only rows the run directory will write count: a copy it drops (an id finished earlier,
            # or attributed twice) must not weigh twice in results.json.
            kept = torch.tensor(self.run_directory.will_write(explanation.ids), dtype=torch.bool)
            self.totals.add({name: v[kept] for name, v in values.items()})
            explanation = explanation.replace(metrics=values)
            self._eval_s += time.perf_counter() - start
        self.run_directory.add(explanation)
        self._overlay(pl_module, explanation, batch)

    def _overlay(self, pl_module: pl.LightningModule, explanation: Explanation, batch: Any) -> None:
        if self._overlaid >= self.overlays or explanation.image_maps is None:
            return
        processor = pl_module.backbone.image_processor
        for i, sample_id in enumerate(explanation.ids):
            if self._overlaid >= self.overlays:
                break
            image = pixels_to_image(batch["pixel_values"][i].detach().float().cpu(), processor)
            overlay(image, explanation.image_maps[i].numpy()).save(self.run_directory.overlay_path(sample_id))
            self._overlaid += 1

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.totals is None:
            return
        means, counts = self.totals.summary()  # every rank joins, also one without samples
        for name, value in means.items():
            if value is not None:
                pl_module.log(f"eval/{name}", value, batch_size=max(1, counts[name]))
        ev = self.evaluation
        self.results = {
            "metrics": means,
            "samples": counts,
            "higher_is_better": self.totals.higher_is_better(),
            "method": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "hparams": {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")},
            "backbone": getattr(pl_module.backbone, "source", type(pl_module.backbone).__name__),
            "evaluation": {"tolerance": ev.tolerance, "tolerance_units": ev.tolerance_units, "steps": ev.steps,
                           "deletion_baseline": ev.deletion_baseline,
                           "insertion_baseline": ev.insertion_baseline, "ground_truth": ev.gt_column},
            "world_size": trainer.world_size,
            # records of earlier attempts (a resumed run) whose stored values are included
            "earlier_records": self.totals.earlier_records,
            # rank 0's clocks for this attempt: before the first batch (e.g. a statistics pre-pass),
            # the method's own time (per batch, data loading excluded) and the metrics'
            "start_s": round(self._start_s, 3),
            "explain_s": round(self._explain_s, 3),
            "evaluate_s": round(self._eval_s, 3),
            "epoch_s": round(time.perf_counter() - self._epoch_start, 3),
        }
        if trainer.is_global_zero:
            path = self.run_directory.write_results(self.results, ev.results_file)
            shown = ", ".join(f"{k} {v:.4g}" for k, v in means.items() if v is not None)
            rank_zero_info(f"evaluation ({max(counts.values(), default=0)} samples): {shown}; written to {path}")

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A checkpoint marks progress (and on SLURM precedes a requeue): make the outputs match it.
        if self.run_directory is not None:
            self.run_directory.flush(wait=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        run = self.run_directory
        try:
            run.flush(wait=True)  # every rank's shards on disk before rank 0 reads their ids
            failure = None
        except Exception as err:  # raised after the collective, so the other ranks do not wait for this one
            failure = err
        # Every rank joins (they all reach the end of training); a rank that could not write sends None.
        counts = _gather(trainer, None if failure is not None else run.counts)
        if failure is not None:
            raise failure
        failed = [rank for rank, c in enumerate(counts) if c is None]
        if failed:
            raise RuntimeError(f"rank(s) {failed} could not write their attribution outputs (see their error)")
        across = 0
        if trainer.is_global_zero and len(counts) > 1:
            across = run.record_duplicates_across_ranks({rank: c.first_sequence for rank, c in enumerate(counts)})
        run.close()
        self.summary = RunSummary(str(run.directory), len(counts), RunCounts.total(counts), run.earlier_records,
                                  run.earlier_skips, across, stopped_early=bool(trainer.should_stop))
        if trainer.is_global_zero:
            print(self.summary.text(), flush=True)
        rank_zero_info(f"Load them with: m2ib_lightning.load_attributions({str(run.directory)!r})")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Completed samples are kept even when the run dies.
        try:
            if self.run_directory is not None:
                self.run_directory.close()
        except Exception:  # noqa: BLE001 - never mask the original exception
            log.exception("could not flush attribution outputs after an exception")


def _gather(trainer: pl.Trainer, counts: RunCounts | None) -> list[RunCounts | None]:
    """Every rank's counts, in rank order, on every rank (one collective; none under one process)."""
    if trainer.world_size > 1 and dist.is_available() and dist.is_initialized():
        gathered: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, counts)
        return gathered
    return [counts]
