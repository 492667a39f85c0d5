"""A Python API for one image-text pair or a few, for notebooks: :func:`explain`.

It runs the same code as ``python train.py fit``: the backbone's :class:`~m2ib_lightning.data.Preprocessor`,
:meth:`M2IBAttribution.explain_batch` (which works without a Trainer) and the records' encoding, so a
pair explained here gets the map a run would write for it (same sample id and seed: the same noise).
With ``output_dir``, the records go to disk through the same
:class:`~m2ib_lightning.outputs.rundir.RunDirectory` as a run's (settings checked, finished ids passed
over and read back).

Example::

    >>> from m2ib_lightning import CLIPBackbone, explain, overlay_image      # doctest: +SKIP
    >>> backbone = CLIPBackbone("openai/clip-vit-base-patch32")              # doctest: +SKIP
    >>> [rec] = explain("cat.jpg", "a cat on a sofa", backbone)              # doctest: +SKIP
    >>> rec.image_map.shape, list(zip(rec.tokens, rec.text_scores))          # doctest: +SKIP
    >>> overlay_image("cat.jpg", rec, backbone.image_processor)              # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2ib_lightning.backbones import BackboneAdapter, CLIPBackbone
from m2ib_lightning.data import Preprocessor, load_image
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.m2ib import M2IBAttribution
from m2ib_lightning.outputs import AttributionRecord, load_attributions
from m2ib_lightning.outputs.format import records
from m2ib_lightning.outputs.rundir import RunDirectory, run_metadata

__all__ = ["explain", "pair_id"]

ImageLike = Image.Image | str | os.PathLike | bytes | np.ndarray


def pair_id(image: Image.Image, text: str) -> str:
    """A stable id from the pixels and the caption: the same pair gets the same noise (and map)
    wherever it appears in a call, and in every call."""
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{image.width}x{image.height}\x1f{text}\x1f".encode())
    digest.update(image.tobytes())
    return f"pair-{digest.hexdigest()}"


def _as_list(value: Any, kind: tuple[type, ...]) -> list[Any]:
    return [value] if isinstance(value, kind) else list(value)


def _image(value: Any, index: int) -> Image.Image:
    if isinstance(value, np.ndarray):
        value = Image.fromarray(value)
    try:
        return load_image(value, None)
    except ValueError as err:
        raise ValueError(f"image {index}: {err}") from err


def explain(
    images: ImageLike | Sequence[ImageLike],
    texts: str | Sequence[str],
    model: str | BackboneAdapter | M2IBAttribution = "openai/clip-vit-base-patch32",
    *,
    ids: Sequence[str] | None = None,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    precision: str = "32-true",
    output_dir: str | os.PathLike | None = None,
    **options: Any,
) -> list[AttributionRecord]:
    """Explain image-text pairs; returns one :class:`~m2ib_lightning.outputs.AttributionRecord` per pair.

    Args:
        images: one image or a list: ``PIL.Image``, a path, encoded bytes, or an ``(H, W, 3)`` uint8 array.
        texts: one caption or a list. ``N`` images with ``N`` texts give ``N`` pairs; one image with
            ``N`` texts (or ``N`` images with one text) pairs it with each.
        model: a hub id or local directory of a CLIP checkpoint (loaded with
            :class:`~m2ib_lightning.CLIPBackbone`), a loaded backbone adapter (reuse it across calls,
            e.g. a :class:`~m2ib_lightning.backbones.siglip.SigLIPBackbone`), or a ready ``M2IBAttribution``.
        ids: sample ids (they seed the noise); default: :func:`pair_id` of each pair's pixels and text.
        batch_size: pairs per optimisation batch.
        device: where to run (default: where the model is, CPU for a new one).
        precision: ``"32-true"`` or ``"bf16-mixed"`` (autocast to bfloat16, as the Trainer's
            ``precision: bf16-mixed`` does), so maps match those of a run with that setting.
        output_dir: also write the records there, as a run does (same format, same settings check;
            pairs whose id the directory already holds are read back instead of explained again).
        **options: ``M2IBAttribution`` settings when ``model`` is not a module: ``vision_layer``,
            ``text_layer``, ``sides``, ``steps``, ``copies``, ``seed``, ``vision_bottleneck``,
            ``text_bottleneck``, ...

    Returns:
        Records in input order: ``image_map`` ``(H, W)`` float32 in [0, 1] at the model's input size,
        ``patch_scores`` ``(h, w)``, ``tokens`` and ``text_scores`` ``(len(tokens),)`` in [0, 1], and
        the clean ``similarity``; exactly what a run writes (maps stored as float16).
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if precision not in ("32-true", "bf16-mixed"):
        raise ConfigError(f"precision must be '32-true' or 'bf16-mixed', got {precision!r}")
    image_list = _as_list(images, (Image.Image, str, os.PathLike, bytes, np.ndarray))
    text_list = _as_list(texts, (str,))
    n_img, n_txt = len(image_list), len(text_list)
    if n_img != n_txt and 1 not in (n_img, n_txt) or not n_img or not n_txt:
        raise ValueError(f"expected as many images as texts, or one of either; got {n_img} images and {n_txt} texts")
    n = max(n_img, n_txt)
    for i, text in enumerate(text_list):
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"text {i} must be a non-empty string, got {text!r}")
    loaded = [_image(v, i) for i, v in enumerate(image_list)]
    pairs = [(loaded[i if n_img > 1 else 0], text_list[i if n_txt > 1 else 0].strip()) for i in range(n)]
    if ids is None:
        ids = [pair_id(img, txt) for img, txt in pairs]
    elif len(ids) != n:
        raise ValueError(f"expected {n} ids (one per pair), got {len(ids)}")

    module = _module(model, options)
    if device is not None:
        module.to(device)
    run = None
    if output_dir is not None:
        run = RunDirectory(output_dir, run_metadata(module, precision))
    todo = [i for i in range(n) if run is None or str(ids[i]) not in run.finished]
    target = next((b.device for b in module.backbone.parameters()), torch.device("cpu"))
    preprocess = Preprocessor.from_backbone(module.backbone)
    batches = []
    for start in range(0, len(todo), batch_size):
        chunk = [pairs[i] for i in todo[start : start + batch_size]]
        inputs = preprocess([p[0] for p in chunk], [p[1] for p in chunk])
        batches.append({"ids": [str(ids[i]) for i in todo[start : start + batch_size]],
                        **{k: v.to(target) for k, v in inputs.items()}})
    autocast = torch.autocast(target.type, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    with autocast:
        # Bottlenecks that need dataset statistics (IBA-style) get them from these pairs unless
        # they have them already (a stats_file, an earlier call, or module.fit_bottleneck_statistics
        # on a representative set first: then later calls do not depend on the pairs given).
        module.fit_bottleneck_statistics(batches)
    found: dict[str, AttributionRecord] = {}
    for batch in batches:
        with autocast:
            explanation = module.explain_batch(batch)
        if run is not None:
            run.add(explanation)
        found.update((rec.id, rec) for rec in records(explanation))
    if run is not None:
        run.close()
        stored = load_attributions(run.directory)
        found.update((str(i), stored[str(i)]) for i in ids if str(i) not in found)
    return [found[str(i)] for i in ids]


def _module(model: str | BackboneAdapter | M2IBAttribution, options: dict[str, Any]) -> M2IBAttribution:
    if isinstance(model, M2IBAttribution):
        if options:
            raise ConfigError(f"options {sorted(options)} only apply when model is not an M2IBAttribution; "
                              "set them on the module instead")
        return model
    backbone = model if isinstance(model, BackboneAdapter) else CLIPBackbone(model)
    return M2IBAttribution(backbone, **options)
