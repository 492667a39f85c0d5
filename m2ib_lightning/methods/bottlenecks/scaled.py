"""M2IB whose information is measured in units of each token's own scale: one beta for any model."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from m2ib_lightning.methods.bottlenecks.per_token import PerTokenM2IB
from m2ib_lightning.methods.bottlenecks.reference import M2IB

__all__ = ["ScaledM2IB", "ScaledPerTokenM2IB"]


class ScaledM2IB(M2IB):
    """M2IB on hidden states scaled to unit RMS per token, with noise at the token's own scale.

    The reference draws ``eps ~ N(0, 1)`` whatever the scale of ``R``, and its KL grows with ``R^2``:
    the same ``beta`` means much more compression on a model (or layer) whose hidden states are small
    (CLIP's token embeddings have an RMS of about 0.05 on the toy models, where ``N(0, 1)`` noise
    drowns a token at any ``lambda < 1``) than on one whose states are large (an RMS of 3-5 in the
    upper blocks). Here each token ``t`` is measured in its own units, ``s_t = RMS over channels of R_t``:

    * ``Z = lambda R + (1 - lambda) s_t eps`` (``eps ~ N(0, I)``): dropping a token replaces it by
      noise as large as the token itself;
    * capacity ``KL(N(lambda R~, (1 - lambda)^2) || N(0, 1))`` with ``R~ = R / s_t``, i.e. the
      reference formula on the unit-RMS states; equivalently the KL of ``Z`` against the prior
      ``N(0, s_t^2)``.

    Both are unchanged when ``R`` is multiplied by any constant (or each token by its own), so one
    ``beta`` means the same compression on every model, layer and side: this is the
    "KL measured on R scaled to unit RMS" form of an adaptive ``beta``. ``s_t`` depends on the token
    alone (not on the batch, its padding or the other tokens), so a sample's map does not depend on
    its batch. Where ``R`` already has unit RMS per token this is the reference.

    Args:
        beta: weight of the compression term. The default 1.0 (the reference's is 0.1) was chosen on
            the validation scenes of both synthetic worlds (docs/variants.md): on unit-RMS states
            the KL of a kept element is about 5 nats at the initial mask, and 0.1 barely moved it.
        **kwargs: options of :class:`~m2ib_lightning.methods.bottlenecks.M2IB` (``init_alpha``).
    """

    def __init__(self, beta: float = 1.0, **kwargs: Any) -> None:
        super().__init__(beta=beta, **kwargs)

    def scale(self, hidden: Tensor) -> Tensor:
        """``s_t``, ``(B, L, 1)``: each token's RMS over its channels (floored above 0)."""
        return hidden.float().pow(2).mean(-1, keepdim=True).sqrt().clamp_min(1e-12)

    def compress(self, hidden: Tensor, alpha: Tensor, noise: Tensor) -> Tensor:
        """``lambda R + (1 - lambda) s_t eps``, ``(B * K, L, D)``."""
        s = self.scale(hidden)
        z = super().compress(hidden / s, alpha, noise).unflatten(0, noise.shape[:2])
        return (z * s.unsqueeze(1)).flatten(0, 1)

    def capacity(self, hidden: Tensor, alpha: Tensor) -> Tensor:
        """The reference capacity of the unit-RMS states ``R / s_t``, ``(B, L, D)``."""
        return super().capacity(hidden / self.scale(hidden), alpha)


class ScaledPerTokenM2IB(ScaledM2IB, PerTokenM2IB):
    """:class:`ScaledM2IB` with one mask value per token (:class:`PerTokenM2IB`): keep or drop a token whole.

    On unit-RMS tokens a per-token mask's capacity is ``D`` times one function of the token's
    ``lambda``, so the map is the mask itself, read on one scale for every token, layer and model:
    where the reference's map follows the size of the hidden states (large tokens cost more to
    keep), this one follows only what the optimisation kept. The best bottleneck of the validation
    sweeps on both synthetic worlds (docs/variants.md).

    Args:
        beta: see :class:`ScaledM2IB` (default 1.0).
        **kwargs: options of :class:`~m2ib_lightning.methods.bottlenecks.M2IB` (``init_alpha``).
    """
