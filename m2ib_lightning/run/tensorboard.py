"""TensorBoard logging of maps through Lightning's logger: the :class:`TensorBoardMaps` callback.

Add it with a TensorBoard logger (``pip install tensorboard``; the CLI's default is no logger)::

    trainer:
      logger:
        class_path: lightning.pytorch.loggers.TensorBoardLogger
        init_args: {save_dir: outputs/demo, name: tb}
      callbacks:
        - class_path: m2ib_lightning.TensorBoardMaps
          init_args: {n: 8}

then ``tensorboard --logdir outputs/demo/tb``: the IMAGES tab shows ``maps/<id>`` (the image map over
the image as the model saw it), the TEXT tab ``tokens/<id>`` (each token with its score).
"""

from __future__ import annotations

import html
from typing import Any

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.outputs.overlays import overlay, pixels_to_image

__all__ = ["TensorBoardMaps"]


class TensorBoardMaps(pl.Callback):
    """Log the first ``n`` image maps (as overlays) and token scores of every epoch to TensorBoard.

    Logs through ``trainer.loggers``' first ``TensorBoardLogger`` (global rank 0 only, as Lightning's
    logger does); without one it warns once and does nothing, so a config that keeps the callback
    but drops the logger still runs.

    Args:
        n: samples logged per epoch (the first ones of the epoch).
        strength: opacity of the map over the image, in [0, 1].
        tokens: also log the caption's tokens with their scores (TensorBoard's TEXT tab).
    """

    def __init__(self, n: int = 8, strength: float = 0.5, tokens: bool = True) -> None:
        super().__init__()
        if not isinstance(n, int) or n < 0:
            raise ConfigError(f"n must be an int >= 0, got {n!r}")
        if not 0 <= strength <= 1:
            raise ConfigError(f"strength must be in [0, 1], got {strength!r}")
        self.n, self.strength, self.tokens = n, float(strength), tokens
        self._logged = 0
        self._warned = False

    def _experiment(self, trainer: pl.Trainer) -> Any:
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        if not self._warned:
            names = [type(logger).__name__ for logger in trainer.loggers] or "none"
            rank_zero_warn(f"TensorBoardMaps: the trainer has no TensorBoardLogger (loggers: {names}); nothing is "
                           "logged. Set trainer.logger to lightning.pytorch.loggers.TensorBoardLogger.")
            self._warned = True
        return None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._logged = 0

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        explanation = (outputs or {}).get("explanation")
        if explanation is None or not len(explanation) or self._logged >= self.n or not trainer.is_global_zero:
            return
        experiment = self._experiment(trainer)
        if experiment is None:
            return
        step = trainer.current_epoch
        processor = pl_module.backbone.image_processor
        for i, sample_id in enumerate(explanation.ids[: self.n - self._logged]):
            if explanation.image_maps is not None:
                image = pixels_to_image(batch["pixel_values"][i], processor)
                blended = np.asarray(overlay(image, explanation.image_maps[i].numpy(), self.strength))
                experiment.add_image(f"maps/{sample_id}", blended, global_step=step, dataformats="HWC")
            if self.tokens and explanation.text_scores is not None:
                scores = explanation.text_scores[i].tolist()
                # A markdown table; tokens escaped, as "<|startoftext|>" would be read as an HTML tag.
                rows = "".join(f"| {html.escape(t).replace('|', '&#124;')} | {s:.3f} |\n"
                               for t, s in zip(explanation.tokens[i], scores))
                experiment.add_text(f"tokens/{sample_id}", "| token | score |\n|---|---|\n" + rows, global_step=step)
            self._logged += 1
