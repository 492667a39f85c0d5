"""Run one attribution job with a plain Trainer; launched as a script by the multi-process tests.

Usage: python tests/ddp_driver.py MODEL_DIR DATA_FILE OUT_DIR DEVICES STRATEGY [SIDES [BATCH_SIZE]]

STRATEGY is ``single``, ``independent`` (m2ib_ddp) or ``leaky`` (the same strategy with mask
gradients averaged across ranks after every backward, i.e. what plain DDP would do): the tests use
``leaky`` to prove that the exact comparison would catch such a leak. A strategy sees gradients only
on the optimiser path (the default Adam runs as a functional step whose gradients never pass through
the strategy), so ``leaky`` and ``single-eager`` (its one-process comparison) run Adam through that
path: ``EagerAdam``, a subclass, which the module does not turn into a functional update.
"""

from __future__ import annotations

import os
import sys

import lightning.pytorch as pl
import torch
import torch.distributed as dist

from m2ib_lightning import AttributionWriter, CLIPBackbone, ImageTextDataModule, IndependentDDPStrategy, M2IBAttribution


class EagerAdam(torch.optim.Adam):
    """torch.optim.Adam, stepped as an optimiser object (the module's generic path)."""


class LeakyStrategy(IndependentDDPStrategy):
    """Averages mask gradients across ranks after each backward, as DistributedDataParallel would."""

    def post_backward(self, closure_loss: torch.Tensor) -> None:
        for p in self.lightning_module.parameters():
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= self.world_size


def main() -> None:
    model_dir, data_file, out_dir, devices, strategy = sys.argv[1:6]
    sides = sys.argv[6].split(",") if len(sys.argv) > 6 else ["vision", "text"]
    batch_size = int(sys.argv[7]) if len(sys.argv) > 7 else 1
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    strategies = {
        "single": "auto",
        "single-eager": "auto",
        "independent": IndependentDDPStrategy(process_group_backend="gloo"),
        "leaky": LeakyStrategy(process_group_backend="gloo"),
    }
    eager = {"optimizer": lambda params: EagerAdam(params, lr=1.0)} if strategy in ("leaky", "single-eager") else {}
    module = M2IBAttribution(CLIPBackbone(model_dir), vision_layer=1, text_layer=1, steps=4, copies=3, sides=sides,
                             **eager)
    data = ImageTextDataModule(path="json", data_files=data_file, batch_size=batch_size)
    trainer = pl.Trainer(
        accelerator="cpu", devices=int(devices), strategy=strategies[strategy], max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[AttributionWriter(output_dir=out_dir)],
    )
    trainer.fit(module, datamodule=data)


if __name__ == "__main__":
    main()
