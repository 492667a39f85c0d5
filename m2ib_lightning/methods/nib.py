"""The narrowing information bottleneck (NIB; Zhu et al., ICLR 2025): a deterministic IB attribution.

NIB replaces M2IB's noisy, optimised bottleneck by a deterministic one, ``Z = lambda R`` with one
``lambda`` for all of the layer's features, and follows the similarity as the bottleneck narrows
from ``lambda = 1`` (everything passes) to ``lambda = 0`` (nothing does). Each feature's share of the
change is the path integral of the similarity's gradient, i.e. integrated gradients at the
bottleneck layer with a zero baseline; no noise, no ``beta``, no optimiser, so no seed either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side, TowerState
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.records import Explanation

__all__ = ["NIBAttribution"]


class NIBAttribution(AttributionModule):
    """Narrowing information bottleneck attribution (Zhu et al., ICLR 2025), from its description.

    At the output ``R`` of block ``layer`` (``-1``: the token embeddings) the tower is run on
    ``Z_i = (i / n) R`` for ``i = 1 .. n`` (``n = steps``, the paper's ``num_steps``, default 10) and
    the attribution of feature ``(t, d)`` is

        ``A[t, d] = R[t, d] * (1 / n) * sum_i d s(Z_i) / d Z_i[t, d]``

    with ``s`` the cosine similarity of the tower's embedding to the other tower's clean embedding:
    the right Riemann sum of integrated gradients from ``Z = 0`` to ``Z = R``. A token's score is
    ``A`` summed over its channels (signed, NaN-safe), read out like M2IB's capacity (vision: the
    patch grid upsampled and min-max normalised; text: min-max over the caption's tokens). The
    integral would sum to ``s(R) - s(0)`` (completeness); ten points resolve it only coarsely, as
    the next block's layer norm changes fastest near ``Z = 0``, where no point falls.

    It is deterministic (the same map on every run, no seed) and costs ``n`` forward and backward
    passes through the blocks above the layer per sample and side, against M2IB's
    ``(steps - 1) x copies`` (90 by default).

    Args:
        backbone: the frozen dual encoder.
        vision_layer: the vision bottleneck's layer (0-based block output; ``-1``: patch embeddings).
        text_layer: the text bottleneck's layer (``-1``: the token embeddings, where each token holds
            its own word only; see ``M2IBAttribution``).
        steps: ``n``, points on the path (>= 1).
        chunk_size: most rows (samples x steps) per forward/backward pass (>= ``steps``); the maps do
            not depend on it.
        sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule` (the seed is unused).
    """

    def __init__(self, backbone: BackboneAdapter, vision_layer: int = 9, text_layer: int = 9, steps: int = 10,
                 chunk_size: int = 320, sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < steps:
            raise ConfigError(f"chunk_size must be an int >= steps ({steps}), got {chunk_size!r}")
        self.layers = {"vision": vision_layer, "text": text_layer}
        for side in self.sides:
            backbone.check_layer(side, self.layers[side])
        self.steps, self.chunk_size = steps, chunk_size
        self.save_hyperparameters(ignore=["backbone"])

    def token_attributions(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        """``A`` summed over channels, ``(B, L)``: one score per token of ``side``."""
        layer, n = self.layers[side], self.steps
        with torch.no_grad():
            state = self.backbone.lower(side, inputs, layer)
        hidden = state.hidden.detach().float()
        fractions = torch.arange(1, n + 1, device=hidden.device, dtype=torch.float32) / n
        per_chunk = max(1, self.chunk_size // n)
        scores = []
        for a in range(0, hidden.shape[0], per_chunk):
            b = min(a + per_chunk, hidden.shape[0])
            part = TowerState(hidden[a:b], state.valid[a:b], {k: v[a:b] for k, v in state.extras.items()})
            upper = self.backbone.prepare_upper(side, part.repeat(n, with_hidden=False), layer)
            z = (fractions.view(1, n, 1, 1) * hidden[a:b].unsqueeze(1)).flatten(0, 1).requires_grad_(True)
            with torch.enable_grad():
                emb = self.backbone.upper(side, z.to(state.hidden.dtype), upper, layer).float()
                s = F.cosine_similarity(emb.view(b - a, n, -1), target[a:b].unsqueeze(1), dim=-1, eps=1e-6)
                (grad,) = torch.autograd.grad(s.sum(), z)
            attribution = hidden[a:b] * grad.view(b - a, n, *hidden.shape[1:]).mean(1)
            scores.append(torch.nansum(attribution, dim=-1))
        return torch.cat(scores)

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        inputs = self.model_inputs(batch)
        with torch.no_grad():
            clean = {side: self.backbone.embed(side, inputs).float() for side in SIDES}
        scores = {side: None for side in SIDES}
        for side in self.sides:
            scores[side] = self.token_attributions(side, inputs, clean["text" if side == "vision" else "vision"])
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])
