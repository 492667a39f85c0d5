"""The backbone interface: a frozen dual encoder split at the bottleneck layer.

A backbone adapter exposes, for each tower (``"vision"`` or ``"text"``):

* :meth:`BackboneAdapter.lower`: run the tower up to the OUTPUT of encoder block ``layer``
  (0-based), i.e. ``hidden_states[layer + 1]`` of ``output_hidden_states=True``; ``layer = -1``
  (:data:`EMBEDDINGS`) stops before block 0, at the token embeddings (``hidden_states[0]``);
* :meth:`BackboneAdapter.upper`: run the remaining blocks, the final norm, the pooling and the
  projection, giving the embedding that the tower's ``get_*_features`` would give;
* :meth:`BackboneAdapter.embed`: the clean projected embedding (no bottleneck);

and what methods need beyond that, so that no method, metric or data code reads the wrapped model's
internals:

* :meth:`BackboneAdapter.trace_attention` (an :class:`AttentionTrace`: per-block attention
  probabilities, block outputs, attention inputs, queries, keys, values and attention outputs, all in
  the autograd graph of the embedding) and its short form :meth:`BackboneAdapter.attention_probabilities`,
  for attention-based methods: rollout needs the probabilities and the read-out weights; LeGrad the
  probabilities, the block outputs and :meth:`BackboneAdapter.pooled_readout`;
* :meth:`BackboneAdapter.pooled_attention` (a :class:`PooledAttention`: the attention that forms the
  pooled token, its queries, keys, values and output; Grad-ECLIP's input);
* :meth:`BackboneAdapter.pooled_readout` (final norm, pooling and projection of ANY layer's hidden
  states) and :meth:`BackboneAdapter.readout_weights` (how that read-out weighs the tokens);
* :meth:`BackboneAdapter.pool_positions` (which token a tower pools);
* :meth:`BackboneAdapter.randomization_stages` (the modules of a tower from the top, for the
  model-randomisation sanity check; weights are saved and restored with the adapter's own
  ``state_dict`` / ``load_state_dict``, which cover the wrapped model);
* :attr:`BackboneAdapter.max_text_length` (for the preprocessor).

Only ``lower``, ``upper``, ``embed`` and ``vision_grid`` are required; the rest raise
``NotImplementedError`` naming what is missing until an adapter implements them.

Adapters are plain ``nn.Module`` s: they import nothing from Lightning, and they hold their
weights frozen (``eval()``, ``requires_grad_(False)``).

The trace records live in :mod:`.traces`. This module imports only that and :mod:`m2ib_lightning.errors`.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones.traces import AttentionRecorder, AttentionTrace, PooledAttention
from m2ib_lightning.errors import ConfigError

__all__ = ["EMBEDDINGS", "SIDES", "AttentionRecorder", "AttentionTrace", "BackboneAdapter", "PooledAttention", "Side",
           "TowerState", "one_hot_readout"]

Side = Literal["vision", "text"]
SIDES: tuple[Side, ...] = ("vision", "text")
# The bottleneck layer index of the token embeddings (``hidden_states[0]``): before block 0, where each
# text token holds its own word only (from block 0 on, the pooled EOS token has read the whole caption).
EMBEDDINGS = -1


@dataclass
class TowerState:
    """What a tower's lower half hands to its upper half.

    Attributes:
        hidden: hidden states at the bottleneck, ``(B, L, D)``.
        valid: ``(B, L)`` bool, True for real tokens (False for padding).
        extras: per-sample tensors the upper half needs (leading dim ``B``), e.g. the text
            tower's pooling positions. Repeated along with ``hidden`` by :meth:`repeat`.
        context: per-batch objects that do not repeat (built by :meth:`BackboneAdapter.prepare_upper`).
    """

    hidden: Tensor
    valid: Tensor
    extras: dict[str, Tensor] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def repeat(self, copies: int, with_hidden: bool = True) -> TowerState:
        """Each sample repeated ``copies`` times in a row: ``(B, ...)`` -> ``(B * copies, ...)``.

        ``with_hidden=False`` gives ``hidden`` as a zero-stride placeholder of the repeated shape,
        dtype and device, holding no memory: what the optimisation loop keeps per chunk, since the
        upper half gets the noisy hidden states as an argument (``prepare_upper`` must only read
        ``hidden``'s shape, dtype and device).
        """
        b, *rest = self.hidden.shape
        hidden = (self.hidden.repeat_interleave(copies, dim=0) if with_hidden
                  else self.hidden.new_zeros(()).expand(b * copies, *rest))
        return TowerState(
            hidden=hidden,
            valid=self.valid.repeat_interleave(copies, dim=0),
            extras={k: v.repeat_interleave(copies, dim=0) for k, v in self.extras.items()},
        )


def one_hot_readout(positions: Tensor, length: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """Read-out weights ``(B, L)`` of a tower that pools the tokens at ``positions`` ``(B,)``."""
    out = torch.zeros(positions.shape[0], length, dtype=dtype, device=positions.device)
    return out.scatter_(1, positions.long().unsqueeze(1), 1.0)


class BackboneAdapter(nn.Module):
    """Interface of a frozen dual encoder split at a layer. Subclasses implement the methods below.

    Attributes a subclass sets: ``tokenizer`` (a transformers tokenizer), ``image_processor``
    (a transformers image processor) and ``num_layers`` (``{"vision": int, "text": int}``).
    """

    tokenizer: Any
    image_processor: Any
    num_layers: dict[str, int]
    #: tokens before the image patches in the vision sequence (CLIP: 1, the CLS token)
    vision_prefix_tokens: int = 1
    #: ``lower`` / ``upper`` accept layer ``-1`` (:data:`EMBEDDINGS`: split before block 0). Off by
    #: default, so that an adapter indexing ``blocks[layer]`` is not handed -1 (the LAST block).
    embeddings_layer: bool = False
    #: the text tower's number of position embeddings (``None``: not known), see :attr:`max_text_length`
    text_positions: int | None = None

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        """Patch grid ``(h, w)`` of images ``(B, C, H, W)``."""
        raise NotImplementedError

    def check_layer(self, side: Side, layer: int, allow_embeddings: bool = True) -> None:
        """Raise :class:`~m2ib_lightning.errors.ConfigError` unless ``-1 <= layer < num_layers[side]``
        (``0 <=`` without ``allow_embeddings`` or for an adapter without ``embeddings_layer``);
        ``-1`` is the token embeddings, before block 0."""
        n = self.num_layers[side]
        allow_embeddings = allow_embeddings and self.embeddings_layer
        low = EMBEDDINGS if allow_embeddings else 0
        if not isinstance(layer, int) or isinstance(layer, bool) or not low <= layer < n:
            where = " (-1: the token embeddings, before block 0)" if allow_embeddings else ""
            raise ConfigError(
                f"{side} bottleneck layer must be an int in [{low}, {n - 1}]{where} for this backbone "
                f"({n} encoder blocks); got {layer!r}"
            )

    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Run ``side`` from its inputs to the output of block ``layer`` (``-1``: the token embeddings)."""
        raise NotImplementedError

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        """Fill ``state.context`` with what :meth:`upper` needs, once per batch (e.g. attention masks).

        Called on the repeated state, outside the optimisation loop, so that the loop itself does no
        mask construction and no host-device synchronisation. ``state.hidden`` may be a placeholder
        there (:meth:`TowerState.repeat`): read only its shape, dtype and device.
        """
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        """Run blocks ``layer + 1 ...`` on ``hidden`` ``(N, L, D)``; return embeddings ``(N, P)``."""
        raise NotImplementedError

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """Clean projected embedding ``(B, P)`` of ``side`` for ``inputs``."""
        raise NotImplementedError

    # ---- what methods need beyond the split (optional: NotImplementedError until implemented) ----

    @property
    def max_text_length(self) -> int:
        """The text tower's maximum number of tokens per caption: the smaller of the tokenizer's
        ``model_max_length`` and :attr:`text_positions` (values that are not plausible lengths, such
        as transformers' "no limit" sentinel, are ignored; 77, CLIP's, when neither is known)."""
        limit = getattr(self.tokenizer, "model_max_length", None)
        candidates = [v for v in (limit, self.text_positions) if isinstance(v, int) and 0 < v < 100_000]
        return min(candidates) if candidates else 77

    def pool_positions(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """``(B,)`` long: the position of the token whose final state ``side`` reads out for ``inputs``
        (e.g. CLIP: the CLS token 0 for images, the first end-of-text token for captions).

        Raises ``NotImplementedError`` for a tower that pools no single token (an attention-pooling
        head, mean pooling): :meth:`readout_weights` covers those too.
        """
        raise NotImplementedError(f"{type(self).__name__} does not say which token its {side} tower pools")

    def readout_weights(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        """``(N, L)``: how :meth:`pooled_readout` of ``hidden`` ``(N, L, D)`` weighs its tokens, rows
        summing to 1: one-hot at :meth:`pool_positions` for a tower that pools one token, uniform over
        the pooled tokens for mean pooling, the pooling head's attention (mean over heads) for an
        attention-pooling head. Attention rollout reads the embedding's relevance as this mix of rows."""
        raise NotImplementedError(f"{type(self).__name__} does not describe its {side} tower's read-out")

    def pooled_readout(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        """The tower's read-out applied to hidden states of ANY layer: final norm, pooling, projection.

        Args:
            hidden: ``(N, L, D)``, e.g. :attr:`AttentionTrace.hidden` ``[i]`` or a :meth:`lower` output.
            state: the :class:`TowerState` of the same inputs (its ``extras``, e.g. pooling positions).

        Returns:
            ``(N, P)``; for the last block's output, the embedding (``upper`` runs the remaining
            blocks and then this). For an earlier layer, LeGrad's per-layer read-out.
        """
        raise NotImplementedError(f"{type(self).__name__} has no separate read-out for its {side} tower")

    def run_blocks(self, side: Side, hidden: Tensor, state: TowerState, start: int, stop: int) -> Tensor:
        """Blocks ``start .. stop - 1`` of ``side`` on ``hidden`` ``(N, L, D)``, exactly as the model runs
        them (no speed-ups), with the masks :meth:`prepare_upper` put in ``state.context``."""
        raise NotImplementedError(f"{type(self).__name__} cannot run single blocks of its {side} tower")

    def attention_unavailable(self, side: Side) -> str | None:
        """Why :meth:`trace_attention` cannot run on ``side`` (``None``: it can)."""
        return f"{type(self).__name__} does not expose its attention probabilities (trace_attention)"

    def record_attention(self, side: Side, start_layer: int) -> AbstractContextManager[AttentionRecorder]:
        """A context in which blocks ``start_layer ..`` of ``side`` run with explicit attention
        probabilities (e.g. eager attention) and record them, with their inputs, in the recorder it
        yields; everything is restored on exit."""
        raise NotImplementedError(self.attention_unavailable(side) or "record_attention is not implemented")

    def trace_attention(self, side: Side, inputs: dict[str, Tensor], start_layer: int = 0) -> AttentionTrace:
        """Run tower ``side`` on ``inputs`` keeping blocks ``start_layer ..``'s attention in the graph.

        Returns an :class:`AttentionTrace`. Gradients are on inside, whatever the caller's mode, so
        ``torch.autograd.grad(f(trace.embedding), trace.probabilities)`` works after it returns.
        Raises ``NotImplementedError`` (see :meth:`attention_unavailable`) for a tower whose attention
        the adapter cannot expose.

        Built from :meth:`lower` (to block ``start_layer - 1``: ``start_layer = 0`` needs
        ``embeddings_layer``), :meth:`prepare_upper`, :meth:`run_blocks`, :meth:`pooled_readout`,
        :meth:`readout_weights` and :meth:`record_attention`, inside the recording context: an adapter
        implements those (and :meth:`attention_unavailable`), or overrides this.
        """
        reason = self.attention_unavailable(side)
        if reason is not None:
            raise NotImplementedError(reason)
        self.check_layer(side, start_layer, allow_embeddings=False)
        n = self.num_layers[side]
        with self.record_attention(side, start_layer) as recorder:
            with torch.no_grad():
                state = self.lower(side, inputs, start_layer - 1)
                # masks for the traced blocks, built inside the recording context (eager masks)
                state = self.prepare_upper(side, state, start_layer - 1)
            hidden = state.hidden.detach().requires_grad_(True)
            outputs = []
            with torch.enable_grad():
                for layer in range(start_layer, n):
                    hidden = self.run_blocks(side, hidden, state, layer, layer + 1)
                    outputs.append(hidden)
                embedding = self.pooled_readout(side, hidden, state)
        with torch.no_grad():
            readout = self.readout_weights(side, hidden.detach(), state)
        parts = {"attention maps": recorder.probabilities, "queries": recorder.queries, "keys": recorder.keys,
                 "values": recorder.values, "attention outputs": recorder.outputs}
        for what, recorded in parts.items():
            if len(recorded) != n - start_layer and (what == "attention maps" or recorded):
                raise RuntimeError(f"{type(self).__name__} recorded {len(recorded)} {what} for "
                                   f"{n - start_layer} blocks of its {side} tower")
        return AttentionTrace(embedding=embedding, probabilities=recorder.probabilities, hidden=outputs,
                              attention_inputs=recorder.inputs, readout=readout, state=state,
                              start_layer=start_layer, queries=recorder.queries, keys=recorder.keys,
                              values=recorder.values, outputs=recorder.outputs)

    def pooled_attention_unavailable(self, side: Side) -> str | None:
        """Why :meth:`pooled_attention` cannot run on ``side`` (``None``: it can)."""
        return self.attention_unavailable(side)

    def pooled_attention(self, side: Side, inputs: dict[str, Tensor]) -> PooledAttention:
        """The attention that forms tower ``side``'s pooled token on ``inputs``: a :class:`PooledAttention`.

        Gradients are on inside, whatever the caller's mode, so ``torch.autograd.grad(f(embedding),
        output)`` works after it returns. Raises ``NotImplementedError`` (see
        :meth:`pooled_attention_unavailable`) where the adapter cannot expose it.

        Built from :meth:`trace_attention` of the last block (whose recorder must keep the queries,
        keys, values and outputs) and :meth:`pool_positions`: the last block's attention at the pooled
        token's row. An adapter whose tower pools with an attention head overrides this.
        """
        reason = self.pooled_attention_unavailable(side)
        if reason is not None:
            raise NotImplementedError(reason)
        trace = self.trace_attention(side, inputs, self.num_layers[side] - 1)
        if not trace.outputs:
            raise NotImplementedError(f"{type(self).__name__} does not record the queries, keys, values and "
                                      f"attention outputs of its {side} tower")
        probabilities = trace.probabilities[-1].detach()
        row = self.pool_positions(side, inputs).to(probabilities.device).long()
        return PooledAttention(embedding=trace.embedding, output=trace.outputs[-1], row=row,
                               queries=trace.queries[-1].detach(), keys=trace.keys[-1].detach(),
                               values=trace.values[-1].detach(), probabilities=probabilities,
                               heads=probabilities.shape[1])

    def attention_probabilities(self, side: Side, inputs: dict[str, Tensor],
                                start_layer: int = 0) -> tuple[Tensor, list[Tensor]]:
        """``(embedding (B, P), [probabilities (B, H, L, L) of blocks start_layer ..])``, in one autograd
        graph: the short form of :meth:`trace_attention`."""
        trace = self.trace_attention(side, inputs, start_layer)
        return trace.embedding, trace.probabilities

    def randomization_stages(self, side: Side = "vision") -> list[tuple[str, list[nn.Module]]]:
        """The modules of tower ``side`` from the top, for the cascading randomisation sanity check.

        ``[("projection", [...]), ("block N-1", [...]), ..., ("block 0", [...]), ("embeddings", [...])]``:
        the read-out after the last block (final norm, pooling head, projection), each block from the
        last down, then everything below block 0. Together they hold every parameter of the tower
        exactly once. Save and restore the weights around a cascade with ``state_dict()`` /
        ``load_state_dict()`` of the adapter itself.
        """
        raise NotImplementedError(f"{type(self).__name__} does not list the stages of its {side} tower")

    def special_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """``(B, L)`` bool: positions that are not words of the caption (start/end tokens, padding).

        Uses the tokenizer's ``all_special_ids`` (its unknown-word token excepted: that stands for
        a word, unless it doubles as start, end or padding token as in CLIP's tokenizer); without
        such a list, the first and last valid token (CLIP's layout). Metrics and baselines that
        perturb words leave these alone: SigLIP, for one, has no start token.
        """
        valid = attention_mask.bool()
        tok = self.tokenizer
        ids = getattr(tok, "all_special_ids", None)
        if ids:
            structural = {getattr(tok, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "cls", "sep")}
            unk = getattr(tok, "unk_token_id", None)
            special = [i for i in ids if i != unk or unk in structural]
            return ~valid | torch.isin(input_ids, torch.tensor(special, device=input_ids.device))
        lengths = valid.sum(1, keepdim=True)
        pos = torch.arange(valid.shape[1], device=valid.device).unsqueeze(0)
        return ~valid | (pos == 0) | (pos == lengths - 1)

    def tokens(self, input_ids: Tensor, valid: Tensor) -> list[list[str]]:
        """The token strings of each row of ``input_ids`` ``(B, L)`` where ``valid``."""
        out = []
        for ids, ok in zip(input_ids.tolist(), valid.tolist()):
            kept = [i for i, v in zip(ids, ok) if v]
            out.append(self.tokenizer.convert_ids_to_tokens(kept))
        return out

    # The frozen weights never train: keep them in eval mode whatever the owner asks.
    def train(self, mode: bool = True) -> BackboneAdapter:  # noqa: D401
        return super().train(False)

