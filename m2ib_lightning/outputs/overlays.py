"""The image as the model saw it, and a map over it: shared by the report, TensorBoard and the API.

The maps live in the model's input space (the image after the checkpoint's resize and crop), so an
overlay must show the image the same way: :func:`model_view` runs the checkpoint's image processor
and undoes its normalisation (:func:`pixels_to_image`), and :func:`overlay_image` blends a record's
map over that with the writer's colour ramp.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import torch
from PIL import Image

from m2ib_lightning.data import load_image
from m2ib_lightning.outputs.format import AttributionRecord

log = logging.getLogger(__name__)

__all__ = ["colour_ramp", "model_view", "overlay", "overlay_image", "pixels_to_image"]


def colour_ramp(values: np.ndarray) -> np.ndarray:
    """``(H, W)`` in [0, 1] -> ``(H, W, 3)`` uint8, a jet-like colour ramp (blue -> red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    rgb = np.clip(1.5 - np.abs(4.0 * v - np.array([3.0, 2.0, 1.0])), 0.0, 1.0)
    return (rgb * 255).astype(np.uint8)


def overlay(image: np.ndarray, heat: np.ndarray, strength: float = 0.5) -> Image.Image:
    """Blend an RGB uint8 image ``(H, W, 3)`` with the colour-mapped map ``(H, W)``."""
    mixed = (1 - strength) * image.astype(np.float32) + strength * colour_ramp(heat).astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def pixels_to_image(pixel_values: torch.Tensor, image_processor: Any) -> np.ndarray:
    """Model input ``(3, H, W)`` -> the RGB uint8 image ``(H, W, 3)`` it came from (normalisation undone)."""
    mean = torch.tensor(getattr(image_processor, "image_mean", [0.0] * 3), dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(getattr(image_processor, "image_std", [1.0] * 3), dtype=torch.float32).view(3, 1, 1)
    pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
    return (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def model_view(image: Image.Image, size: tuple[int, int], image_processor: Any = None) -> np.ndarray:
    """The image as the model saw it, ``(H, W, 3)`` uint8 at the map's ``size = (H, W)``.

    With the checkpoint's image processor this is exact (its resize, crop and normalisation, undone).
    Without it, CLIP's convention is assumed: shortest edge resized to the input size, centre crop.
    """
    image = image.convert("RGB")
    if image_processor is not None:
        pixels = image_processor(images=[image], return_tensors="pt")["pixel_values"][0]
        if tuple(pixels.shape[-2:]) == tuple(size):
            return pixels_to_image(pixels, image_processor)
        log.warning("image processor gives %s, the maps are %s: using a centre crop instead",
                    tuple(pixels.shape[-2:]), tuple(size))
    h, w = size
    scale = max(h / image.height, w / image.width)
    rw, rh = max(w, round(image.width * scale)), max(h, round(image.height * scale))
    resized = image.resize((rw, rh), Image.BICUBIC)
    left, top = (rw - w) // 2, (rh - h) // 2
    return np.asarray(resized.crop((left, top, left + w, top + h)))


def overlay_image(image: Image.Image | str | os.PathLike, record: AttributionRecord, image_processor: Any = None,
                  strength: float = 0.5) -> Image.Image:
    """``record``'s image map blended over ``image`` as the model saw it (the writer's colour ramp)."""
    if record.image_map is None:
        raise ValueError(f"record {record.id!r} has no image map (the vision side was not explained)")
    picture = image if isinstance(image, Image.Image) else load_image(image, None)
    return overlay(model_view(picture, record.image_map.shape, image_processor), record.image_map, strength)
