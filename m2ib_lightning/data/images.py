"""Untrusted image values -> RGB ``PIL.Image``: bounded, repaired where the repair is faithful, else a reason.

A dataset row may hold its image as a ``PIL.Image``, as ``{"bytes": ..., "path": ...}`` (the
``datasets.Image`` storage form), as raw bytes, as a local path, or as an http(s) URL. Whatever the
source, :func:`read_image` either returns an RGB image together with notes on what was repaired, or
raises :class:`ImageError` whose message is the skip reason written to the skip manifest.

What is repaired (the model needs 8-bit RGB):

* grayscale, bilevel, palette (with or without transparency), RGBA / LA (alpha dropped, as PIL
  does), YCbCr, LAB, HSV: converted to RGB by PIL, without a note (lossless or the usual reading);
* CMYK: converted with PIL's approximate formula, noted;
* 16-bit and 32-bit integer or float images (``I;16*``, ``I``, ``F``): PIL would clip them to 8
  bits (a 12-bit X-ray becomes white), so they are rescaled linearly from their own min..max to
  0..255, noted.

What is skipped: undecodable, truncated or missing files; zero-size images; images with more than
``max_pixels`` pixels (checked from the header, before anything is decoded: a decompression bomb
never allocates); images whose long side is more than ``max_aspect_ratio`` times the short one
(CLIP's processor scales the SHORT side to 224 px: a 1 x 3000 image becomes 224 x 672000 and takes
many seconds and gigabytes); formats outside :data:`IMAGE_FORMATS` (PIL can hand EPS to
Ghostscript, which has no place in a pipeline reading web data). Any exception from a decoder is a
skip too: Pillow raises more than ``OSError`` on malformed files.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: PIL formats we decode (JPEG covers MPO). Anything else is refused from its header: no other plugin runs.
IMAGE_FORMATS: tuple[str, ...] = ("JPEG", "PNG", "GIF", "BMP", "DIB", "TIFF", "WEBP", "PPM", "JPEG2000", "TGA", "AVIF")
#: default bound on width x height (PIL warns above 89.5M and refuses above 179M pixels)
DEFAULT_MAX_PIXELS = 50_000_000
#: default bound on long side / short side (web banners reach about 10)
DEFAULT_MAX_ASPECT_RATIO = 20.0

_HIGH_BIT_DEPTH = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")
_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


class ImageError(ValueError):
    """An image that cannot be used; the message is the skip reason.

    Attributes:
        transient: True when retrying later might succeed (a network timeout, an HTTP 503), so a
            resumed run may want to try the sample again.
    """

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


@dataclass
class LoadedImage:
    """An RGB image and the repairs made to it (empty when it was used as stored)."""

    image: Image.Image
    notes: list[str] = field(default_factory=list)


def url_scheme(value: str) -> str | None:
    """The lower-case scheme of ``value`` if it looks like a URL (``scheme://...``), else ``None``."""
    m = _URL.match(value)
    return m.group(1).lower() if m else None


def read_image(
    value: Any,
    root: Path | None = None,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    fetch: Callable[[str], bytes] | None = None,
    local_files: bool = True,
    max_aspect_ratio: float = DEFAULT_MAX_ASPECT_RATIO,
) -> LoadedImage:
    """Decode one dataset value into an RGB image, or raise :class:`ImageError` with the reason.

    Args:
        value: a ``PIL.Image``, ``{"bytes": ..., "path": ...}``, ``bytes``, a path, or an http(s) URL.
        root: folder that relative paths are resolved against.
        max_pixels: images with more pixels than this (width x height, read from the header) are refused.
        max_aspect_ratio: images whose long side exceeds this many times the short side are refused.
        fetch: downloads an http(s) URL (e.g. :class:`m2ib_lightning.data.fetch.Fetcher`); ``None`` refuses URLs.
        local_files: whether paths on this machine may be opened. A remote dataset should not make
            the job read arbitrary local files, so the datamodule turns this off unless the data
            is local or ``image_root`` is set.
    """
    limits = (max_pixels, max_aspect_ratio)
    if isinstance(value, Image.Image):
        return _finish(value, limits)
    if isinstance(value, dict):
        data, path = value.get("bytes"), value.get("path")
        if data:
            return _decode(data, limits)
        if path:
            value = path
        else:
            raise ImageError(f"no image in this row (got a dict with keys {sorted(value)} but no bytes or path)")
    if isinstance(value, bytes | bytearray | memoryview):
        if not value:
            raise ImageError("no image in this row (got empty bytes)")
        return _decode(bytes(value), limits)
    if isinstance(value, str) and url_scheme(value):
        scheme = url_scheme(value)
        if scheme not in ("http", "https"):
            raise ImageError(f"URL scheme {scheme!r} not allowed (only http and https are fetched): {_short(value)}")
        if fetch is None:
            raise ImageError(f"image is a URL but fetching is off: {_short(value)}")
        return _decode(fetch(value), limits)
    if isinstance(value, str | os.PathLike) and str(value):
        if not local_files:
            raise ImageError(
                f"image is a local path ({_short(str(value))}) but the dataset is remote; set image_root "
                "to read images from this machine"
            )
        p = Path(value).expanduser()
        path = p if p.is_absolute() or root is None else root / p
        try:
            with open(path, "rb") as f:
                return _decode(f, limits)
        except OSError as err:
            raise ImageError(f"unreadable image: {err.strerror or err} ({path})") from err
    raise ImageError(f"no image in this row (got {type(value).__name__})")


def load_image(value: Any, root: Path | None = None, **kwargs: Any) -> Image.Image:
    """The RGB image of :func:`read_image`, without the repair notes."""
    return read_image(value, root, **kwargs).image


def _decode(source: bytes | Any, limits: tuple[int, float]) -> LoadedImage:
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    try:
        image = Image.open(stream, formats=_formats())
        _check_size(image, limits)  # header only: nothing decoded yet
        image.load()
    except ImageError:
        raise
    except Exception as err:  # noqa: BLE001 - malformed files make Pillow raise struct.error, IndexError, ...
        raise ImageError(f"unreadable image: {_reproducible(err)}") from err
    return _finish(image, limits)


def _formats() -> tuple[str, ...]:
    # Only those this Pillow build has: AVIF and JPEG2000 depend on optional libraries.
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def _check_size(image: Image.Image, limits: tuple[int, float]) -> None:
    max_pixels, max_ratio = limits
    w, h = image.size
    if w <= 0 or h <= 0:
        raise ImageError(f"zero-size image ({w} x {h})")
    if w * h > max_pixels:
        raise ImageError(f"image too large: {w} x {h} = {w * h} pixels, more than max_image_pixels={max_pixels}")
    if max(w, h) > max_ratio * min(w, h):
        raise ImageError(f"extreme aspect ratio: {w} x {h}, more than max_aspect_ratio={max_ratio:g}")


def _finish(image: Image.Image, limits: tuple[int, float]) -> LoadedImage:
    _check_size(image, limits)
    notes: list[str] = []
    mode = image.mode
    try:
        if mode == "RGB":
            return LoadedImage(image, notes)
        if mode in _HIGH_BIT_DEPTH:
            image, note = _rescale_to_8bit(image)
            notes.append(note)
        elif mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")  # PIL asks for this route; the alpha is then dropped like RGBA's
        elif mode == "CMYK":
            notes.append("CMYK image converted to RGB (approximate colours)")
        return LoadedImage(image.convert("RGB"), notes)
    except Exception as err:  # noqa: BLE001 - a conversion failure is this sample's problem only
        raise ImageError(f"unsupported image mode {mode!r}: {_reproducible(err)}") from err


def _rescale_to_8bit(image: Image.Image) -> tuple[Image.Image, str]:
    """``(H, W)`` integer or float image -> ``L`` image, its min..max mapped linearly to 0..255."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    values = np.nan_to_num(values, nan=lo, posinf=hi, neginf=lo)
    scaled = np.zeros_like(values) if hi <= lo else (values - lo) / (hi - lo)
    out = Image.fromarray(np.clip(np.round(scaled * 255), 0, 255).astype(np.uint8))  # 2-D uint8: mode L
    return out, f"{image.mode} image rescaled from {lo:g}..{hi:g} to 8 bits"


def _reproducible(err: BaseException) -> str:
    # PIL names in-memory sources by their repr (a memory address); keep reasons reproducible.
    return re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "<bytes>", str(err)) or type(err).__name__


def _short(value: str, limit: int = 200) -> str:
    return value if len(value) <= limit else value[: limit - 3] + "..."
