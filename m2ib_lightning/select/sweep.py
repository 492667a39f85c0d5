"""Running a sweep: every setting on every pair of this rank, per-sample scores gathered on rank 0.

:class:`SweepModule` is a LightningModule run by ``Trainer.fit`` with the configured accelerator,
devices, strategy and precision, so the sweep runs wherever a fit runs, ``m2ib_ddp`` included. Its
training steps only collect the rank's batches (the data module shards the pairs across ranks);
at the end of the epoch it runs every setting on them, the settings in the outer loop (one progress
line each), the batches in the inner one, with the towers' lower blocks shared between all layers
(:class:`~m2ib_lightning.select.cache.LayerCache`). Each rank explains its own pairs for every setting;
the per-sample scores are then gathered on every rank (``all_gather_object``) and read on rank 0.

Per setting and batch: the M2IB maps (``explain_batch`` of an ``M2IBAttribution`` built for the
setting, explaining that side only) and the label-free scores of :mod:`.scores`. Then the
randomisation check (the maps again, with the tower above the bottleneck re-initialised), which
costs as much as the sweep itself: by default only for the settings whose check can change the
choice (the rule's best and, for a one-standard-error rule, those it cannot tell from the best;
those ranked above the choice were checked and rejected), rechecked until the choice stands. The
choice is then the one checking every setting would give; ``randomisation="all"`` checks them all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from m2ib_lightning.backbones import Side
from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.records import Explanation
from m2ib_lightning.select.cache import LayerCache
from m2ib_lightning.select.candidates import Setting
from m2ib_lightning.select.scores import (
    caption_words,
    image_scores,
    randomisation_scores,
    randomised_above,
    word_scores,
)

__all__ = ["Scores", "SweepModule", "merge"]

#: ``{setting key: {score name: {sample id: value}}}``
Scores = dict[str, dict[str, dict[str, float]]]
#: an extra scorer (e.g. a labelled one in a validation script): ``(setting, explanation, batch) -> {name: (B,)}``
Scorer = Callable[[Setting, Explanation, dict[str, Any]], dict[str, torch.Tensor]]


class SweepModule(AttributionModule):
    """Explains this rank's pairs under every setting and scores the maps.

    Args:
        backbone: the configured backbone behind a :class:`LayerCache`.
        settings: the sweep, in order.
        build: ``setting -> M2IBAttribution`` explaining ``setting.side`` only.
        evaluation: ``{"steps", "deletion_baseline", "insertion_baseline", "tolerance"}`` (tolerance in
            pixels of the model's input) of the image curves and the peak check.
        randomisation: ``"all"``: every setting's maps are explained again with the tower above its
            bottleneck re-initialised; ``"needed"``: only the settings ``pending`` names, until it names
            none (the check is costly: as much as the sweep); ``"none"``: never.
        pending: ``scores -> settings`` whose randomisation check could still change the choice, given
            everything gathered so far (every rank gets the same scores, so every rank agrees).
        seed: seed of the re-initialisation.
        progress: called on rank 0 after each setting with ``(index, total, setting, scores, seconds)``.
        scorers: more per-sample scores (labelled ones, for validation only).
    """

    def __init__(self, backbone: LayerCache, settings: list[Setting], build: Callable[[Setting], Any],
                 evaluation: dict[str, Any], randomisation: str = "needed",
                 pending: Callable[[Scores], list[Setting]] | None = None, seed: int = 0,
                 progress: Callable[..., None] | None = None, scorers: list[Scorer] | None = None) -> None:
        sides = tuple(dict.fromkeys(s.side for s in settings)) or ("vision",)
        super().__init__(backbone, sides=sides, seed=seed)
        if randomisation not in ("all", "needed", "none"):
            raise ValueError(f"randomisation must be 'all', 'needed' or 'none', got {randomisation!r}")
        self.settings, self.build = settings, build
        self.evaluation, self.randomisation, self.pending = dict(evaluation), randomisation, pending
        self.progress, self.scorers = progress, list(scorers or [])
        self.batches: list[dict[str, Any]] = []
        self.scores: Scores = {}
        self.pairs = 0
        self.seconds: dict[str, float] = {}
        self.checked: list[str] = []

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if batch["ids"]:  # padding batches (DDP) and all-skipped batches hold nothing to explain
            self.batches.append(batch)

    def on_train_epoch_end(self) -> None:
        with self.trainer.precision_plugin.forward_context(), self.backbone.serving(
                [self.model_inputs(b) for b in self.batches]):
            local, originals = self.sweep()
            self.scores, self.pairs = merge(gather(local))
            if self.randomisation == "none":
                return
            while True:
                if self.randomisation == "all":
                    todo = list(self.settings)
                else:
                    todo = self.pending(self.scores) if self.pending is not None else []
                todo = [s for s in todo if s.key not in self.checked]
                if not todo:
                    return
                for setting in todo:
                    start = time.perf_counter()
                    module = self.build(setting).to(self.device)
                    for j, batch in enumerate(self.batches):
                        values = self.randomised(module, setting, batch, originals[setting.key][j])
                        for name, v in values.items():
                            local[setting.key].setdefault(name, {}).update(
                                zip(batch["ids"], v.detach().double().cpu().tolist()))
                    self.checked.append(setting.key)
                    seconds = time.perf_counter() - start
                    self.seconds[setting.key] = self.seconds.get(setting.key, 0.0) + seconds
                    if self.progress is not None and self.trainer.is_global_zero:
                        self.progress(None, None, setting, local[setting.key], seconds)
                self.scores, self.pairs = merge(gather(local))

    # ------------------------------------------------------------------------------- the sweep
    def sweep(self) -> tuple[Scores, dict[str, list[Explanation]]]:
        """This rank's per-sample scores of every setting (without the randomisation check), and each
        setting's explanations per batch (what the check compares with)."""
        out: Scores = {}
        originals: dict[str, list[Explanation]] = {}
        backbone: LayerCache = self.backbone
        clean: dict[int, dict[Side, torch.Tensor]] = {}
        for index, setting in enumerate(self.settings):
            start = time.perf_counter()
            module = self.build(setting).to(self.device)
            values: dict[str, dict[str, float]] = {}
            originals[setting.key] = []
            for j, batch in enumerate(self.batches):
                if j not in clean:
                    inputs = self.model_inputs(batch)
                    with torch.no_grad():
                        clean[j] = {side: backbone.embed(side, inputs).float() for side in ("vision", "text")}
                explanation, scores = self.score_batch(module, setting, batch, clean[j])
                originals[setting.key].append(explanation)
                for name, v in scores.items():
                    values.setdefault(name, {}).update(zip(batch["ids"], v.detach().double().cpu().tolist()))
            out[setting.key] = values
            self.seconds[setting.key] = time.perf_counter() - start
            if self.progress is not None and self.trainer.is_global_zero:
                self.progress(index, len(self.settings), setting, values, self.seconds[setting.key])
        return out, originals

    def score_batch(self, module: Any, setting: Setting, batch: dict[str, Any],
                    clean: dict[Side, torch.Tensor]) -> tuple[Explanation, dict[str, torch.Tensor]]:
        """One setting's explanation of one batch and its per-sample label-free scores."""
        inputs = self.model_inputs(batch)
        explanation = module.explain_batch(batch)
        if setting.side == "vision":
            scores = image_scores(self.backbone, inputs["pixel_values"], explanation.image_maps, clean["text"],
                                  self.evaluation["steps"], self.evaluation["deletion_baseline"],
                                  self.evaluation["insertion_baseline"])
        else:
            scores = word_scores(self.backbone, inputs["input_ids"], inputs["attention_mask"],
                                 explanation.text_scores, clean["vision"])
        for scorer in self.scorers:
            scores.update(scorer(setting, explanation, batch))
        # what the randomisation check compares with: the maps only
        kept = Explanation(ids=explanation.ids, similarity=explanation.similarity, image_maps=explanation.image_maps,
                           text_scores=explanation.text_scores)
        return kept, scores

    def randomised(self, module: Any, setting: Setting, batch: dict[str, Any], original: Explanation
                   ) -> dict[str, torch.Tensor]:
        """The randomisation scores of one setting on one batch: its maps again, with the tower above the
        bottleneck re-initialised, against ``original``."""
        with randomised_above(self.backbone, setting.side, setting.layer, self.seed):
            shuffled = module.explain_batch(batch)
        if setting.side == "vision":
            return randomisation_scores("vision", original, shuffled, self.evaluation["tolerance"])
        inputs = self.model_inputs(batch)
        words = caption_words(self.backbone, inputs["input_ids"], inputs["attention_mask"])
        return randomisation_scores("text", original, shuffled, 0.0, words)


def gather(local: Scores) -> list[Scores]:
    """Every rank's scores (a collective under a process group; ``[local]`` without one)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [local]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


def merge(parts: list[Scores]) -> tuple[Scores, int]:
    """One ``{setting: {score: {id: value}}}`` from the ranks' parts, and the number of distinct pairs."""
    out: Scores = {}
    ids: set[str] = set()
    for part in parts:
        for key, values in part.items():
            for name, per_id in values.items():
                out.setdefault(key, {}).setdefault(name, {}).update(per_id)
                ids.update(per_id)
    return out, len(ids)
