"""open_clip models behind the :class:`~m2ib_lightning.backbones.BackboneAdapter` interface.

Supported: open_clip's ``CLIP`` class and ``CustomTextCLIP`` whose text tower is open_clip's own
``TextTransformer``, with a ``VisionTransformer`` image tower (class token first) and open_clip's BPE
``SimpleTokenizer`` (the OpenAI CLIP, LAION and DataComp ViT checkpoints). Not supported yet, refused
with a :class:`~m2ib_lightning.errors.ConfigError` naming the tower: Hugging Face text towers
(``HFTextEncoder``, e.g. BiomedCLIP's PubMedBERT), timm and ResNet image towers, CoCa's appended
text class token, and tokenizers other than ``SimpleTokenizer``.

The split follows the model exactly: ``lower`` runs open_clip's own embedding code and the blocks
``0 .. layer``; ``upper`` runs the remaining blocks and then the tower's own pooling, final norm and
projection, so ``upper(lower(x))`` equals ``encode_image`` / ``encode_text`` (``normalize=False``).
Blocks may be batch-first or sequence-first (``transformer.batch_first``): the adapter always hands
out ``(B, L, D)``.

open_clip tokenises every caption to the model's fixed ``context_length`` with 0 padding and pools
the text at the end-of-text token (``argmax`` of the ids, or the configured ``text_pool_type``); the
adapter's tokenizer keeps that fixed length (as ``encode_text`` requires) and adds the attention mask
(``ids != 0``: start token, caption, end token), which is the text map's ``valid`` range.

open_clip is optional (``pip install 'm2ib_lightning[openclip]'``; it needs a torchvision matching
torch) and is imported only when an :class:`OpenCLIPBackbone` is built.
:func:`build_tiny_openclip` writes a tiny random model that loads offline (tests, demos).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones import BackboneAdapter, Side, TowerState, _offline
from m2ib_lightning.errors import BackboneLoadError, ConfigError

__all__ = ["OpenCLIPBackbone", "build_tiny_openclip"]

#: weight files open_clip reads from a model directory, in its order of preference
CHECKPOINT_NAMES = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors",
                    "open_clip_pytorch_model.bin", "open_clip_pytorch_model.pth")
CONFIG_NAME = "open_clip_config.json"
INSTALL_HINT = "pip install 'm2ib_lightning[openclip]' (open_clip_torch, with a torchvision matching your torch)"


class OpenCLIPTokenizer:
    """open_clip's ``SimpleTokenizer`` called like a transformers tokenizer.

    ``tokenizer(captions, padding=..., truncation=..., max_length=..., return_tensors="pt")`` gives
    ``input_ids`` ``(B, context_length)`` (0-padded, truncated with the end token kept, exactly as
    open_clip tokenises) and ``attention_mask`` (``ids != 0``). The length is always the model's
    ``context_length``, whatever padding is asked for: ``encode_text`` adds positional embeddings
    and the causal mask for that length. Without ``return_tensors`` it returns lists, and with
    ``truncation=False`` the untruncated ids (used to count a caption's tokens).
    """

    pad_token_id = 0

    def __init__(self, tokenizer: Any, context_length: int) -> None:
        self.tokenizer, self.context_length = tokenizer, context_length
        self.model_max_length = context_length

    def __call__(self, text: str | Sequence[str], padding: bool | str = True, truncation: bool = True,
                 max_length: int | None = None, return_tensors: str | None = None, **_: Any) -> dict[str, Any]:
        texts = [text] if isinstance(text, str) else list(text)
        if not truncation:
            tok = self.tokenizer
            ids = [[tok.sot_token_id, *tok.encode(t), tok.eot_token_id] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] * len(row) for row in ids]}
        input_ids = self.tokenizer(texts, context_length=self.context_length)
        encoded = {"input_ids": input_ids, "attention_mask": (input_ids != self.pad_token_id).long()}
        if return_tensors is None:
            return {k: [row[row_mask.bool()].tolist() for row, row_mask in zip(v, encoded["attention_mask"])]
                    for k, v in encoded.items()}
        return encoded

    def convert_ids_to_tokens(self, ids: Sequence[int]) -> list[str]:
        """One string per id, e.g. ``["<start_of_text>", "red", "circle", "<end_of_text>"]``."""
        return [self.tokenizer.decode([i]).strip() for i in ids]

    def __len__(self) -> int:
        return self.tokenizer.vocab_size


class OpenCLIPImageProcessor:
    """open_clip's evaluation transform called like a transformers image processor.

    ``processor(images=[...], return_tensors="pt")["pixel_values"]`` is ``(B, 3, H, W)``: the
    transform applied to each PIL image and stacked. ``image_mean`` / ``image_std`` undo it for overlays.
    """

    def __init__(self, transform: Any, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        self.transform = transform
        self.image_mean, self.image_std = list(image_mean), list(image_std)

    def __call__(self, images: Any = None, return_tensors: str | None = "pt", **_: Any) -> dict[str, Tensor]:
        batch = images if isinstance(images, (list, tuple)) else [images]
        return {"pixel_values": torch.stack([self.transform(image) for image in batch])}


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
            hint = (" Offline mode is on (HF_HUB_OFFLINE) and it is not in the cache." if _offline()
                    else " Check the id and your network.")
            hint += " To use a model on disk, pass its directory (open_clip_config.json + weights)."
        detail = str(err).strip().rstrip(".")
        raise BackboneLoadError(f"could not load the open_clip model {name!r}: {detail}.{hint}") from err
    return name, loaded, tokenizer, transform


class OpenCLIPBackbone(BackboneAdapter):
    """An open_clip dual encoder (``CLIP`` or ``CustomTextCLIP`` with open_clip's text transformer), frozen.

    Args:
        model: ``hf-hub:<org>/<repo>`` (e.g. ``hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``), a
            local open_clip model directory (``open_clip_config.json`` with ``open_clip_model.safetensors``
            or ``open_clip_pytorch_model.bin``; a ``local-dir:`` prefix is accepted), or an open_clip
            built-in architecture name (e.g. ``ViT-B-32``) together with ``pretrained``.
        pretrained: with a built-in name only: a local checkpoint file, or an open_clip pretrained tag
            (downloaded by open_clip).
        cache_dir: where hub downloads are cached.
    """

    def __init__(self, model: str = "hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K", pretrained: str | None = None,
                 cache_dir: str | None = None) -> None:
        super().__init__()
        self.source, self.model, tokenizer, transform = load_openclip(model, pretrained, cache_dir)
        from open_clip.tokenizer import SimpleTokenizer
        from open_clip.transformer import TextTransformer, VisionTransformer

        self.model.eval().requires_grad_(False)
        visual = self.model.visual
        text = self.model if hasattr(self.model, "transformer") else getattr(self.model, "text", None)
        unsupported = []
        if not isinstance(visual, VisionTransformer):
            unsupported.append(f"a {type(visual).__name__} image tower (only open_clip's VisionTransformer is "
                               "supported; timm and ResNet towers are not yet)")
        if text is not self.model and not isinstance(text, TextTransformer):
            unsupported.append(f"a {type(text).__name__} text tower (only open_clip's own text transformer is "
                               "supported; Hugging Face text towers, e.g. BiomedCLIP's, are not yet)")
        elif getattr(text, "cls_emb", None) is not None:
            unsupported.append("a text tower with an appended class token (CoCa; not supported yet)")
        if not isinstance(tokenizer, SimpleTokenizer):
            unsupported.append(f"a {type(tokenizer).__name__} tokenizer (only open_clip's SimpleTokenizer is "
                               "supported yet)")
        if unsupported:
            raise ConfigError(f"OpenCLIPBackbone cannot split {self.source} ({type(self.model).__name__}): it has "
                              + "; ".join(unsupported))
        self.pool_type = getattr(text, "text_pool_type", None) or getattr(text, "pool_type", "argmax")
        self.eos_id = getattr(text, "text_eos_id", None) or getattr(text, "eos_id", None)
        self.context_length = int(text.positional_embedding.shape[0])
        self.tokenizer = OpenCLIPTokenizer(tokenizer, self.context_length)
        self.image_processor = OpenCLIPImageProcessor(transform, visual.image_mean, visual.image_std)
        self.num_layers = {"vision": len(visual.transformer.resblocks), "text": len(text.transformer.resblocks)}

    @property
    def _text(self) -> nn.Module:
        """The module holding the text tower's parts (``CLIP`` keeps them on the model itself)."""
        return self.model if hasattr(self.model, "transformer") else self.model.text

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        ph, pw = self.model.visual.patch_size
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

    def _blocks(self, side: Side, hidden: Tensor, start: int, stop: int | None, mask: Tensor | None) -> Tensor:
        """Blocks ``start .. stop - 1`` of ``side`` on ``hidden`` ``(N, L, D)``, whatever the blocks' layout."""
        transformer = self._transformer(side)
        seq_first = not getattr(transformer, "batch_first", True)
        if seq_first:
            hidden = hidden.transpose(0, 1)
        for block in transformer.resblocks[start:stop]:
            hidden = block(hidden, attn_mask=mask)
        return hidden.transpose(0, 1) if seq_first else hidden

    def lower(self, side: Side, inputs: dict[str, Tensor], layer: int) -> TowerState:
        """Tower ``side`` up to the output of block ``layer``: hidden ``(B, L, D)``."""
        self.check_layer(side, layer)
        if side == "vision":
            hidden = self.model.visual._embeds(inputs["pixel_values"])
            valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
            return TowerState(hidden=self._blocks(side, hidden, 0, layer + 1, None), valid=valid)
        ids = inputs["input_ids"]
        text = self._text
        cast = text.transformer.get_cast_dtype()
        hidden = text.token_embedding(ids).to(cast) + text.positional_embedding[: ids.shape[1]].to(cast)
        hidden = self._blocks(side, hidden, 0, layer + 1, self._text_mask(ids, hidden.dtype))
        attn = inputs.get("attention_mask")
        valid = (ids != OpenCLIPTokenizer.pad_token_id) if attn is None else attn.bool()
        return TowerState(hidden=hidden, valid=valid, extras={"input_ids": ids})

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        if side == "text":
            state.context["mask"] = self._text_mask(state.extras["input_ids"], state.hidden.dtype)
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        """Blocks ``layer + 1 ...``, the tower's pooling, final norm and projection: embeddings ``(N, P)``."""
        from open_clip.transformer import text_global_pool

        if side == "vision":
            visual = self.model.visual
            pooled, _ = visual._pool(self._blocks(side, hidden, layer + 1, None, None))
            return pooled if visual.proj is None else pooled @ visual.proj
        ids = state.extras["input_ids"]
        mask = state.context.get("mask")
        if mask is None or (mask.dim() == 3 and mask.shape[0] != hidden.shape[0] * self._text.heads):
            mask = self._text_mask(ids, hidden.dtype)
        hidden = self._text.ln_final(self._blocks(side, hidden, layer + 1, None, mask))
        pooled = text_global_pool(hidden, ids, self.pool_type, eos_token_id=self.eos_id)
        projection = self._text.text_projection
        if projection is None:
            return pooled
        return projection(pooled) if isinstance(projection, nn.Linear) else pooled @ projection

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        """``encode_image`` / ``encode_text`` (unnormalised, like ``CLIPBackbone.embed``): ``(B, P)``."""
        if side == "vision":
            return self.model.encode_image(inputs["pixel_values"])
        return self.model.encode_text(inputs["input_ids"])


def build_tiny_openclip(
    out_dir: str | Path,
    width: int = 32,
    num_layers: int = 3,
    head_width: int = 16,
    embed_dim: int = 16,
    image_size: int = 64,
    patch_size: int = 16,
    context_length: int = 32,
    seed: int = 0,
    weights: str = "open_clip_model.safetensors",
    custom_text: bool = False,
    text_cfg: dict[str, Any] | None = None,
) -> Path:
    """Save a tiny random open_clip ``CLIP`` to ``out_dir`` as open_clip's ``local-dir:`` format.

    ``open_clip_config.json`` (model and preprocessing config) is built by open_clip's own config
    mechanism, and the weights are written to ``weights`` (``open_clip_model.safetensors``, or
    ``open_clip_pytorch_model.bin`` for a pickle). ``custom_text`` builds a ``CustomTextCLIP`` (text
    tower under ``model.text``) instead of a ``CLIP``; ``text_cfg`` overrides entries of open_clip's
    ``CLIPTextCfg`` (e.g. ``no_causal_mask``, ``pool_type``, ``qk_norm``). The tokenizer is
    open_clip's shipped BPE vocabulary, so the text tower keeps the full 49408-token vocabulary.
    """
    import open_clip

    if weights not in CHECKPOINT_NAMES:
        raise ConfigError(f"weights must be one of {CHECKPOINT_NAMES}, got {weights!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_cfg = {
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "layers": num_layers, "width": width, "head_width": head_width,
                       "patch_size": patch_size},
        "text_cfg": {"context_length": context_length, "vocab_size": 49408, "width": width,
                     "heads": width // head_width, "layers": num_layers, **(text_cfg or {})},
        **({"custom_text": True} if custom_text else {}),
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3}}
    (out / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # No weights in the directory yet: open_clip builds the model with its own random init.
        model = open_clip.create_model(f"local-dir:{out}")
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if weights.endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(state, out / weights)
    else:
        torch.save(state, out / weights)
    return out
