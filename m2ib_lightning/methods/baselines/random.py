"""Uniform random scores: the chance level of every metric."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side
from m2ib_lightning.methods.baselines.base import Baseline
from m2ib_lightning.methods.noise import noise_generator
from m2ib_lightning.records import Explanation


class RandomMap(Baseline):
    """Uniform random scores per vision token and per text token: the chance level of every metric.

    The image map is read out like M2IB's (patch grid, bilinear upsampling), so it is a fair chance
    baseline at the same resolution. Noise comes from the (seed, side, sample id) stream.

    Args:
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        clean = self.clean(batch)
        scores: dict[str, Tensor | None] = {"vision": None, "text": None}
        if "vision" in self.sides:
            pixels = batch["pixel_values"]
            h, w = self.backbone.vision_grid(pixels)
            n = self.backbone.vision_prefix_tokens + h * w
            scores["vision"] = torch.stack([torch.rand(n, generator=noise_generator(self.seed, "vision", i))
                                            for i in batch["ids"]])
        if "text" in self.sides:
            length = batch["input_ids"].shape[1]
            scores["text"] = torch.stack([torch.rand(length, generator=noise_generator(self.seed, "text", i))
                                          for i in batch["ids"]])
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])

