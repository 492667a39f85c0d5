"""The backbone interface: a frozen dual encoder split at the bottleneck layer.

A backbone adapter exposes, for each tower (``"vision"`` or ``"text"``):

* :meth:`BackboneAdapter.lower`: run the tower up to the OUTPUT of encoder block ``layer``
  (0-based), i.e. ``hidden_states[layer + 1]`` of ``output_hidden_states=True``; ``layer = -1``
  (:data:`EMBEDDINGS`) stops before block 0, at the token embeddings (``hidden_states[0]``);
* :meth:`BackboneAdapter.upper`: run the remaining blocks, the final norm, the pooling and the
  projection, giving the embedding that the tower's ``get_*_features`` would give;
* :meth:`BackboneAdapter.embed`: the clean projected embedding (no bottleneck);

and what methods need beyond that, so that no method reads the wrapped model's internals:
:meth:`BackboneAdapter.attention_probabilities` (per-block attention maps in the autograd graph),
:meth:`BackboneAdapter.pool_positions` (which token a tower pools), :meth:`BackboneAdapter.randomization_stages`
(the modules of a tower from the top, for the model-randomisation sanity check) and
:attr:`BackboneAdapter.max_text_length` (for the preprocessor).

Adapters are plain ``nn.Module`` s: they import nothing from Lightning, and they hold their
weights frozen (``eval()``, ``requires_grad_(False)``).

This module imports only :mod:`m2ib_lightning.errors`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from m2ib_lightning.errors import ConfigError

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

