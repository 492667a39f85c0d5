"""Loading a transformers checkpoint from a hub id or a local directory, safely, with one clear error.

Weights: safetensors when the checkpoint has them. A checkpoint with only PyTorch ``.bin`` weights
(``pytorch_model.bin``: PubMedCLIP, many older hub models) is loaded with torch's weights-only
unpickler, which builds tensors and plain containers and nothing else, and one log line says so;
a ``.bin`` that holds any other object (a pickle that would run code) is refused. Nothing is ever
unpickled in full. ``use_safetensors: true`` loads safetensors only.

Any failure (a missing directory, offline mode without a cache, a missing optional package, a
weight format refused by the safety settings) becomes one :class:`~m2ib_lightning.errors.BackboneLoadError`
naming the source and what to do.
"""

from __future__ import annotations

import logging
import os
import pickle
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from m2ib_lightning.errors import BackboneLoadError, ConfigError

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


SAFETENSORS_FILES = ("model.safetensors", "model.safetensors.index.json")
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json")


def load_pretrained(model_cls: Any, family: str, model: str, *, revision: str | None, trust_remote_code: bool,
                    use_safetensors: bool | None, attn_implementation: str, cache_dir: str | None
                    ) -> tuple[str, Any, Any, Any]:
    """Load ``model_cls`` with its tokenizer and image processor from a hub id or a local directory.

    ``use_safetensors``: ``None`` (default) prefers safetensors and falls back to ``.bin`` weights
    read by torch's weights-only unpickler; ``True`` loads safetensors only; ``False`` prefers
    ``.bin`` (still weights-only). Returns ``(source, model, tokenizer, image_processor)``; any
    failure becomes one :class:`BackboneLoadError` naming the source and what to do (offline cache,
    a local directory, the weight format, missing optional packages), a ``.bin`` holding anything
    but tensors included.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    if use_safetensors not in (None, True, False):
        raise ConfigError(f"use_safetensors must be true, false or null, got {use_safetensors!r}")
    source, local = resolve_source(model)
    where = f"local directory {source}" if local else f"hub id {source!r}"
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    try:
        with _no_conversion_requests():
            # weights_only=True: a .bin goes through torch's weights-only unpickler, whatever the
            # library's default is (transformers 5 defaults to it; older releases did not always).
            loaded = model_cls.from_pretrained(source, use_safetensors=use_safetensors, weights_only=True,
                                               attn_implementation=attn_implementation, **common)
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        image_processor = AutoImageProcessor.from_pretrained(source, **common)
    except Exception as err:
        refused = _unpickling_error(err)
        if refused is not None:
            raise BackboneLoadError(
                f"refused the PyTorch .bin weights of the {family} model from {where}: they hold objects other "
                f"than tensors, and unpickling them could run code ({_blocked(refused)}). Nothing was unpickled "
                "in full; use a checkpoint with safetensors weights, or .bin weights saved from a state_dict"
            ) from err
        if not isinstance(err, OSError | ValueError | ImportError):
            raise
        hint = ""
        if not local:
            hint = (
                " Offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the cache."
                if is_offline()
                else " Check the id, your network and, for gated models, your token."
            )
            hint += " To use a checkpoint on disk, pass its directory instead."
        if use_safetensors and "safetensors" in str(err).lower():
            hint += (" use_safetensors: true loads safetensors weights only; leave it null (the default) to "
                     "load .bin weights with torch's weights-only unpickler.")
        if "sentencepiece" in str(err).lower():
            hint += " This tokenizer needs the sentencepiece package (pip install sentencepiece)."
        detail = str(err).strip().rstrip(".")
        raise BackboneLoadError(f"could not load a {family} model from {where}: {detail}.{hint}") from err
    if _pickle_weights(source, local, use_safetensors, revision, cache_dir):
        log.info("%s: no safetensors weights; loaded its PyTorch .bin weights with torch's weights-only unpickler "
                 "(tensors only, no code run)", source)
    return source, loaded, tokenizer, image_processor


@contextmanager
def _no_conversion_requests() -> Iterator[None]:
    """No request to the hub's safetensors conversion service while loading: for a ``.bin``-only
    repository transformers would otherwise ask it to open a pull request on the model's repository
    (and with ``use_safetensors=True`` load the weights of that pull request instead of the pinned
    revision)."""
    name = "DISABLE_SAFETENSORS_CONVERSION"
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _unpickling_error(err: BaseException | None) -> pickle.UnpicklingError | None:
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, pickle.UnpicklingError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None


def _blocked(err: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused (not its advice to turn the check off)."""
    found = re.search(r"GLOBAL ([\w.]+)", str(err))
    if found:
        return f"the file asks for GLOBAL {found.group(1)}, which the weights-only unpickler does not allow"
    return "the weights-only unpickler refused it"


def _pickle_weights(source: str, local: bool, use_safetensors: bool | None, revision: str | None,
                    cache_dir: str | None) -> bool:
    """Whether ``from_pretrained`` read ``.bin`` weights (what it does when no safetensors file is
    there, or when ``use_safetensors`` is False and a ``.bin`` is)."""
    if use_safetensors:
        return False
    if local:
        has = {name for name in SAFETENSORS_FILES + PICKLE_FILES if (Path(source) / name).is_file()}
    else:
        from huggingface_hub import try_to_load_from_cache

        has = {name for name in SAFETENSORS_FILES + PICKLE_FILES
               if isinstance(try_to_load_from_cache(source, name, cache_dir=cache_dir, revision=revision), str)}
    pickles, safes = has & set(PICKLE_FILES), has & set(SAFETENSORS_FILES)
    return bool(pickles) and (use_safetensors is False or not safes)
