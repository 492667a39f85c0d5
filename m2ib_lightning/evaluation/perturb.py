"""The model-side perturbations of the evaluation: masked images, deletion/insertion curves, kept words.

The score is the one every method explains: the cosine similarity ``s`` between the image and the
caption embeddings (definitions in docs/method.md and docs/evaluation.md):

* image confidence: ``s'`` of the normalised pixels multiplied by the map;
* text confidence: the caption's words (special tokens such as BOS and EOS kept) scoring above
  the median of their scores are kept, the others replaced by token id 0;
* deletion / insertion: the most relevant pixels first, ``steps`` equal fractions, replaced by
  (or inserted into) a baseline image: ``"mean"`` (zeros of the normalised pixels, i.e. the
  dataset mean colour) or ``"blur"`` (Gaussian blur of the image, kernel 11, sigma 5 at 224 px as
  in Petsiuk et al. 2018).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter
from m2ib_lightning.errors import ConfigError

__all__ = ["baseline_image", "gaussian_blur", "keep_above_median", "perturbation_curves", "similarity"]

Baseline = Literal["mean", "blur"]


def similarity(backbone: BackboneAdapter, side: str, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
    """``(B,)`` cosine similarity between ``side``'s embedding of ``inputs`` and ``target`` ``(B, P)``."""
    return F.cosine_similarity(backbone.embed(side, inputs).float(), target.float(), dim=-1)


def gaussian_blur(pixels: Tensor, kernel: int = 11, sigma: float = 5.0) -> Tensor:
    """Separable Gaussian blur of ``(B, C, H, W)`` with reflect padding."""
    x = torch.arange(kernel, dtype=torch.float32, device=pixels.device) - (kernel - 1) / 2
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).to(pixels.dtype)
    c = pixels.shape[1]
    out = F.pad(pixels, (kernel // 2,) * 4, mode="reflect")
    out = F.conv2d(out, k.view(1, 1, 1, -1).expand(c, 1, 1, kernel), groups=c)
    return F.conv2d(out, k.view(1, 1, -1, 1).expand(c, 1, kernel, 1), groups=c)


def baseline_image(pixels: Tensor, kind: Baseline) -> Tensor:
    """The image that deleted pixels become (or inserted pixels start from)."""
    if kind == "mean":
        return torch.zeros_like(pixels)
    if kind == "blur":
        # Kernel and sigma of Petsiuk et al. (11, 5) at 224 px, scaled with the image.
        scale = pixels.shape[-1] / 224
        kernel = max(3, int(round(11 * scale)) | 1)
        return gaussian_blur(pixels, kernel=kernel, sigma=5.0 * scale)
    raise ConfigError(f"baseline must be 'mean' or 'blur', got {kind!r}")


def perturbation_curves(backbone: BackboneAdapter, pixels: Tensor, maps: Tensor, text: Tensor, steps: int = 16,
                        mode: Literal["deletion", "insertion"] = "deletion", baseline: Baseline = "mean") -> Tensor:
    """Similarity after deleting (or inserting) the ``k / steps`` most relevant pixels, ``k = 0..steps``.

    Args:
        backbone: the frozen dual encoder.
        pixels: ``(B, C, H, W)`` normalised images.
        maps: ``(B, H, W)`` attribution maps (ties broken by position, row-major).
        text: ``(B, P)`` clean caption embeddings.
        steps: number of equal fractions.
        mode: ``"deletion"`` (replace the top pixels by the baseline) or ``"insertion"`` (start from
            the baseline and put the top pixels back).
        baseline: ``"mean"`` or ``"blur"`` (see :func:`baseline_image`).

    Returns:
        ``(B, steps + 1)`` curves, ready for :class:`~m2ib_lightning.evaluation.metrics.DeletionAUC` /
        :class:`~m2ib_lightning.evaluation.metrics.InsertionAUC`.
    """
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    b, _, h, w = pixels.shape
    if maps.shape != (b, h, w):
        raise ValueError(f"maps must be (B, H, W) = {(b, h, w)}, got {tuple(maps.shape)}")
    base = baseline_image(pixels, baseline)
    order = maps.reshape(b, -1).float().argsort(dim=1, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    rank = rank.view(b, 1, h, w)
    curves = []
    for k in range(steps + 1):
        top = rank < round(k * h * w / steps)
        image = torch.where(top, base, pixels) if mode == "deletion" else torch.where(top, pixels, base)
        curves.append(similarity(backbone, "vision", {"pixel_values": image}, text))
    return torch.stack(curves, dim=1)


def keep_above_median(scores: Sequence[Tensor], attention_mask: Tensor, special: Tensor | None = None) -> Tensor:
    """``(B, L)`` bool: which tokens the text confidence metric keeps.

    ``scores[i]`` has one value per valid token of caption ``i`` (special tokens included, as in
    the outputs). Special tokens (``special``, ``(B, L)`` bool, e.g. from
    :meth:`~m2ib_lightning.backbones.BackboneAdapter.special_tokens`; default: the first and last
    valid token, CLIP's BOS and EOS) and padding are always kept; a word is kept when its score is
    strictly above the median of the caption's word scores (the mean of the two middle ones for an
    even count, as ``numpy.percentile(..., 50)`` in the reference code).
    """
    valid = attention_mask.bool()
    if special is None:
        lengths = valid.sum(1, keepdim=True)
        pos = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
        special = ~valid | (pos == 0) | (pos == lengths - 1)
    keep = torch.ones_like(valid)
    for i, s in enumerate(scores):
        where = valid[i].nonzero().flatten()
        if len(s) != len(where):
            raise ValueError(f"caption {i}: expected {len(where)} token scores (its valid tokens), got {len(s)}")
        is_word = ~special[i, where].to(keep.device)
        words = s.to(keep.device).float()[is_word]
        if len(words):
            keep[i, where[is_word]] = words > torch.quantile(words, 0.5)
    return keep

