"""Read-out of raw scores as maps: per-patch scores to an image map, per-token scores to text scores.

Shared by every method (M2IB and the baselines) through
:meth:`~m2ib_lightning.methods.base.AttributionModule.explanation`, so that all methods' maps are
normalised the same way, as the M2IB reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def minmax(x: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Min-max normalise ``x`` to [0, 1] over ``dims``; a constant slice maps to zeros."""
    lo = x.amin(dim=dims, keepdim=True)
    hi = x.amax(dim=dims, keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(torch.finfo(x.dtype).tiny)


def image_map(patch_scores: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Patch scores ``(B, h * w)`` -> maps ``(B, H, W)`` in [0, 1].

    Bilinear upsampling (``align_corners=False``) of the ``h x w`` grid to the input size, then
    min-max normalisation per map, as the reference does.
    """
    b, n = patch_scores.shape
    if n != grid[0] * grid[1]:
        raise ValueError(f"expected {grid[0]} x {grid[1]} = {grid[0] * grid[1]} patch scores, got {n}")
    up = F.interpolate(patch_scores.float().view(b, 1, *grid), size=size, mode="bilinear", align_corners=False)
    return minmax(up[:, 0], dims=(1, 2))


def text_map(token_scores: Tensor) -> Tensor:
    """Scores of one caption's valid tokens ``(L,)`` (BOS and EOS included) -> [0, 1]."""
    return minmax(token_scores.float(), dims=(0,))
