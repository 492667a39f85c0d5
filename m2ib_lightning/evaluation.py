"""Evaluate attribution maps while they are computed: a callback, and the model-side perturbations.

:class:`AttributionEvaluator` sits next to the writer. After every batch it perturbs the inputs
with the batch's maps, scores them with the frozen backbone and feeds the metrics of
:mod:`m2ib_lightning.metrics`; at the end of the epoch the metrics are synced across ranks, logged
(``eval/...``) and written, with the run's settings and timings, to a results JSON next to the
attribution outputs. It works for every :class:`~m2ib_lightning.attribution.AttributionModule`
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn

from m2ib_lightning.backbones import BackboneAdapter
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.metrics import (
    ConfidenceDrop,
    ConfidenceIncrease,
    DeletionAUC,
    EnergyPointingGame,
    InsertionAUC,
    MaskAUROC,
    PointingGame,
)
from m2ib_lightning.store import Attributions, atomic_write
from m2ib_lightning.synthetic import ground_truth
from m2ib_lightning.writer import AttributionWriter

log = logging.getLogger(__name__)

Baseline = Literal["mean", "blur"]

IMAGE_METRICS = ("confidence_drop", "confidence_increase", "deletion_auc", "insertion_auc")
LOCALISATION_METRICS = ("pointing_game", "energy_pointing_game", "mask_auroc")
TEXT_METRICS = ("confidence_drop", "confidence_increase")
ALL_METRICS = (*(f"image/{m}" for m in (*IMAGE_METRICS, *LOCALISATION_METRICS)), *(f"text/{m}" for m in TEXT_METRICS))


# ------------------------------------------------------------------------ model-side perturbations
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
        ``(B, steps + 1)`` curves, ready for :class:`~m2ib_lightning.metrics.DeletionAUC` /
        :class:`~m2ib_lightning.metrics.InsertionAUC`.
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
            :func:`m2ib_lightning.synthetic.ground_truth`). Must also be listed in
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
            from m2ib_lightning.baselines import drop_tokens

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


# ------------------------------------------------------------------------------ sanity check
def vision_cascade(backbone: BackboneAdapter) -> list[tuple[str, list[nn.Module]]]:
    """Stages of the cascading randomisation of a CLIP vision tower, from the top (Adebayo et al. 2018).

    Each stage re-initialises its modules ON TOP of the previous stages': first the projection
    and the final norm, then each block from the last down, then the patch embeddings.
    """
    model = getattr(backbone, "model", None)
    if model is None or not hasattr(model, "vision_model"):
        raise ConfigError(f"cascading randomisation needs a CLIPBackbone, got {type(backbone).__name__}")
    tower = model.vision_model
    stages: list[tuple[str, list[nn.Module]]] = [("projection", [model.visual_projection, tower.post_layernorm])]
    for index in reversed(range(len(tower.encoder.layers))):
        stages.append((f"block {index}", [tower.encoder.layers[index]]))
    stages.append(("embeddings", [tower.embeddings, tower.pre_layrnorm]))
    return stages


@torch.no_grad()
def reinitialize_(modules: Sequence[nn.Module], generator: torch.Generator) -> None:
    """Replace every parameter by Gaussian noise with the mean and std of its own trained values.

    Keeping each tensor's scale keeps activations in range, so a map that changes does so because
    the learned structure is gone, not because the network's numbers blew up or vanished.
    """
    for module in modules:
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            std = p.float().std() if p.numel() > 1 else torch.tensor(0.0)
            p.copy_(p.float().mean() + std * noise)


def cascading_randomization(module: Any, batch: dict[str, Any], seed: int = 0, baseline_seed: int | None = None,
                            masks: Tensor | None = None, tolerance: float = 15.0) -> dict[str, dict[str, Tensor]]:
    """Compare each sample's image map before and after cascading randomisation of the vision tower.

    Per stage (each includes the previous ones, see :func:`vision_cascade`) and per sample:

    * ``spearman``: rank correlation of the whole map with the original map;
    * ``peak_kept``: 1 where the map's maximum stays within ``tolerance`` pixels of the original
      maximum (the whole-map correlation can stay high when the background ranks below the
      objects either way, while the object the map points at changes);
    * ``pointing``: pointing-game hits against ``masks`` ``(B, H, W)``, when given.

    Args:
        module: an attribution module (its backbone is changed in place, then restored).
        batch: a batch with ``ids`` and model inputs.
        seed: seed of the re-initialisation noise.
        baseline_seed: when set, stage ``"seed"`` compares the maps of ``module.seed`` and of this
            seed on the ORIGINAL model: the agreement a stochastic method has with itself.
        masks: ground-truth regions for the pointing game.
        tolerance: pixels, for ``peak_kept`` and the pointing game.

    Returns:
        ``{stage: {measure: (B,) tensor}}``; stage ``"original"`` holds only ``pointing``.
    """
    from m2ib_lightning.metrics import _pointing_hits, spearman

    def maps() -> Tensor:
        return module.explain_batch(batch)["image_maps"].float()

    def compare(original: Tensor, new: Tensor) -> dict[str, Tensor]:
        w = original.shape[-1]
        a, b = original.flatten(1).argmax(1), new.flatten(1).argmax(1)
        dist2 = (a // w - b // w) ** 2 + (a % w - b % w) ** 2
        out = {"spearman": torch.stack([spearman(x, y) for x, y in zip(original, new)]),
               "peak_kept": (dist2 <= tolerance**2).float()}
        if masks is not None:
            out["pointing"] = _pointing_hits(new, masks.to(new.device), tolerance)
        return out

    model = module.backbone.model
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    original = maps()
    result: dict[str, dict[str, Tensor]] = {}
    if masks is not None:
        result["original"] = {"pointing": _pointing_hits(original, masks.to(original.device), tolerance)}
    if baseline_seed is not None:
        own = module.seed
        module.seed = baseline_seed
        try:
            result["seed"] = compare(original, maps())
        finally:
            module.seed = own
    gen = torch.Generator().manual_seed(seed)
    try:
        for name, modules in vision_cascade(module.backbone):
            reinitialize_(modules, gen)
            result[name] = compare(original, maps())
    finally:
        model.load_state_dict(saved)
    return result


def load_method(config: str | Path) -> Any:
    """Instantiate the ``model:`` of a YAML config (e.g. ``configs/methods/gradcam.yaml``)."""
    from jsonargparse import ArgumentParser

    from m2ib_lightning.attribution import AttributionModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AttributionModule, "model")
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(["--config", str(config)], defaults=True)
    return parser.instantiate_classes(cfg).model


def sanity_table(methods: Sequence[str], root: Path, limit: int = 32, seed: int = 0) -> dict[str, Any]:
    """Cascading randomisation of every method on the first ``limit`` benchmark scenes.

    Returns ``{"results": {method: {stage: {measure: mean}}}, "table": markdown}``.
    """
    from PIL import Image

    from m2ib_lightning.data import Preprocessor

    pairs = root / "data" / "toy" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:limit]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        module = load_method(root / "configs" / "methods" / f"{method}.yaml")
        images = [Image.open(pairs.parent / r["image"]).convert("RGB") for r in rows]
        batch = {"ids": [r["id"] for r in rows],
                 **Preprocessor.from_backbone(module.backbone)(images, [r["caption"] for r in rows])}
        size = tuple(batch["pixel_values"].shape[-2:])
        masks = torch.stack([ground_truth(r["mask"], size) for r in rows])
        module.sides = ("vision",)
        with torch.no_grad():
            corr = cascading_randomization(module, batch, seed=seed, baseline_seed=seed + 1, masks=masks)
        results[method] = {stage: {k: float(v.float().mean()) for k, v in m.items()} for stage, m in corr.items()}
    stages = [s for s in next(iter(results.values())) if s not in ("original", "seed")]
    head = ["Method", "measure", "original", "other seed", *[f"+ {s}" if i else s for i, s in enumerate(stages)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for method, res in results.items():
        for measure, label in (("spearman", "rank corr."), ("peak_kept", "peak kept"), ("pointing", "pointing")):
            cells = [method if measure == "spearman" else "", label,
                     f"{res['original']['pointing']:.2f}" if measure == "pointing" else "-",
                     f"{res['seed'][measure]:.2f}", *[f"{res[s][measure]:.2f}" for s in stages]]
            lines.append("| " + " | ".join(cells) + " |")
    return {"results": results, "table": "\n".join(lines)}
