"""Faithfulness and localisation of attribution maps: metrics, perturbations, the sanity check.

Owns: torchmetrics metrics with functional twins (:mod:`.metrics`), the model-side perturbations
(:mod:`.perturb`), ground-truth regions (:mod:`.ground_truth`), the evaluation of one batch's
explanation, a pure function of (backbone, explanation, batch) (:mod:`.evaluator`), and the
model-randomisation sanity check (:mod:`.sanity`).

May import: :mod:`m2ib_lightning.errors`, :mod:`m2ib_lightning.records`, :mod:`m2ib_lightning.files`,
:mod:`m2ib_lightning.backbones`, :mod:`m2ib_lightning.methods` (token dropping, shared with RISE).
Never outputs, run, report or assets.
"""

from m2ib_lightning.evaluation.evaluator import ALL_METRICS, AttributionEvaluator
from m2ib_lightning.evaluation.ground_truth import decode_mask, encode_mask, ground_truth
from m2ib_lightning.evaluation.perturb import keep_above_median, perturbation_curves, similarity
from m2ib_lightning.evaluation.sanity import cascading_randomization, reinitialize_, vision_cascade

__all__ = ["ALL_METRICS", "AttributionEvaluator", "cascading_randomization", "decode_mask", "encode_mask",
           "ground_truth", "keep_above_median", "perturbation_curves", "reinitialize_", "similarity",
           "vision_cascade"]
