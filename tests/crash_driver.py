"""``python train.py fit ...`` with a checkpoint every 2 batches and, optionally, a SIGKILL at a chosen point.

Usage: M2IB_TEST_KILL=<kind>:<n> python tests/crash_driver.py fit -c ... (the CLI's arguments)

Kinds (the process kills itself, so the point is exact whatever the machine's load):

* ``batch``: inside the n-th relevance pass of the optimisation loop (``side_loss``: one per step,
  chunk and side, on the functional and the optimiser path alike), i.e. in the middle of a batch's
  optimisation;
* ``shard``: inside the n-th file write of the outputs (shard or manifest), after half of the file
  reached its temporary name and before the rename;
* ``checkpoint``: inside the n-th checkpoint save, after the writer flushed for it and half of the
  checkpoint file is written.

Without ``M2IB_TEST_KILL`` the run goes to its end (with the same checkpoints). Used by tests/test_crash.py.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

import m2ib_lightning.outputs.format as output_format
from m2ib_lightning.methods import M2IBAttribution
from m2ib_lightning.run import cli


def die() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


class Count:
    def __init__(self, at: int | None) -> None:
        self.n, self.at = 0, at

    def hit(self) -> bool:
        self.n += 1
        return self.n == self.at


class CheckpointEvery(pl.Callback):
    """Saves a checkpoint every ``every`` batches (the writer flushes its outputs on each)."""

    def __init__(self, folder: str, every: int) -> None:
        self.folder, self.every = folder, every

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if (batch_idx + 1) % self.every == 0:
            trainer.save_checkpoint(str(Path(self.folder) / "crash-test.ckpt"))


def half_then_die(path: Path, write) -> None:
    write(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    die()


def main() -> None:
    kind, _, n = os.environ.get("M2IB_TEST_KILL", "").partition(":")
    at = int(n) if n else None
    if kind not in ("", "batch", "shard", "checkpoint"):
        raise SystemExit(f"unknown kill point {kind!r}")
    counts = {k: Count(at if kind == k else None) for k in ("batch", "shard", "checkpoint")}

    atomic_write = output_format.atomic_write

    def killing_atomic_write(path: Path, write) -> None:
        if counts["shard"].hit():  # the temporary name atomic_write would use, half written
            half_then_die(path.with_name(f".tmp-{os.getpid()}-{path.name}"), write)
        atomic_write(path, write)

    output_format.atomic_write = killing_atomic_write

    side_loss = M2IBAttribution.side_loss

    def killing_side_loss(self, *args, **kwargs):
        if counts["batch"].hit():
            die()
        return side_loss(self, *args, **kwargs)

    M2IBAttribution.side_loss = killing_side_loss

    save_checkpoint = TorchCheckpointIO.save_checkpoint

    def killing_save(self, checkpoint, path, storage_options=None) -> None:
        if counts["checkpoint"].hit():
            half_then_die(Path(path), lambda p: save_checkpoint(self, checkpoint, p, storage_options))
        save_checkpoint(self, checkpoint, path, storage_options)

    TorchCheckpointIO.save_checkpoint = killing_save

    root = sys.argv[sys.argv.index("--trainer.default_root_dir") + 1]
    cli.TRAINER_DEFAULTS = {**cli.TRAINER_DEFAULTS, "callbacks": [CheckpointEvery(root, 2)]}
    cli.main(sys.argv[1:])


if __name__ == "__main__":
    main()
