"""Faithfulness and localisation metrics of attribution maps, as torchmetrics ``Metric`` s.

Every metric keeps a per-sample SUM and a sample COUNT (``dist_reduce_fx="sum"``), so values
computed on several ranks merge exactly, and has a functional twin (same maths, one call) that
returns the mean over the batch. Inputs are what the model-side helpers of
:mod:`m2ib_lightning.evaluation` produce: similarities before and after masking, score curves, or
maps with ground-truth masks.

==============================  ==========================  ============  ======================
metric                          update(...)                 higher better  reference
==============================  ==========================  ============  ======================
:class:`ConfidenceDrop`         ``(s, s_masked)``           no            M2IB paper, spec
:class:`ConfidenceIncrease`     ``(s, s_masked)``           yes           M2IB paper, spec
:class:`DeletionAUC`            ``(curves)``                no            Petsiuk et al. 2018
:class:`InsertionAUC`           ``(curves)``                yes           Petsiuk et al. 2018
:class:`PointingGame`           ``(maps, masks)``           yes           Zhang et al. 2018
:class:`EnergyPointingGame`     ``(maps, masks)``           yes           Wang et al. 2020
:class:`MaskAUROC`              ``(maps, masks)``           yes           -
==============================  ==========================  ============  ======================

:func:`spearman` (rank correlation of two maps) serves the model-randomisation sanity check.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = [
    "ConfidenceDrop",
    "ConfidenceIncrease",
    "DeletionAUC",
    "EnergyPointingGame",
    "InsertionAUC",
    "MaskAUROC",
    "PointingGame",
    "confidence_drop",
    "confidence_increase",
    "curve_auc",
    "energy_pointing_game",
    "mask_auroc",
    "pointing_game",
    "rankdata",
    "spearman",
]


# ----------------------------------------------------------------------------- validation
def _check_pair(s: Tensor, s_masked: Tensor) -> None:
    if s.ndim != 1 or s.shape != s_masked.shape:
        raise ValueError(f"expected similarities of shape (B,) and (B,), got {tuple(s.shape)} and "
                         f"{tuple(s_masked.shape)}")


def _check_maps(maps: Tensor, masks: Tensor) -> None:
    if maps.ndim != 3 or masks.shape != maps.shape:
        raise ValueError(f"expected maps (B, H, W) and masks of the same shape, got {tuple(maps.shape)} and "
                         f"{tuple(masks.shape)}")
    if masks.dtype != torch.bool:
        raise ValueError(f"masks must be bool, got {masks.dtype}")


class _MeanMetric(Metric):
    """A mean over samples of a per-sample value: ``total`` (sum) and ``count`` sync as sums."""

    full_state_update = False
    #: the mean is multiplied by this (100 for percentages)
    scale: float = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.latest: Tensor | None = None

    def _accumulate(self, values: Tensor) -> None:
        """Add a batch's per-sample values; NaN marks a sample the metric is undefined for (not counted).

        ``latest`` keeps the batch's values, scaled and NaN included, one per sample in batch order
        (not a metric state: the evaluation callback stores them with each sample's record).
        """
        values = values.detach().to(torch.float64)
        self.latest = self.scale * values
        defined = values[~values.isnan()]
        self.total += defined.sum().to(self.total.device)
        self.count += defined.numel()

    def totals(self) -> tuple[Tensor, Tensor]:
        """``(sum, count)`` over all ranks. A collective call when distributed: every rank makes it."""
        with self.sync_context(should_sync=True, should_unsync=True):
            return self.total.clone(), self.count.clone()

    def compute(self) -> Tensor:
        """The mean of the per-sample values seen so far (NaN before any sample)."""
        if self.count == 0:
            return torch.tensor(float("nan"), dtype=torch.float64, device=self.total.device)
        return self.scale * self.total / self.count


# -------------------------------------------------------------------- confidence drop / increase
def _drop_per_sample(s: Tensor, s_masked: Tensor) -> Tensor:
    _check_pair(s, s_masked)
    return (s.float() - s_masked.float()).clamp_min(0.0)


def _increase_per_sample(s: Tensor, s_masked: Tensor) -> Tensor:
    _check_pair(s, s_masked)
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
    return 100.0 * _drop_per_sample(s, s_masked).mean()


def confidence_increase(s: Tensor, s_masked: Tensor) -> Tensor:
    """``100 * fraction of samples with s_masked > s`` (higher is better).

    Example:
        >>> confidence_increase(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
        tensor(50.)
    """
    return 100.0 * _increase_per_sample(s, s_masked).mean()


class ConfidenceDrop(_MeanMetric):
    """Mean confidence drop, in percent of similarity (see :func:`confidence_drop`).

    Example:
        >>> metric = ConfidenceDrop()
        >>> metric.update(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
        >>> metric.compute()
        tensor(5.0000, dtype=torch.float64)
    """

    higher_is_better = False
    is_differentiable = False
    scale = 100.0

    def update(self, s: Tensor, s_masked: Tensor) -> None:
        """``s``, ``s_masked``: ``(B,)`` similarities before and after masking."""
        self._accumulate(_drop_per_sample(s, s_masked))


class ConfidenceIncrease(_MeanMetric):
    """Percentage of samples whose similarity rises when masked (see :func:`confidence_increase`).

    Example:
        >>> metric = ConfidenceIncrease()
        >>> metric.update(torch.tensor([0.5, 0.5]), torch.tensor([0.4, 0.7]))
        >>> metric.compute()
        tensor(50., dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False
    scale = 100.0

    def update(self, s: Tensor, s_masked: Tensor) -> None:
        """``s``, ``s_masked``: ``(B,)`` similarities before and after masking."""
        self._accumulate(_increase_per_sample(s, s_masked))


# ------------------------------------------------------------------------ deletion / insertion
def _auc_per_sample(curves: Tensor) -> Tensor:
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
    return _auc_per_sample(curves).mean()


class DeletionAUC(_MeanMetric):
    """Area under the deletion curve (lower is better: the score falls fast when the most relevant
    pixels go first).

    Example:
        >>> metric = DeletionAUC()
        >>> metric.update(torch.tensor([[1.0, 0.5, 0.0]]))
        >>> metric.compute()
        tensor(0.5000, dtype=torch.float64)
    """

    higher_is_better = False
    is_differentiable = False

    def update(self, curves: Tensor) -> None:
        """``curves``: ``(B, n + 1)`` scores at deleted fractions ``0, 1/n, ..., 1``."""
        self._accumulate(_auc_per_sample(curves))


class InsertionAUC(_MeanMetric):
    """Area under the insertion curve (higher is better: the score recovers fast when the most
    relevant pixels come back first).

    Example:
        >>> metric = InsertionAUC()
        >>> metric.update(torch.tensor([[0.0, 1.0, 1.0]]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False

    def update(self, curves: Tensor) -> None:
        """``curves``: ``(B, n + 1)`` scores at inserted fractions ``0, 1/n, ..., 1``."""
        self._accumulate(_auc_per_sample(curves))


# ------------------------------------------------------------------------------ localisation
def pointing_hits(maps: Tensor, masks: Tensor, tolerance: float) -> Tensor:
    _check_maps(maps, masks)
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


def _energy_per_sample(maps: Tensor, masks: Tensor) -> Tensor:
    _check_maps(maps, masks)
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
    return _energy_per_sample(maps, masks).mean()


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


def _auroc_per_sample(maps: Tensor, masks: Tensor) -> Tensor:
    """Per-sample AUROC; NaN where a mask is all inside or all outside (undefined)."""
    _check_maps(maps, masks)
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
    values = _auroc_per_sample(maps, masks)
    return values[~values.isnan()].mean()


class PointingGame(_MeanMetric):
    """Pointing-game accuracy (see :func:`pointing_game`).

    Args:
        tolerance: pixels between the map's maximum and the region that still count as a hit.

    Example:
        >>> maps = torch.zeros(2, 4, 4); maps[0, 0, 0] = 1; maps[1, 3, 3] = 1
        >>> masks = torch.zeros(2, 4, 4, dtype=torch.bool); masks[:, :2, :2] = True
        >>> metric = PointingGame(tolerance=3)
        >>> metric.update(maps, masks)
        >>> metric.compute()
        tensor(1., dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False

    def __init__(self, tolerance: float = 15.0, **kwargs) -> None:
        super().__init__(**kwargs)
        if not tolerance >= 0:
            raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance!r}")
        self.tolerance = float(tolerance)

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """``maps``: ``(B, H, W)``; ``masks``: ``(B, H, W)`` bool."""
        self._accumulate(pointing_hits(maps, masks, self.tolerance))


class EnergyPointingGame(_MeanMetric):
    """Energy-based pointing game (see :func:`energy_pointing_game`).

    Example:
        >>> metric = EnergyPointingGame()
        >>> metric.update(torch.tensor([[[1.0, 1.0], [2.0, 0.0]]]), torch.tensor([[[True, False], [True, False]]]))
        >>> metric.compute()
        tensor(0.7500, dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """``maps``: ``(B, H, W)`` non-negative; ``masks``: ``(B, H, W)`` bool."""
        self._accumulate(_energy_per_sample(maps, masks))


class MaskAUROC(_MeanMetric):
    """Mean per-sample AUROC of the map against the ground-truth mask (see :func:`mask_auroc`).

    Example:
        >>> metric = MaskAUROC()
        >>> metric.update(torch.tensor([[[0.9, 0.1], [0.5, 0.5]]]), torch.tensor([[[True, False], [True, False]]]))
        >>> metric.compute()
        tensor(0.8750, dtype=torch.float64)
    """

    higher_is_better = True
    is_differentiable = False

    def update(self, maps: Tensor, masks: Tensor) -> None:
        """``maps``: ``(B, H, W)``; ``masks``: ``(B, H, W)`` bool; undefined samples are not counted."""
        self._accumulate(_auroc_per_sample(maps, masks))


# ------------------------------------------------------------------------------- sanity check
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
