"""What attention-based methods read from an adapter: per-block attention traces and the pooled token's attention.

* :class:`AttentionTrace` (:meth:`~m2ib_lightning.backbones.base.BackboneAdapter.trace_attention`): per block,
  the attention probabilities, block outputs, attention inputs and, where the adapter's recorder keeps
  them, the queries, keys, values and the attention output before its output projection;
* :class:`PooledAttention` (:meth:`~m2ib_lightning.backbones.base.BackboneAdapter.pooled_attention`): the
  one attention that forms the pooled token (the last block's at the pooled position, or an
  attention-pooling head's), what Grad-ECLIP reads;
* :class:`AttentionRecorder`: what a recorder fills while the traced blocks run
  (:mod:`m2ib_lightning.backbones.attention`).

Layout: queries, keys, values and attention outputs are ``(B, L, H * d)`` as the projections give them,
head ``h`` in channels ``h * d .. (h + 1) * d`` (``H`` the number of heads: ``probabilities.shape[1]``).

This module imports nothing of the package at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from m2ib_lightning.backbones.base import TowerState

__all__ = ["AttentionRecorder", "AttentionTrace", "PooledAttention"]


@dataclass
class AttentionTrace:
    """One forward pass of a tower with what attention-based methods read, all in one autograd graph.

    Blocks ``start_layer .. num_layers - 1`` are traced; index ``i`` of each list is block
    ``start_layer + i``. The graph starts at the input of block ``start_layer`` (frozen weights and
    integer token ids give nothing to differentiate below it), so ``torch.autograd.grad`` of any
    function of ``embedding`` (or of ``pooled_readout`` of any traced ``hidden``) reaches every
    tensor below.

    Attributes:
        embedding: the projected embedding ``(B, P)``, as :meth:`BackboneAdapter.embed` computes it
            (up to the attention kernel: the trace runs the probabilities explicitly).
        probabilities: per block, the softmax attention probabilities ``(B, H, L, L)`` (query rows,
            key columns; each row sums to 1 over the keys it may attend; masked keys are 0).
        hidden: per block, its output hidden states ``(B, L, D)`` (``hidden_states[layer + 1]``);
            :meth:`BackboneAdapter.pooled_readout` of ``hidden[i]`` is layer ``i``'s read-out
            (LeGrad's per-layer similarity).
        attention_inputs: per block, the tokens its attention reads ``(B, L, D)``: the query, key
            and value projections are applied to these (the block's first norm applied to its input
            for pre-norm blocks; the block input itself for post-norm BERT blocks).
        readout: ``(B, L)``, how the embedding weighs the last block's output tokens
            (:meth:`BackboneAdapter.readout_weights`), detached.
        state: the tower's :class:`TowerState` at block ``start_layer``'s input (``valid`` and the
            per-sample ``extras`` that :meth:`BackboneAdapter.pooled_readout` needs).
        start_layer: the first traced block.
        queries, keys, values: per block, the attention's query, key and value projections of
            ``attention_inputs``, ``(B, L, H * d)`` (queries and keys before the attention's scale,
            after a per-head query / key norm where the block has one).
        outputs: per block, the attention's output before its output projection, ``(B, L, H * d)``:
            row ``i`` of head ``h`` is ``sum_j probabilities[:, h, i, j] * values_h[:, j]``. In the graph
            of ``embedding``: ``torch.autograd.grad(f(embedding), outputs[i])`` is the gradient with
            respect to block ``i``'s attention output (Grad-ECLIP's channel weights).
            ``queries``, ``keys``, ``values`` and ``outputs`` are empty where the adapter's recorder
            does not keep them.
    """

    embedding: Tensor
    probabilities: list[Tensor]
    hidden: list[Tensor]
    attention_inputs: list[Tensor]
    readout: Tensor
    state: TowerState
    start_layer: int
    queries: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    values: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


@dataclass
class PooledAttention:
    """The attention that forms a tower's pooled token, from one forward pass, in the graph of ``embedding``.

    For a tower that pools one token (CLIP's CLS and EOS, SigLIP's last text position) it is the last
    block's self-attention, read at that token's row; for an attention-pooling head (SigLIP's image
    tower) it is the head's attention, whose single query is its learned probe, over the last
    block's output after the final norm.

    Attributes:
        embedding: the projected embedding ``(B, P)``.
        output: the attention's output before its output projection, ``(B, Lq, H * d)`` for every
            query row (``Lq = 1`` for a pooling head), in the graph of ``embedding``.
        row: ``(B,)`` long, the pooled query's row of ``output``, ``queries`` and ``probabilities``.
        queries: ``(B, Lq, H * d)``; keys, values: ``(B, L, H * d)``, detached.
        probabilities: ``(B, H, Lq, L)``, detached; keys the pooled query may not attend are 0.
        heads: ``H``.
    """

    embedding: Tensor
    output: Tensor
    row: Tensor
    queries: Tensor
    keys: Tensor
    values: Tensor
    probabilities: Tensor
    heads: int


class AttentionRecorder:
    """Per traced block, in call order: the attention probabilities and the attention's input, and where
    the recorder can, the queries, keys, values and attention output (see :class:`AttentionTrace`).

    An adapter's :meth:`BackboneAdapter.record_attention` fills one while the blocks run
    (:mod:`m2ib_lightning.backbones.attention` has recorders for transformers, ``nn.MultiheadAttention``
    and timm blocks).
    """

    def __init__(self) -> None:
        self.probabilities: list[Tensor] = []
        self.inputs: list[Tensor] = []
        self.queries: list[Tensor] = []
        self.keys: list[Tensor] = []
        self.values: list[Tensor] = []
        self.outputs: list[Tensor] = []
