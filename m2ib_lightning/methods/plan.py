"""Typed per-batch state of M2IB's inner optimisation: what is constant during it, and what a pass returns.

:meth:`~m2ib_lightning.methods.m2ib.M2IBAttribution.prepare` builds a :class:`BatchPlan` once per batch
(towers below the bottleneck, clean embeddings, chunks, noise keys); every optimisation step reads
it, and each pass returns one :class:`SideTerms` per explained side.

Shapes are static across batches, so that one compiled step (and one CUDA graph) serves a whole run:
captions are padded to a bucket length (:func:`bucket_length`, :func:`pad_text`), and a batch with
fewer samples than a chunk holds is padded with rows that copy its first sample and carry weight 0
(:func:`pad_rows`). Neither changes a map: padded tokens are masked out of attention and out of the
compression mean, and padded rows add nothing to the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import Side, TowerState

__all__ = ["BatchPlan", "Chunk", "SidePlan", "SideTerms", "bucket_length", "pad_rows", "pad_text"]


@dataclass
class Chunk:
    """Samples ``start:stop`` of the (padded) batch, run through the upper blocks together; every chunk
    of a side has the same shapes.

    Attributes:
        start, stop: the rows' positions in the padded batch.
        hidden: bottleneck input ``(n, L, D)`` float32; ``valid``: ``(n, L)`` bool.
        tokens: ``(n,)`` valid tokens x channels per sample: the compression term's normaliser.
        keys: ``(n, 2)`` int32 noise keys (:func:`~m2ib_lightning.methods.noise.sample_keys`).
        weight: ``(n,)`` float32, 1 for the batch's samples and 0 for padding rows.
        upper: the rows' state for the upper blocks, each sample repeated ``copies`` times
            (``n * K`` rows; its ``hidden`` is a placeholder: the noisy states are passed in).
        target: the other tower's clean embeddings of these samples ``(n, P)``.
    """

    start: int
    stop: int
    hidden: Tensor
    valid: Tensor
    tokens: Tensor
    keys: Tensor
    weight: Tensor
    upper: TowerState
    target: Tensor


@dataclass
class SidePlan:
    """One side's constant state during a batch's optimisation.

    Attributes:
        state: the bottleneck input of the padded batch, ``hidden`` ``(B', L, D)`` float32 and ``valid``.
        chunks: the padded batch cut into chunks of whole samples, all of one size.
        rows: rows (pairs x copies) per chunk (named in out-of-memory messages).
        samples: the batch's own samples ``B`` (the first ``B`` rows; the rest pad the last chunk).
        tokens: ``(B',)`` valid tokens x channels per sample; ``keys``: ``(B', 2)`` noise keys;
        weight: ``(B',)`` 1 for samples, 0 for padding rows.
        target: the other tower's clean embeddings ``(B', P)``.
    """

    state: TowerState
    chunks: list[Chunk]
    rows: int
    samples: int
    tokens: Tensor
    keys: Tensor
    weight: Tensor
    target: Tensor


@dataclass
class BatchPlan:
    """A batch's constant state: its ids and model inputs (captions padded to the bucket length), both
    towers' clean embeddings ``(B, P)``, the plan of each explained side, and where the caption's own
    positions sit in the padded ones (``text_offset``, ``text_length``: the input's length before padding).
    """

    ids: list[str]
    inputs: dict[str, Any]
    clean: dict[Side, Tensor]
    sides: dict[Side, SidePlan] = field(default_factory=dict)
    text_offset: int = 0
    text_length: int | None = None


@dataclass
class SideTerms:
    """One side's loss terms per sample, ``(B,)`` each, and its capacity ``(B, L, D)`` (the map)."""

    compression: Tensor
    relevance: Tensor
    capacity: Tensor


def bucket_length(length: int, bucket: int, limit: int) -> int:
    """The padded length of a caption batch of ``length`` tokens: the next multiple of ``bucket``, at
    most ``limit`` (the text tower's maximum); never shorter than ``length``."""
    if bucket <= 1 or length >= limit:
        return length
    return max(length, min(-(-length // bucket) * bucket, limit))


def pad_text(inputs: dict[str, Tensor], length: int, pad_id: int, left: bool = False) -> dict[str, Tensor]:
    """``inputs`` with ``input_ids`` padded with ``pad_id`` and ``attention_mask`` with 0 to ``length``
    positions (on the right, or on the left for a left-padding tokenizer)."""
    ids = inputs.get("input_ids")
    if ids is None or ids.shape[1] >= length:
        return inputs
    extra = length - ids.shape[1]
    out = dict(inputs)
    mask = inputs.get("attention_mask")
    if mask is None:
        mask = torch.ones_like(ids)
    pads = ((ids.new_full((ids.shape[0], extra), pad_id), mask.new_zeros((mask.shape[0], extra))))
    out["input_ids"] = torch.cat((pads[0], ids) if left else (ids, pads[0]), dim=1)
    out["attention_mask"] = torch.cat((pads[1], mask) if left else (mask, pads[1]), dim=1)
    return out


def pad_rows(state: TowerState, index: Tensor) -> TowerState:
    """``state``'s rows taken at ``index`` (``(B',)``: the batch's rows, then copies of row 0)."""
    return TowerState(hidden=state.hidden.index_select(0, index), valid=state.valid.index_select(0, index),
                      extras={k: v.index_select(0, index) for k, v in state.extras.items()})
