"""open_clip models behind the :class:`~m2ib_lightning.backbones.BackboneAdapter` interface.

Supported: open_clip's ``CLIP`` class and ``CustomTextCLIP`` whose text tower is open_clip's own
``TextTransformer``, with a ``VisionTransformer`` image tower (class token first) and open_clip's BPE
``SimpleTokenizer`` (the OpenAI CLIP, LAION and DataComp ViT checkpoints); and BiomedCLIP's form
(``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``): a ``TimmModel`` image tower
wrapping a timm ``VisionTransformer`` with a class token, and an ``HFTextEncoder`` text tower wrapping
a transformers BERT model with open_clip's ``HFTokenizer``. Each tower type combines with either of the
other tower's. Not supported, refused with a :class:`~m2ib_lightning.errors.ConfigError` naming the
tower: ResNet image towers, timm towers other than a ViT with a class token, Hugging Face text towers
other than BERT, CoCa's appended text class token, and other tokenizers.

The split follows the model exactly: ``lower`` runs open_clip's own embedding code and the blocks
``0 .. layer``; ``upper`` runs the remaining blocks and then the tower's own pooling, final norm and
projection, so ``upper(lower(x))`` equals ``encode_image`` / ``encode_text`` (``normalize=False``).
Blocks may be batch-first or sequence-first (``transformer.batch_first``): the adapter always hands
out ``(B, L, D)``.

open_clip tokenises every caption to the model's fixed ``context_length`` with 0 padding and pools
the text at the end-of-text token (``argmax`` of the ids, or the configured ``text_pool_type``); the
adapter's tokenizer keeps that fixed length (as ``encode_text`` requires) and adds the attention mask
(``ids != 0``: start token, caption, end token), which is the text map's ``valid`` range. A BERT
text tower masks its padding (``ids != pad_token_id``, as ``HFTextEncoder`` does) and has no causal
mask, so its captions are padded only to the longest in the batch (same embedding, less work); the
attention mask covers ``[CLS]``, the caption and ``[SEP]``.

Attention traces (``trace_attention``, for rollout and LeGrad; ``pooled_attention``, for Grad-ECLIP):
open_clip's standard blocks (``nn.MultiheadAttention``, recomputed with explicit probabilities), timm
ViT blocks (fused kernel off) and BERT (eager attention). Not open_clip's custom blocks
(``CustomResidualAttentionBlock``: qk_norm, scaled cosine attention), whose attention has no
probabilities path, nor read-outs without token weights (attention or max pooling), nor, for
``pooled_attention``, mean pooling; ``attention_unavailable`` / ``pooled_attention_unavailable`` name
the reason. What the adapter recognises in a model lives in :mod:`.openclip_parts`.

open_clip is optional (``pip install 'm2ib_lightning[openclip]'``; it needs a torchvision matching
torch) and is imported only when an :class:`OpenCLIPBackbone` is built.
:func:`m2ib_lightning.assets.tiny_models.build_tiny_openclip` writes a tiny random one that loads offline.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones import openclip_parts as parts
from m2ib_lightning.backbones.attention import record_bert, record_multihead, record_timm
from m2ib_lightning.backbones.base import AttentionRecorder, BackboneAdapter, Side, TowerState
from m2ib_lightning.backbones.loading import is_offline
from m2ib_lightning.backbones.openclip_io import OpenCLIPHFTokenizer, OpenCLIPImageProcessor, OpenCLIPTokenizer
from m2ib_lightning.errors import BackboneLoadError, ConfigError

__all__ = ["OpenCLIPBackbone"]

#: weight files open_clip reads from a model directory, in its order of preference
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
CONFIG_NAME = "open_clip_config.json"
INSTALL_HINT = "pip install 'm2ib_lightning[openclip]' (open_clip_torch, with a torchvision matching your torch)"


def _model_name(model: str | os.PathLike, pretrained: str | None) -> tuple[str, bool]:
    """open_clip's name for ``model`` (``local-dir:``, ``hf-hub:`` or a built-in name) and whether it is local.

    Checks up front what open_clip would otherwise only warn about (then use random weights): a
    directory without weights, a built-in name without ``pretrained``.
    """
    text = os.fspath(model)
    if text.startswith("hf-hub:"):
        return text, False
    text = text.removeprefix("local-dir:")
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / CONFIG_NAME).is_file():
            raise BackboneLoadError(f"{path} is a directory but holds no {CONFIG_NAME}; expected an open_clip "
                                    f"model directory ({CONFIG_NAME} and one of {', '.join(CHECKPOINT_NAMES)})")
        if not any((path / name).is_file() for name in CHECKPOINT_NAMES):
            raise BackboneLoadError(f"{path} holds {CONFIG_NAME} but no weights; expected one of "
                                    f"{', '.join(CHECKPOINT_NAMES)}")
        return f"local-dir:{path}", True
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or path.exists():
        raise BackboneLoadError(f"open_clip model directory {text!r} does not exist")
    from open_clip import get_model_config

    # open_clip spells built-in names with "-" or "/" (ViT-B-32, ViT-B/32).
    if get_model_config(text.replace("/", "-")) is None:
        hint = f"; a hub id needs the prefix: hf-hub:{text}" if "/" in text else ""
        raise BackboneLoadError(f"{text!r} is neither an open_clip model directory nor a built-in open_clip "
                                f"architecture{hint}")
    if not pretrained:
        raise BackboneLoadError(f"{text!r} names an open_clip architecture without weights: pass pretrained (a "
                                "local checkpoint file or an open_clip pretrained tag), an hf-hub: id or a directory")
    return text, False


def load_openclip(model: str | os.PathLike, pretrained: str | None = None, cache_dir: str | None = None
                  ) -> tuple[str, nn.Module, Any, Any]:
    """Load an open_clip model, its tokenizer and its evaluation transform.

    Returns ``(name, model, tokenizer, transform)``; any failure becomes one
    :class:`BackboneLoadError` naming the source and what to do.
    """
    try:
        import open_clip
        from open_clip.pretrained import download_pretrained_from_hf
    except ImportError as err:
        raise BackboneLoadError(f"OpenCLIPBackbone needs open_clip: {INSTALL_HINT} ({err})") from err
    name, local = _model_name(model, pretrained)
    builtin = not local and not name.startswith("hf-hub:")
    if builtin and pretrained and ("/" in pretrained or os.sep in pretrained) and not Path(pretrained).is_file():
        raise BackboneLoadError(f"checkpoint file {pretrained!r} for {name!r} does not exist")
    try:
        if name.startswith("hf-hub:"):
            # open_clip only warns when the weights are missing and goes on with random ones.
            download_pretrained_from_hf(name.removeprefix("hf-hub:"), cache_dir=cache_dir)
        loaded, _, transform = open_clip.create_model_and_transforms(
            name, pretrained=pretrained if builtin else None, cache_dir=cache_dir)
        tokenizer = open_clip.get_tokenizer(name, cache_dir=cache_dir)
    except Exception as err:  # open_clip and huggingface_hub raise many types; all mean "not loaded"
        hint = ""
        if not local:
            hint = (" Offline mode is on (HF_HUB_OFFLINE) and it is not in the cache." if is_offline()
                    else " Check the id and your network.")
            hint += " To use a model on disk, pass its directory (open_clip_config.json + weights)."
        detail = str(err).strip().rstrip(".")
        raise BackboneLoadError(f"could not load the open_clip model {name!r}: {detail}.{hint}") from err
    return name, loaded, tokenizer, transform


class OpenCLIPBackbone(BackboneAdapter):
    """An open_clip dual encoder (``CLIP`` or ``CustomTextCLIP``), frozen.

    Image tower: open_clip's ``VisionTransformer`` or a ``TimmModel`` wrapping a timm
    ``VisionTransformer`` with a class token (BiomedCLIP). Text tower: open_clip's own text
    transformer or an ``HFTextEncoder`` wrapping a transformers BERT model (BiomedCLIP's PubMedBERT).

    Args:
        model: ``hf-hub:<org>/<repo>`` (e.g. ``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K`` or
            ``hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``), a
            local open_clip model directory (``open_clip_config.json`` with ``open_clip_model.safetensors``
            or ``open_clip_pytorch_model.bin``; a ``local-dir:`` prefix is accepted), or an open_clip
            built-in architecture name (e.g. ``ViT-B-32``) together with ``pretrained``.
        pretrained: with a built-in name only: a local checkpoint file, or an open_clip pretrained tag
            (downloaded by open_clip).
        cache_dir: where hub downloads are cached.
    """

    embeddings_layer = True

    def __init__(self, model: str = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", pretrained: str | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.source, self.model, tokenizer, transform = load_openclip(model, pretrained, cache_dir)
        self.model.eval().requires_grad_(False)
        visual = self.model.visual
        text = self.model if hasattr(self.model, "transformer") else getattr(self.model, "text", None)
        self.timm_vision = parts.is_timm_vit(visual)
        self.hf_text = parts.is_hf_bert(text)
        unsupported = parts.unsupported_parts(visual, text, tokenizer, self.timm_vision, self.hf_text, self.model)
        if unsupported:
            raise ConfigError(f"OpenCLIPBackbone cannot split {self.source} ({type(self.model).__name__}): it has "
                              + "; ".join(unsupported))
        if self.hf_text:
            self.context_length = int(tokenizer.context_length)
            self.tokenizer = OpenCLIPHFTokenizer(tokenizer, self.context_length)
            text_blocks = len(text.transformer.encoder.layer)
        else:
            self.pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
            self.eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
            self.context_length = int(text.positional_embedding.shape[0])
            self.tokenizer = OpenCLIPTokenizer(tokenizer, self.context_length)
            text_blocks = len(text.transformer.resblocks)
        if self.timm_vision:
            # the class token (and any register tokens) precede the patches
            self.vision_prefix_tokens = int(visual.trunk.num_prefix_tokens)
            vision_blocks = len(visual.trunk.blocks)
        else:
            vision_blocks = len(visual.transformer.resblocks)
        self.image_processor = OpenCLIPImageProcessor(transform, visual.image_mean, visual.image_std)
        self.num_layers = {"vision": vision_blocks, "text": text_blocks}
        self.text_positions = self.context_length

    @property
    def _text(self) -> nn.Module:
        """The module holding the text tower's parts (``CLIP`` keeps them on the model itself)."""
        return self.model if hasattr(self.model, "transformer") else self.model.text

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        visual = self.model.visual
        ph, pw = visual.trunk.patch_embed.patch_size if self.timm_vision else visual.patch_size
        return pixel_values.shape[-2] // ph, pixel_values.shape[-1] // pw

    def _transformer(self, side: Side) -> nn.Module:
        return self.model.visual.transformer if side == "vision" else self._text.transformer

    def _text_mask(self, input_ids: Tensor, dtype: torch.dtype) -> Tensor | None:
        """The additive attention mask ``encode_text`` uses: causal ``(L, L)``, or with padding ``(N*H, L, L)``."""
        text, length = self._text, input_ids.shape[1]
        mask = text.attn_mask
        if mask is not None:
            mask = mask[:length, :length]
        if getattr(text, "use_pad_mask", False):
            pad = text._build_additive_mask(input_ids, length, dtype)
            mask = pad if mask is None else mask.unsqueeze(0) + pad
        return mask

    def _hf_mask(self, input_ids: Tensor, hidden: Tensor) -> Tensor | None:
        """The BERT attention mask ``HFTextEncoder`` builds from ``ids != pad_token_id`` (``None``: no padding)."""
        from transformers.masking_utils import create_bidirectional_mask

        text = self._text
        attn = (input_ids != text.config.pad_token_id).long()
        return create_bidirectional_mask(config=text.transformer.config, inputs_embeds=hidden, attention_mask=attn)

    def _blocks(self, side: Side, hidden: Tensor, start: int, stop: int | None, mask: Tensor | None) -> Tensor:
        """Blocks ``start .. stop - 1`` of ``side`` on ``hidden`` ``(N, L, D)``, whatever the blocks' layout."""
        if side == "vision" and self.timm_vision:
            for block in self.model.visual.trunk.blocks[start:stop]:
                hidden = block(hidden)
            return hidden
        if side == "text" and self.hf_text:
            for block in self._text.transformer.encoder.layer[start:stop]:
                hidden = block(hidden, mask)
            return hidden
        transformer = self._transformer(side)
        seq_first = not getattr(transformer, "batch_first", True)
        if seq_first:
            hidden = hidden.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            hidden = block(hidden, attn_mask=mask)
        return hidden.transpose(0, 1) if seq_first else hidden

    def _vision_embeds(self, pixel_values: Tensor) -> Tensor:
        """The vision tower's tokens before block 0: ``(B, prefix + patches, D)``."""
        if not self.timm_vision:
            return self.model.visual._embeds(pixel_values)
        trunk = self.model.visual.trunk
        return trunk.norm_pre(trunk.patch_drop(trunk._pos_embed(trunk.patch_embed(pixel_values))))

    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Tower ``side`` up to the output of block ``layer``: hidden ``(B, L, D)``."""
        self.check_layer(side, layer)
        if side == "vision":
            hidden = self._vision_embeds(inputs["pixel_values"])
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            return TowerState(hidden=self._blocks(side, hidden, 0, layer + 1, None), valid=valid)
        ids = inputs["input_ids"]
        text = self._text
        if self.hf_text:
            hidden = text.transformer.embeddings(input_ids=ids)
            mask = self._hf_mask(ids, hidden)
        else:
            cast = text.transformer.get_cast_dtype()
            hidden = text.token_embedding(ids).to(cast) + text.positional_embedding[: ids.shape[1]].to(cast)
            mask = self._text_mask(ids, hidden.dtype)
        hidden = self._blocks(side, hidden, 0, layer + 1, mask)
        attn = inputs.get("attention_mask")
        valid = (ids != self.tokenizer.pad_token_id) if attn is None else attn.bool()
        return TowerState(hidden=hidden, valid=valid, extras={"input_ids": ids})

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        if side == "text":
            ids = state.extras["input_ids"]
            mask = self._hf_mask(ids, state.hidden) if self.hf_text else self._text_mask(ids, state.hidden.dtype)
            state.context["mask"], state.context["rows"] = mask, ids.shape[0]
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        """Blocks ``layer + 1 ...``, the tower's pooling, final norm and projection: embeddings ``(N, P)``."""
        hidden = self.run_blocks(side, hidden, state, layer + 1, self.num_layers[side])
        return self.pooled_readout(side, hidden, state)

    def run_blocks(self, side: Side, hidden: Tensor, state: TowerState, start: int, stop: int) -> Tensor:
        mask = None
        if side == "text":
            ids = state.extras["input_ids"]
            if state.context.get("rows") == hidden.shape[0] and "mask" in state.context:
                mask = state.context["mask"]
            else:
                mask = self._hf_mask(ids, hidden) if self.hf_text else self._text_mask(ids, hidden.dtype)
        return self._blocks(side, hidden, start, stop, mask)

    def pooled_readout(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        """The tower's own pooling, final norm and projection of ``hidden`` ``(N, L, D)``: ``(N, P)``."""
        if side == "vision":
            visual = self.model.visual
            if self.timm_vision:
                # TimmModel.forward: the trunk's norm and head (its pooling), then open_clip's head
                return visual.head(visual.trunk.forward_head(visual.trunk.norm(hidden)))
            pooled, _ = visual._pool(hidden)
            return pooled if visual.proj is None else pooled @ visual.proj
        ids = state.extras["input_ids"]
        if self.hf_text:
            return self._hf_head(hidden, ids)
        from open_clip.transformer import text_global_pool

        hidden = self._text.ln_final(hidden)
        pooled = text_global_pool(hidden, ids, self.pool_type, eos_token_id=self.eos_id)
        projection = self._text.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def _pool_rule(self, side: Side) -> str:
        tower = self.model.visual if side == "vision" else self._text
        return parts.pool_rule(side, tower, self.timm_vision, self.hf_text)

    def pool_positions(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """The class token (0) for a token-pooling image tower; for text, open_clip's ``text_pool_type``
        (``argmax`` of the ids, the first ``eos``, ``first``, ``last``) or BERT's ``[CLS]`` (0).
        ``NotImplementedError`` for mean pooling (see :meth:`readout_weights`)."""
        key = "pixel_values" if side == "vision" else "input_ids"
        x = inputs[key]
        rule = self._pool_rule(side)
        return parts.pool_positions(rule, x.shape[0], x.shape[1] if side == "text" else 0,
                                    inputs.get("input_ids"), getattr(self, "eos_id", None), x.device)

    def readout_weights(self, side: Side, hidden: Tensor, state: TowerState) -> Tensor:
        n, length = hidden.shape[:2]
        pad = self._text.config.pad_token_id if self.hf_text and side == "text" else None
        return parts.readout_weights(self._pool_rule(side), n, length, state.extras.get("input_ids"),
                                     getattr(self, "eos_id", None), pad, self.vision_prefix_tokens, hidden.device)

    def _attention_blocks(self, side: Side) -> list[nn.Module]:
        if side == "vision" and self.timm_vision:
            return list(self.model.visual.trunk.blocks)
        if side == "text" and self.hf_text:
            return list(self._text.transformer.encoder.layer)
        return list(self._transformer(side).resblocks)

    def attention_unavailable(self, side: Side) -> str | None:
        """``None`` for open_clip's standard blocks (``nn.MultiheadAttention``), timm ViT blocks and BERT;
        a reason for open_clip's custom blocks or a read-out without token weights."""
        rule = self._pool_rule(side)
        kind = parts.attention_kind(self._attention_blocks(side), side == "vision" and self.timm_vision,
                                    side == "text" and self.hf_text)
        for what in (kind, rule):
            if what.startswith("unsupported"):
                return f"OpenCLIPBackbone cannot trace the {side} tower of {self.source}: {what.split(': ', 1)[1]}"
        return None

    def record_attention(self, side: Side, start_layer: int) -> AbstractContextManager[AttentionRecorder]:
        blocks = self._attention_blocks(side)[start_layer:]
        if side == "vision" and self.timm_vision:
            return record_timm([b.attn for b in blocks])
        if side == "text" and self.hf_text:
            return record_bert(self._text.transformer, blocks)
        return record_multihead([b.attn for b in blocks])

    def pooled_attention_unavailable(self, side: Side) -> str | None:
        """As :meth:`attention_unavailable`, or: the tower pools no single token (mean pooling)."""
        rule = self._pool_rule(side)
        return self.attention_unavailable(side) or (
            f"OpenCLIPBackbone: the {side} tower of {self.source} pools no single token ({rule} pooling)"
            if rule in parts.MEAN_RULES else None)

    def randomization_stages(self, side: Side = "vision") -> list[tuple[str, list[nn.Module]]]:
        """``projection``: the tower's final norm, pooling and projection; then each block; ``embeddings``:
        every other parameter of the tower (token or patch embeddings, positions, class token, ``ln_pre``)."""
        if side == "vision":
            visual = self.model.visual
            tower = visual
            if self.timm_vision:
                trunk = visual.trunk
                top = [trunk.norm, trunk.fc_norm, trunk.head, visual.head]
            else:
                top = [visual.ln_post, parts.Parameters([("proj", visual.proj)] if visual.proj is not None else [])]
        else:
            text = tower = self._text
            if self.hf_text:
                bert_pooler = text.transformer.pooler
                top = [text.proj, text.pooler, *([bert_pooler] if bert_pooler is not None else [])]
            else:
                projection = text.text_projection
                top = [text.ln_final, projection if isinstance(projection, nn.Module)
                       else parts.Parameters([("text_projection", projection)] if projection is not None else [])]
        # A CLIP keeps its text parts on the model itself: its image tower and logit scale are not text.
        image = self.model.visual if tower is self.model else None
        return parts.stages(top, self._attention_blocks(side), tower, image)

    def _hf_head(self, hidden: Tensor, input_ids: Tensor) -> Tensor:
        """``HFTextEncoder.forward`` after the encoder: BERT's pooler (if built), open_clip's pooler, ``proj``."""
        from transformers.modeling_outputs import BaseModelOutputWithPoolingAndCrossAttentions

        text = self._text
        bert_pooler = getattr(text.transformer, "pooler", None)
        out = BaseModelOutputWithPoolingAndCrossAttentions(
            last_hidden_state=hidden, pooler_output=None if bert_pooler is None else bert_pooler(hidden))
        return text.proj(text.pooler(out, (input_ids != text.config.pad_token_id).long()))

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """``encode_image`` / ``encode_text`` (unnormalised, like ``CLIPBackbone.embed``): ``(B, P)``."""
        if side == "vision":
            return self.model.encode_image(inputs["pixel_values"])
        return self.model.encode_text(inputs["input_ids"])
