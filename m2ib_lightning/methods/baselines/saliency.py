"""Vanilla gradients of the image-text similarity (Simonyan et al. 2014)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side
from m2ib_lightning.methods.baselines.base import Baseline, token_gradients
from m2ib_lightning.records import Explanation


class GradientSaliency(Baseline):
    """Vanilla gradients (Simonyan et al. 2014) of the image-text similarity.

    Image: ``max over channels |d s / d pixel|``. Text: the L2 norm of ``d s / d h`` for each token,
    with ``h`` the hidden states at the output of block ``text_layer``; the default ``-1`` is the
    token embeddings themselves (token ids are looked up, not differentiable, so the embeddings are
    the input that gradients reach).

    Args:
        text_layer: 0-based text block whose output tokens are differentiated (``-1``: the token
            embeddings, before block 0).
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, text_layer: int = -1, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if "text" in self.sides:
            backbone.check_layer("text", text_layer)
        self.text_layer = text_layer
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        out: dict[str, Tensor | None] = {"pixel_maps": None, "text_scores": None}
        with torch.enable_grad():
            if "vision" in self.sides:
                pixels = inputs["pixel_values"].detach().float().requires_grad_(True)
                emb = self.backbone.embed("vision", {**inputs, "pixel_values": pixels}).float()
                s = F.cosine_similarity(emb, clean["text"], dim=-1).sum()
                (grad,) = torch.autograd.grad(s, pixels)
                out["pixel_maps"] = grad.abs().amax(1)
            if "text" in self.sides:
                out["text_scores"] = token_gradients(self.backbone, "text", inputs, self.text_layer,
                                                     clean["vision"]).norm(dim=-1)
        return self.outputs(batch, clean["vision"], clean["text"], text_scores=out["text_scores"],
                            pixel_maps=out["pixel_maps"])

