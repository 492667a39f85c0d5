"""Offline demo assets: a tiny random CLIP and a handful of synthetic image-caption pairs.

Nothing here downloads anything. ``build_tiny_clip`` writes a directory that the ordinary
``transformers`` loaders accept (``CLIPModel``, ``AutoTokenizer``, ``AutoImageProcessor``), so code
that normally loads ``openai/clip-vit-base-patch32`` can be run end to end on a laptop or in CI.
``make_demo_pairs`` draws flat-colour shapes whose captions name one of them, which is enough for
the pipeline to have something to explain (the model is random, so the maps are not meaningful).

Regenerate the shipped copy with::

    python -m m2ib_lightning.assets.demo data/demo
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

from m2ib_lightning.assets.tiny_models import build_tiny_clip, verify_tiny_clip

__all__ = ["BACKGROUNDS", "COLOURS", "SHAPES", "draw_background", "draw_shape", "make_demo_pairs", "main"]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 210),
    "yellow": (235, 200, 30),
    "purple": (140, 60, 170),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = ((250, 250, 250), (235, 235, 235), (245, 240, 225), (225, 235, 240), (240, 230, 235))


def _describe_position(row: int, col: int) -> str:
    """Coarse phrase for a cell of the 3 x 3 placement grid, e.g. ``"in the top left"``."""
    vertical = ("top", "", "bottom")[row]
    horizontal = ("left", "", "right")[col]
    if vertical and horizontal:
        return f"in the {vertical} {horizontal}"
    if horizontal:
        return f"on the {horizontal}"
    if vertical:
        return f"at the {vertical}"
    return "in the center"


def draw_shape(
    draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill: tuple[int, int, int] | int
) -> None:
    """Draw ``shape`` (one of :data:`SHAPES`) filling ``box`` = ``(x0, y0, x1, y1)`` in pixels.

    ``fill`` is an RGB triple, or a single value for a one-band image (e.g. 1 on a ``"1"``/``"L"``
    image to draw the shape's exact pixel mask with the same rasterisation as the coloured image).
    """
    if shape not in SHAPES:
        raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def draw_background(draw: ImageDraw.ImageDraw, rng: random.Random, image_size: int) -> None:
    """Fill the square canvas with a light plain, striped or grid background drawn from ``rng``."""
    base = rng.choice(BACKGROUNDS)
    draw.rectangle((0, 0, image_size, image_size), fill=base)
    texture = rng.choice(("plain", "stripes", "grid"))
    if texture == "plain":
        return
    # A faint tint of the base colour: enough texture to not be a constant input, while the
    # PNG stays a few kB because runs of identical pixels compress well.
    tint = tuple(max(0, c - 12) for c in base)
    step = rng.choice((14, 16, 28))
    for offset in range(0, image_size, step):
        draw.line((0, offset, image_size, offset), fill=tint, width=2)
        if texture == "grid":
            draw.line((offset, 0, offset, image_size), fill=tint, width=2)


def _draw_pair(rng: random.Random, image_size: int) -> tuple[Image.Image, str, list[int]]:
    """Draw one image and return it with a caption naming one shape and that shape's box."""
    image = Image.new("RGB", (image_size, image_size))
    draw = ImageDraw.Draw(image)
    draw_background(draw, rng, image_size)

    cell = image_size / 3
    cells = rng.sample([(r, c) for r in range(3) for c in range(3)], k=rng.randint(1, 3))
    # Distinct colours per image make "<colour> <shape>" name exactly one object.
    colours = rng.sample(sorted(COLOURS), k=len(cells))
    objects = []
    for (row, col), colour in zip(cells, colours):
        shape = rng.choice(SHAPES)
        size = int(cell * rng.uniform(0.55, 0.85))
        x0 = int(col * cell + rng.uniform(0, cell - size))
        y0 = int(row * cell + rng.uniform(0, cell - size))
        box = (x0, y0, x0 + size, y0 + size)
        draw_shape(draw, shape, box, COLOURS[colour])
        objects.append((shape, colour, row, col, box))

    shape, colour, row, col, box = rng.choice(objects)
    article = "an" if colour[0] in "aeiou" else "a"
    if len(objects) > 1 and rng.random() < 0.3:
        article = "the"
    caption = f"{article} {colour} {shape} {_describe_position(row, col)}"
    return image, caption, list(box)


def make_demo_pairs(out_dir: str | Path, n: int = 16, image_size: int = 224, seed: int = 0) -> Path:
    """Write ``n`` synthetic image-caption pairs and return the path of ``pairs.jsonl``.

    Layout: ``out_dir/images/demo-XXX.png`` and ``out_dir/pairs.jsonl``, one JSON object per line
    ``{"id", "image", "caption", "bbox"}`` where ``image`` is relative to the jsonl's folder and
    ``bbox`` is the ``[x0, y0, x1, y1]`` pixel box of the shape the caption names (for pointing-game
    style checks). The same arguments give byte-identical files.

    Args:
        out_dir: Directory to write (created if missing).
        n: Number of pairs.
        image_size: Side of the square RGB images, in pixels.
        seed: Seed of the drawing; each image uses its own stream derived from it.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32, got {image_size}")
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(n):
        # One stream per image: pair k is the same whatever n is.
        rng = random.Random(f"{seed}-{index}")
        image, caption, bbox = _draw_pair(rng, image_size)
        sample_id = f"demo-{index:03d}"
        relative = f"images/{sample_id}.png"
        image.save(out / relative, format="PNG", optimize=True)
        record = {"id": sample_id, "image": relative, "caption": caption, "bbox": bbox}
        lines.append(json.dumps(record))
    pairs = out / "pairs.jsonl"
    pairs.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return pairs


def _read_captions(pairs: Path) -> list[str]:
    with pairs.open(encoding="utf-8") as handle:
        return [json.loads(line)["caption"] for line in handle if line.strip()]


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: regenerate the demo pairs and the tiny CLIP."""
    parser = argparse.ArgumentParser(
        prog="python -m m2ib_lightning.assets.demo",
        description="Write synthetic image-caption pairs and a tiny random CLIP trained-tokenizer model.",
    )
    parser.add_argument("out_dir", type=Path, nargs="?", default=Path("data/demo"), help="output folder")
    parser.add_argument("--n", type=int, default=16, help="number of image-caption pairs")
    parser.add_argument("--image-size", type=int, default=224, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the images and of the weights")
    parser.add_argument("--model-subdir", default="tiny-clip", help="model folder inside out_dir")
    parser.add_argument("--skip-check", action="store_true", help="do not reload and check the model")
    args = parser.parse_args(argv)

    from transformers.utils import logging as hf_logging

    # Per-shard progress bars are noise for a model this size.
    hf_logging.disable_progress_bar()

    pairs = make_demo_pairs(args.out_dir, n=args.n, image_size=args.image_size, seed=args.seed)
    model_dir = build_tiny_clip(
        args.out_dir / args.model_subdir,
        captions=_read_captions(pairs),
        image_size=args.image_size,
        seed=args.seed,
    )
    if not args.skip_check:
        verify_tiny_clip(model_dir)
    print(f"wrote {pairs} and {model_dir}")


if __name__ == "__main__":
    main()
