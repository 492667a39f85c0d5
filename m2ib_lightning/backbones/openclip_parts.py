"""What :class:`~m2ib_lightning.backbones.openclip.OpenCLIPBackbone` recognises in an open_clip model.

* which towers it can split (:func:`is_timm_vit`, :func:`is_hf_bert`, :func:`unsupported_parts`);
* how each tower reads out its embedding (:func:`pool_rule`, :func:`pool_positions`, :func:`readout_weights`);
* which attention modules a tower's blocks use (:func:`attention_kind`);
* the randomisation stages (:func:`stages`), with parameters that belong to no submodule as one module
  (:class:`Parameters`).

open_clip, timm and transformers are imported inside the functions: this module loads without them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["Parameters", "attention_kind", "is_hf_bert", "is_timm_vit", "pool_positions", "pool_rule",
           "readout_weights", "stages", "unsupported_parts"]

#: pooling rules :func:`pool_rule` names: one token ...
TOKEN_RULES = ("first", "last", "argmax", "eos")
#: ... or a mean: over the valid tokens (BERT's mean pooler) or the tokens after the prefix (patches)
MEAN_RULES = ("mean", "patches", "all")


def pool_rule(side: str, tower: nn.Module, timm_vision: bool, hf_text: bool) -> str:
    """How ``tower`` (``model.visual``, or the module holding the text parts) pools its last block's output.

    One of :data:`TOKEN_RULES` (``first``: position 0, the class token; ``last``; ``argmax`` of the ids;
    ``eos``: the first end-of-text id), of :data:`MEAN_RULES` (``mean``: the valid tokens; ``patches``:
    the tokens after the prefix; ``all``), or a phrase starting with ``"unsupported"`` that names it.
    """
    if side == "vision" and timm_vision:
        trunk = tower.trunk
        if getattr(trunk, "attn_pool", None) is not None:
            return "unsupported: timm attention pooling (map)"
        pool = trunk.global_pool
        if pool == "token":
            return "first"
        if pool == "avg":
            return "all" if getattr(trunk, "pool_include_prefix", False) else "patches"
        return f"unsupported: timm global pooling {pool!r}"
    if side == "vision":
        if getattr(tower, "attn_pool", None) is not None:
            return "unsupported: an attentional pooler"
        return {"tok": "first", "avg": "patches"}.get(tower.pool_type, f"unsupported: pool_type {tower.pool_type!r}")
    if hf_text:
        name = type(tower.pooler).__name__
        rules = {"ClsPooler": "first", "ClsLastHiddenStatePooler": "first", "MeanPooler": "mean"}
        return rules.get(name, f"unsupported: the Hugging Face text pooler {name}")
    pool = getattr(tower, "text_pool_type", None) or getattr(tower, "pool_type", "argmax")
    return pool if pool in TOKEN_RULES else f"unsupported: text pool_type {pool!r}"


def pool_positions(rule: str, n: int, length: int, input_ids: Tensor | None, eos_id: int | None,
                   device: torch.device) -> Tensor:
    """``(n,)`` positions of the pooled token under a :data:`TOKEN_RULES` ``rule``."""
    if rule == "first":
        return torch.zeros(n, dtype=torch.long, device=device)
    if rule == "last":
        return torch.full((n,), length - 1, dtype=torch.long, device=device)
    if rule == "argmax":
        return input_ids.argmax(dim=-1)
    if rule == "eos":
        return (input_ids == eos_id).int().argmax(dim=-1)
    raise NotImplementedError(f"this open_clip tower pools no single token ({rule})")


def readout_weights(rule: str, n: int, length: int, input_ids: Tensor | None, eos_id: int | None, pad_id: int | None,
                    prefix: int, device: torch.device) -> Tensor:
    """``(n, length)`` read-out weights (rows summing to 1) of the pooling ``rule``."""
    if rule in TOKEN_RULES:
        pos = pool_positions(rule, n, length, input_ids, eos_id, device)
        return torch.zeros(n, length, device=device).scatter_(1, pos.unsqueeze(1), 1.0)
    if rule == "mean":
        mask = (input_ids != pad_id).float()
        return mask / mask.sum(1, keepdim=True)
    if rule in ("patches", "all"):
        skip = prefix if rule == "patches" else 0
        weights = torch.zeros(n, length, device=device)
        weights[:, skip:] = 1.0 / (length - skip)
        return weights
    raise NotImplementedError(f"this open_clip tower's read-out has no token weights ({rule})")


def attention_kind(blocks: Iterable[nn.Module], timm_vision: bool, hf_text: bool) -> str:
    """``"timm"``, ``"transformers"`` or ``"multihead"``: how the probabilities of ``blocks`` are recorded
    (:mod:`m2ib_lightning.backbones.attention`); or a phrase starting with ``"unsupported"``."""
    blocks = list(blocks)
    if timm_vision:
        from timm.layers import Attention

        odd = {type(b.attn).__name__ for b in blocks if not isinstance(getattr(b, "attn", None), Attention)}
        return f"unsupported: timm attention {', '.join(sorted(odd))}" if odd else "timm"
    if hf_text:
        return "transformers"
    from m2ib_lightning.backbones.attention import multihead_unsupported

    odd = {type(b).__name__ for b in blocks if not isinstance(getattr(b, "attn", None), nn.MultiheadAttention)}
    if odd:
        return (f"unsupported: open_clip's {', '.join(sorted(odd))} (custom attention: qk_norm, scaled cosine "
                "attention; it computes its attention with a fused kernel only, never the probabilities)")
    reasons = {multihead_unsupported(b.attn) for b in blocks} - {None}
    return f"unsupported: {', '.join(sorted(reasons))}" if reasons else "multihead"


def stages(top: list[nn.Module], blocks: list[nn.Module], tower: nn.Module, image: nn.Module | None
           ) -> list[tuple[str, list[nn.Module]]]:
    """The randomisation stages: ``projection`` (``top``), each block from the last down, and
    ``embeddings``: every other parameter of ``tower`` (without ``image``'s and ``logit_*`` when the
    tower is a whole CLIP holding its text parts), so that each parameter is in exactly one stage."""
    seen = {id(p) for m in (*top, *blocks) for p in m.parameters()}
    if image is not None:
        seen |= {id(p) for p in image.parameters()}
    rest = [(n, p) for n, p in tower.named_parameters()
            if id(p) not in seen and not (image is not None and n.startswith("logit_"))]
    return [("projection", top), *((f"block {i}", [blocks[i]]) for i in reversed(range(len(blocks)))),
            ("embeddings", [Parameters(rest)])]


class Parameters(nn.Module):
    """Parameters that hang on a tower directly (open_clip's ``proj``, ``class_embedding``, ...), as one
    module: the SAME tensors, so re-initialising this module's parameters changes the model's."""

    def __init__(self, named: Iterable[tuple[str, nn.Parameter]]) -> None:
        super().__init__()
        for name, param in named:
            self.register_parameter(name.replace(".", "__"), param)


def is_timm_vit(visual: nn.Module) -> bool:
    """An open_clip ``TimmModel`` around a timm ``VisionTransformer`` with a class token."""
    from open_clip.timm_model import TimmModel

    if not isinstance(visual, TimmModel):
        return False
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    trunk = visual.trunk
    return type(trunk) is TimmViT and getattr(trunk, "cls_token", None) is not None


def is_hf_bert(text: nn.Module | None) -> bool:
    """An open_clip ``HFTextEncoder`` around a transformers BERT encoder."""
    from open_clip.hf_model import HFTextEncoder

    if not isinstance(text, HFTextEncoder):
        return False
    from transformers import BertModel

    return type(text.transformer) is BertModel and not text.transformer.config.is_decoder


def unsupported_parts(visual: nn.Module, text: nn.Module | None, tokenizer: Any, timm_vision: bool, hf_text: bool,
                 model: nn.Module) -> list[str]:
    """What keeps the model from being split, one phrase per part (empty: supported)."""
    from open_clip.hf_model import HFTextEncoder
    from open_clip.timm_model import TimmModel
    from open_clip.tokenizer import HFTokenizer, SimpleTokenizer
    from open_clip.transformer import TextTransformer, VisionTransformer

    unsupported = []
    if isinstance(visual, TimmModel) and not timm_vision:
        unsupported.append(f"a timm {type(visual.trunk).__name__} image tower (only a timm VisionTransformer with "
                           "a class token is supported)")
    elif not timm_vision and not isinstance(visual, VisionTransformer):
        unsupported.append(f"a {type(visual).__name__} image tower (only open_clip's VisionTransformer and a timm "
                           "VisionTransformer with a class token are supported; ResNet towers are not)")
    if isinstance(text, HFTextEncoder) and not hf_text:
        unsupported.append(f"a Hugging Face {type(text.transformer).__name__} text tower (only BERT encoders, e.g. "
                           "BiomedCLIP's PubMedBERT, are supported)")
    elif not hf_text and text is not model and not isinstance(text, TextTransformer):
        unsupported.append(f"a {type(text).__name__} text tower (only open_clip's own text transformer and Hugging "
                           "Face BERT towers are supported)")
    elif not hf_text and getattr(text, "cls_emb", None) is not None:
        unsupported.append("a text tower with an appended class token (CoCa; not supported yet)")
    if hf_text:
        if not isinstance(tokenizer, HFTokenizer) or tokenizer.tokenizer_mode:
            mode = getattr(tokenizer, "tokenizer_mode", "")
            unsupported.append(f"a {type(tokenizer).__name__} tokenizer (mode {mode!r}; a BERT text tower needs "
                               "open_clip's HFTokenizer in its standard mode)")
    elif not isinstance(tokenizer, SimpleTokenizer):
        unsupported.append(f"a {type(tokenizer).__name__} tokenizer (open_clip's own text transformer is supported "
                           "with its SimpleTokenizer only)")
    return unsupported

