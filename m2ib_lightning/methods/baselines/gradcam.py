"""Grad-CAM on transformer tokens (Selvaraju et al. 2017)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side
from m2ib_lightning.methods.baselines.base import Baseline, token_gradients
from m2ib_lightning.records import Explanation


class GradCAM(Baseline):
    """Grad-CAM (Selvaraju et al. 2017) on transformer tokens: ``ReLU(sum_c w_c h_c)`` per token,
    with ``w_c`` the mean over the sample's tokens of ``d s / d h_c`` at the output of a block
    (its patch tokens for an image: the CLS token is left out of the weights, as in ViT Grad-CAM).

    Use a block below the last one: CLIP pools the CLS (vision) or EOS (text) token, so the other
    tokens of the last block get no gradient at all.

    Args:
        vision_layer: 0-based vision block whose output tokens are weighted (default 9 of 12,
            the M2IB paper's layer; ``-1``: the patch embeddings, before block 0).
        text_layer: same for the text tower (``-1``: the token embeddings).
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, vision_layer: int = 9, text_layer: int = 9,
                 sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        self.layers = {"vision": vision_layer, "text": text_layer}
        for side in self.sides:
            backbone.check_layer(side, self.layers[side])
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores: dict[str, Tensor | None] = {"vision": None, "text": None}
        for side in self.sides:
            grad, hidden = token_gradients(self.backbone, side, inputs, self.layers[side], clean[self.other(side)],
                                           return_hidden=True)
            if side == "text":
                valid = batch["attention_mask"].bool()
            else:
                valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                valid[:, : self.backbone.vision_prefix_tokens] = False
            valid = valid.unsqueeze(-1)
            weights = (grad * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
            scores[side] = F.relu((weights * hidden).sum(-1))
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])

