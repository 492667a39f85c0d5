"""Drawing world 2: each object's shape (:func:`silhouette`, also its ground-truth mask), its fill
painted through it (:func:`draw_object`), and the textured backgrounds (:func:`draw_background`)."""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from m2ib_lightning.assets.world2.captions import COLOURS, FILLS, SHAPES, SceneObject

__all__ = ["BACKGROUNDS", "LIGHT", "draw_background", "draw_object", "silhouette"]

LIGHT = (246, 246, 242)
BACKGROUNDS = ((196, 198, 192), (214, 206, 188), (188, 200, 210), (200, 212, 196), (210, 198, 208))


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
