"""World 2's objects and what captions say of them: the vocabulary, :class:`SceneObject`, noun
phrases, :class:`CaptionSpec`, the geometric :func:`relation`, and the checks (:func:`resolve`,
:func:`caption_holds`, :func:`true_specs`) and hard negatives (:func:`foils`) built on them."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from m2ib_lightning.assets.world2.scenes import Scene

__all__ = [
    "COLOURS",
    "FILLS",
    "KINDS",
    "OPPOSITE",
    "PLURALS",
    "RELATIONS",
    "RELATION_GAP",
    "SHAPES",
    "CaptionSpec",
    "NounPhrase",
    "SceneObject",
    "all_captions",
    "all_captions_index",
    "all_specs",
    "anchor_of",
    "caption_holds",
    "foils",
    "noun_phrases",
    "relation",
    "resolve",
    "spec_index",
    "true_specs",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "blue": (35, 75, 205),
    "green": (25, 145, 55),
    "yellow": (225, 175, 0),
}
FILLS = ("plain", "striped", "dotted", "checked")
SHAPES = ("star", "cross", "ring", "diamond", "heart")
PLURALS = {"star": "stars", "cross": "crosses", "ring": "rings", "diamond": "diamonds", "heart": "hearts"}
RELATIONS = ("left of", "right of", "above", "below")
OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
KINDS = ("single", "count", "relation")
RELATION_GAP = 4


@dataclass(frozen=True)
class SceneObject:
    """One object: its ``colour``, ``fill`` and ``shape``, and ``box`` = ``(x0, y0, x1, y1)`` in pixels."""

    colour: str
    fill: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def centre(self) -> tuple[float, float]:
        x0, y0, x1, y1 = self.box
        return (x0 + x1) / 2, (y0 + y1) / 2

    def to_json(self) -> dict:
        return {"colour": self.colour, "fill": self.fill, "shape": self.shape, "box": list(self.box)}


@dataclass(frozen=True, order=True)
class NounPhrase:
    """One attribute and the shape: ``"striped star"`` (``attribute`` a fill) or ``"blue ring"`` (a colour)."""

    attribute: str
    shape: str

    def matches(self, obj: SceneObject) -> bool:
        return obj.shape == self.shape and self.attribute in (obj.colour, obj.fill)

    @property
    def text(self) -> str:
        return f"{self.attribute} {self.shape}"

    @property
    def plural(self) -> str:
        return f"{self.attribute} {PLURALS[self.shape]}"


def noun_phrases(obj: SceneObject) -> tuple[NounPhrase, NounPhrase]:
    """The two noun phrases that describe ``obj``: by its colour and by its fill."""
    return NounPhrase(obj.colour, obj.shape), NounPhrase(obj.fill, obj.shape)


@dataclass(frozen=True, order=True)
class CaptionSpec:
    """What a caption says: ``kind`` (one of :data:`KINDS`), the referent's noun phrase ``subject``,
    and for a relation the ``relation`` (one of :data:`RELATIONS`) and the anchor's ``anchor``."""

    kind: str
    subject: NounPhrase
    relation: str = ""
    anchor: NounPhrase | None = None

    @property
    def text(self) -> str:
        if self.kind == "single":
            return f"a {self.subject.text}"
        if self.kind == "count":
            return f"two {self.subject.plural}"
        assert self.anchor is not None
        return f"the {self.subject.text} {self.relation} the {self.anchor.text}"


@lru_cache(maxsize=1)
def all_specs() -> tuple[CaptionSpec, ...]:
    """Every caption of the world, in a fixed order: 40 ``single``, 40 ``count``, 6240 ``relation``."""
    phrases = [NounPhrase(a, s) for a in (*COLOURS, *FILLS) for s in SHAPES]
    specs = [CaptionSpec("single", p) for p in phrases] + [CaptionSpec("count", p) for p in phrases]
    specs += [CaptionSpec("relation", p, r, q) for p in phrases for r in RELATIONS for q in phrases if q != p]
    return tuple(specs)


def all_captions() -> list[str]:
    """The text of every :func:`all_specs` entry, in the same order (6320 captions)."""
    return [s.text for s in all_specs()]


@lru_cache(maxsize=1)
def spec_index() -> dict[CaptionSpec, int]:
    return {s: i for i, s in enumerate(all_specs())}


def relation(a: SceneObject, b: SceneObject) -> str | None:
    """The relation of ``a`` to ``b`` (``"left of"``: ``a`` is left of ``b``), or None.

    At most one holds: ``a``'s box must end :data:`RELATION_GAP` px before ``b``'s begins along the
    axis where the centres are further apart (ties: none).
    """
    (ax, ay), (bx, by) = a.centre, b.centre
    dx, dy = bx - ax, by - ay
    if abs(dx) > abs(dy):
        if a.box[2] + RELATION_GAP <= b.box[0]:
            return "left of"
        if b.box[2] + RELATION_GAP <= a.box[0]:
            return "right of"
    elif abs(dy) > abs(dx):
        if a.box[3] + RELATION_GAP <= b.box[1]:
            return "above"
        if b.box[3] + RELATION_GAP <= a.box[1]:
            return "below"
    return None


def resolve(objects: Sequence[SceneObject], spec: CaptionSpec) -> tuple[int, ...] | None:
    """The indices of the objects ``spec`` names in ``objects``, or None when it does not hold.

    ``single``: exactly one object matches the noun phrase; ``count``: exactly two; ``relation``:
    exactly one object matches the anchor's phrase, and exactly one other object matches the
    subject's phrase and stands in the relation to it. The result is the referent(s), not the anchor.
    """
    matching = [i for i, o in enumerate(objects) if spec.subject.matches(o)]
    if spec.kind == "single":
        return tuple(matching) if len(matching) == 1 else None
    if spec.kind == "count":
        return tuple(matching) if len(matching) == 2 else None
    assert spec.anchor is not None
    anchors = [j for j, o in enumerate(objects) if spec.anchor.matches(o)]
    if len(anchors) != 1:
        return None
    a = anchors[0]
    referents = [i for i in matching if i != a and relation(objects[i], objects[a]) == spec.relation]
    return tuple(referents) if len(referents) == 1 else None


def anchor_of(objects: Sequence[SceneObject], spec: CaptionSpec) -> int:
    """Index of a relation's anchor in ``objects`` (-1 for other kinds); the caption must hold."""
    if spec.kind != "relation":
        return -1
    assert spec.anchor is not None
    return next(j for j, o in enumerate(objects) if spec.anchor.matches(o))


def caption_holds(scene: Scene | Sequence[SceneObject], spec: CaptionSpec | str) -> bool:
    """Whether the caption ``spec`` (a spec or its text) is true of ``scene``: :func:`resolve` names someone."""
    if isinstance(spec, str):
        spec = all_specs()[all_captions_index()[spec]]
    objects = getattr(scene, "objects", scene)  # a Scene, or its objects
    return resolve(objects, spec) is not None


@lru_cache(maxsize=1)
def all_captions_index() -> dict[str, int]:
    return {c: i for i, c in enumerate(all_captions())}


def true_specs(objects: Sequence[SceneObject]) -> list[CaptionSpec]:
    """Every caption of the world that holds for ``objects``, in :func:`all_specs` order.

    Built from the scene's own objects (cheap) rather than by testing all 6320 captions; a test
    checks that both give the same set.
    """
    found: set[CaptionSpec] = set()
    phrases = {p for o in objects for p in noun_phrases(o)}
    for p in phrases:
        n = sum(p.matches(o) for o in objects)
        if n == 1:
            found.add(CaptionSpec("single", p))
        elif n == 2:
            found.add(CaptionSpec("count", p))
    for a, anchor in enumerate(objects):
        for q in noun_phrases(anchor):
            if sum(q.matches(o) for o in objects) != 1:
                continue
            for i, obj in enumerate(objects):
                rel = relation(obj, anchor) if i != a else None
                if rel is None:
                    continue
                for p in noun_phrases(obj):
                    spec = CaptionSpec("relation", p, rel, q)
                    if p != q and resolve(objects, spec) is not None:
                        found.add(spec)
    index = spec_index()
    return sorted(found, key=index.__getitem__)


def foils(spec: CaptionSpec) -> list[CaptionSpec]:
    """Captions one edit away from ``spec``: hard negatives for training and the foil accuracy.

    ``single`` <-> ``count`` of the same phrase; the phrase's attribute swapped for another of its
    type (colour for colour, fill for fill) or its shape for another; for a relation the opposite
    relation and the subject and anchor exchanged. A foil may still be true of a given scene
    (check with :func:`caption_holds`).
    """
    def variants(p: NounPhrase) -> list[NounPhrase]:
        pool = tuple(COLOURS) if p.attribute in COLOURS else FILLS
        return ([NounPhrase(a, p.shape) for a in pool if a != p.attribute]
                + [NounPhrase(p.attribute, s) for s in SHAPES if s != p.shape])

    if spec.kind in ("single", "count"):
        other = "count" if spec.kind == "single" else "single"
        return [CaptionSpec(other, spec.subject), *(CaptionSpec(spec.kind, p) for p in variants(spec.subject))]
    assert spec.anchor is not None
    out = [CaptionSpec("relation", spec.subject, OPPOSITE[spec.relation], spec.anchor),
           CaptionSpec("relation", spec.anchor, spec.relation, spec.subject)]
    out += [CaptionSpec("relation", p, spec.relation, spec.anchor) for p in variants(spec.subject) if p != spec.anchor]
    return out
