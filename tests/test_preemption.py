"""The requeue signal is handled at a batch boundary: checkpoint saved, outputs flushed, training stopped.

Runs in-process under a SLURM-like environment (Lightning's ``SLURMEnvironment`` detects it from the
variables) and sends itself a real ``SIGUSR1``. ``tests/test_slurm.py`` does the same on a real
cluster with two ranks and a real requeue.
"""

from __future__ import annotations

import os
import signal

import lightning.pytorch as pl
import pytest

from m2ib_lightning import AttributionWriter, ImageTextDataModule, M2IBAttribution, load_attributions
from m2ib_lightning.run import preemption
from m2ib_lightning.run.preemption import SlurmRequeue


class SignalAt(pl.Callback):
    """Sends this process SIGUSR1 while batch ``at`` runs (as SLURM would, at any moment)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.at:
            os.kill(os.getpid(), signal.SIGUSR1)


def slurm_like(monkeypatch) -> None:
    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "m2ib-test", "SLURM_JOB_ID": "4242424",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)


@pytest.mark.parametrize("accepted", [True, False], ids=["requeued", "requeue-refused"])
def test_requeue_signal_checkpoints_and_stops_at_the_batch_boundary(tmp_path, backbone, pairs_dir, monkeypatch,
                                                                    caplog, accepted):
    # What `scontrol requeue` answers (tests/test_slurm.py has a real one).
    monkeypatch.setattr(preemption, "requeue_job", lambda: accepted)
    slurm_like(monkeypatch)
    requeue = SlurmRequeue()
    module = M2IBAttribution(backbone, vision_layer=1, text_layer=1, steps=2, copies=2)
    data = ImageTextDataModule(path="json", data_files=str(pairs_dir / "pairs.jsonl"), batch_size=1)
    out = tmp_path / "attributions"
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[AttributionWriter(output_dir=str(out), overlays=0), requeue, SignalAt(1)])
    assert type(trainer._accelerator_connector.cluster_environment).__name__ == "SLURMEnvironment"
    trainer.fit(module, datamodule=data)

    assert list(tmp_path.glob("hpc_ckpt_*.ckpt"))
    assert requeue._signum is None  # the handler was handed back at teardown
    records = load_attributions(out)
    if accepted:
        # Batch 1 finished (the signal only set a flag), then the checkpoint was saved and training stopped.
        assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 2  # of 6 batches
        assert len(records) == 2  # both finished batches were flushed with the checkpoint
    else:
        # Stopping would end the job COMPLETED with 2 of 6 samples done and nothing queued: go on.
        assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6
        assert len(records) == 6 and "did not requeue the job" in caplog.text


@pytest.mark.parametrize("margin_s, batch_size, warned",
                         [(1e-3, 2, True), (1e6, 2, False), (None, 2, False),
                          (1e-3, 6, False)])  # one batch only: the first batch (warm-up) is not counted
def test_batches_too_long_for_the_signal_margin_are_warned_once(tmp_path, backbone, pairs_dir, monkeypatch, caplog,
                                                                margin_s, batch_size, warned):
    slurm_like(monkeypatch)
    module = M2IBAttribution(backbone, vision_layer=1, text_layer=1, steps=2, copies=2)
    data = ImageTextDataModule(path="json", data_files=str(pairs_dir / "pairs.jsonl"), batch_size=batch_size)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                         callbacks=[SlurmRequeue(margin_s=margin_s)])
    with caplog.at_level("WARNING", logger="m2ib_lightning.run.preemption"):
        trainer.fit(module, datamodule=data)
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 6 // batch_size  # all ran, whatever the margin
    messages = [r.getMessage() for r in caplog.records if "preemption.margin_s" in r.getMessage()]
    assert len(messages) == (1 if warned else 0)  # once per run, not once per batch
    if warned:
        assert "data.init_args.batch_size" in messages[0] and "--signal=USR1@" in messages[0]


def test_margin_must_be_positive():
    with pytest.raises(ValueError, match=r"preemption.margin_s must be > 0 seconds \(or null\), got 0"):
        SlurmRequeue(margin_s=0)
