"""A grounded synthetic benchmark: scenes of coloured shapes, a caption naming one, and its mask.

Every scene holds ``min_objects`` to ``max_objects`` flat shapes (circle, square, triangle in six
colours, drawn by :mod:`m2ib_lightning.assets.demo`), one per cell of a 3 x 3 grid so that shapes
never overlap. No two shapes of a scene share both colour and kind, but they may share one of them
(a red circle next to a red square and a blue circle), so a model, or a map, that only looks at
colour or only at shape is caught out. The caption names exactly one shape ("a red circle"), and
the ground truth is that shape's exact pixel mask, rasterised by the same drawing call as the image.

Written to disk by :func:`make_benchmark` (``python -m m2ib_lightning.assets.scenes data/toy``)::

    images/toy-000.png ...   RGB scenes
    pairs.jsonl              {"id", "image", "caption", "bbox": [x0, y0, x1, y1],
                              "mask": {"size": [H, W], "counts": [...]}} per line

``mask`` is a run-length encoding (:func:`m2ib_lightning.evaluation.ground_truth.encode_mask`), which
the evaluation's ``ground_truth`` turns into a boolean mask at the model's input size.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from m2ib_lightning.assets.demo import COLOURS, SHAPES, draw_background, draw_shape
from m2ib_lightning.evaluation.ground_truth import encode_mask

__all__ = ["Scene", "SceneObject", "all_captions", "caption_for", "draw_scene", "make_benchmark", "scene_rng"]


@dataclass(frozen=True)
class SceneObject:
    """One shape of a scene: ``colour`` and ``shape`` name it, ``box`` = ``(x0, y0, x1, y1)`` in pixels."""

    colour: str
    shape: str
    box: tuple[int, int, int, int]

    @property
    def name(self) -> str:
        return f"{self.colour} {self.shape}"


@dataclass
class Scene:
    """A rendered scene: the RGB ``image`` and its ``objects`` (any of which a caption may name).

    Attributes:
        image: ``image_size x image_size`` RGB image.
        objects: the shapes, in drawing order.
        target: index into ``objects`` of the shape the scene's caption names.
    """

    image: Image.Image
    objects: list[SceneObject] = field(default_factory=list)
    target: int = 0

    @property
    def caption(self) -> str:
        return caption_for(self.objects[self.target])

    def mask(self, index: int | None = None) -> np.ndarray:
        """``(H, W)`` bool pixel mask of ``objects[index]`` (default: the target)."""
        obj = self.objects[self.target if index is None else index]
        canvas = Image.new("1", self.image.size, 0)
        draw_shape(ImageDraw.Draw(canvas), obj.shape, obj.box, 1)
        return np.asarray(canvas, dtype=bool)


def caption_for(obj: SceneObject) -> str:
    """``"a red circle"``, ``"an orange square"``: article, colour, shape."""
    article = "an" if obj.colour[0] in "aeiou" else "a"
    return f"{article} {obj.colour} {obj.shape}"


def all_captions() -> list[str]:
    """The caption of every (colour, shape), in a fixed order: ``len(COLOURS) * len(SHAPES)`` texts."""
    return [caption_for(SceneObject(c, s, (0, 0, 1, 1))) for c in sorted(COLOURS) for s in SHAPES]


def scene_rng(seed: int | str, index: int) -> random.Random:
    """The drawing stream of scene ``index``: scene k is the same whatever the number of scenes."""
    return random.Random(f"synthetic-{seed}-{index}")


def draw_scene(rng: random.Random, image_size: int = 224, min_objects: int = 2, max_objects: int = 4) -> Scene:
    """Draw one scene from ``rng``; the caption's target is chosen uniformly among its shapes.

    Args:
        rng: the scene's random stream (see :func:`scene_rng`).
        image_size: side of the square image in pixels (>= 32).
        min_objects: fewest shapes in a scene (>= 1).
        max_objects: most shapes in a scene (<= 9, one per cell of the 3 x 3 grid).
    """
    if not 1 <= min_objects <= max_objects <= 9:
        raise ValueError(f"need 1 <= min_objects <= max_objects <= 9, got {min_objects} and {max_objects}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    draw_background(draw, rng, image_size)
    cell = image_size / 3
    k = rng.randint(min_objects, max_objects)
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k=k)
    # (colour, shape) pairs without replacement: the caption names exactly one object, while
    # shapes sharing one attribute with it stay possible (and frequent) as distractors.
    kinds = rng.sample([(c, s) for c in sorted(COLOURS) for s in SHAPES], k=k)
    objects = []
    for (row, col), (colour, shape) in zip(cells, kinds):
        size = int(cell * rng.uniform(0.55, 0.85))
        x0 = int(col * cell + rng.uniform(0, cell - size))
        y0 = int(row * cell + rng.uniform(0, cell - size))
        box = (x0, y0, x0 + size, y0 + size)
        draw_shape(draw, shape, box, COLOURS[colour])
        objects.append(SceneObject(colour, shape, box))
    return Scene(image=image, objects=objects, target=rng.randrange(k))

# ------------------------------------------------------------------------------- on disk
def make_benchmark(out_dir: str | Path, n: int = 128, image_size: int = 224, seed: int | str = "benchmark",
                   prefix: str = "toy", min_objects: int = 2, max_objects: int = 4) -> Path:
    """Write ``n`` scenes with captions and ground-truth masks; return the path of ``pairs.jsonl``.

    The same arguments give byte-identical files. Scene streams are keyed by ``seed``: the toy CLIP
    trains on other seeds, so a benchmark written with the default seed is held out.

    Args:
        out_dir: directory to write (created if missing).
        n: number of scenes.
        image_size: side of the square images in pixels.
        seed: seed (or label) of the scene streams.
        prefix: sample ids are ``{prefix}-{index:03d}``.
        min_objects: fewest shapes per scene.
        max_objects: most shapes per scene.
    """

    def scene_of(index: int) -> tuple[Image.Image, dict[str, Any]]:
        scene = draw_scene(scene_rng(seed, index), image_size, min_objects, max_objects)
        return scene.image, {"caption": scene.caption, "bbox": list(scene.objects[scene.target].box),
                             "mask": encode_mask(scene.mask())}

    return write_pairs(out_dir, n, prefix, scene_of)


def write_pairs(out_dir: str | Path, n: int, prefix: str,
                scene_of: Callable[[int], tuple[Image.Image, dict[str, Any]]]) -> Path:
    """Write ``n`` scenes as ``images/{prefix}-{index:03d}.png`` and one ``pairs.jsonl`` line each
    (``id``, ``image``, then the fields ``scene_of(index)`` returns with the image); return its path."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        image, fields = scene_of(index)
        sample_id = f"{prefix}-{index:03d}"
        relative = f"images/{sample_id}.png"
        image.save(out / relative, format="PNG", optimize=True)
        lines.append(json.dumps({"id": sample_id, "image": relative, **fields}))
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``python -m m2ib_lightning.assets.scenes data/toy --n 128``."""
    parser = argparse.ArgumentParser(prog="python -m m2ib_lightning.assets.scenes",
                                     description="Write the grounded synthetic benchmark (scenes, captions, masks).")
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/toy"), help="output folder")
    parser.add_argument("--n", type=int, default=128, help="number of scenes")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", default="benchmark", help="seed (or label) of the scene streams")
    parser.add_argument("--prefix", default="toy", help="sample id prefix")
    args = parser.parse_args(argv)
    pairs = make_benchmark(args.out_dir, n=args.n, image_size=args.image_size, seed=args.seed, prefix=args.prefix)
    print(f"wrote {pairs}")


if __name__ == "__main__":
    main()
