"""One mask value per token, shared by all its channels."""

from __future__ import annotations

from torch import Tensor

from m2ib_lightning.methods.bottlenecks.reference import M2IB

__all__ = ["PerTokenM2IB"]


class PerTokenM2IB(M2IB):
    """One mask value per token, shared by all its channels: ``alpha`` is ``(B, L, 1)``.

    The capacity is still computed per element (``lambda`` broadcast over the D channels) and summed
    over channels for the map, so only the mask's parameterisation changes: D times fewer parameters
    (768 -> 1 per token for ViT-B), and the mask can only keep or drop a token as a whole. The noise
    is the reference's (:meth:`M2IB.sample_noise`), per channel; the masks are still one per sample,
    so the step stays functional and compilable (``torch_compile``).

    Args:
        **kwargs: options of :class:`~m2ib_lightning.methods.bottlenecks.M2IB` (``beta``, ``init_alpha``).
    """

    def mask_shape(self, hidden: Tensor) -> tuple[int, ...]:
        """``(B, L, 1)`` for hidden states ``(B, L, D)``."""
        return (*hidden.shape[:-1], 1)

