"""Fingerprints of what decides a backbone's maps: its weights and its tokenizer's vocabulary.

Stored with every run's outputs and compared when a run resumes into the same directory, and used
to key cached dataset statistics, so that maps or statistics of one checkpoint are never mixed with
another's, whatever path or name it was loaded under.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import torch
from torch import nn


def weights_fingerprint(module: nn.Module) -> str:
    """A short sha256 of ``module``'s weights (every state_dict entry: name, shape, dtype, bytes).

    Identifies the model that something derived from it (e.g. cached dataset statistics) belongs
    to, whatever name or path it was loaded under. About a second per GB of weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """What of a tokenizer decides the token ids: a short sha256 of its vocabulary (token -> id) and
    its maximum length (captions are truncated to it); ``None`` when it exposes no vocabulary.

    Looks through wrappers (``.tokenizer``): transformers tokenizers (``get_vocab``) and open_clip's
    BPE tokenizer (``encoder``).
    """
    vocab = None
    current = tokenizer
    for _ in range(3):
        if current is None:
            break
        get_vocab = getattr(current, "get_vocab", None)
        encoder = getattr(current, "encoder", None)
        if callable(get_vocab):
            try:
                vocab = get_vocab()
            except (NotImplementedError, AttributeError, TypeError):  # e.g. a remote-code tokenizer without one
                vocab = None
        if not vocab and isinstance(encoder, dict):
            vocab = encoder
        if vocab:
            break
        current = getattr(current, "tokenizer", None)
    if not vocab:
        return None
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    length = getattr(tokenizer, "model_max_length", None)
    return {"vocab": digest.hexdigest()[:16], "max_length": length if isinstance(length, int) else None}

