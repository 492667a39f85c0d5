"""A backbone adapter that runs each tower's lower blocks once per batch for every layer of a sweep.

:class:`LayerCache` wraps any :class:`~m2ib_lightning.backbones.BackboneAdapter` and forwards every call
to it, except :meth:`LayerCache.lower` inside :meth:`LayerCache.serving`: there, the first request of a
side and batch runs the tower from its embeddings block by block (``lower`` at the first layer, ``prepare_upper``,
then ``run_blocks`` one block at a time), keeps the hidden states after every block, and every
later request of that side and batch, at any layer, is served from them. A sweep over all ``N``
layers then pays for ``N`` blocks below its bottlenecks instead of ``N (N + 1) / 2``, and the
methods (``M2IBAttribution``) need no change: they call ``backbone.lower`` as always.

It is exact when ``run_blocks`` runs the blocks as ``lower`` does, which the adapter interface asks
of it (:meth:`~m2ib_lightning.backbones.BackboneAdapter.run_blocks`). The cache checks it once per
side on the first batch (the deepest cached layer against the adapter's own ``lower``, bit for bit)
and stops caching that side, with a warning, if they differ; an adapter without ``run_blocks`` is
served by its own ``lower``, one call per layer and batch, still shared between the settings of
that layer.

Cached states are only valid while the weights BELOW the bottleneck stay as they are: the
randomisation check of :mod:`.scores` changes only the blocks above it (and the read-out).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones import EMBEDDINGS, BackboneAdapter, Side, TowerState

log = logging.getLogger(__name__)

__all__ = ["LayerCache"]

#: attributes that live on the wrapper itself (everything else is read from the wrapped adapter)
_OWN = {"inner", "_batches", "_states", "_checked", "_uncached", "hits", "misses"}


class LayerCache(BackboneAdapter):
    """``inner`` with :meth:`lower` served from per-batch hidden states of every layer.

    Args:
        inner: the adapter to wrap (its weights are shared, not copied).

    Attributes:
        hits, misses: ``lower`` calls served from the cache, and calls passed to ``inner`` (outside
            :meth:`batch`, for other inputs, or for a side the cache does not serve).
    """

    def __init__(self, inner: BackboneAdapter) -> None:
        super().__init__()
        self.inner = inner
        self._batches: list[dict[str, Tensor]] = []
        self._states: dict[tuple[Side, int], tuple[TowerState, dict[int, Tensor]]] = {}
        self._checked: set[str] = set()
        self._uncached: set[str] = set()
        self.hits = self.misses = 0

    # ----------------------------------------------------------------------------- delegation
    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules (``inner``)
        except AttributeError:
            if name in _OWN or name.startswith("__"):
                raise
            return getattr(self._modules["inner"], name)

    @property
    def num_layers(self) -> dict[str, int]:  # type: ignore[override]
        return self.inner.num_layers

    @property
    def embeddings_layer(self) -> bool:  # type: ignore[override]
        return self.inner.embeddings_layer

    @property
    def vision_prefix_tokens(self) -> int:  # type: ignore[override]
        return self.inner.vision_prefix_tokens

    @property
    def text_positions(self) -> int | None:  # type: ignore[override]
        return self.inner.text_positions

    @property
    def max_text_length(self) -> int:
        return self.inner.max_text_length

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        return self.inner.vision_grid(pixel_values)

    def check_layer(self, side: Side, layer: int, allow_embeddings: bool = True) -> None:
        self.inner.check_layer(side, layer, allow_embeddings)

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        return self.inner.prepare_upper(side, state, layer)

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        return self.inner.upper(side, hidden, state, layer)

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        return self.inner.embed(side, inputs)

    def pool_positions(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        return self.inner.pool_positions(side, inputs)

    def readout_weights(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        return self.inner.readout_weights(side, hidden, state)

    def pooled_readout(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        return self.inner.pooled_readout(side, hidden, state)

    def run_blocks(self, side: Side, hidden: Tensor, state: TowerState, start: int, stop: int) -> Tensor:
        return self.inner.run_blocks(side, hidden, state, start, stop)

    def randomization_stages(self, side: Side = "vision") -> list[tuple[str, list[nn.Module]]]:
        return self.inner.randomization_stages(side)

    def special_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.inner.special_tokens(input_ids, attention_mask)

    def tokens(self, input_ids: Tensor, valid: Tensor) -> list[list[str]]:
        return self.inner.tokens(input_ids, valid)

    def attention_unavailable(self, side: Side) -> str | None:
        return self.inner.attention_unavailable(side)

    def trace_attention(self, side: Side, inputs: dict[str, Tensor], start_layer: int = 0) -> Any:
        return self.inner.trace_attention(side, inputs, start_layer)

    def pooled_attention(self, side: Side, inputs: dict[str, Tensor]) -> Any:
        return self.inner.pooled_attention(side, inputs)

    # ---------------------------------------------------------------------------------- cache
    @contextmanager
    def serving(self, batches: list[dict[str, Tensor]]) -> Iterator[LayerCache]:
        """Serve ``lower`` for these batches' model inputs (the same tensor objects) from the cache while
        inside; everything cached is dropped on exit."""
        self._batches = list(batches)
        self._states = {}
        try:
            yield self
        finally:
            self._batches, self._states = [], {}

    def _batch_of(self, side: Side, inputs: dict[str, Tensor]) -> int | None:
        key = "pixel_values" if side == "vision" else "input_ids"
        tensor = inputs.get(key)
        for index, batch in enumerate(self._batches):
            if tensor is not None and batch.get(key) is tensor and (
                    side == "vision" or inputs.get("attention_mask") is batch.get("attention_mask")):
                return index
        return None

    def first_layer(self) -> int:
        """Where the cached pass starts: the token embeddings where the adapter can split there, else block 0."""
        return EMBEDDINGS if self.inner.embeddings_layer else 0

    @torch.no_grad()
    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        self.inner.check_layer(side, layer)
        index = None if side in self._uncached else self._batch_of(side, inputs)
        if index is None or layer < self.first_layer():
            self.misses += 1
            return self.inner.lower(side, inputs, layer)
        first = self.first_layer()
        if (side, index) not in self._states:
            base = self.inner.lower(side, inputs, first)
            context = self.inner.prepare_upper(side, TowerState(base.hidden, base.valid, dict(base.extras)), first)
            self._states[side, index] = (context, {first: base.hidden})
        state, hidden = self._states[side, index]
        if layer not in hidden:
            try:
                deepest = max(hidden)
                h = hidden[deepest]
                for block in range(deepest + 1, layer + 1):
                    h = self.inner.run_blocks(side, h, state, block, block + 1)
                    hidden[block] = h
            except NotImplementedError:
                log.info("%s has no run_blocks: each layer's lower blocks run separately", type(self.inner).__name__)
                return self._stop_caching(side, inputs, layer)
            if side not in self._checked:
                self._checked.add(side)
                own = self.inner.lower(side, inputs, layer).hidden
                if own.shape != hidden[layer].shape or not torch.equal(own, hidden[layer]):
                    log.warning("%s: run_blocks does not reproduce lower on the %s tower; not caching it",
                                type(self.inner).__name__, side)
                    return self._stop_caching(side, inputs, layer)
        self.hits += 1
        return TowerState(hidden=hidden[layer], valid=state.valid, extras=dict(state.extras))

    def _stop_caching(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        self._uncached.add(side)
        self._states = {k: v for k, v in self._states.items() if k[0] != side}
        self.misses += 1
        return self.inner.lower(side, inputs, layer)

    def train(self, mode: bool = True) -> LayerCache:  # noqa: D401
        super().train(False)
        return self
