"""From per-sample scores to a choice: derived scores, bootstrap intervals, the rules, the table, the fragment.

Each side is its own problem (the vision and the text maps of M2IB are separate optimisations), so
each side's settings are ranked among themselves, on the pairs that every one of them scored.

Scores per pair (``higher`` says which way is better), from :mod:`.scores`:

==================  ======  ==============================================================================
``deletion``        no      area under the similarity while the most relevant pixels (words) are deleted
``insertion``       yes     area under the similarity while they are inserted into the baseline
``gap``             yes     ``insertion - deletion``: how far apart the two curves are; 0 for a map that
                            orders the input at random (both curves then sink or rise alike)
``deletion_norm``   no      deletion area rescaled by the pair's own drop: ``(area - deleted) /
                            (clean - deleted)``, so that pairs with a large similarity do not weigh more
``insertion_norm``  yes     likewise ``(area - inserted_from) / (clean - inserted_from)``
``gap_norm``        yes     ``insertion_norm - deletion_norm``
``gap_rank``        no      on each pair, the setting's rank by ``gap`` among the side's settings (1: the
                            best; ties share their mean rank), averaged over the pairs. Each pair counts
                            alike, whatever the scale of its similarities, and anything that shifts or
                            scales every setting's score of a pair alike (the pair's own similarity, a
                            deletion baseline that differs from the insertion one) cancels
``deletion_rank``   no      likewise for ``deletion``
``rand_spearman``   no      rank correlation of the map with the map after re-initialising the tower
                            above the bottleneck (high: the map does not depend on what the model does
                            with the hidden states: it fails the sanity check)
``rand_peak_kept``  no      fraction of maps whose peak stays in place after that re-initialisation
==================  ======  ==============================================================================

Intervals are percentile bootstrap intervals over the pairs (95%, the same resampled pairs for all
settings of a side); ``se`` is the standard error of the mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.select.candidates import Setting
from m2ib_lightning.select.sweep import Scores

__all__ = ["DEFAULT_RULE", "HIGHER", "RULES", "Rule", "Summary", "choose", "derive", "pair_ranks", "partner",
           "summarise",
           "to_check"]

#: whether a larger value of a score is better
HIGHER = {"deletion": False, "insertion": True, "gap": True, "deletion_norm": False, "insertion_norm": True,
          "gap_norm": True, "gap_rank": False, "deletion_rank": False, "rand_spearman": False,
          "rand_peak_kept": False}
#: per-pair ranks among a side's settings: rank score -> the score ranked
RANKED = {"gap_rank": "gap", "deletion_rank": "deletion"}
#: the smallest per-pair drop (clean - deleted similarity) a normalised score divides by
MIN_DROP = 1e-3


def derive(values: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Add the derived per-pair scores (``gap``, the normalised areas) to one setting's scores."""
    out = {k: dict(v) for k, v in values.items()}
    if not {"deletion", "insertion", "clean", "deleted", "inserted_from"} <= set(values):
        return out
    gap, dn, inn, gn = {}, {}, {}, {}
    for i, dele in values["deletion"].items():
        ins = values["insertion"].get(i, math.nan)
        clean, deleted, start = values["clean"][i], values["deleted"][i], values["inserted_from"][i]
        gap[i] = ins - dele
        drop, rise = clean - deleted, clean - start
        dn[i] = (dele - deleted) / drop if drop > MIN_DROP else math.nan
        inn[i] = (ins - start) / rise if rise > MIN_DROP else math.nan
        gn[i] = inn[i] - dn[i]
    out.update(gap=gap, deletion_norm=dn, insertion_norm=inn, gap_norm=gn)
    return out


@dataclass
class Summary:
    """One setting's scores over the pairs: mean, standard error and bootstrap interval per score.

    Attributes:
        values: per score, the per-pair values in the order of the side's common pairs (NaN kept).
        rejected: why the rule leaves this setting out (``None``: it is a candidate).
    """

    setting: Setting
    n: int
    mean: dict[str, float] = field(default_factory=dict)
    se: dict[str, float] = field(default_factory=dict)
    low: dict[str, float] = field(default_factory=dict)
    high: dict[str, float] = field(default_factory=dict)
    values: dict[str, np.ndarray] = field(default_factory=dict)
    rejected: str | None = None


def summarise(settings: Sequence[Setting], scores: Scores, resamples: int = 1000, seed: int = 0
              ) -> dict[str, list[Summary]]:
    """Per side, one :class:`Summary` per setting (in the sweep's order), on the pairs every setting of
    the side scored; bootstrap intervals with ``resamples`` draws of the pairs, shared by the settings."""
    out: dict[str, list[Summary]] = {}
    for side in dict.fromkeys(s.side for s in settings):
        mine = [s for s in settings if s.side == side and s.key in scores]
        if not mine:
            continue
        derived = {s.key: derive(scores[s.key]) for s in mine}
        ids = sorted(set.intersection(*(set(derived[s.key].get("deletion", {})) for s in mine)))
        if not ids:
            raise ConfigError(f"no pair was scored under every {side} setting")
        rng = np.random.default_rng(seed)
        draws = rng.integers(0, len(ids), size=(resamples, len(ids)))
        values = {s.key: {name: np.array([per_id.get(i, math.nan) for i in ids], dtype=np.float64)
                          for name, per_id in derived[s.key].items()} for s in mine}
        for rank_name, base in RANKED.items():
            if all(base in values[s.key] for s in mine):
                ranks = pair_ranks(np.stack([values[s.key][base] for s in mine]), HIGHER[base])
                for s, row in zip(mine, ranks):
                    values[s.key][rank_name] = row
        rows = []
        for s in mine:
            summary = Summary(setting=s, n=len(ids))
            for name, v in values[s.key].items():
                summary.values[name] = v
                ok = ~np.isnan(v)
                if not ok.any():
                    continue
                summary.mean[name] = float(v[ok].mean())
                summary.se[name] = float(v[ok].std(ddof=1) / math.sqrt(ok.sum())) if ok.sum() > 1 else math.nan
                boot = _nanmean_rows(v[draws])
                summary.low[name], summary.high[name] = (float(np.nanpercentile(boot, 2.5)),
                                                         float(np.nanpercentile(boot, 97.5)))
            rows.append(summary)
        out[side] = rows
    return out


def pair_ranks(scores: np.ndarray, higher: bool) -> np.ndarray:
    """``(S, P)`` scores of S settings on P pairs -> each setting's rank on each pair (1: the best; ties
    share their mean rank; NaN where the setting has no score for the pair, which is left out of that
    pair's ranking)."""
    out = np.full(scores.shape, np.nan)
    for p in range(scores.shape[1]):
        column = scores[:, p]
        ok = ~np.isnan(column)
        if not ok.any():
            continue
        v = -column[ok] if higher else column[ok]
        order = np.argsort(v, kind="stable")
        ranks = np.empty(len(v))
        ranks[order] = np.arange(1, len(v) + 1)
        for value in np.unique(v):  # ties: their mean rank
            tied = v == value
            if tied.sum() > 1:
                ranks[tied] = ranks[tied].mean()
        out[ok, p] = ranks
    return out


def _nanmean_rows(x: np.ndarray) -> np.ndarray:
    ok = ~np.isnan(x)
    counts = ok.sum(1)
    sums = np.where(ok, x, 0.0).sum(1)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


@dataclass(frozen=True)
class Rule:
    """How a side's setting is chosen.

    Attributes:
        score: the score ranked by (:data:`HIGHER` says the direction).
        max_rand_spearman: leave out settings whose mean ``rand_spearman`` is above this (``None``: no filter).
        one_se: among the settings whose paired difference to the best is within one standard error
            of that difference, take the first in the sweep's order of preference (:func:`preference`)
            instead of the best.
        combine: also bottleneck the best setting's runner-up layer (:func:`partner`) when the data
            cannot rank the two apart, and average the two maps (``MultiLayerM2IB``).
    """

    score: str
    max_rand_spearman: float | None = None
    one_se: bool = False
    combine: bool = False

    def describe(self) -> str:
        parts = [f"{'highest' if HIGHER[self.score] else 'lowest'} mean {self.score}"]
        if self.max_rand_spearman is not None:
            parts.append(f"among settings whose maps change under randomisation (mean rand_spearman <= "
                         f"{self.max_rand_spearman:g})")
        if self.one_se:
            parts.append("one-standard-error rule towards the reference bottleneck and shallower layers")
        if self.combine:
            parts.append("combined with the same bottleneck's next layer when its mean lies inside the best's "
                         "95% interval (the two maps averaged, MultiLayerM2IB)")
        return ", ".join(parts)


#: above this mean ``rand_spearman`` a map counts as surviving the randomisation (the "+sanity" rules)
SURVIVES = 0.9

RULES: dict[str, Rule] = {
    "deletion": Rule("deletion"),
    "insertion": Rule("insertion"),
    "gap": Rule("gap"),
    "deletion_norm": Rule("deletion_norm"),
    "gap_norm": Rule("gap_norm"),
    "deletion_rank": Rule("deletion_rank"),
    "gap_rank": Rule("gap_rank"),
    "deletion+sanity": Rule("deletion", max_rand_spearman=SURVIVES),
    "gap+sanity": Rule("gap", max_rand_spearman=SURVIVES),
    "gap_rank+sanity": Rule("gap_rank", max_rand_spearman=SURVIVES),
    "gap_rank+sanity0.5": Rule("gap_rank", max_rand_spearman=0.5),
    "deletion+sanity+1se": Rule("deletion", max_rand_spearman=SURVIVES, one_se=True),
    "gap_rank+sanity+1se": Rule("gap_rank", max_rand_spearman=SURVIVES, one_se=True),
    "gap_rank+sanity+combine": Rule("gap_rank", max_rand_spearman=SURVIVES, combine=True),
}
DEFAULT_RULE = "gap_rank+sanity+combine"


def preference(summary: Summary) -> tuple[int, int]:
    """Order of preference among settings the one-SE rule cannot tell apart: the reference bottleneck
    first, then the shallower layer."""
    return (summary.setting.variant.class_path.rsplit(".", 1)[1] != "M2IB", summary.setting.layer)


def choose(rows: list[Summary], rule: Rule) -> tuple[Summary | None, list[Summary]]:
    """The chosen setting of one side and the side's settings ranked best first (rejected ones last,
    each with its reason in ``rejected``). ``None`` when no setting has the score."""
    sign = 1.0 if HIGHER[rule.score] else -1.0
    for row in rows:
        row.rejected = None
        if rule.score not in row.mean:
            row.rejected = f"no {rule.score}"
        elif rule.max_rand_spearman is not None:
            rho = row.mean.get("rand_spearman")
            if rho is not None and rho > rule.max_rand_spearman:
                row.rejected = f"map survives randomisation (rand_spearman {rho:.2f} > {rule.max_rand_spearman:g})"
    ranked = sorted(rows, key=lambda r: (r.rejected is not None, -sign * r.mean.get(rule.score, -math.inf * sign)))
    candidates = [r for r in ranked if r.rejected is None]
    if not candidates:
        return None, ranked
    best = candidates[0]
    if rule.one_se:
        close = [r for r in candidates if _within_one_se(best, r, rule.score, sign)]
        best = min(close, key=preference)
    return best, ranked


def partner(best: Summary | None, ranked: list[Summary], rule: Rule) -> Summary | None:
    """For a combining rule: the best-ranked candidate with ``best``'s bottleneck (class and arguments) at
    another layer, if its mean score lies inside ``best``'s 95% bootstrap interval, i.e. if these pairs
    cannot rank the two layers apart. Averaging the two layers' maps then hedges a choice the data
    does not make; a runner-up outside the interval is left out, so a clearly best layer stays alone.
    Unchecked randomisation counts as passing (:func:`to_check` asks for the check)."""
    if not rule.combine or best is None:
        return None
    config = best.setting.variant.config()
    for row in ranked:
        if (row.rejected is None and row is not best and row.setting.layer != best.setting.layer
                and row.setting.variant.config() == config):
            mean = row.mean.get(rule.score)
            if mean is not None and best.low[rule.score] <= mean <= best.high[rule.score]:
                return row
            return None
    return None


def to_check(rows: list[Summary], rule: Rule) -> list[Setting]:
    """The settings whose randomisation check (not run yet: no ``rand_spearman``) could change the choice
    of ``rule``: the one it would choose, counting unchecked settings as passing, and for a one-SE rule
    every setting it cannot tell from the best. Settings ranked above those were checked (and rejected)."""
    if rule.max_rand_spearman is None:
        return []
    best, ranked = choose(rows, rule)
    if best is None:
        return []
    sign = 1.0 if HIGHER[rule.score] else -1.0
    top = next(r for r in ranked if r.rejected is None)
    needed = [top, best] + ([r for r in ranked if r.rejected is None and _within_one_se(top, r, rule.score, sign)]
                           if rule.one_se else [])
    other = partner(best, ranked, rule)
    if other is not None:
        needed.append(other)
    return list(dict.fromkeys(r.setting for r in needed if "rand_spearman" not in r.mean))


def _within_one_se(best: Summary, other: Summary, score: str, sign: float) -> bool:
    d = sign * (best.values[score] - other.values[score])
    d = d[~np.isnan(d)]
    if len(d) < 2:
        return other is best
    return float(d.mean()) <= float(d.std(ddof=1) / math.sqrt(len(d)))


def table(rows: list[Summary], chosen: Summary | None, rule: Rule, columns: Sequence[str],
          also: Summary | None = None) -> str:
    """A markdown table of one side's ranked settings: mean [95% interval] per score (``also``: the
    chosen setting's partner layer, :func:`partner`)."""
    heads = ["rank", "setting", *(f"{c} {'↑' if HIGHER.get(c, True) else '↓'}" for c in columns), "note"]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    for i, row in enumerate(rows, 1):
        cells = [str(i) if row.rejected is None else "-", row.setting.label().strip()]
        for c in columns:
            cells.append(f"{row.mean[c]:.3f} [{row.low[c]:.3f}, {row.high[c]:.3f}]" if c in row.mean else "n/a")
        note = "**chosen**" if row is chosen else "**chosen, combined**" if row is also else (row.rejected or "")
        if rule.max_rand_spearman is not None and "rand_spearman" not in row.mean and row.rejected is None:
            note = (note + "; " if note else "") + "randomisation not checked"
        lines.append("| " + " | ".join(cells + [note]) + " |")
    return "\n".join(lines)


def fragment(chosen: dict[str, Summary], header: Sequence[str],
             partners: dict[str, Summary] | None = None) -> str:
    """The YAML fragment that makes ``train.py fit`` use the chosen settings (after the same configs).

    With a partner on a side (:func:`partner`; only when both sides were chosen) the model becomes
    ``MultiLayerM2IB`` with that side's two layers, the best first, and the other side's one layer."""
    import yaml

    partners = {side: p for side, p in (partners or {}).items() if p is not None}
    model: dict[str, Any] = {}
    init: dict[str, Any] = {}
    multi = bool(partners) and set(chosen) == {"vision", "text"}
    if multi:
        model["class_path"] = "m2ib_lightning.MultiLayerM2IB"
    for side in ("vision", "text"):
        if side in chosen:
            setting = chosen[side].setting
            if multi:
                init[f"{side}_layers"] = [setting.layer] + ([partners[side].setting.layer] if side in partners else [])
            else:
                init[f"{side}_layer"] = setting.layer
            init[f"{side}_bottleneck"] = setting.variant.config()
    model["init_args"] = init
    body = yaml.safe_dump({"model": model}, sort_keys=False, default_flow_style=False)
    return "".join(f"# {line}\n" if line else "#\n" for line in header) + body
