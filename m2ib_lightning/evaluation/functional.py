"""The metrics' maths as plain functions: per-sample values and their batch means.

Each ``*_per_sample`` function returns one value per sample (``(B,)``; NaN where a metric is
undefined for a sample); each functional twin (:func:`confidence_drop`, :func:`curve_auc`,
:func:`pointing_game`, ...) is the mean over the batch, in the units of :mod:`.metrics`. The
torchmetrics classes of :mod:`.metrics` and the evaluation of a batch both call these, so the
definitions live in one place.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "REFERENCE_SIZE",
    "TOLERANCE_UNITS",
    "auc_per_sample",
    "auroc_per_sample",
    "check_maps",
    "check_pair",
    "confidence_drop",
    "confidence_increase",
    "curve_auc",
    "drop_per_sample",
    "energy_per_sample",
    "energy_pointing_game",
    "increase_per_sample",
    "mask_auroc",
    "pointing_game",
    "pointing_hits",
    "rankdata",
    "spearman",
    "tolerance_pixels",
]


def check_pair(s: Tensor, s_masked: Tensor) -> None:
    if s.ndim != 1 or s.shape != s_masked.shape:
        raise ValueError(f"expected similarities of shape (B,) and (B,), got {tuple(s.shape)} and "
                         f"{tuple(s_masked.shape)}")


def check_maps(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected maps (B, H, W) and masks of the same shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}")


def drop_per_sample(s: Tensor, s_masked: Tensor) -> Tensor:
    """``max(0, s - s_masked)`` per sample, ``(B,)`` (:func:`confidence_drop` is 100 times its mean)."""
    check_pair(s, s_masked)
    return (s.float() - s_masked.float()).clamp_min(0.0)


def increase_per_sample(s: Tensor, s_masked: Tensor) -> Tensor:
    """``1`` where ``s_masked > s``, else ``0``, per sample ``(B,)``."""
    check_pair(s, s_masked)
    return (s_masked.float() > s.float()).float()


def confidence_drop(s: Tensor, s_masked: Tensor) -> Tensor:
    """``100 * mean(max(0, s - s_masked))`` (lower is better; the M2IB paper's image/text metric).

    Args:
        s: ``(B,)`` clean image-text similarity.
        s_masked: ``(B,)`` similarity after the input was masked by its attribution map.

    Example:
        >>> confidence_drop(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
        tensor(5.0000)
    """
    return 100.0 * drop_per_sample(s, s_masked).mean()


def confidence_increase(s: Tensor, s_masked: Tensor) -> Tensor:
    """``100 * fraction of samples with s_masked > s`` (higher is better).

    Example:
        >>> confidence_increase(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
        tensor(50.)
    """
    return 100.0 * increase_per_sample(s, s_masked).mean()


def auc_per_sample(curves: Tensor) -> Tensor:
    """Trapezoid area under each curve ``(B, n + 1)`` on an evenly spaced [0, 1] axis, ``(B,)``."""
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"expected curves of shape (B, steps + 1) with steps >= 1, got {tuple(curves.shape)}")
    c = curves.float()
    # Trapezoid rule on an evenly spaced fraction axis [0, 1].
    return (0.5 * (c[:, 1:] + c[:, :-1])).mean(1)


def curve_auc(curves: Tensor) -> Tensor:
    """Mean area under score curves sampled at evenly spaced fractions ``0, 1/n, ..., 1``.

    Args:
        curves: ``(B, n + 1)`` score after deleting (or inserting) a fraction ``k / n`` of the
            pixels, most relevant first.

    Example:
        >>> curve_auc(torch.tensor([[1.0, 0.5, 0.0], [1.0, 1.0, 1.0]]))
        tensor(0.7500)
    """
    return auc_per_sample(curves).mean()


#: the map size at which the pointing game's usual tolerance (15 px, Zhang et al. 2018) was set
REFERENCE_SIZE = 224
#: how a pointing-game tolerance is given: in pixels of a 224-px map, scaled to the map's size, or in
#: pixels of the map itself
TOLERANCE_UNITS = ("relative", "pixels")


def tolerance_pixels(tolerance: float, size: tuple[int, int], units: str = "relative") -> float:
    """The pointing-game tolerance in pixels of a map of ``size`` ``(H, W)``.

    ``units="relative"``: ``tolerance`` is in pixels of a 224-px map and scales with the map,
    ``tolerance * sqrt(H * W) / 224`` (15 at 224 px is 6.43 at 96 px and 25.7 at 384 px);
    ``units="pixels"``: ``tolerance`` itself, whatever the map's size.

    Example:
        >>> tolerance_pixels(15, (96, 96))
        6.428571428571429
        >>> tolerance_pixels(15, (96, 96), "pixels")
        15.0
    """
    if units not in TOLERANCE_UNITS:
        raise ValueError(f"tolerance units must be one of {list(TOLERANCE_UNITS)}, got {units!r}")
    if not tolerance >= 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance!r}")
    if units == "pixels":
        return float(tolerance)
    return float(tolerance) * (size[0] * size[1]) ** 0.5 / REFERENCE_SIZE


def pointing_hits(maps: Tensor, masks: Tensor, tolerance: float) -> Tensor:
    """``1`` where the map's first maximum lies within ``tolerance`` pixels of the region, per sample ``(B,)``."""
    check_maps(maps, masks)
    b, h, w = maps.shape
    # The first maximum in row-major order (torch.argmax's rule), so ties are deterministic.
    flat = maps.reshape(b, -1).float().argmax(1)
    py, px = (flat // w).view(b, 1, 1), (flat % w).view(b, 1, 1)
    ys = torch.arange(h, device=maps.device).view(1, h, 1)
    xs = torch.arange(w, device=maps.device).view(1, 1, w)
    near = (ys - py) ** 2 + (xs - px) ** 2 <= tolerance**2
    return (near & masks).flatten(1).any(1).float()


def pointing_game(maps: Tensor, masks: Tensor, tolerance: float = 15.0) -> Tensor:
    """Fraction of maps whose maximum lies within ``tolerance`` pixels of the ground-truth region.

    Args:
        maps: ``(B, H, W)`` attribution maps.
        masks: ``(B, H, W)`` bool ground-truth regions.
        tolerance: Euclidean distance in pixels (15 at 224 px in Zhang et al. 2018; 0: the
            maximum itself must be inside).

    Example:
        >>> maps = torch.zeros(2, 4, 4); maps[0, 0, 0] = 1; maps[1, 3, 3] = 1
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool); masks[:, :2, :2] = True
        >>> pointing_game(maps, masks, tolerance=0)
        tensor(0.5000)
    """
    return pointing_hits(maps, masks, tolerance).mean()


def energy_per_sample(maps: Tensor, masks: Tensor) -> Tensor:
    """Fraction of each non-negative map's mass inside its region, ``(B,)`` (0 for an all-zero map)."""
    check_maps(maps, masks)
    m = maps.float().clamp_min(0.0).flatten(1)
    inside = (m * masks.flatten(1)).sum(1)
    total = m.sum(1)
    # An all-zero map has no energy anywhere: it scores 0, not NaN.
    return torch.where(total > 0, inside / total.clamp_min(torch.finfo(m.dtype).tiny), torch.zeros_like(total))


def energy_pointing_game(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean fraction of each (non-negative) map's mass inside the ground-truth region.

    Example:
        >>> maps = torch.tensor([[[1.0, 1.0], [2.0, 0.0]]])
        >>> energy_pointing_game(maps, torch.tensor([[[True, False], [True, False]]]))
        tensor(0.7500)
    """
    return energy_per_sample(maps, masks).mean()


def rankdata(x: Tensor) -> Tensor:
    """Ranks ``1..n`` of a 1-D tensor, ties given their average rank (like ``scipy.stats.rankdata``).

    Example:
        >>> rankdata(torch.tensor([0.5, 0.1, 0.5, 0.9]))
        tensor([2.5000, 1.0000, 2.5000, 4.0000], dtype=torch.float64)
    """
    if x.ndim != 1:
        raise ValueError(f"expected a 1-D tensor, got shape {tuple(x.shape)}")
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).to(torch.float64)
    average = ends - (counts.to(torch.float64) - 1) / 2
    return average[inverse]


def auroc_per_sample(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-sample AUROC; NaN where a mask is all inside or all outside (undefined)."""
    check_maps(maps, masks)
    out = []
    for m, gt in zip(maps.flatten(1).float(), masks.flatten(1)):
        pos, n = int(gt.sum()), gt.numel()
        if pos == 0 or pos == n:
            out.append(torch.tensor(float("nan"), dtype=torch.float64, device=maps.device))
            continue
        # Mann-Whitney U from average ranks: P(score of a mask pixel > score of a background pixel),
        # ties counted one half.
        ranks = rankdata(m)
        u = ranks[gt].sum() - pos * (pos + 1) / 2
        out.append(u / (pos * (n - pos)))
    return torch.stack(out) if out else torch.zeros(0, dtype=torch.float64, device=maps.device)


def mask_auroc(maps: Tensor, masks: Tensor) -> Tensor:
    """Mean over samples of the AUROC of map values separating region pixels from the rest.

    0.5 is chance; samples whose mask is empty or covers the whole image are left out.

    Example:
        >>> maps = torch.tensor([[[0.9, 0.1], [0.5, 0.5]]])
        >>> mask_auroc(maps, torch.tensor([[[True, False], [True, False]]]))
        tensor(0.8750, dtype=torch.float64)
    """
    values = auroc_per_sample(maps, masks)
    return values[~values.isnan()].mean()


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Spearman rank correlation of two maps of the same shape (flattened), ties averaged.

    Example:
        >>> spearman(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 30.0, 20.0]))
        tensor(0.5000, dtype=torch.float64)
    """
    if a.shape != b.shape:
        raise ValueError(f"expected two maps of the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    ra, rb = rankdata(a.flatten().float()), rankdata(b.flatten().float())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    if denom == 0:  # a constant map has no ranking to agree with
        return torch.tensor(0.0, dtype=torch.float64, device=a.device)
    return (ra * rb).sum() / denom
