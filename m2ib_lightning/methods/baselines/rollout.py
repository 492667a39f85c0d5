"""Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.baselines.base import Baseline
from m2ib_lightning.records import Explanation


class AttentionRollout(Baseline):
    """Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021).

    With ``A_b`` a block's attention probabilities ``(heads, L, L)``,
    ``Abar_b = mean_heads(relu(dA_b * A_b))`` where ``dA_b = d s / d A_b``, and from ``R = I``
    each block from ``start_layer`` up applies ``R <- R + Abar_b R``. The relevance of the embedding
    is the row of ``R`` of the token the tower pools, or the mix of rows its read-out weighs
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.readout_weights`, e.g. SigLIP's attention-pooling
    head): the vision map is that row (CLIP: the CLS row, one score per token); the text scores are
    that row minus the identity, so that the pooled (EOS) token's own residual path does not dominate.

    Needs an adapter with attention probabilities
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.trace_attention`: CLIP, SigLIP, open_clip).

    Args:
        start_layer: first block included in the rollout (0: all blocks).
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, start_layer: int = 0, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for side in self.sides:
            reason = backbone.attention_unavailable(side)
            if reason is not None:
                raise ConfigError(f"AttentionRollout needs an adapter with attention probabilities for the {side} "
                                  f"tower: {reason}")
            backbone.check_layer(side, start_layer, allow_embeddings=False)
        self.start_layer = start_layer
        self.save_hyperparameters(ignore=["backbone"])

    def _rollout(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        trace = self.backbone.trace_attention(side, inputs, self.start_layer)
        probs = trace.probabilities
        with torch.enable_grad():
            s = F.cosine_similarity(trace.embedding.float(), target, dim=-1).sum()
            grads = torch.autograd.grad(s, probs)
        b, _, n, _ = probs[0].shape
        rel = torch.eye(n, device=target.device).expand(b, n, n).clone()
        for a, g in zip(probs, grads):
            cam = (g * a).clamp_min(0).mean(1).float()
            rel = rel + cam @ rel
        readout = trace.readout.to(rel.device, rel.dtype).unsqueeze(1)  # (B, 1, L), rows summing to 1
        row = torch.bmm(readout, rel).squeeze(1)
        return row if side == "vision" else row - readout.squeeze(1)

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores = {side: self._rollout(side, inputs, clean[self.other(side)]) if side in self.sides else None
                  for side in SIDES}
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])
