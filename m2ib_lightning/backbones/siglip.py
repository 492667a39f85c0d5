"""SigLIP (transformers ``SiglipModel``) behind the :class:`~m2ib_lightning.backbones.BackboneAdapter` interface.

What differs from CLIP, and how the adapter follows the model exactly:

* Vision: no CLS token (``vision_prefix_tokens = 0``): every vision token is a patch, and the image
  embedding comes from a multi-head attention pooling head ("MAP": a learned probe attends over all
  patches) after ``post_layernorm``. ``upper`` reproduces ``get_image_features``; ``pooled_attention``
  is that head's attention (the probe is the one query), run explicitly to keep it in the graph.
* Text: bidirectional attention, and the embedding is the LAST position's state (after
  ``final_layer_norm``) through ``head``. SigLIP was trained on captions padded to a fixed length
  (64) with every position attended, so that last position is usually a pad token. The adapter's
  tokenizer therefore always pads to ``text_length`` (``padding="max_length"``, as the model card
  asks), which also makes a caption's embedding independent of the other captions in its batch.
  With ``attend_to_padding=True`` (default, the official usage) the pads take part in attention as
  in ``get_text_features(input_ids)``; with False, they are masked as in
  ``get_text_features(input_ids, attention_mask)``. Either way the bottleneck covers every position
  (``valid`` is all True): below the bottleneck the pads have attended to the caption, and the
  pooled last position (usually a pad) reads its own state even when pads are masked as keys, so a
  pad left clean would carry the caption around the bottleneck and flatten the text map. Pads get
  noise and compression cost like caption tokens; the text map reports only the caption's own
  tokens (the tokenizer's attention mask, EOS included). The compression term is then a mean over
  all ``text_length`` positions, so a given ``beta`` weighs each caption token less than on CLIP
  (whose pads are left out): tune ``beta`` for SigLIP's text side on its own.

:func:`m2ib_lightning.assets.tiny_models.build_tiny_siglip` writes a tiny random one that loads offline.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2ib_lightning.backbones.attention import record_transformers
from m2ib_lightning.backbones.base import (
    AttentionRecorder,
    BackboneAdapter,
    PooledAttention,
    Side,
    TowerState,
    one_hot_readout,
)
from m2ib_lightning.backbones.loading import load_pretrained
from m2ib_lightning.errors import ConfigError

__all__ = ["PadToLength", "SigLIPBackbone"]


class PadToLength:
    """A tokenizer whose calls always pad (and truncate) to ``length`` tokens; everything else delegates.

    SigLIP's text tower pools the last position, so a caption must always be padded to the length the
    model was trained with, whatever padding the caller asks for.
    """

    def __init__(self, tokenizer: Any, length: int) -> None:
        self.tokenizer, self.length = tokenizer, length

    @property
    def model_max_length(self) -> int:
        return self.length

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("truncation") is False and "return_tensors" not in kwargs:
            # Counting a caption's tokens (the data module reports truncated captions): no padding.
            kwargs.pop("padding", None)
            kwargs.pop("max_length", None)
            return self.tokenizer(*args, **kwargs)
        kwargs.update(padding="max_length", truncation=True, max_length=self.length)
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        # Guard against recursion while unpickling (DataLoader workers), before `tokenizer` exists.
        if name == "tokenizer" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.tokenizer, name)

    def __len__(self) -> int:
        return len(self.tokenizer)


class SigLIPBackbone(BackboneAdapter):
    """A transformers ``SiglipModel`` (e.g. ``google/siglip-base-patch16-224``), frozen.

    Args:
        model: hub id or a local directory written by ``save_pretrained`` (model, tokenizer, image
            processor).
        revision: hub revision (branch, tag or commit) to pin.
        trust_remote_code: allow code shipped with the checkpoint to run (off by default).
        use_safetensors: ``None`` (default): safetensors when the checkpoint has them, else its
            ``.bin`` read by torch's weights-only unpickler (anything but tensors is refused);
            ``True``: safetensors only; ``False``: prefer ``.bin`` (still weights-only).
        attn_implementation: transformers attention backend (``sdpa`` or ``eager``).
        cache_dir: where hub downloads are cached.
        attend_to_padding: pad tokens take part in text attention, as in SigLIP's training and
            ``get_text_features(input_ids)`` (default); False masks them out.
        text_length: the fixed caption length in tokens (default: the text tower's
            ``max_position_embeddings``, 64 for the released checkpoints).
    """

    embeddings_layer = True

    vision_prefix_tokens = 0

    def __init__(
        self,
        model: str = "google/siglip-base-patch16-224",
        revision: str | None = None,
        trust_remote_code: bool = False,
        use_safetensors: bool | None = None,
        attn_implementation: str = "sdpa",
        cache_dir: str | None = None,
        attend_to_padding: bool = True,
        text_length: int | None = None,
    ) -> None:
        super().__init__()
        from transformers import SiglipModel

        source, self.model, tokenizer, self.image_processor = load_pretrained(
            SiglipModel, "SigLIP", model, revision=revision, trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors, attn_implementation=attn_implementation, cache_dir=cache_dir)
        config = self.model.config
        if not config.vision_config.vision_use_head:
            raise ConfigError("SigLIPBackbone needs the vision attention-pooling head (vision_use_head: true); "
                              f"{source} has vision_use_head={config.vision_config.vision_use_head}")
        positions = config.text_config.max_position_embeddings
        length = positions if text_length is None else text_length
        if not isinstance(length, int) or not 2 <= length <= positions:
            raise ConfigError(f"text_length must be an int in [2, {positions}] for this checkpoint, "
                              f"got {text_length!r}")
        self.tokenizer = PadToLength(tokenizer, length)
        self.text_positions = positions
        self.source = source
        self.attend_to_padding = attend_to_padding
        self.model.eval().requires_grad_(False)
        self.num_layers = {
            "vision": config.vision_config.num_hidden_layers,
            "text": config.text_config.num_hidden_layers,
        }

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return pixel_values.shape[-2] // p, pixel_values.shape[-1] // p

    def _tower(self, side: Side) -> nn.Module:
        return self.model.vision_model if side == "vision" else self.model.text_model

    def _text_mask(self, hidden: Tensor, attention_mask: Tensor) -> Tensor | None:
        if self.attend_to_padding:
            return None
        from transformers.masking_utils import create_bidirectional_mask

        return create_bidirectional_mask(config=self.model.text_model.config, inputs_embeds=hidden,
                                         attention_mask=attention_mask)

    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Tower ``side`` up to the output of block ``layer``: hidden ``(B, L, D)``."""
        self.check_layer(side, layer)
        tower = self._tower(side)
        if side == "vision":
            hidden = tower.embeddings(inputs["pixel_values"])
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            mask, extras = None, {}
        else:
            ids = inputs["input_ids"]
            attn = inputs.get("attention_mask")
            if attn is None:
                attn = torch.ones_like(ids)
            hidden = tower.embeddings(input_ids=ids)
            # Every position is under the bottleneck, pads included (module doc).
            valid = torch.ones_like(attn, dtype=torch.bool)
            mask, extras = self._text_mask(hidden, attn), {"attention_mask": attn}
        for block in tower.encoder.layers[: layer + 1]:
            hidden = block(hidden, mask)
        return TowerState(hidden=hidden, valid=valid, extras=extras)

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        if side == "text":
            state.context["mask"] = self._text_mask(state.hidden, state.extras["attention_mask"])
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        """Blocks ``layer + 1 ...``, final norm and pooling head: embeddings ``(N, P)``."""
        hidden = self.run_blocks(side, hidden, state, layer + 1, self.num_layers[side])
        return self.pooled_readout(side, hidden, state)

    def run_blocks(self, side: Side, hidden: Tensor, state: TowerState, start: int, stop: int) -> Tensor:
        mask = state.context.get("mask") if side == "text" else None
        for block in self._tower(side).encoder.layers[start:stop]:
            hidden = block(hidden, mask)
        return hidden

    def pooled_readout(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        """Vision: ``post_layernorm``, then the attention-pooling head over every token; text:
        ``final_layer_norm`` and ``head`` of the last position. ``(N, L, D)`` -> ``(N, P)``."""
        tower = self._tower(side)
        if side == "vision":
            return tower.head(tower.post_layernorm(hidden))
        return tower.head(tower.final_layer_norm(hidden)[:, -1, :])

    def pool_positions(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """Text: the last position (usually a pad, see the module doc). The vision tower pools no single
        token (its attention-pooling head reads them all): ``NotImplementedError``, see :meth:`readout_weights`."""
        if side == "vision":
            raise NotImplementedError("SigLIP's vision tower pools no single token: its attention-pooling head (MAP) "
                                      "reads every patch; readout_weights gives the head's weights")
        ids = inputs["input_ids"]
        return torch.full((ids.shape[0],), ids.shape[1] - 1, dtype=torch.long, device=ids.device)

    def readout_weights(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        """Text: one-hot at the last position. Vision: the pooling head's attention from its probe to
        each token (after ``post_layernorm``), averaged over heads."""
        n, length = hidden.shape[:2]
        if side == "text":
            return one_hot_readout(torch.full((n,), length - 1, device=hidden.device), length)
        tower = self._tower("vision")
        head, x = tower.head, tower.post_layernorm(hidden)
        _, weights = head.attention(head.probe.repeat(n, 1, 1), x, x, need_weights=True, average_attn_weights=True)
        return weights[:, 0].float()

    def attention_unavailable(self, side: Side) -> str | None:
        return None

    def pooled_attention(self, side: Side, inputs: dict[str, Tensor]) -> PooledAttention:
        """Text: the last block's attention at the last position. Vision: the attention-pooling head's,
        whose one query is its probe, over the last block's output after ``post_layernorm``; the head
        is run explicitly (its ``nn.MultiheadAttention`` would return the weights outside the graph)."""
        if side == "text":
            return super().pooled_attention(side, inputs)
        tower = self._tower("vision")
        head, mha = tower.head, tower.head.attention
        with torch.no_grad():
            hidden = self.lower(side, inputs, self.num_layers[side] - 1).hidden
        with torch.enable_grad():
            x = tower.post_layernorm(hidden.detach().requires_grad_(True))
            n, length, width = x.shape
            heads = mha.num_heads
            w_q, w_k, w_v = mha.in_proj_weight.chunk(3)
            b_q, b_k, b_v = mha.in_proj_bias.chunk(3)
            q = F.linear(head.probe.expand(n, -1, -1), w_q, b_q)
            k, v = F.linear(x, w_k, b_k), F.linear(x, w_v, b_v)

            def split(t: Tensor) -> Tensor:
                return t.view(n, t.shape[1], heads, width // heads).transpose(1, 2)

            probabilities = ((split(q) * (width // heads) ** -0.5) @ split(k).transpose(-2, -1)).softmax(-1)
            output = (probabilities @ split(v)).transpose(1, 2).reshape(n, 1, width)
            pooled = mha.out_proj(output)
            embedding = (pooled + head.mlp(head.layernorm(pooled)))[:, 0]
        return PooledAttention(embedding=embedding, output=output, row=torch.zeros(n, dtype=torch.long,
                                                                                    device=x.device),
                               queries=q.detach(), keys=k.detach(), values=v.detach(),
                               probabilities=probabilities.detach(), heads=heads)

    def record_attention(self, side: Side, start_layer: int) -> AbstractContextManager[AttentionRecorder]:
        attentions = [block.self_attn for block in self._tower(side).encoder.layers[start_layer:]]
        return record_transformers(self.model, attentions,
                                   [(a.q_proj, a.k_proj, a.v_proj, a.out_proj) for a in attentions])

    def randomization_stages(self, side: Side = "vision") -> list[tuple[str, list[nn.Module]]]:
        """``projection`` is the read-out: the final norm and the pooling head (SigLIP's projection)."""
        tower = self._tower(side)
        norm = tower.post_layernorm if side == "vision" else tower.final_layer_norm
        blocks = tower.encoder.layers
        return [("projection", [norm, tower.head]),
                *((f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))),
                ("embeddings", [tower.embeddings])]

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        if side == "vision":
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            attn = None if self.attend_to_padding else inputs.get("attention_mask")
            out = self.model.get_text_features(input_ids=inputs["input_ids"], attention_mask=attn)
        return out if isinstance(out, Tensor) else out.pooler_output

