"""The base LightningModule of every attribution method: frozen-backbone plumbing and the output contract.

A method subclasses :class:`AttributionModule` and implements :meth:`AttributionModule.explain_batch`,
which maps a batch to an :class:`~m2ib_lightning.records.Explanation`, built from clean embeddings and
raw scores with :meth:`AttributionModule.outputs` (which reads raw scores out as maps the same way for
every method). ``training_step`` adds the batch's skips and logs, so ``python train.py fit`` runs any
method; it returns ``{"explanation": Explanation}`` (Lightning's manual optimisation wants a dict),
which the sink callback (:class:`~m2ib_lightning.run.writer.AttributionWriter`) evaluates and writes.
"""

from __future__ import annotations

import functools
import inspect
import json
import time
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side, tokenizer_fingerprint, weights_fingerprint
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.readout import image_map, text_map
from m2ib_lightning.methods.strategy import check_strategy
from m2ib_lightning.records import Explanation, Skip

MODEL_INPUTS = ("pixel_values", "input_ids", "attention_mask")


class AttributionModule(pl.LightningModule):
    """Owns the frozen backbone and runs one ``explain_batch`` per training step (manual optimisation).

    Args:
        backbone: the frozen dual encoder, e.g. ``m2ib_lightning.CLIPBackbone``. Kept out of
            ``parameters()``, ``state_dict()`` and checkpoints; moved to the device with the module.
        sides: which maps to compute: ``["vision", "text"]``, or only one of them.
        seed: seed of the method's randomness; each (seed, side, sample id) has its own stream.
    """

    #: state_dict keys starting with these are per-batch scratch, never saved or loaded
    transient_prefixes: tuple[str, ...] = ()

    def __init__(self, backbone: BackboneAdapter, sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__()
        self.automatic_optimization = False
        if not isinstance(backbone, BackboneAdapter):
            raise ConfigError(f"backbone must be a BackboneAdapter, got {type(backbone).__name__}")
        sides = tuple(dict.fromkeys(sides))
        if not sides or any(s not in SIDES for s in sides):
            raise ConfigError(f"sides must be a non-empty subset of {list(SIDES)}, got {list(sides)}")
        # Plain attribute, not a submodule: the frozen weights stay out of parameters(),
        # state_dict(), checkpoints and DDP's parameter broadcast. `_apply` moves it.
        object.__setattr__(self, "backbone", backbone)
        backbone.eval().requires_grad_(False)
        self.sides: tuple[Side, ...] = sides
        self.seed = seed

    # ----------------------------------------------------------------- frozen backbone plumbing
    def _apply(self, fn, recurse: bool = True):  # type: ignore[override]
        super()._apply(fn, recurse)
        self.backbone._apply(fn, recurse)
        return self

    def train(self, mode: bool = True) -> AttributionModule:
        super().train(mode)
        self.backbone.eval()
        return self

    def _transient(self, key: str) -> bool:
        return bool(self.transient_prefixes) and key.startswith(self.transient_prefixes)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Without per-batch scratch; the backbone is never in it (it is loaded from its source)."""
        sd = super().state_dict(*args, **kwargs)
        for key in [k for k in sd if self._transient(k)]:
            del sd[key]
        return sd

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False):  # type: ignore[override]
        kept = {k: v for k, v in state_dict.items() if not self._transient(k)}
        result = super().load_state_dict(kept, strict=False, assign=assign)
        missing = [k for k in result.missing_keys if not self._transient(k)]
        if strict and (missing or result.unexpected_keys):
            raise RuntimeError(f"state_dict mismatch: missing keys {missing}, unexpected keys {result.unexpected_keys}")
        return result

    def configure_optimizers(self) -> Any:
        return None

    def settings(self) -> dict[str, Any]:
        """What determines this method's maps, JSON-ready: stored with the outputs, and compared
        when a run resumes into the same directory.

        The method, its hyperparameters, the backbone (source, a fingerprint of its weights and
        of its tokenizer's vocabulary and maximum length) and, for modules with bottlenecks, each
        bottleneck's class and scalar settings.
        """
        out: dict[str, Any] = {
            "method": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": str(getattr(self.backbone, "source", type(self.backbone).__name__)),
            "weights": weights_fingerprint(self.backbone),
            **{k: v for k, v in self.hparams.items() if not k.startswith("_")},
        }
        bottlenecks = getattr(self, "bottlenecks", None)
        if bottlenecks is not None:
            out["bottlenecks"] = {
                side: {"class": f"{type(b).__module__}.{type(b).__qualname__}",
                       **{k: v for k, v in sorted(vars(b).items())
                          if not k.startswith("_") and k != "training" and isinstance(v, str | int | float | bool)}}
                for side, b in bottlenecks.items() if side in self.sides
            }
        processor = getattr(self.backbone, "image_processor", None)
        if hasattr(processor, "to_dict"):  # the same weights under other preprocessing make other maps
            # (not its class name: transformers picks a torchvision or PIL backend by what is installed)
            out["image_processor"] = {k: v for k, v in processor.to_dict().items()
                                      if k not in ("image_processor_type", "processor_class") and not k.startswith("_")}
        tokenizer = tokenizer_fingerprint(getattr(self.backbone, "tokenizer", None))
        if tokenizer is not None:  # the same weights fed other token ids make other maps
            out["tokenizer"] = tokenizer
        factory = getattr(self, "optimizer_factory", None)
        if factory is not None:
            out["optimizer"] = _describe(factory)
        return json.loads(json.dumps(out, sort_keys=True, default=str))

    def setup(self, stage: str) -> None:
        check_strategy(self.trainer)

    # -------------------------------------------------------------------------- the contract
    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        """Explain one batch: ``batch`` holds ``ids`` and model inputs."""
        raise NotImplementedError

    @staticmethod
    def model_inputs(batch: dict[str, Any]) -> dict[str, Tensor]:
        return {k: batch[k] for k in MODEL_INPUTS if k in batch}

    def outputs(self, batch: dict[str, Any], image: Tensor, text: Tensor,
                vision_scores: Tensor | None = None, text_scores: Tensor | None = None,
                pixel_maps: Tensor | None = None) -> Explanation:
        """The batch's :class:`~m2ib_lightning.records.Explanation` from clean embeddings and raw scores.

        Args:
            batch: the input batch (``ids``, ``pixel_values``, ``input_ids``, ``attention_mask``).
            image: clean image embeddings ``(B, P)``; ``text``: clean text embeddings ``(B, P)``.
            vision_scores: raw score per vision token ``(B, L)`` (prefix tokens included), read out
                as the reference does: prefix dropped, patch grid upsampled, min-max normalised.
            text_scores: raw score per text token ``(B, L)``; each caption's valid tokens are
                min-max normalised.
            pixel_maps: raw pixel-level maps ``(B, H, W)`` for methods that work in pixel space
                (min-max normalised per map); exclusive with ``vision_scores``.
        """
        out = Explanation(
            ids=list(batch["ids"]),
            similarity=F.cosine_similarity(image.float(), text.float(), dim=-1).detach().cpu(),
        )
        pixels = batch.get("pixel_values")
        if vision_scores is not None:
            patches = vision_scores.detach()[:, self.backbone.vision_prefix_tokens :].float()
            out.grid = self.backbone.vision_grid(pixels)
            out.patch_scores = patches.cpu()
            out.image_maps = image_map(patches, out.grid, tuple(pixels.shape[-2:])).cpu()
        elif pixel_maps is not None:
            raw = pixel_maps.detach().float()
            out.image_maps = image_map(raw.flatten(1), tuple(raw.shape[-2:]), tuple(raw.shape[-2:])).cpu()
            # The records keep a raw score per patch for every method; for a pixel-space method it
            # is the map's mean over each patch, so writers and readers need no special case.
            out.grid = self.backbone.vision_grid(pixels) if pixels is not None else tuple(raw.shape[-2:])
            out.patch_scores = F.adaptive_avg_pool2d(raw.unsqueeze(1), out.grid).flatten(1).cpu()
        if text_scores is not None:
            valid = batch["attention_mask"].bool().cpu()
            scores = text_scores.detach().float().cpu()
            out.text_scores = [text_map(s[v]) for s, v in zip(scores, valid)]
            out.tokens = self.backbone.tokens(batch["input_ids"].cpu(), valid)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, Explanation]:
        """Explain the batch; its skips, and the repairs of the pairs it explains, ride along."""
        skipped = [Skip.from_dict(s, "skipped") for s in batch.get("skipped", [])]
        ids = set(batch["ids"])
        repaired = [Skip.from_dict(r, "repaired") for r in batch.get("repaired", []) if r["id"] in ids]
        # Logged on every step (0 included), so that every rank logs the same keys for the epoch-end sync.
        for name, entries in (("skipped", skipped), ("repaired", repaired)):
            self.log(name, float(len(entries)), reduce_fx="sum", on_step=False, on_epoch=True, sync_dist=True,
                     batch_size=1)
        if not batch["ids"]:
            return {"explanation": Explanation.empty(skipped)}
        start = time.perf_counter()
        out = self.explain_batch(batch)
        out.skipped = skipped + repaired
        n = len(out)
        elapsed = time.perf_counter() - start
        if out.loss is not None:
            self.log("loss", out.loss / n, batch_size=n)
        for name, value in out.terms.items():
            self.log(name, value, batch_size=n)
        self.log("pairs_per_s", n / max(elapsed, 1e-9), prog_bar=True, batch_size=n)
        return {"explanation": out}


def _describe(factory: Any) -> Any:
    """A JSON-ready, run-independent description of an optimiser factory: a function's or class's
    name; for a partial (what the CLI builds from ``class_path`` + ``init_args``, nested inside
    jsonargparse's helpers) its target and arguments; any other object by its type, never by a
    ``repr`` that may hold a memory address."""
    if isinstance(factory, functools.partial):
        return {"call": _describe(factory.func), "args": [_describe(a) for a in factory.args],
                "kwargs": {k: _describe(v) for k, v in sorted(factory.keywords.items())}}
    if isinstance(factory, str | int | float | bool) or factory is None:
        return factory
    if isinstance(factory, list | tuple):
        return [_describe(v) for v in factory]
    if isinstance(factory, dict):
        return {str(k): _describe(v) for k, v in sorted(factory.items(), key=lambda kv: str(kv[0]))}
    if isinstance(factory, type) or inspect.isroutine(factory):
        return f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', type(factory).__name__)}"
    return f"{type(factory).__module__}.{type(factory).__qualname__}"
