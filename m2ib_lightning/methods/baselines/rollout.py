"""Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, CLIPBackbone, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.baselines.base import Baseline


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Run a transformers model with eager attention, whose probabilities are tensors in the graph
    (SDPA never materialises them); the previous implementation is restored on exit."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class AttentionRollout(Baseline):
    """Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021).

    With ``A_b`` a block's attention probabilities ``(heads, L, L)``,
    ``Abar_b = mean_heads(relu(dA_b * A_b))`` where ``dA_b = d s / d A_b``, and from ``R = I``
    each block from ``start_layer`` up applies ``R <- R + Abar_b R``. The vision map is the CLS
    row of ``R`` (one score per token); the text scores are the row of the pooled (EOS) token,
    minus the identity, so that the pooled token's own residual path does not dominate.

    Needs a :class:`~m2ib_lightning.CLIPBackbone` (it reads transformers' attention modules).

    Args:
        start_layer: first block included in the rollout (0: all blocks).
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, start_layer: int = 0, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if not isinstance(backbone, CLIPBackbone):
            raise ConfigError(f"AttentionRollout needs a CLIPBackbone (a transformers CLIPModel), got "
                              f"{type(backbone).__name__}")
        for side in self.sides:
            backbone.check_layer(side, start_layer, allow_embeddings=False)
        self.start_layer = start_layer
        self.save_hyperparameters(ignore=["backbone"])

    def _rollout(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        model = self.backbone.model
        tower = model.vision_model if side == "vision" else model.text_model
        blocks = list(tower.encoder.layers)[self.start_layer :]
        probs: list[Tensor] = []
        hooks = [b.self_attn.register_forward_hook(lambda mod, args, out: probs.append(out[1])) for b in blocks]
        # The weights are frozen and token ids are not differentiable: start the graph at the
        # embeddings so that the attention probabilities have gradients.
        hooks.append(tower.embeddings.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True)))
        try:
            with _eager_attention(model), torch.enable_grad():
                emb = self.backbone.embed(side, inputs).float()
                s = F.cosine_similarity(emb, target, dim=-1).sum()
                grads = torch.autograd.grad(s, probs)
        finally:
            for h in hooks:
                h.remove()
        b, _, n, _ = probs[0].shape
        rel = torch.eye(n, device=target.device).expand(b, n, n).clone()
        for a, g in zip(probs, grads):
            cam = (g * a).clamp_min(0).mean(1).float()
            rel = rel + cam @ rel
        if side == "vision":
            return rel[:, 0]
        pool = self.backbone._pool_positions(inputs["input_ids"])
        return rel[torch.arange(b, device=rel.device), pool] - torch.eye(n, device=rel.device)[pool]

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores = {side: self._rollout(side, inputs, clean[self.other(side)]) if side in self.sides else None
                  for side in SIDES}
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])

