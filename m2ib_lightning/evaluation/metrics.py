"""Faithfulness and localisation metrics of attribution maps, as torchmetrics ``Metric`` s.

Every metric keeps a per-sample SUM and a sample COUNT (``dist_reduce_fx="sum"``), so values
computed on several ranks merge exactly, and has a functional twin (same maths, one call) that
returns the mean over the batch (:mod:`.functional`, with the per-sample values). Inputs are what
the model-side helpers of :mod:`m2ib_lightning.evaluation.perturb` produce: similarities before and
after masking, score curves, or maps with ground-truth masks.

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

from m2ib_lightning.evaluation.functional import (
    auc_per_sample,
    auroc_per_sample,
    confidence_drop,
    confidence_increase,
    curve_auc,
    drop_per_sample,
    energy_per_sample,
    energy_pointing_game,
    increase_per_sample,
    mask_auroc,
    pointing_game,
    pointing_hits,
    rankdata,
    spearman,
)

__all__ = [
    "ConfidenceDrop",
    "ConfidenceIncrease",
    "DeletionAUC",
    "EnergyPointingGame",
    "InsertionAUC",
    "MaskAUROC",
    "PerSampleMean",
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


class PerSampleMean(Metric):
    """A mean over samples of a per-sample value: ``total`` (sum) and ``count`` sync as sums.

    The base of every metric here, and on its own the running mean of per-sample values that are
    already computed (the evaluation's totals over a run): ``update(values)`` with ``values`` ``(B,)``;
    NaN marks a sample the value is undefined for, which is not counted.

    Example:
        >>> metric = PerSampleMean()
        >>> metric.update(torch.tensor([1.0, float("nan"), 3.0]))
        >>> metric.compute(), int(metric.count)
        (tensor(2., dtype=torch.float64), 2)
    """

    full_state_update = False
    #: the mean is multiplied by this (100 for percentages)
    scale: float = 1.0

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, values: Tensor) -> None:
        """Add per-sample values ``(B,)`` (NaN: undefined, not counted)."""
        self.add(values)

    def add(self, values: Tensor) -> None:
        """Add a batch's per-sample values, in the metric's unscaled units."""
        values = values.detach().to(torch.float64)
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


class ConfidenceDrop(PerSampleMean):
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
        self.add(drop_per_sample(s, s_masked))


class ConfidenceIncrease(PerSampleMean):
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
        self.add(increase_per_sample(s, s_masked))


class DeletionAUC(PerSampleMean):
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
        self.add(auc_per_sample(curves))


class InsertionAUC(PerSampleMean):
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
        self.add(auc_per_sample(curves))


class PointingGame(PerSampleMean):
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
        self.add(pointing_hits(maps, masks, self.tolerance))


class EnergyPointingGame(PerSampleMean):
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
        self.add(energy_per_sample(maps, masks))


class MaskAUROC(PerSampleMean):
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
        self.add(auroc_per_sample(maps, masks))


