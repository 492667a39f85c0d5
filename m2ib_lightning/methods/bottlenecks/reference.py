"""Information bottlenecks: how a mask turns hidden states into noisy ones, and what it costs.

:class:`M2IB` is the reference method of Wang, Rudner and Wilson (NeurIPS 2023), exactly as the
public reference code behaves (docs/method.md). It is also the base of the variant
hierarchy: a variant is a subclass overriding one or two of the documented hooks

* :meth:`M2IB.mask_shape` - the shape of the mask logits ``alpha`` for a batch;
* :meth:`M2IB.sample_noise` - the noise ``eps`` of a batch, a pure function of the samples' keys and the step;
* :meth:`M2IB.compress` - ``Z`` from hidden states, mask and noise;
* :meth:`M2IB.capacity` - the per-element KL that is both penalised and read out as the map;
* :meth:`M2IB.token_scores` - one relevance score per token from the capacity.

and it is told the layout of its side's tokens once per batch (:meth:`M2IB.set_layout`, a
:class:`TokenLayout`), for variants that need it (e.g. smoothing over the patch grid).

Bottlenecks hold no parameters: the mask logits belong to the LightningModule (one set per batch).
All maths runs in float32, whatever autocast does around it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.noise import standard_normal

__all__ = ["M2IB", "TokenLayout"]


@dataclass(frozen=True)
class TokenLayout:
    """How a side's tokens are laid out at the bottleneck, for one batch.

    Attributes:
        side: ``"vision"`` or ``"text"``.
        prefix_tokens: tokens before the image patches (CLIP: 1, the CLS token; SigLIP: 0); 0 on the text side.
        grid: the patch grid ``(h, w)`` of the vision side (tokens ``prefix_tokens:`` in row-major
            order); ``None`` on the text side.
    """

    side: str
    prefix_tokens: int = 0
    grid: tuple[int, int] | None = None


class M2IB(nn.Module):
    """Reference M2IB bottleneck: one mask value per token per channel, standard-normal noise.

    ``lambda = sigmoid(alpha)``, ``Z = lambda * R + (1 - lambda) * eps`` with ``eps ~ N(0, I)`` and
    capacity ``KL(N(lambda R, (1 - lambda)^2) || N(0, 1))`` per element.

    Args:
        beta: weight of the compression (capacity) term against the relevance term.
        init_alpha: initial mask logit for every element (5.0: ``lambda`` about 0.993, i.e. almost
            everything passes at the start).
    """

    def __init__(self, beta: float = 0.1, init_alpha: float = 5.0) -> None:
        super().__init__()
        if not beta >= 0:
            raise ConfigError(f"beta must be >= 0, got {beta!r}")
        if not torch.isfinite(torch.tensor(float(init_alpha))):
            raise ConfigError(f"init_alpha must be finite, got {init_alpha!r}")
        self.beta = float(beta)
        self.init_alpha = float(init_alpha)
        self._layout: TokenLayout | None = None  # private: not a setting (settings() skips "_" names)

    def set_layout(self, layout: TokenLayout) -> None:
        """The module tells the bottleneck its side's token layout, once per batch, before the
        optimisation. The reference ignores it; variants read it as ``self._layout``."""
        self._layout = layout

    def mask_shape(self, hidden: Tensor) -> tuple[int, ...]:
        """Shape of ``alpha`` for hidden states ``(B, L, D)``; must broadcast against them."""
        return tuple(hidden.shape)

    def initial_alpha(self, hidden: Tensor) -> Tensor:
        """Fresh float32 mask logits for a batch, filled with ``init_alpha``."""
        return torch.full(self.mask_shape(hidden), self.init_alpha, dtype=torch.float32, device=hidden.device)

    def sample_noise(self, keys: Tensor, step: Tensor | int, shape: tuple[int, int, int, int]) -> Tensor:
        """The noise of ``n`` samples at one optimisation step, ``shape = (n, K, L, D)``, float32.

        Args:
            keys: ``(n, 2)`` int32, each sample's key (from the seed, the side and its id).
            step: the step (0-based): a 0-d integer tensor in the loop (an int is accepted too).
            shape: samples, noisy copies, token positions, channels.

        It must be a pure function of its arguments, element by element: element ``[i, k, l, d]`` may
        depend on ``keys[i]``, ``step``, ``k``, ``l`` and ``d`` only (not on ``n``, ``L`` or the other
        samples), so a sample's map does not depend on its batch, and read nothing on the host (it runs
        inside the compiled step). Default: standard normal
        (:func:`m2ib_lightning.methods.noise.standard_normal`).
        """
        return standard_normal(keys, step, shape)

    def gates(self, alpha: Tensor) -> tuple[Tensor, Tensor]:
        """``(lambda, 1 - lambda)``; the complement as ``sigmoid(-alpha)`` keeps it exact near 1."""
        return torch.sigmoid(alpha), torch.sigmoid(-alpha)

    def compress(self, hidden: Tensor, alpha: Tensor, noise: Tensor) -> Tensor:
        """Noisy hidden states.

        Args:
            hidden: ``R``, ``(B, L, D)``.
            alpha: mask logits, broadcastable to ``(B, L, D)``.
            noise: ``(B, K, L, D)``.

        Returns:
            ``Z``, ``(B * K, L, D)``, the K copies of each sample in a row.
        """
        lam, comp = self.gates(alpha)
        z = (lam * hidden).unsqueeze(1) + comp.unsqueeze(1) * noise
        return z.flatten(0, 1)

    def capacity(self, hidden: Tensor, alpha: Tensor) -> Tensor:
        """Per-element ``KL(N(lambda R, (1 - lambda)^2) || N(0, 1))``, ``(B, L, D)``.

        ``-0.5 * (1 + log((1 - lambda)^2) - (lambda R)^2 - (1 - lambda)^2)``, with the log written
        as ``2 * logsigmoid(-alpha)`` so that it stays finite where ``1 - lambda`` underflows.
        """
        lam, comp = self.gates(alpha)
        log_var = 2.0 * F.logsigmoid(-alpha)
        return -0.5 * (1.0 + log_var - (lam * hidden) ** 2 - comp**2)

    def token_scores(self, capacity: Tensor) -> Tensor:
        """One score per token, ``(B, L)``: the capacity summed over channels (NaN-safe)."""
        return torch.nansum(capacity, dim=-1)


