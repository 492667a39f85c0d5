"""The typed records that cross the package's boundaries.

* :class:`Explanation`: what a method returns for one batch (ids, maps, token scores, similarity)
  and what the sink adds (per-sample metric values) before the run directory writes it;
* :class:`Skip`: a row that was not explained (``kind="skipped"``) or was explained in a repaired
  form (``kind="repaired"``), as it travels from the data layer to the skip manifest.

This module imports nothing from the package: every layer may use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import Tensor

__all__ = ["Explanation", "Skip"]


@dataclass(frozen=True)
class Skip:
    """A manifest entry: a row left out (``skipped``) or explained in a repaired form (``repaired``).

    Attributes:
        id: the sample id.
        reason: why, in words a user can act on (``"undecodable caption: not UTF-8 ..."``).
        kind: ``"skipped"`` (no record) or ``"repaired"`` (a record exists; e.g. a truncated caption).
        transient: a failure that a later attempt may not repeat (a URL that timed out): a resumed
            run tries the row again.
        duplicate: the row was left out because an earlier row of the same reader's stream had the
            same id (``reason`` starts with ``"duplicate id"``); run-wide summaries count these apart.
        source: where in the data the row is, when the data layer knows it: ``{"file": ..., "line":
            21, "row": 20}`` for a line that did not parse (``line`` 1-based as editors show it,
            ``row`` the 0-based position that derived ids use), ``{"file", "row_group", "rows": [first,
            last]}`` for a parquet row group, ``{"file", "member", "row"}`` for a tar member,
            ``{"file", "row"}`` for a duplicate.
    """

    id: str
    reason: str
    kind: Literal["skipped", "repaired"] = "skipped"
    transient: bool = False
    duplicate: bool = False
    source: Mapping[str, Any] | None = field(default=None, hash=False)

    @classmethod
    def from_dict(cls, entry: Mapping[str, Any], kind: Literal["skipped", "repaired"] | None = None) -> Skip:
        """From the dicts the data layer puts in a batch (``{"id", "reason"[, "transient"][, "duplicate"][,
        "source"]}``)."""
        source = entry.get("source")
        return cls(id=str(entry["id"]), reason=str(entry["reason"]), kind=kind or entry.get("kind", "skipped"),
                   transient=bool(entry.get("transient", False)), duplicate=bool(entry.get("duplicate", False)),
                   source=dict(source) if source else None)

    def to_json(self) -> dict[str, Any]:
        """The manifest line's object: ``kind`` only for repairs, ``transient``, ``duplicate`` and
        ``source`` only when set (entries without them read as before)."""
        out: dict[str, Any] = {"id": self.id, "reason": self.reason}
        if self.kind == "repaired":
            out["kind"] = "repaired"
        if self.transient:
            out["transient"] = True
        if self.duplicate:
            out["duplicate"] = True
        if self.source:
            out["source"] = dict(self.source)
        return out


@dataclass
class Explanation:
    """One batch's attribution results, in batch order.

    Attributes:
        ids: the ``B`` sample ids.
        similarity: ``(B,)`` clean image-text cosine similarity (CPU, float32).
        image_maps: ``(B, H, W)`` maps in [0, 1] at the model's input size, or ``None`` (vision not
            explained).
        patch_scores: ``(B, h * w)`` raw score per patch (``grid = (h, w)``), or ``None``.
        grid: the patch grid ``(h, w)`` of ``patch_scores``.
        text_scores: ``B`` tensors ``(L_i,)`` in [0, 1], one per valid token (BOS/EOS included),
            or ``None`` (text not explained).
        tokens: ``B`` lists of the ``L_i`` token strings, with ``text_scores``.
        metrics: per-sample evaluation values ``{name: (B,) float64}`` in the results' units (NaN
            where undefined); empty unless the evaluation ran.
        skipped: rows of the batch that were not explained, and repairs of the explained ones.
        loss: the summed objective of the last optimisation step (methods that optimise), or ``None``.
        terms: scalars to log (per-side loss terms, redone steps, ...).
    """

    ids: list[str]
    similarity: Tensor
    image_maps: Tensor | None = None
    patch_scores: Tensor | None = None
    grid: tuple[int, int] | None = None
    text_scores: list[Tensor] | None = None
    tokens: list[list[str]] | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)
    skipped: list[Skip] = field(default_factory=list)
    loss: Tensor | None = None
    terms: dict[str, Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def empty(cls, skipped: Iterable[Skip] = ()) -> Explanation:
        """A batch with no pair to explain (all rows skipped, or a padding batch under DDP)."""
        from torch import zeros

        return cls(ids=[], similarity=zeros(0), skipped=list(skipped))

    def replace(self, **changes: Any) -> Explanation:
        """A copy with some fields changed (e.g. ``metrics`` added by the evaluation)."""
        return dataclasses.replace(self, **changes)
