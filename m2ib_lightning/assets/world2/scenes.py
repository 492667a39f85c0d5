"""World 2's scenes: :class:`Scene`, the per-scene random streams (:func:`scene_rng`), and
:func:`draw_scene`, which plans the objects a caption names, adds distractors, lays them out until
the caption names exactly the planted ones, and draws the image."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from m2ib_lightning.assets.world2.captions import (
    COLOURS,
    FILLS,
    KINDS,
    SHAPES,
    CaptionSpec,
    NounPhrase,
    SceneObject,
    anchor_of,
    relation,
    resolve,
)
from m2ib_lightning.assets.world2.drawing import draw_background, draw_object, silhouette

__all__ = ["KIND_WEIGHTS", "MAX_SIZE", "MIN_SIZE", "Scene", "draw_scene", "scene_rng"]

# Caption kinds of the scenes :func:`draw_scene` plants, and their probabilities.
KIND_WEIGHTS = (0.3, 0.3, 0.4)
MIN_SIZE, MAX_SIZE = 32, 72


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
