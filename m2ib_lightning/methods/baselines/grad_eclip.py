"""Grad-ECLIP (Zhao et al., "Gradient-based Visual Explanation for Transformer-based CLIP", ICML 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.baselines.base import Baseline


class GradECLIP(Baseline):
    """Grad-ECLIP: the pooled token's last attention, read as a sum over tokens, weighted by channel and token.

    The attention that forms the pooled token (the last block's, at the CLS / EOS / last position; for
    SigLIP's image tower, its attention-pooling head, whose query is the learned probe) computes, per
    head ``h`` and channel ``c`` of that head, ``o_c = sum_i A_h[i] v_ic`` over the tokens ``i`` it
    attends. Linearising the similarity ``s = cos(f, t)`` in ``o`` and loosening the attention::

        w_c        = d s / d o_c                        # channel weights, at the pooled query's row
        lambda_h,i = minmax_i cos(q_h, k_h,i)           # spatial weights, per head, over the keys
        H_i        = relu( sum_h lambda_h,i * sum_{c in h} w_c v_ic )

    with ``q_h`` the pooled query and ``k_h,i``, ``v_ic`` the keys and values of head ``h``
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.pooled_attention`), ``o`` the attention output
    before its output projection, ``t`` the other side's clean embedding, and ``minmax_i`` the min-max
    normalisation over the keys the pooled query attends (for an image, without the prefix tokens,
    whose scores are not reported). The vision map is ``H`` over the patches, the text scores ``H`` over
    the caption's tokens, each read out (upsampled, min-max normalised) like every method's.

    Deviations from the paper and the authors' code:

    * The model's own heads: the authors' code recomputes the explained block's attention with ONE
      head over the full width (query-key products scaled by ``1 / sqrt(D)``), which changes the
      model's embedding. Here the attention runs as the model runs it; each head's channels are
      weighted by that head's loosened attention, which is what the paper's single-head derivation
      gives per head.
    * Loosened attention: the cosine similarity of query and key, min-max normalised over the keys
      (the authors' code); the paper motivates it as a softer, non-negative stand-in for the softmax.
    * The last attention only (the authors' code can add the maps of the last few blocks); for
      SigLIP's image tower that is the pooling head, which the paper does not treat.
    * Text: the caption's every valid token is scored, start and end tokens included, and min-max
      normalised; the authors' text code keeps the words between them and normalises to sum 1.

    Args:
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for side in self.sides:
            reason = backbone.pooled_attention_unavailable(side)
            if reason is not None:
                raise ConfigError(f"GradECLIP needs the attention that forms the pooled token of the {side} "
                                  f"tower: {reason}")
        self.save_hyperparameters(ignore=["backbone"])

    def _grad_eclip(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        att = self.backbone.pooled_attention(side, inputs)
        with torch.enable_grad():
            s = F.cosine_similarity(att.embedding.float(), target, dim=-1).sum()
            (grad,) = torch.autograd.grad(s, att.output)
        b, length, width = att.keys.shape
        batch = torch.arange(b, device=grad.device)

        def heads(t: Tensor) -> Tensor:  # (B, n, H * d) -> (B, H, n, d)
            return t.float().view(b, t.shape[1], att.heads, width // att.heads).transpose(1, 2)

        weights = heads(grad[batch, att.row].unsqueeze(1))  # (B, H, 1, d)
        query = heads(att.queries[batch, att.row].unsqueeze(1))
        keys, values = heads(att.keys), heads(att.values)
        attended = att.probabilities[batch, :, att.row] > 0  # (B, H, L)
        if side == "vision":
            attended[..., : self.backbone.vision_prefix_tokens] = False
        cosine = F.cosine_similarity(query, keys, dim=-1)  # (B, H, L)
        low = cosine.masked_fill(~attended, float("inf")).amin(-1, keepdim=True)
        high = cosine.masked_fill(~attended, float("-inf")).amax(-1, keepdim=True)
        loose = torch.where(high > low, (cosine - low) / (high - low), torch.ones_like(cosine)) * attended
        return F.relu((loose * (weights * values).sum(-1)).sum(1))

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores = {side: self._grad_eclip(side, inputs, clean[self.other(side)]) if side in self.sides else None
                  for side in SIDES}
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])
