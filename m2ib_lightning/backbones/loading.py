"""Loading a transformers checkpoint from a hub id or a local directory, with one clear error.

Any failure (a missing directory, offline mode without a cache, a missing optional package, a
weight format refused by the safety settings) becomes one :class:`~m2ib_lightning.errors.BackboneLoadError`
naming the source and what to do.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from m2ib_lightning.errors import BackboneLoadError

log = logging.getLogger(__name__)


def resolve_source(model: str | os.PathLike) -> tuple[str, bool]:
    """(source, is_local). A string that names an existing directory is local; a path-like
    string that does not exist is an error here rather than an opaque hub lookup later."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneLoadError(
                f"{path} is a directory but holds no config.json; expected a checkpoint saved with "
                "save_pretrained (config.json, model.safetensors, tokenizer and preprocessor files)"
            )
        return str(path), True
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local or path.exists():
        raise BackboneLoadError(f"checkpoint directory {text!r} does not exist")
    return text, False


def is_offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def load_pretrained(model_cls: Any, family: str, model: str, *, revision: str | None, trust_remote_code: bool,
                    use_safetensors: bool, attn_implementation: str, cache_dir: str | None
                    ) -> tuple[str, Any, Any, Any]:
    """Load ``model_cls`` with its tokenizer and image processor from a hub id or a local directory.

    Returns ``(source, model, tokenizer, image_processor)``; any failure becomes one
    :class:`BackboneLoadError` naming the source and what to do (offline cache, a local directory,
    safetensors, missing optional packages).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    source, local = resolve_source(model)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    try:
        loaded = model_cls.from_pretrained(
            source, use_safetensors=use_safetensors, attn_implementation=attn_implementation, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        image_processor = AutoImageProcessor.from_pretrained(source, **common)
    except (OSError, ValueError, ImportError) as err:
        where = f"local directory {source}" if local else f"hub id {source!r}"
        hint = ""
        if not local:
            hint = (
                " Offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the cache."
                if is_offline()
                else " Check the id, your network and, for gated models, your token."
            )
            hint += " To use a checkpoint on disk, pass its directory instead."
        if use_safetensors and "safetensors" in str(err).lower():
            hint += " Only safetensors weights are loaded by default (use_safetensors: false to allow .bin)."
        if "sentencepiece" in str(err).lower():
            hint += " This tokenizer needs the sentencepiece package (pip install sentencepiece)."
        detail = str(err).strip().rstrip(".")
        raise BackboneLoadError(f"could not load a {family} model from {where}: {detail}.{hint}") from err
    return source, loaded, tokenizer, image_processor

