"""The evaluation of a batch's maps: a pure function of (backbone, explanation, batch), and run totals.

:class:`AttributionEvaluator` holds the evaluation settings (the CLI's ``evaluation:`` group) and
:meth:`~AttributionEvaluator.evaluate`: it perturbs the inputs with the batch's maps, scores them with
the frozen backbone and returns each metric's per-sample values, changing nothing. The sink callback
(:class:`~m2ib_lightning.run.writer.AttributionWriter`) stores those values with each sample's record
and adds them to the run's :class:`MetricTotals` (torchmetrics states, synced across ranks), from which
``results.json`` is written. It works for every attribution method, because it reads only the
:class:`~m2ib_lightning.records.Explanation`.

Enable it under the CLI's ``evaluation:`` group::

    evaluation:
      enabled: true
      mask_column: mask          # ground truth passed through data.init_args.extra_columns

The perturbations are those of :mod:`m2ib_lightning.evaluation.perturb`; the metric definitions
those of :mod:`m2ib_lightning.evaluation.functional`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2ib_lightning.backbones import BackboneAdapter
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.evaluation import functional as fn
from m2ib_lightning.evaluation.ground_truth import ground_truth
from m2ib_lightning.evaluation.metrics import (
    ConfidenceDrop,
    ConfidenceIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    MaskAUROC,
    PerSampleMean,
    PointingGame,
)
from m2ib_lightning.evaluation.perturb import Baseline, keep_above_median, perturbation_curves, similarity
from m2ib_lightning.methods.baselines import drop_tokens
from m2ib_lightning.records import Explanation

__all__ = ["ALL_METRICS", "AttributionEvaluator", "MetricTotals"]

IMAGE_METRICS = ("confidence_drop", "confidence_increase", "deletion_auc", "insertion_auc")
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_auroc")
TEXT_METRICS = ("confidence_drop", "confidence_increase")
ALL_METRICS = (*(f"image/{m}" for m in (*IMAGE_METRICS, *LOCALISATION_METRICS)), *(f"text/{m}" for m in TEXT_METRICS))
#: whether a larger value is better, by metric (the torchmetrics classes' attribute)
HIGHER_IS_BETTER = {
    "confidence_drop": ConfidenceDrop.higher_is_better, "confidence_increase": ConfidenceIncrease.higher_is_better,
    "deletion_auc": DeletionAUC.higher_is_better, "insertion_auc": InsertionAUC.higher_is_better,
    "pointing_game": PointingGame.higher_is_better, "energy_pointing_game": EnergyPointingGame.higher_is_better,
    "mask_auroc": MaskAUROC.higher_is_better,
}


class AttributionEvaluator:
    """Faithfulness and localisation metrics of a batch's maps (settings + a pure ``evaluate``).

    Args:
        enabled: compute anything at all (off by default: the metrics cost extra forward passes,
            ``2 * (steps + 1) + 4`` per batch with deletion and insertion).
        metrics: names to compute (default: all that apply), from ``image/confidence_drop``,
            ``image/confidence_increase``, ``image/deletion_auc``, ``image/insertion_auc``,
            ``image/pointing_game``, ``image/energy_pointing_game``, ``image/mask_auroc``,
            ``text/confidence_drop``, ``text/confidence_increase``.
        mask_column: dataset column with the ground-truth region of the captioned object (an RLE
            mask ``{"size", "counts"}``, a box or a 2-D array; see
            :func:`m2ib_lightning.evaluation.ground_truth.ground_truth`). Must also be listed in
            ``data.init_args.extra_columns``. Enables the localisation metrics.
        bbox_column: a column with boxes ``[x0, y0, x1, y1]`` in pixels of the stored image, used
            when ``mask_column`` is not set.
        tolerance: pointing-game tolerance (15 px at 224 px in Zhang et al. 2018), in the units of
            ``tolerance_units``.
        tolerance_units: ``relative`` (default): ``tolerance`` is in pixels of a 224-px map and scales
            with the map's size (``tolerance * sqrt(H * W) / 224``: 15 is 6.4 px on a 96-px map, 25.7 on
            a 384-px SigLIP's); ``pixels``: ``tolerance`` pixels of the map (the model's input) at any
            size. See :func:`~m2ib_lightning.evaluation.functional.tolerance_pixels`.
        steps: fractions of the deletion and insertion curves.
        deletion_baseline: what deleted pixels become (``mean`` or ``blur``).
        insertion_baseline: what the insertion curve starts from (``mean`` or ``blur``).
        results_file: where the results JSON goes (default: ``results.json`` in the run's output
            directory).
        autocast: score the perturbed inputs under the trainer's precision (e.g. bf16 autocast);
            default False scores them in float32, so that small similarity differences (the
            confidence increase's ``s' > s``) are not decided by bfloat16 rounding.

    Each sample's values are stored in its record, so they survive with the maps: a resumed run adds
    the stored values of the samples it passes over, and ``results.json`` covers the records of
    every attempt. The settings the values depend on (:meth:`protocol`) are kept in
    ``evaluation.json`` beside the records; a rerun with other settings stops with a message rather
    than mix values measured two ways.
    """

    def __init__(self, enabled: bool = False, metrics: list[str] | None = None, mask_column: str | None = None,
                 bbox_column: str | None = None, tolerance: float = 15.0,
                 tolerance_units: Literal["relative", "pixels"] = "relative", steps: int = 16,
                 deletion_baseline: Baseline = "mean", insertion_baseline: Baseline = "blur",
                 results_file: str | None = None, autocast: bool = False) -> None:
        names = list(metrics) if metrics is not None else list(ALL_METRICS)
        unknown = [m for m in names if m not in ALL_METRICS]
        if unknown:
            raise ConfigError(f"evaluation.metrics: unknown {unknown}; expected names from {list(ALL_METRICS)}")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"evaluation.steps must be an int >= 1, got {steps!r}")
        if not tolerance >= 0:
            raise ConfigError(f"evaluation.tolerance must be >= 0, got {tolerance!r}")
        if tolerance_units not in fn.TOLERANCE_UNITS:
            raise ConfigError(f"evaluation.tolerance_units must be one of {list(fn.TOLERANCE_UNITS)} (relative: "
                              f"pixels at {fn.REFERENCE_SIZE} px, scaled to the map's size), got {tolerance_units!r}")
        for name, value in (("deletion_baseline", deletion_baseline), ("insertion_baseline", insertion_baseline)):
            if value not in ("mean", "blur"):
                raise ConfigError(f"evaluation.{name} must be 'mean' or 'blur', got {value!r}")
        self.gt_column = mask_column or bbox_column
        if self.gt_column is None:
            if metrics is not None and any(m.split("/")[1] in LOCALISATION_METRICS for m in names):
                raise ConfigError("evaluation: localisation metrics need mask_column or bbox_column")
            names = [m for m in names if m.split("/")[1] not in LOCALISATION_METRICS]
        self.enabled = bool(enabled)
        self.names = names
        self.tolerance, self.tolerance_units, self.steps = float(tolerance), tolerance_units, steps
        self.deletion_baseline, self.insertion_baseline = deletion_baseline, insertion_baseline
        self.results_file = results_file
        self.autocast = bool(autocast)

    def wants(self, name: str) -> bool:
        return name in self.names

    #: what a stored protocol that lacks a key meant (written before the key existed): tolerances were pixels
    PROTOCOL_BEFORE: dict[str, Any] = {"tolerance_units": "pixels"}

    def protocol(self) -> dict[str, Any]:
        """The settings per-sample values depend on (stored next to the outputs, compared on resume)."""
        return {"metrics": sorted(self.names), "tolerance": self.tolerance, "tolerance_units": self.tolerance_units,
                "steps": self.steps,
                "deletion_baseline": self.deletion_baseline, "insertion_baseline": self.insertion_baseline,
                "ground_truth": self.gt_column, "autocast": self.autocast}

    def totals(self) -> MetricTotals:
        """Fresh run totals of this evaluation's metrics."""
        return MetricTotals(self.names)

    @torch.no_grad()
    def evaluate(self, backbone: BackboneAdapter, explanation: Explanation, batch: dict[str, Any]
                 ) -> dict[str, Tensor]:
        """Each metric's per-sample values for one batch: ``{name: (B,) float64 on the CPU}``.

        In the units of the results (percent for the confidence metrics), NaN where a metric is
        undefined for a sample (e.g. the mask AUROC of a region covering the whole image). Depends
        on nothing but its arguments and the settings.
        """
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask") if k in batch}
        image = backbone.embed("vision", inputs).float()
        text = backbone.embed("text", inputs).float()
        s = F.cosine_similarity(image, text, dim=-1)
        values: dict[str, Tensor] = {}
        if explanation.image_maps is not None:
            pixels = inputs["pixel_values"]
            maps = explanation.image_maps.to(pixels.device).float()
            if self.wants("image/confidence_drop") or self.wants("image/confidence_increase"):
                masked = similarity(backbone, "vision", {"pixel_values": pixels * maps.unsqueeze(1).to(pixels.dtype)},
                                    text)
                values.update(self._confidence("image", s, masked))
            for mode, baseline in (("deletion", self.deletion_baseline), ("insertion", self.insertion_baseline)):
                if self.wants(f"image/{mode}_auc"):
                    curves = perturbation_curves(backbone, pixels, maps.to(pixels.dtype), text, self.steps, mode,
                                                 baseline)
                    values[f"image/{mode}_auc"] = fn.auc_per_sample(curves)
            if any(self.wants(f"image/{m}") for m in LOCALISATION_METRICS):
                masks = self._ground_truth(batch, tuple(maps.shape[-2:])).to(maps.device)
                tolerance = fn.tolerance_pixels(self.tolerance, tuple(maps.shape[-2:]), self.tolerance_units)
                per_sample = {"pointing_game": lambda: fn.pointing_hits(maps, masks, tolerance),
                              "energy_pointing_game": lambda: fn.energy_per_sample(maps, masks),
                              "mask_auroc": lambda: fn.auroc_per_sample(maps, masks)}
                for name, compute in per_sample.items():
                    if self.wants(f"image/{name}"):
                        values[f"image/{name}"] = compute()
        if explanation.text_scores is not None and (self.wants("text/confidence_drop")
                                                    or self.wants("text/confidence_increase")):
            special = backbone.special_tokens(batch["input_ids"], batch["attention_mask"])
            keep = keep_above_median(explanation.text_scores, batch["attention_mask"], special)
            ids = drop_tokens(batch["input_ids"], keep)
            masked = similarity(backbone, "text", {"input_ids": ids, "attention_mask": batch["attention_mask"]}, image)
            values.update(self._confidence("text", s, masked))
        return {name: v.detach().to(torch.float64).cpu() for name, v in values.items()}

    def _confidence(self, side: str, s: Tensor, masked: Tensor) -> dict[str, Tensor]:
        out = {}
        if self.wants(f"{side}/confidence_drop"):
            out[f"{side}/confidence_drop"] = ConfidenceDrop.scale * fn.drop_per_sample(s, masked).double()
        if self.wants(f"{side}/confidence_increase"):
            out[f"{side}/confidence_increase"] = ConfidenceIncrease.scale * fn.increase_per_sample(s, masked).double()
        return out

    def _ground_truth(self, batch: dict[str, Any], size: tuple[int, int]) -> Tensor:
        extra = batch.get("extra") or {}
        if self.gt_column not in extra:
            raise ConfigError(f"evaluation: ground-truth column {self.gt_column!r} is not in the batch "
                              f"(columns passed through: {sorted(extra)}); add it to data.init_args.extra_columns")
        # A box is in pixels of the image as stored; masks carry their own size.
        originals = batch.get("image_sizes") or [None] * len(extra[self.gt_column])
        return torch.stack([ground_truth(v, size, original) for v, original in zip(extra[self.gt_column], originals)])


class MetricTotals(nn.Module):
    """A run's running means of per-sample values, one :class:`~m2ib_lightning.evaluation.metrics.PerSampleMean`
    per metric (synced across ranks), plus the values stored with records of earlier attempts.

    Args:
        names: the metrics, e.g. :attr:`AttributionEvaluator.names`.
    """

    def __init__(self, names: Iterable[str]) -> None:
        super().__init__()
        # ModuleDict keys cannot hold "/".
        self.metrics = nn.ModuleDict({n.replace("/", "__"): PerSampleMean() for n in names})
        self.earlier: dict[str, tuple[float, int]] = {}
        self.earlier_records = 0

    @property
    def names(self) -> list[str]:
        return [key.replace("__", "/") for key in self.metrics]

    def metric(self, name: str) -> PerSampleMean:
        return self.metrics[name.replace("/", "__")]

    def add(self, values: Mapping[str, Tensor]) -> None:
        """Add one batch's per-sample values (as :meth:`AttributionEvaluator.evaluate` returns them)."""
        for name, v in values.items():
            key = name.replace("/", "__")
            if key in self.metrics:
                self.metrics[key].update(v)

    def add_earlier(self, stored: Mapping[str, Mapping[str, float]]) -> int:
        """Count the values stored with the records of earlier attempts (``{id: {name: value}}``);
        returns how many of those records hold no values at all."""
        self.earlier_records = len(stored)
        for values in stored.values():
            for name, value in values.items():
                if name.replace("/", "__") in self.metrics:
                    total, count = self.earlier.get(name, (0.0, 0))
                    self.earlier[name] = (total + value, count + 1)
        return sum(1 for values in stored.values() if not values)

    def reset(self) -> None:
        for metric in self.metrics.values():
            metric.reset()

    def summary(self) -> tuple[dict[str, float | None], dict[str, int]]:
        """``(means, counts)`` per metric over all ranks and earlier attempts. A collective call when
        distributed: every rank makes it (also one without samples)."""
        means: dict[str, float | None] = {}
        counts: dict[str, int] = {}
        for key, metric in self.metrics.items():
            name = key.replace("__", "/")
            total, count = metric.totals()
            earlier_total, earlier_count = self.earlier.get(name, (0.0, 0))
            counts[name] = int(count) + earlier_count
            means[name] = float(total + earlier_total) / counts[name] if counts[name] > 0 else None
        return means, counts

    def higher_is_better(self) -> dict[str, bool]:
        return {name: bool(HIGHER_IS_BETTER[name.split("/")[1]]) for name in self.names}
