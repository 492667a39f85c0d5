"""Ground-truth regions as boolean masks at the model's input size: run-length masks, boxes, arrays.

The localisation metrics compare a map with the region a caption names. Datasets store that
region as a run-length mask (``{"size": [H, W], "counts": [...]}``: row-major runs alternating
background and foreground, starting with background), a box ``[x0, y0, x1, y1]`` in pixels of the
stored image, or a 2-D array; :func:`ground_truth` maps each to the model's input pixels the way
CLIP's image processor maps the image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = ["decode_mask", "encode_mask", "ground_truth"]


def encode_mask(mask: np.ndarray) -> dict[str, list[int]]:
    """Run-length encode a ``(H, W)`` bool mask: ``{"size": [H, W], "counts": [...]}``.

    Counts are row-major run lengths alternating background / foreground, starting with
    background (a leading 0 when the first pixel is foreground); they sum to ``H * W``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    flat = mask.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat.size and flat[0]:
        counts = [0, *counts]
    return {"size": [int(mask.shape[0]), int(mask.shape[1])], "counts": [int(c) for c in counts]}


def decode_mask(rle: Mapping[str, Any]) -> np.ndarray:
    """Inverse of :func:`encode_mask`: ``(H, W)`` bool."""
    h, w = (int(v) for v in rle["size"])
    counts = np.asarray(rle["counts"], dtype=np.int64)
    if counts.sum() != h * w:
        raise ValueError(f"mask run lengths sum to {int(counts.sum())}, expected H * W = {h * w}")
    values = np.arange(len(counts)) % 2 == 1
    return np.repeat(values, counts).reshape(h, w)


def resize_centre_crop(mask: Tensor, size: tuple[int, int]) -> Tensor:
    """Mirror CLIP preprocessing on a ``(h, w)`` mask: shortest edge to ``min(size)``, centre crop."""
    h, w = mask.shape
    if (h, w) == tuple(size):
        return mask
    short = min(size)
    scale = short / min(h, w)
    rh, rw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    resized = torch.nn.functional.interpolate(mask[None, None].float(), size=(rh, rw), mode="nearest")[0, 0]
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    return resized[top : top + size[0], left : left + size[1]] > 0.5


def ground_truth(value: Any, size: tuple[int, int], image_size: tuple[int, int] | None = None) -> Tensor:
    """A ``(H, W)`` bool ground-truth mask at the model's input ``size`` from a dataset value.

    Accepts a run-length mask (``{"size", "counts"}``, see :func:`encode_mask`), a box
    ``[x0, y0, x1, y1]`` in pixels of the original image (whose ``(height, width)`` is
    ``image_size``; default: ``size``, i.e. images already at the model's resolution), or a 2-D
    array. Masks of another resolution are mapped like CLIP's image processor maps the image
    (shortest edge resized to the input size, then centre crop).

    Example:
        >>> ground_truth([2, 1, 4, 3], (4, 6)).int()
        tensor([[0, 0, 0, 0, 0, 0],
                [0, 0, 1, 1, 0, 0],
                [0, 0, 1, 1, 0, 0],
                [0, 0, 0, 0, 0, 0]], dtype=torch.int32)
    """
    if isinstance(value, Mapping):
        mask = torch.from_numpy(decode_mask(value))
    elif isinstance(value, Sequence | np.ndarray | Tensor) and np.ndim(np.asarray(value)) == 1:
        if len(value) != 4:
            raise ValueError(f"a box must be [x0, y0, x1, y1], got {list(value)!r}")
        x0, y0, x1, y1 = (float(v) for v in value)
        h, w = image_size or size
        mask = torch.zeros(h, w, dtype=torch.bool)
        # Pixel (i, j) covers [j, j+1) x [i, i+1); it is in the box when its centre is.
        mask[max(0, round(y0)) : max(0, round(y1)), max(0, round(x0)) : max(0, round(x1))] = True
    elif value is not None and np.ndim(np.asarray(value)) == 2:
        mask = torch.as_tensor(np.asarray(value)).bool()
    else:
        raise ValueError(f"ground truth must be an RLE mask dict, a box [x0, y0, x1, y1] or a 2-D mask; "
                         f"got {type(value).__name__}")
    return resize_centre_crop(mask, tuple(size))


