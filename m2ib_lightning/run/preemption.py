"""SLURM preemption handled at a batch boundary, the same one on every rank.

Lightning's own SLURM auto-requeue saves the HPC checkpoint from INSIDE the ``SIGUSR1`` handler.
Under DDP saving a checkpoint runs collectives (barriers), and the signal interrupts each rank
wherever it is, possibly inside another collective (the even-batches check, a synced metric): the
ranks then wait on mismatched collectives and the job hangs until its time limit, neither
checkpointed nor requeued. We saw exactly that in a loaded CI run of ``tests/test_slurm.py``.

:class:`SlurmRequeue` installs its own handler first (Lightning then leaves the signal alone), and
the handler only records that the signal came. At the end of every training batch the ranks agree,
with one small all-reduce, whether any of them received it; if so, all of them save the HPC
checkpoint together (the writer flushes its outputs on checkpoint save), the global rank 0 asks
SLURM to requeue the job, and training stops, on every rank, if SLURM accepted (otherwise the run
goes on, with an error logged: stopping would leave the job COMPLETED with part of its data done).
The requeued job resumes from that checkpoint, and the writer passes over the samples whose outputs
are complete.

The signal must come early enough for the running batch to finish and the checkpoint to be saved
before SLURM kills the job (``--signal=USR1@90`` in ``scripts/slurm/``: 90 s before the time
limit). SLURM does not tell the job how early its signal comes, so ``margin_s`` says it, and a run
whose batches take more than half of it is warned, with the settings to change, at its first such
batch.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment

from m2ib_lightning.errors import ConfigError

log = logging.getLogger(__name__)

__all__ = ["SlurmRequeue"]


class SlurmRequeue(pl.Callback):
    """Checkpoint and requeue a SLURM job on its requeue signal (``SIGUSR1``), at a batch boundary.

    Active only when the Trainer runs under SLURM with auto-requeue on (Lightning's
    ``SLURMEnvironment``, the default inside an ``sbatch`` job); elsewhere it does nothing.

    Args:
        margin_s: how many seconds before the time limit the signal comes (the ``@`` of the sbatch
            ``--signal=USR1@90``). A batch taking more than half of it is warned about once (by the
            global rank 0; the first batch, which pays the warm-up, is not counted): the batch under
            way when the signal comes must finish, and the checkpoint be saved, within it. ``None``:
            no check.
    """

    def __init__(self, margin_s: float | None = 90.0) -> None:
        if margin_s is not None and not margin_s > 0:
            raise ConfigError(f"preemption.margin_s must be > 0 seconds (or null), got {margin_s!r}")
        self.margin_s = margin_s
        self.requested = False
        self._signum: int | None = None
        self._previous: Any = None
        self._batch_started: float | None = None
        self._batches = 0
        self._warned = False

    @staticmethod
    def _environment(trainer: pl.Trainer) -> SLURMEnvironment | None:
        # A parallel strategy holds the cluster environment; a single-device run under SLURM gets
        # Lightning's default one (auto-requeue on SIGUSR1) when the job is a SLURM batch job.
        env = getattr(trainer.strategy, "cluster_environment", None)
        if env is None and SLURMEnvironment.detect():
            env = SLURMEnvironment()
        if isinstance(env, SLURMEnvironment) and env.auto_requeue and env.requeue_signal is not None:
            return env
        return None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        env = self._environment(trainer)
        if env is None or threading.current_thread() is not threading.main_thread():
            return
        self.requested, self._warned, self._batches = False, False, 0
        self._signum = int(env.requeue_signal)
        self._previous = signal.signal(self._signum, self._on_signal)
        log.info("SLURM requeue on signal %d: checkpoint and requeue at the next batch boundary", self._signum)

    def _on_signal(self, signum: int, frame: Any) -> None:
        self.requested = True  # nothing else here: the work happens at a batch boundary

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_started = time.monotonic()

    def _check_batch_time(self, trainer: pl.Trainer) -> None:
        self._batches += 1
        # The first batch of a run also pays warm-up (and torch.compile's compilation): not counted.
        if self.margin_s is None or self._warned or self._batch_started is None or self._batches < 2:
            return
        if not trainer.is_global_zero:  # the ranks run in step; one warning per job
            return
        took = time.monotonic() - self._batch_started
        if took > self.margin_s / 2:
            self._warned = True
            log.warning(
                "a batch took %.0f s, more than half of the %.0f s between the requeue signal and the time limit "
                "(preemption.margin_s): a signal during such a batch may leave no time to checkpoint and requeue "
                "before the job is killed at its limit (finished outputs are kept: submitting the command again "
                "continues). Lower data.init_args.batch_size, or signal earlier (sbatch "
                "--signal=USR1@<seconds>, and preemption.margin_s to match)",
                took, self.margin_s)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._signum is None:
            return
        self._check_batch_time(trainer)
        # Every rank reaches this point once per batch (they yield equal batch counts), so the
        # decision is one collective in step on all of them.
        if not trainer.strategy.reduce_boolean_decision(self.requested, all=False):
            return
        log.info("requeue signal received: saving the HPC checkpoint at batch %d", batch_idx)
        trainer.save_checkpoint(hpc_checkpoint_path(trainer.default_root_dir))
        for logger in trainer.loggers:  # flushed now: once SLURM accepts the requeue, the kill follows soon
            logger.save()
        requeued = trainer.strategy.broadcast(requeue_job() if trainer.is_global_zero else None, src=0)
        self.requested = False
        if requeued:
            for logger in trainer.loggers:
                logger.finalize("finished")
            trainer.should_stop = True
            return
        # Stopping now would end the job as COMPLETED with part of the data done and nothing
        # queued to finish it. Go on instead: the outputs so far are flushed and checkpointed, the
        # job works until SLURM stops it, and rerunning the command continues from there.
        log.error("SLURM did not requeue the job (see the warning above): going on with the run; if it is "
                  "stopped before the end, submit the same command again to continue")

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._signum is not None and threading.current_thread() is threading.main_thread():
            signal.signal(self._signum, self._previous if self._previous is not None else signal.SIG_DFL)
        self._signum = None


def hpc_checkpoint_path(folder: str | os.PathLike) -> str:
    """The next ``hpc_ckpt_<N>.ckpt`` in ``folder``: the name under which Lightning looks for the
    checkpoint to resume from when the requeued job starts (the highest ``N`` in ``default_root_dir``)."""
    numbers = [int(m.group(1)) for p in Path(folder).glob("hpc_ckpt_*.ckpt")
               if (m := re.fullmatch(r"hpc_ckpt_(\d+)\.ckpt", p.name))]
    return str(Path(folder) / f"hpc_ckpt_{max(numbers, default=0) + 1}.ckpt")


def requeue_job() -> bool:
    """``scontrol requeue`` this job (array tasks included); True when SLURM accepted it."""
    array_job = os.environ.get("SLURM_ARRAY_JOB_ID")
    job_id = f"{array_job}_{os.environ['SLURM_ARRAY_TASK_ID']}" if array_job else os.environ.get("SLURM_JOB_ID", "")
    if not re.fullmatch(r"[0-9_]+", job_id):
        log.warning("cannot requeue: no SLURM job id in the environment (got %r)", job_id)
        return False
    try:
        result = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        log.warning("requeuing SLURM job %s failed: %s", job_id, err)
        return False
    if result.returncode == 0:
        log.info("requeued SLURM job %s", job_id)
        return True
    log.warning("requeuing SLURM job %s failed (%d): %s", job_id, result.returncode, result.stderr.strip())
    return False
