"""A second grounded world: textured objects, several instances and spatial relations.

Where the toy world (:mod:`m2ib_lightning.assets.scenes`) has flat shapes of one size, one per
cell of a 3 x 3 grid, on light backgrounds, and captions naming one shape by colour and kind, this
world differs in kind:

* **Objects** are stars, crosses, rings (with a hole showing the background), diamonds and hearts,
  each in one of four colours AND one of four fills (plain, striped, dotted, checked), of sizes
  from 32 to 72 px, placed freely (never overlapping) on muted, textured backgrounds (faint
  stripes, dots, checks, waves or blotches: the fills' own patterns appear, faintly, behind them).
* **Captions** refer to objects by ONE attribute and the shape (a noun phrase, NP: "striped star",
  "blue ring"), in three kinds:

  - ``single``: "a striped star", exactly one object of the scene is a striped star;
  - ``count``: "two dotted crosses", exactly two are; the ground truth is the union of both;
  - ``relation``: "the striped star left of the blue ring": exactly one blue ring (the anchor)
    and exactly one striped star in that relation to it (the referent). About 70 % of these scenes
    hold a second striped star elsewhere (half by design, more by chance among the distractors),
    which only the relation rules out.

  Distractors share the NP's attribute or its shape (other striped things, stars of another fill
  or colour), so a colour-only, texture-only or shape-only map is caught out.
* **Ground truth**: ``mask`` is the exact pixel mask of the referent(s) (the subject of the
  caption, not the anchor of a relation), rasterised by the same drawing calls as the image;
  ``bbox`` its box. Every object of the scene is listed too (``objects``, with ``referents`` and
  ``anchor`` indices into it), for analyses that ask where a map went instead.

Relations are geometric and exclusive: ``a`` is *left of* ``b`` when ``a``'s box ends before
``b``'s begins (a gap of at least :data:`RELATION_GAP` px) and the centres are further apart
horizontally than vertically; *right of*, *above* and *below* likewise. Captions are checked for
every scene: :func:`resolve` must return exactly the objects the generator meant, and the same
function says whether a caption holds for any other scene (:func:`caption_holds`, used for the
in-batch positives when the world-2 CLIP is trained).

Written to disk by :func:`make_world2` (``python -m m2ib_lightning.assets.world2 data/world2``)::

    images/w2-000.png ...    RGB scenes, 224 x 224
    pairs.jsonl              {"id", "image", "caption", "kind", "bbox", "mask",
                              "objects", "referents", "anchor"} per line
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from m2ib_lightning.evaluation.ground_truth import encode_mask

__all__ = [
    "COLOURS",
    "FILLS",
    "KINDS",
    "RELATIONS",
    "SHAPES",
    "CaptionSpec",
    "NounPhrase",
    "Scene",
    "SceneObject",
    "WORLD",
    "World2",
    "all_captions",
    "all_specs",
    "caption_holds",
    "draw_scene",
    "foils",
    "make_world2",
    "relation",
    "resolve",
    "scene_rng",
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
# Caption kinds of the scenes :func:`draw_scene` plants, and their probabilities.
KIND_WEIGHTS = (0.3, 0.3, 0.4)
RELATION_GAP = 4
LIGHT = (246, 246, 242)
BACKGROUNDS = ((196, 198, 192), (214, 206, 188), (188, 200, 210), (200, 212, 196), (210, 198, 208))
MIN_SIZE, MAX_SIZE = 32, 72


# ------------------------------------------------------------------------------- objects and captions
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
    objects = scene.objects if isinstance(scene, Scene) else scene
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


# ------------------------------------------------------------------------------- drawing
def _polygon(shape: str, box: tuple[int, int, int, int]) -> list[tuple[float, float]]:
    x0, y0, x1, y1 = box
    w, h = x1 - x0, y1 - y0
    cx, cy = x0 + w / 2, y0 + h / 2

    def at(u: float, v: float) -> tuple[float, float]:  # unit square [-0.5, 0.5]^2 -> box
        return cx + u * w, cy + v * h

    if shape == "star":
        points = []
        for k in range(10):
            r = 0.5 if k % 2 == 0 else 0.21
            angle = -math.pi / 2 + k * math.pi / 5
            points.append(at(r * math.cos(angle), r * math.sin(angle) + 0.04))
        return points
    if shape == "cross":
        a = 0.17
        return [at(u, v) for u, v in ((-a, -0.5), (a, -0.5), (a, -a), (0.5, -a), (0.5, a), (a, a), (a, 0.5),
                                      (-a, 0.5), (-a, a), (-0.5, a), (-0.5, -a), (-a, -a))]
    if shape == "diamond":
        return [at(0, -0.5), at(0.42, 0), at(0, 0.5), at(-0.42, 0)]
    if shape == "heart":
        points = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            u = 16 * math.sin(t) ** 3
            v = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            points.append(at(u / 34, -(v + 2.5) / 31))
        return points
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def silhouette(obj: SceneObject) -> Image.Image:
    """The ``"L"`` image of ``obj``'s box (``x1 - x0 + 1`` wide) that is 255 on its shape, 0 elsewhere.

    The one rasterisation of an object: the image pastes the object's fill through it, and the
    ground-truth mask is it, pasted at the box's corner.
    """
    x0, y0, x1, y1 = obj.box
    w, h = x1 - x0, y1 - y0
    canvas = Image.new("L", (w + 1, h + 1), 0)
    draw = ImageDraw.Draw(canvas)
    if obj.shape == "ring":
        inset = round(0.27 * w)
        draw.ellipse((0, 0, w, h), fill=255)
        draw.ellipse((inset, inset, w - inset, h - inset), fill=0)
    else:
        draw.polygon(_polygon(obj.shape, (0, 0, w, h)), fill=255)
    return canvas


def _fill(fill: str, colour: tuple[int, int, int], size: tuple[int, int], rng: random.Random) -> Image.Image:
    """An RGB texture of ``size`` (W, H): ``colour`` plain, or patterned with a light second colour."""
    w, h = size
    image = Image.new("RGB", size, colour)
    draw = ImageDraw.Draw(image)
    if fill == "striped":
        period, phase = 9, rng.randrange(9)
        for offset in range(-h - period + phase, w + period, period):
            draw.line((offset, 0, offset + h, h), fill=LIGHT, width=3)
    elif fill == "dotted":
        step, px, py = 9, rng.randrange(9), rng.randrange(9)
        for y in range(py - step, h + step, step):
            shift = step // 2 if (y - py) // step % 2 else 0
            for x in range(px - step + shift, w + step, step):
                draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=LIGHT)
    elif fill == "checked":
        cell, px, py = 7, rng.randrange(14), rng.randrange(14)
        for row, y in enumerate(range(-py, h, cell)):
            for col, x in enumerate(range(-px, w, cell)):
                if (row + col) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=LIGHT)
    elif fill != "plain":
        raise ValueError(f"fill must be one of {FILLS}, got {fill!r}")
    return image


def draw_object(image: Image.Image, obj: SceneObject, rng: random.Random) -> None:
    """Paint ``obj`` onto ``image``: its fill through its silhouette, the silhouette's 2 px rim in its colour."""
    shape_mask = silhouette(obj)
    texture = _fill(obj.fill, COLOURS[obj.colour], shape_mask.size, rng)
    # A rim inside the silhouette keeps the outline visible when a light stripe or check meets it.
    inner = shape_mask.filter(ImageFilter.MinFilter(5))
    rim = Image.fromarray(((np.asarray(shape_mask) > 0) & (np.asarray(inner) == 0)).astype(np.uint8) * 255)
    texture.paste(COLOURS[obj.colour], (0, 0), rim)
    image.paste(texture, obj.box[:2], shape_mask)


def draw_background(image: Image.Image, rng: random.Random) -> None:
    """A muted base colour with a faint texture: stripes, dots, checks, waves, blotches or none."""
    w, h = image.size
    base = rng.choice(BACKGROUNDS)
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, w, h), fill=base)
    delta = rng.choice((-1, 1)) * rng.randint(10, 18)
    tint = tuple(min(255, max(0, c + delta)) for c in base)
    texture = rng.choice(("none", "stripes", "dots", "checks", "waves", "blotches"))
    if texture == "stripes":
        period, slope = rng.choice((10, 14, 18)), rng.choice((-1, 0, 1))
        for offset in range(-h, w + h, period):
            if slope:
                draw.line((offset, 0, offset + slope * h, h), fill=tint, width=3)
            else:
                draw.line((0, offset, w, offset), fill=tint, width=3)
    elif texture == "dots":
        for _ in range(rng.randint(150, 300)):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.choice((1, 2, 3))
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)
    elif texture == "checks":
        cell = rng.choice((16, 28))
        for y in range(0, h, cell):
            for x in range(0, w, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle((x, y, x + cell - 1, y + cell - 1), fill=tint)
    elif texture == "waves":
        period, amplitude = rng.choice((12, 18)), rng.uniform(3, 7)
        for y0 in range(-period, h + period, period):
            points = [(x, y0 + amplitude * math.sin(x / 11 + y0)) for x in range(0, w + 4, 4)]
            draw.line(points, fill=tint, width=2)
    elif texture == "blotches":
        for _ in range(rng.randint(5, 10)):
            x, y, r = rng.randrange(w), rng.randrange(h), rng.randint(15, 45)
            draw.ellipse((x - r, y - r, x + r, y + r), fill=tint)


# ------------------------------------------------------------------------------- scenes
@dataclass
class Scene:
    """A rendered scene: ``image``, its ``objects`` and the ``spec`` of its caption.

    Attributes:
        image: RGB image.
        objects: every object, in drawing order.
        spec: what the caption says; :func:`resolve` of it gives ``referents``.
        referents: indices of the objects the caption names (two for ``count``).
        anchor: index of a relation's anchor, -1 for the other kinds.
    """

    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)
    spec: CaptionSpec | None = None
    referents: tuple[int, ...] = ()
    anchor: int = -1

    @property
    def caption(self) -> str:
        assert self.spec is not None
        return self.spec.text

    def object_mask(self, index: int) -> np.ndarray:
        """``(H, W)`` bool pixel mask of ``objects[index]``."""
        obj = self.objects[index]
        local = np.asarray(silhouette(obj)) > 0
        out = np.zeros(self.image.size[::-1], dtype=bool)
        x0, y0 = obj.box[:2]
        out[y0 : y0 + local.shape[0], x0 : x0 + local.shape[1]] = local
        return out

    def mask(self) -> np.ndarray:
        """``(H, W)`` bool mask of what the caption names: the union of the referents' pixels."""
        out = np.zeros(self.image.size[::-1], dtype=bool)
        for i in self.referents:
            out |= self.object_mask(i)
        return out

    def bbox(self) -> list[int]:
        """``[x0, y0, x1, y1]`` around the referents' boxes."""
        boxes = np.array([self.objects[i].box for i in self.referents])
        return [int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())]


def scene_rng(seed: int | str, index: int) -> random.Random:
    """The drawing stream of scene ``index`` (scene k is the same whatever the number of scenes)."""
    return random.Random(f"world2-{seed}-{index}")


def _random_object(rng: random.Random, like: NounPhrase | None = None) -> tuple[str, str, str]:
    """(colour, fill, shape) drawn at random, or sharing the attribute or the shape of ``like``."""
    colour, fill, shape = rng.choice(tuple(COLOURS)), rng.choice(FILLS), rng.choice(SHAPES)
    if like is not None:
        if rng.random() < 0.5:
            shape = like.shape
        elif like.attribute in COLOURS:
            colour = like.attribute
        else:
            fill = like.attribute
    return colour, fill, shape


def _matching(rng: random.Random, phrase: NounPhrase) -> tuple[str, str, str]:
    colour, fill, _ = _random_object(rng)
    if phrase.attribute in COLOURS:
        colour = phrase.attribute
    else:
        fill = phrase.attribute
    return colour, fill, phrase.shape


def _random_phrase(rng: random.Random) -> NounPhrase:
    attribute = rng.choice(tuple(COLOURS)) if rng.random() < 0.5 else rng.choice(FILLS)
    return NounPhrase(attribute, rng.choice(SHAPES))


def _place(rng: random.Random, n: int, image_size: int, gap: int = 6, tries: int = 200) -> list[tuple] | None:
    """``n`` non-overlapping square boxes (at least ``gap`` px apart), or None if they do not fit."""
    boxes: list[tuple[int, int, int, int]] = []
    high = min(MAX_SIZE, image_size // 3)
    low = min(MIN_SIZE, high)
    for _ in range(n):
        for _ in range(tries):
            side = rng.randint(low, high)
            x0 = rng.randint(2, image_size - side - 3)
            y0 = rng.randint(2, image_size - side - 3)
            box = (x0, y0, x0 + side, y0 + side)
            if all(box[0] > b[2] + gap or b[0] > box[2] + gap or box[1] > b[3] + gap or b[1] > box[3] + gap
                   for b in boxes):
                boxes.append(box)
                break
        else:
            return None
    return boxes


def _plan(rng: random.Random, kind: str, n_objects: int) -> tuple[CaptionSpec, list[tuple[str, str, str]], int]:
    """Attributes of the planted objects (referents first, then a relation's anchor) and distractors.

    Returns the spec (a relation's ``relation`` still unset: it is read off the layout), the
    ``(colour, fill, shape)`` of every object, and how many leading ones are planted.
    """
    subject = _random_phrase(rng)
    if kind == "single":
        planted = [_matching(rng, subject)]
        spec = CaptionSpec("single", subject)
    elif kind == "count":
        planted = [_matching(rng, subject), _matching(rng, subject)]
        spec = CaptionSpec("count", subject)
    else:
        anchor = _random_phrase(rng)
        while anchor == subject:
            anchor = _random_phrase(rng)
        # Referent, anchor, and in half the scenes a second object of the subject's phrase that the
        # relation must rule out.
        planted = [_matching(rng, subject), _matching(rng, anchor)]
        if rng.random() < 0.5:
            planted.append(_matching(rng, subject))
        spec = CaptionSpec("relation", subject, "", anchor)
    attributes = planted + [_random_object(rng, like=subject) for _ in range(max(0, n_objects - len(planted)))]
    return spec, attributes, len(planted)


def draw_scene(rng: random.Random, image_size: int = 224, min_objects: int = 3, max_objects: int = 6,
               kind: str | None = None) -> Scene:
    """Draw one scene from ``rng`` with a caption that names its referent(s) unambiguously.

    The caption's kind is drawn with :data:`KIND_WEIGHTS` (or given as ``kind``); the referents
    (and a relation's anchor) are planted, distractors sharing the subject's attribute or shape
    are added, and the layout and attributes are redrawn from ``rng`` until :func:`resolve` returns
    exactly the planted referents (for a relation: the relation the layout gives them).

    Args:
        rng: the scene's random stream (see :func:`scene_rng`).
        image_size: side of the square image in pixels (>= 160: objects are 32-72 px).
        min_objects: fewest objects (>= 3: a relation with a distractor needs three).
        max_objects: most objects (<= 8).
        kind: one of :data:`KINDS`, or None to draw it.
    """
    if not 3 <= min_objects <= max_objects <= 8:
        raise ValueError(f"need 3 <= min_objects <= max_objects <= 8, got {min_objects} and {max_objects}")
    if image_size < 160:
        raise ValueError(f"image_size must be at least 160, got {image_size}")
    if kind is None:
        kind = rng.choices(KINDS, weights=KIND_WEIGHTS)[0]
    elif kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    n = rng.randint(min_objects, max_objects)
    for _ in range(1000):
        spec, attributes, n_planted = _plan(rng, kind, n)
        for _ in range(20):
            boxes = _place(rng, n, image_size)
            if boxes is None:
                continue
            objects = [SceneObject(c, f, s, b) for (c, f, s), b in zip(attributes, boxes)]
            if kind == "relation":
                rel = relation(objects[0], objects[1])
                if rel is None:
                    continue
                spec = CaptionSpec("relation", spec.subject, rel, spec.anchor)
            referents = resolve(objects, spec)
            expected = (0,) if kind != "count" else (0, 1)
            if referents == expected:
                break
        else:
            continue  # no layout made the caption name exactly the planted objects: replan
        break
    else:  # pragma: no cover - the odds are astronomically small
        raise RuntimeError("could not draw a scene whose caption is unambiguous")
    image = Image.new("RGB", (image_size, image_size))
    draw_background(image, rng)
    # Drawing order shuffled so that the referent is not always drawn first (nothing overlaps,
    # so the order only matters for the recorded object list).
    order = list(range(n))
    rng.shuffle(order)
    objects = [objects[i] for i in order]
    for obj in objects:
        draw_object(image, obj, rng)
    referents = resolve(objects, spec)
    assert referents is not None
    return Scene(image=image, objects=objects, spec=spec, referents=referents, anchor=anchor_of(objects, spec))


# ------------------------------------------------------------------------------- for training
class World2:
    """World 2 as a scene source for :func:`m2ib_lightning.assets.toy_clip.train_toy_clip` (``world: world2``).

    A training step draws one caption true of each scene with the three kinds weighted alike (among
    the kinds the scene has: every scene has ``single`` captions, most have ``relation`` ones,
    ``count`` ones only when two objects share a phrase), uniformly within a kind.
    """

    name = "world2"

    def captions(self) -> list[str]:
        return all_captions()

    def scene(self, seed: int | str, index: int, image_size: int) -> tuple[Image.Image, list[int], int]:
        scene = draw_scene(scene_rng(seed, index), image_size)
        assert scene.spec is not None
        position = spec_index()
        groups: dict[str, list[int]] = {k: [] for k in KINDS}
        for spec in true_specs(scene.objects):
            groups[spec.kind].append(position[spec])
        longest = max(len(g) for g in groups.values())
        # Each non-empty kind cycled to the same length: the kinds weigh alike in a uniform draw.
        pool = [g[j % len(g)] for g in groups.values() if g for j in range(longest)]
        return scene.image, pool, position[scene.spec]

    def foil_table(self) -> tuple[Any, Any]:
        return _foil_table()

    def caption_kinds(self) -> list[str]:
        return [s.kind for s in all_specs()]


@lru_cache(maxsize=1)
def _foil_table() -> tuple[Any, Any]:
    """Foils of every caption, the structural ones (the other count; the opposite relation, the
    roles exchanged) repeated so that a uniform draw picks one of them half the time."""
    import torch

    position = spec_index()
    rows = []
    for spec in all_specs():
        found = [position[f] for f in foils(spec)]
        structural = 2 if spec.kind == "relation" else 1
        head, rest = found[:structural], found[structural:]
        rows.append(head * (len(rest) // structural) + rest)
    width = max(len(r) for r in rows)
    table = torch.tensor([r + [r[0]] * (width - len(r)) for r in rows], dtype=torch.long)
    return table, torch.tensor([len(r) for r in rows], dtype=torch.long)


WORLD = World2()


# ------------------------------------------------------------------------------- on disk
def make_world2(out_dir: str | Path, n: int = 200, image_size: int = 224, seed: int | str = "benchmark",
                prefix: str = "w2") -> Path:
    """Write ``n`` scenes with captions and ground-truth masks; return the path of ``pairs.jsonl``.

    The same arguments give byte-identical files. The world-2 CLIP trains on the streams
    ``train-{seed}`` and is measured on ``heldout``; M2IB's layer is chosen on ``validation``; the
    benchmark (the default, ``benchmark``) is none of them.

    Args:
        out_dir: directory to write (created if missing).
        n: number of scenes.
        image_size: side of the square images in pixels.
        seed: seed (or label) of the scene streams.
        prefix: sample ids are ``{prefix}-{index:03d}``.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        scene = draw_scene(scene_rng(seed, index), image_size)
        assert scene.spec is not None
        sample_id = f"{prefix}-{index:03d}"
        relative = f"images/{sample_id}.png"
        scene.image.save(out / relative, format="PNG", optimize=True)
        record = {"id": sample_id, "image": relative, "caption": scene.caption, "kind": scene.spec.kind,
                  "bbox": scene.bbox(), "mask": encode_mask(scene.mask()),
                  "objects": [o.to_json() for o in scene.objects], "referents": list(scene.referents),
                  "anchor": scene.anchor}
        lines.append(json.dumps(record))
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m m2ib_lightning.assets.world2 data/world2 --n 200``."""
    parser = argparse.ArgumentParser(prog="python -m m2ib_lightning.assets.world2",
                                     description="Write the second grounded benchmark world (textured objects, "
                                                 "counts, relations).")
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/world2"), help="output folder")
    parser.add_argument("--n", type=int, default=200, help="number of scenes")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", default="benchmark", help="seed (or label) of the scene streams")
    parser.add_argument("--prefix", default="w2", help="sample id prefix")
    args = parser.parse_args(argv)
    pairs = make_world2(args.out_dir, n=args.n, image_size=args.image_size, seed=args.seed, prefix=args.prefix)
    print(f"wrote {pairs}")


if __name__ == "__main__":
    main()
