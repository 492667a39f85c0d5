"""A caption's tokens as the report shows them: readable text, shaded by their scores."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from m2ib_lightning.report.render import macro

__all__ = ["display", "token_html", "token_spans"]

# Sub-word markers of common tokenizers: CLIP BPE ends words with </w>, GPT-2 BPE and
# sentencepiece start them with these characters.
_WORD_END, _WORD_STARTS = "</w>", ("\u0120", "\u2581")


def display(token: str) -> str:
    """A token without its sub-word markers (``red</w>`` -> ``red``, ``\u2581cat`` -> ``cat``)."""
    text = token
    if text.endswith(_WORD_END):
        text = text[: -len(_WORD_END)]
    for mark in _WORD_STARTS:
        text = text.replace(mark, " ")
    return text.strip() or token


def token_spans(tokens: Sequence[str], scores: Sequence[float]) -> list[dict[str, Any]]:
    """What the template needs per token: ``token`` (as stored), ``text`` (:func:`display`),
    ``score`` (clipped to [0, 1]) and ``special`` (``<|startoftext|>``, ``[CLS]``: shown muted)."""
    if len(tokens) != len(scores):
        raise ValueError(f"expected one score per token, got {len(tokens)} tokens and {len(scores)} scores")
    return [{"token": token, "text": display(token), "score": float(np.clip(score, 0.0, 1.0)),
             "special": (token.startswith("<") and token.endswith(">") and len(token) > 2)
             or (token.startswith("[") and token.endswith("]"))}
            for token, score in zip(tokens, scores)]


def token_html(tokens: Sequence[str], scores: Sequence[float]) -> str:
    """Tokens as ``<span>`` s whose background opacity is the token's score in [0, 1] (inline styles)."""
    return macro("macros.html.j2", "token_spans", token_spans(tokens, scores))
