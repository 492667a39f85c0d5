"""What every baseline shares: the clean embeddings and targets, gradients at a block, token dropping.

A baseline is an :class:`~m2ib_lightning.methods.base.AttributionModule` that explains the same
target as M2IB, the cosine similarity between the image embedding and the caption embedding, and
returns the same :class:`~m2ib_lightning.records.Explanation`. A new baseline is one file beside this
one: a subclass of :class:`Baseline` implementing ``explain_batch`` (see docs/architecture.md).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side
from m2ib_lightning.methods.base import AttributionModule

__all__ = ["Baseline", "drop_tokens", "token_gradients"]


def drop_tokens(input_ids: Tensor, keep: Tensor, replacement: int = 0) -> Tensor:
    """``input_ids`` with every position where ``keep`` is False replaced by ``replacement``.

    The M2IB paper's text metric replaces removed words by token id 0; RISE on text does the same.
    """
    return torch.where(keep, input_ids, torch.full_like(input_ids, replacement))


class Baseline(AttributionModule):
    """Shared plumbing: clean embeddings and the similarity target of each side."""

    def clean(self, batch: dict[str, Any]) -> dict[Side, Tensor]:
        inputs = self.model_inputs(batch)
        with torch.no_grad():
            return {side: self.backbone.embed(side, inputs).float() for side in SIDES}

    @staticmethod
    def other(side: Side) -> Side:
        return "text" if side == "vision" else "vision"


def token_gradients(backbone: BackboneAdapter, side: Side, inputs: dict[str, Tensor], layer: int, target: Tensor,
                    return_hidden: bool = False) -> Any:
    """``d cos(f_side, target) / d h`` ``(B, L, D)`` at the output ``h`` of block ``layer``.

    With ``return_hidden``, returns ``(grad, h)``.
    """
    with torch.no_grad():
        state = backbone.lower(side, inputs, layer)
    hidden = state.hidden.detach().float().requires_grad_(True)
    state = backbone.prepare_upper(side, state, layer)
    with torch.enable_grad():
        emb = backbone.upper(side, hidden.to(state.hidden.dtype), state, layer).float()
        s = F.cosine_similarity(emb, target, dim=-1).sum()
        (grad,) = torch.autograd.grad(s, hidden)
    return (grad, hidden.detach()) if return_hidden else grad

