"""Typed per-batch state of M2IB's inner optimisation: what is constant during it, and what a pass returns.

:meth:`~m2ib_lightning.methods.m2ib.M2IBAttribution.prepare` builds a :class:`BatchPlan` once per batch
(towers below the bottleneck, clean embeddings, chunks, noise streams); every optimisation step reads
it, and each pass returns one :class:`SideTerms` per explained side.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import Side, TowerState

__all__ = ["BatchPlan", "Chunk", "SidePlan", "SideTerms"]


@dataclass
class Chunk:
    """Samples ``start:stop`` of a batch, run through the upper blocks together.

    Attributes:
        start, stop: the samples' positions in the batch.
        upper: their state for the upper blocks, each sample repeated ``copies`` times
            (``(stop - start) * K`` rows; its ``hidden`` is a placeholder: the noisy states are passed in).
        target: the other tower's clean embeddings of these samples ``(stop - start, P)``.
    """

    start: int
    stop: int
    upper: TowerState
    target: Tensor


@dataclass
class SidePlan:
    """One side's constant state during a batch's optimisation.

    Attributes:
        state: the bottleneck input, ``hidden`` ``(B, L, D)`` float32 and ``valid`` ``(B, L)``.
        chunks: the batch cut into chunks of whole samples.
        rows: rows (pairs x copies) of the largest chunk (named in out-of-memory messages).
        tokens: ``(B,)`` valid tokens x channels per sample: the compression term's normaliser.
        shapes: per sample, the shape of its noise ``(K, L_i, D)`` (its valid tokens only).
        generators: per sample, its noise stream.
        noise: a reused ``(n, K, L, D)`` buffer for one chunk's noise.
    """

    state: TowerState
    chunks: list[Chunk]
    rows: int
    tokens: Tensor
    shapes: list[tuple[int, int, int]]
    generators: list[torch.Generator]
    noise: Tensor


@dataclass
class BatchPlan:
    """A batch's constant state: its ids and model inputs, both towers' clean embeddings ``(B, P)``,
    and the plan of each explained side."""

    ids: list[str]
    inputs: dict[str, Any]
    clean: dict[Side, Tensor]
    sides: dict[Side, SidePlan] = field(default_factory=dict)


@dataclass
class SideTerms:
    """One side's loss terms per sample, ``(B,)`` each, and its capacity ``(B, L, D)`` (the map)."""

    compression: Tensor
    relevance: Tensor
    capacity: Tensor
