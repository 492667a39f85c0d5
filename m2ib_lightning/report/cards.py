"""One sample's card: its pictures, caption, tokens and numbers, as data for ``templates/card.html.j2``.

Per sample the card shows the image as the model saw it (resized and cropped by the checkpoint's
image processor) and the map over it, the caption, the tokens shaded by their scores, the clean
similarity, and numbers: the run's own per-sample evaluation values when it stored them, else the
pointing game and the energy inside the ground truth when the data row has a ``bbox`` or ``mask``,
plus any given per id in a metrics file. Without a data row: the writer's overlay PNG where it
exists, else the map by itself, and the tokens instead of the caption.

A card is plain JSON data (strings, numbers, lists): the report spools it to disk between the pass
over the data and writing the HTML files (:mod:`m2ib_lightning.report.build`).
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from m2ib_lightning.data import load_image
from m2ib_lightning.outputs import OVERLAYS
from m2ib_lightning.outputs.format import overlay_name
from m2ib_lightning.outputs.overlays import colour_ramp, model_view, overlay
from m2ib_lightning.report.tokens import display, token_spans

log = logging.getLogger(__name__)

__all__ = ["CardMaker", "ground_truth_metrics", "image_processor", "png"]


def png(image: Image.Image | np.ndarray, side: int | None = None) -> str:
    """``image`` as a ``data:image/png;base64,...`` URI, its longest side at most ``side`` pixels."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    if side is not None and max(image.size) > side:
        image = image.copy()
        image.thumbnail((side, side), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def ground_truth_metrics(image_map: np.ndarray, truth: np.ndarray, tolerance: float = 15.0,
                         tolerance_units: str = "relative") -> dict[str, float]:
    """Per-sample localisation metrics, with the evaluation's definitions
    (:mod:`m2ib_lightning.evaluation.metrics`) and its tolerance rule.

    Args:
        image_map: ``(H, W)`` in [0, 1]; truth: ``(H, W)`` bool at the same size.
        tolerance: pointing-game tolerance; tolerance_units: ``relative`` (pixels of a 224-px map,
            scaled to the map's size) or ``pixels`` (of the map), as ``evaluation.tolerance_units``
            (:func:`~m2ib_lightning.evaluation.functional.tolerance_pixels`).

    Returns:
        ``pointing_game`` (1 if the map's maximum is within ``tolerance`` of the region),
        ``energy_pointing_game`` (fraction of the map's mass inside it) and ``mask_auroc`` (left out
        when the region is empty or everything).
    """
    import torch

    from m2ib_lightning.evaluation.functional import tolerance_pixels
    from m2ib_lightning.evaluation.metrics import energy_pointing_game, mask_auroc, pointing_game

    if truth.shape != image_map.shape:
        raise ValueError(f"ground truth {truth.shape} and map {image_map.shape} differ in size")
    maps, masks = torch.from_numpy(np.asarray(image_map, dtype=np.float32))[None], torch.from_numpy(truth)[None]
    pixels = tolerance_pixels(tolerance, image_map.shape, tolerance_units)
    out = {"pointing_game": float(pointing_game(maps, masks, pixels)),
           "energy_pointing_game": float(energy_pointing_game(maps, masks))}
    auroc = float(mask_auroc(maps, masks))
    if auroc == auroc:  # NaN: undefined for this mask
        out["mask_auroc"] = auroc
    return out


def image_processor(model: str | None, metadata: Mapping[str, Any]) -> Any:
    """The run's image processor: ``model`` or the run's backbone when it is a local directory (else ``None``)."""
    source = model or metadata.get("backbone")
    if not source or not Path(str(source)).expanduser().is_dir():
        return None
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(Path(str(source)).expanduser()))
    except (OSError, ValueError) as err:
        log.warning("could not load the image processor of %s (%s): assuming CLIP's centre crop", source, err)
        return None


class CardMaker:
    """Builds the cards of one run; every number a card shows is also added to :attr:`totals`.

    Args:
        records: the run's records (:func:`~m2ib_lightning.load_attributions`).
        directory: the run's output directory (for the writer's overlay PNGs).
        extra: per-sample numbers by id (the run's evaluation values, a metrics file's).
        image_column, text_column: the data row's columns.
        root: folder that relative image paths of the data are resolved against.
        processor: the checkpoint's image processor (``None``: CLIP's centre crop is assumed).
        image_size: longest side of the embedded images (``None``: the map's size).
        tolerance, tolerance_units: the pointing game's tolerance and its units (see :func:`ground_truth_metrics`).

    Attributes:
        totals: every number of the cards made so far, by name (the means and the sort keys).
    """

    def __init__(self, records: Any, directory: Path, extra: Mapping[str, Mapping[str, float]], *,
                 image_column: str, text_column: str, root: Path | None, processor: Any,
                 image_size: int | None, tolerance: float, tolerance_units: str = "relative") -> None:
        self.records, self.directory, self.extra = records, directory, extra
        self.image_column, self.text_column, self.root = image_column, text_column, root
        self.processor, self.image_size = processor, image_size
        self.tolerance, self.tolerance_units = tolerance, tolerance_units
        self.totals: dict[str, list[float]] = {}

    def __call__(self, sample_id: str, row: Mapping[str, Any] | None) -> dict[str, Any]:
        """The card of ``sample_id``, with its data ``row`` or without (``None``)."""
        record = self.records[sample_id]
        extra = self.extra.get(sample_id, {})
        caption = row.get(self.text_column) if row is not None else None
        caption = caption if isinstance(caption, str) else None
        image = self._image(sample_id, row)
        values = {"similarity": record.similarity}
        picture = overlay_png = None
        if record.image_map is not None:
            size = record.image_map.shape
            if image is not None:
                view = model_view(image, size, self.processor)
                picture = png(view, self.image_size)
                overlay_png = png(overlay(view, record.image_map), self.image_size)
                truth = _truth(row, size, image)
                if truth is not None and "image/pointing_game" not in extra:  # else the run's own values
                    values.update(ground_truth_metrics(record.image_map, truth, self.tolerance,
                                                               self.tolerance_units))
            else:
                stored = _stored_overlay(self.directory, sample_id)
                overlay_png = png(stored if stored is not None else Image.fromarray(colour_ramp(record.image_map)),
                                  self.image_size)
        elif image is not None:
            picture = png(image, self.image_size)
        values.update(extra)
        for k, v in values.items():
            self.totals.setdefault(k, []).append(v)
        tokens = words = None
        if record.tokens is not None and record.text_scores is not None:
            tokens = token_spans(record.tokens, record.text_scores)
        elif record.tokens is not None:
            words = " ".join(display(t) for t in record.tokens)
        return {"id": record.id, "search": f"{record.id} {caption or ' '.join(record.tokens or [])}".lower(),
                "picture": picture, "overlay": overlay_png, "caption": caption, "tokens": tokens, "words": words,
                "metrics": {k: float(v) for k, v in values.items()}}

    def _image(self, sample_id: str, row: Mapping[str, Any] | None) -> Image.Image | None:
        if row is None:
            return None
        try:
            return load_image(row.get(self.image_column), self.root)
        except ValueError as err:
            log.warning("report: image of %s not shown: %s", sample_id, err)
            return None


def _truth(row: Mapping[str, Any], size: tuple[int, int], image: Image.Image | None) -> np.ndarray | None:
    value = row.get("mask") if row.get("mask") is not None else row.get("bbox")
    if value is None:
        return None
    from m2ib_lightning.evaluation.ground_truth import ground_truth

    image_size = (image.height, image.width) if image is not None else None
    return ground_truth(value, size, image_size).numpy()


def _stored_overlay(directory: Path, sample_id: str) -> Image.Image | None:
    path = directory / OVERLAYS / overlay_name(sample_id)
    return Image.open(path).convert("RGB") if path.is_file() else None
