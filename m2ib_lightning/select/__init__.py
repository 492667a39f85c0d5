"""Choosing M2IB's bottleneck layers and variants without labels: ``python -m m2ib_lightning.select``.

Owns: the command (:mod:`.cli`), what a sweep takes (:mod:`.candidates`: layers, and the bottleneck
variants found in the package that need no extra input), a backbone wrapper that runs each tower's
lower blocks once for every layer (:mod:`.cache`), the label-free scores of a batch's maps
(:mod:`.scores`), the sweep under any trainer strategy (:mod:`.sweep`) and the ranking, intervals,
table and YAML fragment (:mod:`.ranking`). docs/selection.md says what the scores measure and how
the rule was validated.

May import: every layer below (errors, records, files, backbones, data, methods, outputs, evaluation,
report, run, api). Only :mod:`m2ib_lightning.assets` may import it; the package root does not.
"""

from m2ib_lightning.select.cache import LayerCache
from m2ib_lightning.select.candidates import Setting, Variant, discover_variants
from m2ib_lightning.select.cli import main, run
from m2ib_lightning.select.ranking import RULES, Rule, choose, summarise

__all__ = ["RULES", "LayerCache", "Rule", "Setting", "Variant", "choose", "discover_variants", "main", "run",
           "summarise"]
