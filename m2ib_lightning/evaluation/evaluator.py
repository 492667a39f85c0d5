"""Evaluate attribution maps while they are computed: a callback, and the model-side perturbations.

:class:`AttributionEvaluator` sits next to the writer. After every batch it perturbs the inputs
with the batch's maps, scores them with the frozen backbone and feeds the metrics of
:mod:`m2ib_lightning.evaluation.metrics`; at the end of the epoch the metrics are synced across ranks, logged
(``eval/...``) and written, with the run's settings and timings, to a results JSON next to the
attribution outputs. It works for every :class:`~m2ib_lightning.methods.base.AttributionModule`
(M2IB or a baseline) because it reads only the output contract.

Enable it under the CLI's ``evaluation:`` group::

    evaluation:
      enabled: true
      mask_column: mask          # ground truth passed through data.init_args.extra_columns

The score is the one every method explains: the cosine similarity ``s`` between the image and the
caption embeddings. Perturbations (definitions in ``shared/M2IB_SPEC.md``):

* image confidence: ``s'`` of the normalised pixels multiplied by the map;
* text confidence: the caption's words (special tokens such as BOS and EOS kept) scoring above
  the median of their scores are kept, the others replaced by token id 0;
* deletion / insertion: the most relevant pixels first, ``steps`` equal fractions, replaced by
  (or inserted into) a baseline image: ``"mean"`` (zeros of the normalised pixels, i.e. the
  dataset mean colour) or ``"blur"`` (Gaussian blur of the image, kernel 11, sigma 5 at 224 px as
  in Petsiuk et al. 2018).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from m2ib_lightning.backbones import BackboneAdapter
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.evaluation.ground_truth import ground_truth
from m2ib_lightning.evaluation.metrics import (
    ConfidenceDrop,
    ConfidenceIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    MaskAUROC,
    PointingGame,
)
from m2ib_lightning.evaluation.perturb import keep_above_median, perturbation_curves, similarity
from m2ib_lightning.files import atomic_write
from m2ib_lightning.outputs import Attributions
from m2ib_lightning.run.writer import AttributionWriter

log = logging.getLogger(__name__)

Baseline = Literal["mean", "blur"]

IMAGE_METRICS = ("confidence_drop", "confidence_increase", "deletion_auc", "insertion_auc")
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_auroc")
TEXT_METRICS = ("confidence_drop", "confidence_increase")
ALL_METRICS = (*(f"image/{m}" for m in (*IMAGE_METRICS, *LOCALISATION_METRICS)), *(f"text/{m}" for m in TEXT_METRICS))



# ----------------------------------------------------------------------------------- callback
class AttributionEvaluator(pl.Callback):
    """Computes faithfulness and localisation metrics of every batch's maps; writes a results JSON.

    Args:
        enabled: compute anything at all (off by default: the metrics cost extra forward passes,
            ``2 * (steps + 1) + 4`` per batch with deletion and insertion).
        metrics: names to compute (default: all that apply), from ``image/confidence_drop``,
            ``image/confidence_increase``, ``image/deletion_auc``, ``image/insertion_auc``,
            ``image/pointing_game``, ``image/energy_pointing_game``, ``image/mask_auroc``,
            ``text/confidence_drop``, ``text/confidence_increase``.
        mask_column: dataset column with the ground-truth region of the captioned object (an RLE
            mask ``{"size", "counts"}``, a box or a 2-D array; see
            :func:`m2ib_lightning.assets.scenes.ground_truth`). Must also be listed in
            ``data.init_args.extra_columns``. Enables the localisation metrics.
        bbox_column: a column with boxes ``[x0, y0, x1, y1]`` in the model's input pixels, used
            when ``mask_column`` is not set.
        tolerance: pointing-game tolerance in pixels of the map, i.e. of the model's input (15 at
            224 px in Zhang et al.; scale it with the input size, e.g. 26 for a 384 px SigLIP).
        steps: fractions of the deletion and insertion curves.
        deletion_baseline: what deleted pixels become (``mean`` or ``blur``).
        insertion_baseline: what the insertion curve starts from (``mean`` or ``blur``).
        results_file: where the JSON goes (default: ``results.json`` in the writer's output
            directory, else in ``trainer.default_root_dir``).
        autocast: score the perturbed inputs under the trainer's precision (e.g. bf16 autocast);
            default False scores them in float32, so that small similarity differences (the
            confidence increase's ``s' > s``) are not decided by bfloat16 rounding.

    Each sample's values go into its record (``metrics``, written by the writer, which this
    callback is placed before), so they survive with the maps: a resumed run (writer ``resume``)
    adds the stored values of the samples it passes over, so ``results.json`` covers the records
    of every attempt. The evaluation settings are kept in ``evaluation.json`` beside the records;
    a rerun with other settings stops with a message rather than mix values measured two ways.
    """

    def __init__(self, enabled: bool = False, metrics: list[str] | None = None, mask_column: str | None = None,
                 bbox_column: str | None = None, tolerance: float = 15.0, steps: int = 16,
                 deletion_baseline: Baseline = "mean", insertion_baseline: Baseline = "blur",
                 results_file: str | None = None, autocast: bool = False) -> None:
        super().__init__()
        names = list(metrics) if metrics is not None else list(ALL_METRICS)
        unknown = [m for m in names if m not in ALL_METRICS]
        if unknown:
            raise ConfigError(f"evaluation.metrics: unknown {unknown}; expected names from {list(ALL_METRICS)}")
        if not isinstance(steps, int) or steps < 1:
            raise ConfigError(f"evaluation.steps must be an int >= 1, got {steps!r}")
        for name, value in (("deletion_baseline", deletion_baseline), ("insertion_baseline", insertion_baseline)):
            if value not in ("mean", "blur"):
                raise ConfigError(f"evaluation.{name} must be 'mean' or 'blur', got {value!r}")
        self.gt_column = mask_column or bbox_column
        if self.gt_column is None:
            if metrics is not None and any(m.split("/")[1] in LOCALISATION_METRICS for m in names):
                raise ConfigError("evaluation: localisation metrics need mask_column or bbox_column")
            names = [m for m in names if m.split("/")[1] not in LOCALISATION_METRICS]
        self.enabled = enabled
        self.names = names
        self.tolerance, self.steps = tolerance, steps
        self.deletion_baseline, self.insertion_baseline = deletion_baseline, insertion_baseline
        self.results_file = results_file
        self.autocast = bool(autocast)
        factories = {
            "confidence_drop": ConfidenceDrop, "confidence_increase": ConfidenceIncrease,
            "deletion_auc": DeletionAUC, "insertion_auc": InsertionAUC,
            "pointing_game": lambda: PointingGame(tolerance=tolerance),
            "energy_pointing_game": EnergyPointingGame, "mask_auroc": MaskAUROC,
        }
        # ModuleDict keys cannot hold "/" or ".".
        self.metrics = nn.ModuleDict({n.replace("/", "__"): factories[n.split("/")[1]]() for n in names})
        self.results: dict[str, Any] = {}
        self._explain_s = self._eval_s = self._start_s = 0.0
        self._batch_start: float | None = None
        self._train_start: float | None = None
        # Sums and counts of the values stored with the records of earlier attempts (resume).
        self._earlier: dict[str, tuple[float, int]] = {}
        self._earlier_records = 0

    def metric(self, name: str) -> Any:
        return self.metrics[name.replace("/", "__")]

    def wants(self, name: str) -> bool:
        return name.replace("/", "__") in self.metrics

    # ------------------------------------------------------------------------------ hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self.metrics.to(pl_module.device)
        # Batch-end hooks run in list order: come before the writer, so that the outputs it writes
        # carry this batch's per-sample values (and the writer's work is not timed as explaining).
        writers = [i for i, cb in enumerate(trainer.callbacks) if _is_writer(cb)]
        me = next(i for i, cb in enumerate(trainer.callbacks) if cb is self)
        if writers and writers[0] < me:
            trainer.callbacks.insert(writers[0], trainer.callbacks.pop(me))

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._train_start = time.perf_counter()
        self._earlier, self._earlier_records = {}, 0
        writer = next((cb for cb in trainer.callbacks if _is_writer(cb)), None)
        if not self.enabled or writer is None or writer.directory is None:
            return
        column = Attributions(writer.directory).column("metrics")
        self._check_protocol(writer.directory, trainer, evaluated=any(column.values()))
        if not getattr(writer, "excluded", None):
            return
        # The records this run passes over (the writer's snapshot at setup, so nothing this run
        # writes): their stored values count.
        stored = {i: v for i, v in column.items() if i in writer.excluded}
        self._earlier_records = len(stored)
        for values in stored.values():
            for name, value in values.items():
                if self.wants(name):
                    total, count = self._earlier.get(name, (0.0, 0))
                    self._earlier[name] = (total + value, count + 1)
        missing = sum(1 for values in stored.values() if not values)
        if missing:
            log.warning("evaluation: %d of the %d records already in %s have no metrics (evaluated with "
                        "evaluation off?); results.json covers the others", missing, len(stored), writer.directory)

    def protocol(self) -> dict[str, Any]:
        """The settings per-sample values depend on (stored next to the outputs, compared on resume)."""
        return {"metrics": sorted(self.names), "tolerance": self.tolerance, "steps": self.steps,
                "deletion_baseline": self.deletion_baseline, "insertion_baseline": self.insertion_baseline,
                "ground_truth": self.gt_column, "autocast": self.autocast}

    def _check_protocol(self, directory: Path, trainer: pl.Trainer, evaluated: bool) -> None:
        """Refuse to add values measured another way to the ones stored with the records
        (``evaluated``: some record of ``directory`` holds values); else record this run's settings."""
        path = Path(directory) / "evaluation.json"
        ours = json.loads(json.dumps(self.protocol()))
        if evaluated and path.is_file():
            stored = json.loads(path.read_text())
            clash = {k: (stored.get(k), v) for k, v in ours.items() if stored.get(k) != v}
            if clash:
                detail = "; ".join(f"{k}: stored {a!r}, this run {b!r}" for k, (a, b) in sorted(clash.items()))
                raise ConfigError(f"the records in {directory} were evaluated with other settings ({detail}); "
                                  "use the same evaluation settings, or another writer.output_dir")
        elif trainer.is_global_zero:  # (over an earlier run's file when no record holds its values)
            path.parent.mkdir(parents=True, exist_ok=True)
            text = json.dumps(ours, indent=2, sort_keys=True) + "\n"
            atomic_write(path, lambda p: p.write_text(text))

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for m in self.metrics.values():
            m.reset()
        self._explain_s = self._eval_s = 0.0
        self._epoch_start = time.perf_counter()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._batch_start = time.perf_counter()
        if self._train_start is not None:  # the first batch: what came before it (e.g. a statistics pre-pass)
            self._start_s, self._train_start = self._batch_start - self._train_start, None

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        start = time.perf_counter()
        if self._batch_start is not None:
            self._explain_s += start - self._batch_start
        if not self.enabled or not outputs or not outputs.get("ids"):
            return
        context = trainer.precision_plugin.forward_context() if self.autocast else _float32(pl_module.device)
        with torch.no_grad(), context:
            outputs["metrics"] = self.update(pl_module.backbone, outputs, batch)
        self._eval_s += time.perf_counter() - start

    def update(self, backbone: BackboneAdapter, outputs: dict[str, Any], batch: dict[str, Any]) -> dict[str, Tensor]:
        """Feed the metrics from one batch's outputs (the contract of ``AttributionModule.outputs``).

        Returns each metric's per-sample values ``{name: (B,) float64 on the CPU}`` in the units of
        the results (NaN where a metric is undefined for a sample), for the samples' records.
        """
        inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask") if k in batch}
        image = backbone.embed("vision", inputs).float()
        text = backbone.embed("text", inputs).float()
        s = F.cosine_similarity(image, text, dim=-1)
        if "image_maps" in outputs:
            pixels = inputs["pixel_values"]
            maps = outputs["image_maps"].to(pixels.device).float()
            if self.wants("image/confidence_drop") or self.wants("image/confidence_increase"):
                masked = similarity(backbone, "vision", {"pixel_values": pixels * maps.unsqueeze(1).to(pixels.dtype)},
                                    text)
                self._pair_update("image", s, masked)
            for mode, baseline in (("deletion", self.deletion_baseline), ("insertion", self.insertion_baseline)):
                if self.wants(f"image/{mode}_auc"):
                    curves = perturbation_curves(backbone, pixels, maps.to(pixels.dtype), text, self.steps, mode,
                                                 baseline)
                    self.metric(f"image/{mode}_auc").update(curves)
            if any(self.wants(f"image/{m}") for m in LOCALISATION_METRICS):
                extra = batch.get("extra") or {}
                if self.gt_column not in extra:
                    raise ConfigError(f"evaluation: ground-truth column {self.gt_column!r} is not in the batch "
                                      f"(columns passed through: {sorted(extra)}); add it to "
                                      f"data.init_args.extra_columns")
                size = tuple(maps.shape[-2:])
                # A box is in pixels of the image as stored; masks carry their own size.
                originals = batch.get("image_sizes") or [None] * len(extra[self.gt_column])
                masks = torch.stack([ground_truth(v, size, original)
                                     for v, original in zip(extra[self.gt_column], originals)]).to(maps.device)
                for name in LOCALISATION_METRICS:
                    if self.wants(f"image/{name}"):
                        self.metric(f"image/{name}").update(maps, masks)
        if "text_scores" in outputs and (self.wants("text/confidence_drop") or self.wants("text/confidence_increase")):
            from m2ib_lightning.methods.baselines import drop_tokens

            special = backbone.special_tokens(batch["input_ids"], batch["attention_mask"])
            keep = keep_above_median(outputs["text_scores"], batch["attention_mask"], special)
            ids = drop_tokens(batch["input_ids"], keep)
            masked = similarity(backbone, "text", {"input_ids": ids, "attention_mask": batch["attention_mask"]}, image)
            self._pair_update("text", s, masked)
        per_sample = {}
        for key, metric in self.metrics.items():
            if metric.latest is not None:
                per_sample[key.replace("__", "/")] = metric.latest.detach().cpu()
                metric.latest = None
        return per_sample

    def _pair_update(self, side: str, s: Tensor, masked: Tensor) -> None:
        for name in ("confidence_drop", "confidence_increase"):
            if self.wants(f"{side}/{name}"):
                self.metric(f"{side}/{name}").update(s, masked)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.enabled:
            return
        values, counts = {}, {}
        for key, metric in self.metrics.items():
            # Summed over ranks (every rank joins, also one without samples); compute() would give
            # the same mean but leave the local count behind. Then the earlier attempts' records.
            total, count = metric.totals()
            name = key.replace("__", "/")
            earlier_total, earlier_count = self._earlier.get(name, (0.0, 0))
            count = int(count) + earlier_count
            counts[name] = count
            values[name] = float(metric.scale * total + earlier_total) / count if count > 0 else None
        for name, value in values.items():
            if value is not None:
                pl_module.log(f"eval/{name}", value, batch_size=max(1, counts[name]))
        self.results = {
            "metrics": values,
            "samples": counts,
            "higher_is_better": {k.replace("__", "/"): bool(m.higher_is_better) for k, m in self.metrics.items()},
            "method": f"{type(pl_module).__module__}.{type(pl_module).__qualname__}",
            "hparams": {k: v for k, v in dict(pl_module.hparams).items() if not k.startswith("_")},
            "backbone": getattr(pl_module.backbone, "source", type(pl_module.backbone).__name__),
            "evaluation": {"tolerance": self.tolerance, "steps": self.steps,
                           "deletion_baseline": self.deletion_baseline,
                           "insertion_baseline": self.insertion_baseline, "ground_truth": self.gt_column},
            "world_size": trainer.world_size,
            # records of earlier attempts (a resumed run) whose stored values are included
            "earlier_records": self._earlier_records,
            # rank 0's clocks for this attempt: before the first batch (e.g. a statistics pre-pass),
            # the method's own time (per batch, data loading excluded) and the metrics'
            "start_s": round(self._start_s, 3),
            "explain_s": round(self._explain_s, 3),
            "evaluate_s": round(self._eval_s, 3),
            "epoch_s": round(time.perf_counter() - self._epoch_start, 3),
        }
        if trainer.is_global_zero:
            path = self._path(trainer)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.results, indent=2, sort_keys=True, default=str) + "\n")
            shown = ", ".join(f"{k} {v:.4g}" for k, v in values.items() if v is not None)
            rank_zero_info(f"evaluation ({max(counts.values(), default=0)} samples): {shown}; written to {path}")

    def _path(self, trainer: pl.Trainer) -> Path:
        if self.results_file:
            return Path(self.results_file).expanduser()
        for cb in trainer.callbacks:
            directory = getattr(cb, "directory", None)
            if directory is not None and _is_writer(cb):
                return Path(directory) / "results.json"
        return Path(trainer.default_root_dir) / "results.json"


def _is_writer(callback: Any) -> bool:
    return isinstance(callback, AttributionWriter)


def _float32(device: torch.device) -> Any:
    """A context in which no autocast applies on ``device``."""
    return torch.autocast(device_type=device.type, enabled=False)


