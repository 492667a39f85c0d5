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

The package's modules: :mod:`.captions` (objects, noun phrases, caption specs and their checks),
:mod:`.drawing` (shapes, fills, backgrounds), :mod:`.scenes` (:class:`Scene`, :func:`draw_scene`);
here the training adapter (:class:`World2`, :data:`WORLD`) and the writer (:func:`make_world2`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from PIL import Image

from m2ib_lightning.assets.scenes import write_pairs
from m2ib_lightning.assets.world2.captions import (
    COLOURS,
    FILLS,
    KINDS,
    RELATIONS,
    SHAPES,
    CaptionSpec,
    NounPhrase,
    SceneObject,
    all_captions,
    all_specs,
    caption_holds,
    foils,
    relation,
    resolve,
    spec_index,
    true_specs,
)

# ``X as X``: public names outside __all__, importable from here as they were before the split.
from m2ib_lightning.assets.world2.captions import OPPOSITE as OPPOSITE
from m2ib_lightning.assets.world2.captions import PLURALS as PLURALS
from m2ib_lightning.assets.world2.captions import RELATION_GAP as RELATION_GAP
from m2ib_lightning.assets.world2.captions import all_captions_index as all_captions_index
from m2ib_lightning.assets.world2.captions import anchor_of as anchor_of
from m2ib_lightning.assets.world2.captions import noun_phrases as noun_phrases
from m2ib_lightning.assets.world2.drawing import BACKGROUNDS as BACKGROUNDS
from m2ib_lightning.assets.world2.drawing import LIGHT as LIGHT
from m2ib_lightning.assets.world2.drawing import draw_background as draw_background
from m2ib_lightning.assets.world2.drawing import draw_object as draw_object
from m2ib_lightning.assets.world2.drawing import silhouette as silhouette
from m2ib_lightning.assets.world2.scenes import KIND_WEIGHTS as KIND_WEIGHTS
from m2ib_lightning.assets.world2.scenes import MAX_SIZE as MAX_SIZE
from m2ib_lightning.assets.world2.scenes import MIN_SIZE as MIN_SIZE
from m2ib_lightning.assets.world2.scenes import Scene, draw_scene, scene_rng
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

    def scene_of(index: int) -> tuple[Image.Image, dict[str, Any]]:
        scene = draw_scene(scene_rng(seed, index), image_size)
        assert scene.spec is not None
        return scene.image, {"caption": scene.caption, "kind": scene.spec.kind, "bbox": scene.bbox(),
                             "mask": encode_mask(scene.mask()), "objects": [o.to_json() for o in scene.objects],
                             "referents": list(scene.referents), "anchor": scene.anchor}

    return write_pairs(out_dir, n, prefix, scene_of)


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
