"""LeGrad (Bousselham et al., "LeGrad: An Explainability Method for Vision Transformers via Feature
Formation Sensitivity", 2024)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.baselines.base import Baseline


class LeGrad(Baseline):
    """LeGrad: how sensitive each layer's read-out is to that layer's attention map.

    For each block ``l`` from ``start_layer`` to the last, with ``Z_l`` its output tokens and ``A_l`` its
    attention probabilities ``(H, L, L)`` (query rows, key columns)::

        s_l = cos(R(Z_l), t)
        E_l = 1 / (H |Q|) * sum_h sum_{i in Q} relu(d s_l / d A_l[h, i, :]) * [A_l[h, i, :] > 0]
        E   = 1 / n_layers * sum_l E_l                 # one score per token (key column)

    ``t`` is the other side's clean embedding and ``Q`` the sample's query rows (every token of an image,
    a caption's valid tokens: :attr:`~m2ib_lightning.backbones.TowerState.valid`). As in the paper the
    gradient itself is the signal, not multiplied by ``A_l`` (unlike gradient-weighted rollout), averaged
    over heads and query rows. ``[A > 0]`` drops the entries an attention mask removes (a causal tower's
    later tokens, masked padding), whose gradient describes attention the model cannot pay; an image
    tower has none. The image map is ``E`` without the prefix (CLS) column, read out like every method's.

    ``R`` reads a layer out through the tower's final norm, pooling and projection
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.pooled_readout`), on:

    * ``readout="pooled"`` (default): ``Z_l`` itself, so the tower's own pooling (CLIP: the CLS / EOS
      token; SigLIP: its head / last position). Only the pooled token's row of ``A_l`` reaches its own
      read-out, so the row average is that row's gradient, divided by ``|Q|``.
    * ``readout="mean"``: the mean of the valid tokens of ``Z_l`` (every token standing in for it), as the
      authors' code reads CLIP layers (``ln_post`` of the token mean, then the projection): every row
      of ``A_l`` then carries gradient. For SigLIP's head this is its read-out of the mean token.

    Adaptations and deviations: the paper and the authors' code treat image towers only; on text the same
    computation runs on the text tower, every valid token's column is a score (in a causal tower column
    ``j`` collects from the rows ``i >= j`` that may attend it). SigLIP's image tower has no CLS token: ``R``
    is its pooling head, ``A_l`` still the block's own attention, every column a patch; the authors'
    code instead differentiates the head's attention over each layer's tokens and zeroes the patches an
    empty prompt's map marks. Their default starts at the second-to-last block; ``start_layer`` here
    defaults to 0, the paper's aggregation over all layers.

    Needs an adapter that traces the tower's attention
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.trace_attention`: CLIP, SigLIP, open_clip's standard,
    timm and BERT blocks); other towers are refused with the adapter's reason.

    Args:
        start_layer: first block whose map is included (0: all blocks).
        readout: ``"pooled"`` or ``"mean"``, see above.
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, start_layer: int = 0, readout: Literal["pooled", "mean"] = "pooled",
                 sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if readout not in ("pooled", "mean"):
            raise ConfigError(f"LeGrad readout must be 'pooled' or 'mean', got {readout!r}")
        for side in self.sides:
            reason = backbone.attention_unavailable(side)
            if reason is not None:
                raise ConfigError(f"LeGrad needs an adapter that traces the attention of the {side} tower: {reason}")
            backbone.check_layer(side, start_layer, allow_embeddings=False)
        self.start_layer, self.readout = start_layer, readout
        self.save_hyperparameters(ignore=["backbone"])

    def _legrad(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        trace = self.backbone.trace_attention(side, inputs, self.start_layer)
        valid = trace.state.valid.to(trace.hidden[0].device).unsqueeze(-1)  # (B, L, 1)
        rows = (valid / valid.sum(1, keepdim=True)).float()  # the mean over valid query rows
        total = torch.zeros_like(rows[..., 0])
        with torch.enable_grad():
            for hidden, probs in zip(trace.hidden, trace.probabilities):
                if self.readout == "mean":
                    mean = (hidden * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
                    hidden = mean.expand_as(hidden)
                readout = self.backbone.pooled_readout(side, hidden, trace.state).float()
                s = F.cosine_similarity(readout, target, dim=-1).sum()
                (grad,) = torch.autograd.grad(s, probs, retain_graph=True)
                signal = grad.float().clamp_min(0) * (probs.detach() > 0)
                total = total + (signal.mean(1) * rows).sum(1)
        return total / len(trace.probabilities)

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores = {side: self._legrad(side, inputs, clean[self.other(side)]) if side in self.sides else None
                  for side in SIDES}
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])
