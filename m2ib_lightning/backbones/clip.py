"""transformers ``CLIPModel`` behind the :class:`~m2ib_lightning.backbones.base.BackboneAdapter` interface."""

from __future__ import annotations

from contextlib import AbstractContextManager

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones.attention import record_transformers
from m2ib_lightning.backbones.base import SIDES, AttentionRecorder, BackboneAdapter, Side, TowerState, one_hot_readout
from m2ib_lightning.backbones.clip_blocks import clip_block, folded_weights, pooled_block, prunable
from m2ib_lightning.backbones.loading import load_pretrained


def key_mask(attention_mask: Tensor) -> Tensor:
    """``(N, 1, L, L)`` bool: query ``i`` may attend key ``j`` when ``j <= i`` and ``j`` is a token
    (the text tower's causal and padding mask; position 0 is always a token, so every row attends)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    causal = positions[None, :] <= positions[:, None]
    return (causal[None] & attention_mask.bool()[:, None, :])[:, None]


class CLIPBackbone(BackboneAdapter):
    """A transformers ``CLIPModel`` (any checkpoint with its architecture), frozen.

    Args:
        model: hub id (e.g. ``openai/clip-vit-base-patch32``) or a local directory written by
            ``save_pretrained`` holding the model, its tokenizer and its image processor.
        revision: hub revision (branch, tag or commit) to pin.
        trust_remote_code: allow code shipped with the checkpoint to run (off by default).
        use_safetensors: ``None`` (default): safetensors weights when the checkpoint has them,
            else its ``pytorch_model.bin`` read by torch's weights-only unpickler (tensors only: a
            ``.bin`` holding other objects is refused). ``True``: safetensors only. ``False``:
            prefer ``.bin`` (still weights-only).
        attn_implementation: transformers attention backend (``sdpa`` or ``eager``).
        cache_dir: where hub downloads are cached.
        prune_last_block: in :meth:`upper`, run the tower's LAST block for the pooled token only
            (keys and values still come from every token). Exact: no other position of that block
            reaches the embedding. Saves about 40% of the loop's work at layer 9 of 12; set False to
            run the blocks exactly as transformers does (e.g. for an unusual block implementation).
        fold_activation: in :meth:`upper`, compute CLIP's quick GELU ``x * sigmoid(1.702 x)`` as
            ``silu`` with the factor folded into the MLP's weights (``fc2(silu(1.702 fc1(x)) / 1.702)``
            with ``1.702`` and ``1 / 1.702`` applied to the weights, not the activations): one
            fused elementwise kernel instead of three, forward and backward, the same function.
    """

    embeddings_layer = True

    def __init__(
        self,
        model: str = "openai/clip-vit-base-patch32",
        revision: str | None = None,
        trust_remote_code: bool = False,
        use_safetensors: bool | None = None,
        attn_implementation: str = "sdpa",
        cache_dir: str | None = None,
        prune_last_block: bool = True,
        fold_activation: bool = True,
    ) -> None:
        super().__init__()
        from transformers import CLIPModel

        source, self.model, self.tokenizer, self.image_processor = load_pretrained(
            CLIPModel, "CLIP", model, revision=revision, trust_remote_code=trust_remote_code,
            use_safetensors=use_safetensors, attn_implementation=attn_implementation, cache_dir=cache_dir)
        self.source = source
        self.model.eval().requires_grad_(False)
        self.num_layers = {
            "vision": self.model.config.vision_config.num_hidden_layers,
            "text": self.model.config.text_config.num_hidden_layers,
        }
        self.eos_token_id = self.model.config.text_config.eos_token_id
        self.text_positions = self.model.config.text_config.max_position_embeddings
        # Only blocks laid out like transformers' CLIPEncoderLayer can be cut to one query position.
        self.prune_last_block = bool(prune_last_block) and all(
            prunable(self._tower(side).encoder.layers[-1]) for side in SIDES
        )
        self.fold_activation = bool(fold_activation) and all(
            prunable(block) for side in SIDES for block in self._tower(side).encoder.layers
        )

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return pixel_values.shape[-2] // p, pixel_values.shape[-1] // p

    def _tower(self, side: Side) -> nn.Module:
        return self.model.vision_model if side == "vision" else self.model.text_model

    def pool_positions(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """Vision: the CLS token, 0. Text: transformers' ``CLIPTextModel`` rule, the first EOS token, or
        the argmax of the ids for configs with the legacy ``eos_token_id == 2`` (transformers PR #24773)."""
        if side == "vision":
            pixels = inputs["pixel_values"]
            return torch.zeros(pixels.shape[0], dtype=torch.long, device=pixels.device)
        ids = inputs["input_ids"].to(torch.int)
        if self.eos_token_id == 2:
            return ids.argmax(dim=-1)
        return (ids == self.eos_token_id).int().argmax(dim=-1)

    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        self.check_layer(side, layer)
        tower = self._tower(side)
        if side == "vision":
            pixels = inputs["pixel_values"]
            hidden = tower.pre_layrnorm(tower.embeddings(pixels))
            mask, kwargs = None, {}
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            extras: dict[str, Tensor] = {}
        else:
            ids = inputs["input_ids"]
            attn = inputs.get("attention_mask")
            if attn is None:
                attn = torch.ones_like(ids)
            hidden = tower.embeddings(input_ids=ids)
            mask, kwargs = self._text_mask(hidden, attn), {"is_causal": True}
            valid = attn.bool()
            extras = {"attention_mask": attn, "pool": self.pool_positions(side, {"input_ids": ids})}
        for block in tower.encoder.layers[: layer + 1]:
            hidden = block(hidden, mask, **kwargs)
        return TowerState(hidden=hidden, valid=valid, extras=extras)

    def _text_mask(self, hidden: Tensor, attention_mask: Tensor) -> Tensor | None:
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.model.text_model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None
        )

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        if self.fold_activation:  # refresh the folded MLP weights here, outside a compiled step (it cannot)
            for block in self._tower(side).encoder.layers[layer + 1 :]:
                if type(getattr(block.mlp, "activation_fn", None)).__name__ == "QuickGELUActivation":
                    folded_weights(block.mlp)
        if side == "text":
            attn = state.extras["attention_mask"]
            state.context["mask"] = self._text_mask(state.hidden, attn)
            # The pooled query's row of the causal + padding mask, (N, 1, 1, L), for the pruned last block,
            # and the whole mask, (N, 1, L, L), for the loop's own blocks (`clip_block`).
            positions = torch.arange(attn.shape[1], device=attn.device)
            state.context["pool_mask"] = ((positions <= state.extras["pool"][:, None]) & attn.bool())[:, None, None]
            state.context["key_mask"] = key_mask(attn)
            state.context["rows"] = torch.arange(attn.shape[0], device=attn.device)
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        tower = self._tower(side)
        blocks = list(tower.encoder.layers[layer + 1 :])
        # The last block's output is only read at the pooled token (CLS / first EOS): compute that
        # one position (its attention still reads every key and value), see `pooled_block`.
        last = blocks.pop() if self.prune_last_block and blocks else None
        fold = self.fold_activation
        if side == "vision":
            for block in blocks:
                hidden = clip_block(block, hidden, None, fold) if fold else block(hidden, None)
            pooled = hidden[:, 0] if last is None else pooled_block(last, hidden, None, None, fold)
            return self.model.visual_projection(tower.post_layernorm(pooled))
        mask = state.context.get("mask")
        keys = state.context.get("key_mask") if fold else None
        if fold and keys is None:
            keys = key_mask(state.extras["attention_mask"])
        for block in blocks:
            hidden = clip_block(block, hidden, keys, fold) if fold else block(hidden, mask, is_causal=True)
        rows = state.context.get("rows")
        if rows is None or rows.shape[0] != hidden.shape[0]:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
        pool = state.extras["pool"]
        if last is None:
            pooled = hidden[rows, pool]
        else:
            pool_mask = state.context.get("pool_mask")
            if pool_mask is None:
                positions = torch.arange(hidden.shape[1], device=hidden.device)
                attn = state.extras["attention_mask"].bool()
                pool_mask = ((positions <= pool[:, None]) & attn)[:, None, None]
            pooled = pooled_block(last, hidden, (rows, pool), pool_mask, fold)
        # final_layer_norm acts per token, so normalising only the pooled token is the same.
        return self.model.text_projection(tower.final_layer_norm(pooled))

    def run_blocks(self, side: Side, hidden: Tensor, state: TowerState, start: int, stop: int) -> Tensor:
        mask, kwargs = (None, {}) if side == "vision" else (state.context.get("mask"), {"is_causal": True})
        for block in self._tower(side).encoder.layers[start:stop]:
            hidden = block(hidden, mask, **kwargs)
        return hidden

    def pooled_readout(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        tower = self._tower(side)
        if side == "vision":
            return self.model.visual_projection(tower.post_layernorm(hidden[:, 0]))
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        # final_layer_norm acts per token: normalising the pooled token only is the same.
        return self.model.text_projection(tower.final_layer_norm(hidden[rows, state.extras["pool"]]))

    def readout_weights(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        pool = (torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device) if side == "vision"
                else state.extras["pool"])
        return one_hot_readout(pool, hidden.shape[1])

    def attention_unavailable(self, side: Side) -> str | None:
        return None

    def record_attention(self, side: Side, start_layer: int) -> AbstractContextManager[AttentionRecorder]:
        attentions = [block.self_attn for block in self._tower(side).encoder.layers[start_layer:]]
        return record_transformers(self.model, attentions,
                                   [(a.q_proj, a.k_proj, a.v_proj, a.out_proj) for a in attentions])

    def randomization_stages(self, side: Side = "vision") -> list[tuple[str, list[nn.Module]]]:
        tower = self._tower(side)
        if side == "vision":
            top, bottom = [self.model.visual_projection, tower.post_layernorm], [tower.embeddings, tower.pre_layrnorm]
        else:
            top, bottom = [self.model.text_projection, tower.final_layer_norm], [tower.embeddings]
        blocks = tower.encoder.layers
        return [("projection", top), *((f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))),
                ("embeddings", bottom)]

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        if side == "vision":
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            out = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
        # transformers >= 5 returns a model output whose pooler_output is the projection.
        return out if isinstance(out, Tensor) else out.pooler_output

