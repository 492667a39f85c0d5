"""Frozen dual-encoder backbones, split at the bottleneck layer.

A backbone adapter exposes, for each tower (``"vision"`` or ``"text"``):

* :meth:`BackboneAdapter.lower`: run the tower up to the OUTPUT of encoder block ``layer``
  (0-based), i.e. ``hidden_states[layer + 1]`` of ``output_hidden_states=True``; ``layer = -1``
  (:data:`EMBEDDINGS`) stops before block 0, at the token embeddings (``hidden_states[0]``);
* :meth:`BackboneAdapter.upper`: run the remaining blocks, the final norm, the pooling and the
  projection, giving the embedding that the tower's ``get_*_features`` would give;
* :meth:`BackboneAdapter.embed`: the clean projected embedding (no bottleneck).

:class:`CLIPBackbone` (transformers ``CLIPModel``) and :class:`~m2ib_lightning.siglip.SigLIPBackbone`
(transformers ``SiglipModel``) implement it; other dual encoders fit behind the same methods.
Adapters are plain ``nn.Module`` s: they import nothing from Lightning, and they hold their
weights frozen (``eval()``, ``requires_grad_(False)``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2ib_lightning.errors import BackboneLoadError, ConfigError

log = logging.getLogger(__name__)

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


def weights_fingerprint(module: nn.Module) -> str:
    """A short sha256 of ``module``'s weights (every state_dict entry: name, shape, dtype, bytes).

    Identifies the model that something derived from it (e.g. cached dataset statistics) belongs
    to, whatever name or path it was loaded under. About a second per GB of weights.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype};".encode())
        digest.update(tensor.cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer: Any) -> dict[str, Any] | None:
    """What of a tokenizer decides the token ids: a short sha256 of its vocabulary (token -> id) and
    its maximum length (captions are truncated to it); ``None`` when it exposes no vocabulary.

    Looks through wrappers (``.tokenizer``): transformers tokenizers (``get_vocab``) and open_clip's
    BPE tokenizer (``encoder``).
    """
    vocab = None
    current = tokenizer
    for _ in range(3):
        if current is None:
            break
        get_vocab = getattr(current, "get_vocab", None)
        encoder = getattr(current, "encoder", None)
        if callable(get_vocab):
            try:
                vocab = get_vocab()
            except (NotImplementedError, AttributeError, TypeError):  # e.g. a remote-code tokenizer without one
                vocab = None
        if not vocab and isinstance(encoder, dict):
            vocab = encoder
        if vocab:
            break
        current = getattr(current, "tokenizer", None)
    if not vocab:
        return None
    digest = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    length = getattr(tokenizer, "model_max_length", None)
    return {"vocab": digest.hexdigest()[:16], "max_length": length if isinstance(length, int) else None}


def _resolve_source(model: str | os.PathLike) -> tuple[str, bool]:
    """(source, is_local). A string that names an existing directory is local; a path-like
    string that does not exist is an error here rather than an opaque hub lookup later."""
    text = os.fspath(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise BackboneLoadError(
                f"{path} is a directory but holds no config.json; expected a checkpoint saved with "
                "save_pretrained (config.json, model.safetensors, tokenizer and preprocessor files)"
            )
        return str(path), True
    looks_local = text.startswith((".", "/", "~")) or text.count("/") > 1
    if looks_local or path.exists():
        raise BackboneLoadError(f"checkpoint directory {text!r} does not exist")
    return text, False


def _offline() -> bool:
    flags = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    return any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in flags)


def load_pretrained(model_cls: Any, family: str, model: str, *, revision: str | None, trust_remote_code: bool,
                    use_safetensors: bool, attn_implementation: str, cache_dir: str | None
                    ) -> tuple[str, Any, Any, Any]:
    """Load ``model_cls`` with its tokenizer and image processor from a hub id or a local directory.

    Returns ``(source, model, tokenizer, image_processor)``; any failure becomes one
    :class:`BackboneLoadError` naming the source and what to do (offline cache, a local directory,
    safetensors, missing optional packages).
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    source, local = _resolve_source(model)
    common: dict[str, Any] = {"revision": revision, "trust_remote_code": trust_remote_code, "cache_dir": cache_dir}
    try:
        loaded = model_cls.from_pretrained(
            source, use_safetensors=use_safetensors, attn_implementation=attn_implementation, **common
        )
        tokenizer = AutoTokenizer.from_pretrained(source, **common)
        image_processor = AutoImageProcessor.from_pretrained(source, **common)
    except (OSError, ValueError, ImportError) as err:
        where = f"local directory {source}" if local else f"hub id {source!r}"
        hint = ""
        if not local:
            hint = (
                " Offline mode is on (HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE) and it is not in the cache."
                if _offline()
                else " Check the id, your network and, for gated models, your token."
            )
            hint += " To use a checkpoint on disk, pass its directory instead."
        if use_safetensors and "safetensors" in str(err).lower():
            hint += " Only safetensors weights are loaded by default (use_safetensors: false to allow .bin)."
        if "sentencepiece" in str(err).lower():
            hint += " This tokenizer needs the sentencepiece package (pip install sentencepiece)."
        detail = str(err).strip().rstrip(".")
        raise BackboneLoadError(f"could not load a {family} model from {where}: {detail}.{hint}") from err
    return source, loaded, tokenizer, image_processor


class CLIPBackbone(BackboneAdapter):
    """A transformers ``CLIPModel`` (any checkpoint with its architecture), frozen.

    Args:
        model: hub id (e.g. ``openai/clip-vit-base-patch32``) or a local directory written by
            ``save_pretrained`` holding the model, its tokenizer and its image processor.
        revision: hub revision (branch, tag or commit) to pin.
        trust_remote_code: allow code shipped with the checkpoint to run (off by default).
        use_safetensors: load only safetensors weights (safe default). Set False to allow a
            pickle ``pytorch_model.bin`` from a source you trust.
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
        use_safetensors: bool = True,
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
        # Only blocks laid out like transformers' CLIPEncoderLayer can be cut to one query position.
        self.prune_last_block = bool(prune_last_block) and all(
            _prunable(self._tower(side).encoder.layers[-1]) for side in SIDES
        )
        self.fold_activation = bool(fold_activation) and all(
            _prunable(block) for side in SIDES for block in self._tower(side).encoder.layers
        )

    def vision_grid(self, pixel_values: Tensor) -> tuple[int, int]:
        p = self.model.config.vision_config.patch_size
        return pixel_values.shape[-2] // p, pixel_values.shape[-1] // p

    def _tower(self, side: Side) -> nn.Module:
        return self.model.vision_model if side == "vision" else self.model.text_model

    def _pool_positions(self, input_ids: Tensor) -> Tensor:
        # Same rule as transformers' CLIPTextModel: first EOS, or argmax of the ids for
        # configs with the legacy eos_token_id == 2 (transformers PR #24773).
        ids = input_ids.to(torch.int)
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
            extras = {"attention_mask": attn, "pool": self._pool_positions(ids)}
        for block in tower.encoder.layers[: layer + 1]:
            hidden = block(hidden, mask, **kwargs)
        return TowerState(hidden=hidden, valid=valid, extras=extras)

    def _text_mask(self, hidden: Tensor, attention_mask: Tensor) -> Tensor | None:
        from transformers.masking_utils import create_causal_mask

        return create_causal_mask(
            config=self.model.text_model.config, inputs_embeds=hidden, attention_mask=attention_mask, cache=None
        )

    def prepare_upper(self, side: Side, state: TowerState, layer: int) -> TowerState:
        if side == "text":
            attn = state.extras["attention_mask"]
            state.context["mask"] = self._text_mask(state.hidden, attn)
            # The pooled query's row of the causal + padding mask, (N, 1, 1, L), for the pruned last block.
            positions = torch.arange(attn.shape[1], device=attn.device)
            state.context["pool_mask"] = ((positions <= state.extras["pool"][:, None]) & attn.bool())[:, None, None]
            state.context["rows"] = torch.arange(attn.shape[0], device=attn.device)
        return state

    def upper(self, side: Side, hidden: Tensor, state: TowerState, layer: int) -> Tensor:
        tower = self._tower(side)
        blocks = list(tower.encoder.layers[layer + 1 :])
        # The last block's output is only read at the pooled token (CLS / first EOS): compute that
        # one position (its attention still reads every key and value), see `_pooled_block`.
        last = blocks.pop() if self.prune_last_block and blocks else None
        fold = self.fold_activation
        if side == "vision":
            for block in blocks:
                hidden = _block(block, hidden, None, fold) if fold else block(hidden, None)
            pooled = hidden[:, 0] if last is None else _pooled_block(last, hidden, None, None, fold)
            return self.model.visual_projection(tower.post_layernorm(pooled))
        mask = state.context.get("mask")
        for block in blocks:
            hidden = _block(block, hidden, mask, fold, is_causal=True) if fold else block(hidden, mask, is_causal=True)
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
            pooled = _pooled_block(last, hidden, (rows, pool), pool_mask, fold)
        # final_layer_norm acts per token, so normalising only the pooled token is the same.
        return self.model.text_projection(tower.final_layer_norm(pooled))

    def embed(self, side: Side, inputs: dict[str, Tensor]) -> Tensor:
        if side == "vision":
            out = self.model.get_image_features(pixel_values=inputs["pixel_values"])
        else:
            out = self.model.get_text_features(
                input_ids=inputs["input_ids"], attention_mask=inputs.get("attention_mask")
            )
        # transformers >= 5 returns a model output whose pooler_output is the projection.
        return out if isinstance(out, Tensor) else out.pooler_output


def _prunable(block: nn.Module) -> bool:
    """Whether ``block`` has the layout of transformers' ``CLIPEncoderLayer`` that `_pooled_block` uses."""
    attn = getattr(block, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")
    return attn is not None and all(hasattr(attn, n) for n in names) and all(
        hasattr(block, n) for n in ("layer_norm1", "layer_norm2", "mlp")
    )


def _pooled_block(block: nn.Module, hidden: Tensor, index: tuple[Tensor, Tensor] | None,
                  key_mask: Tensor | None, fold: bool = False) -> Tensor:
    """A pre-norm CLIP encoder block evaluated at ONE query position per row.

    Args:
        block: a ``CLIPEncoderLayer`` (eval mode: no dropout).
        hidden: block input ``(N, L, D)``.
        index: ``(rows, positions)`` of the query token of each row, each ``(N,)``; ``None`` for
            position 0 (the vision CLS token).
        key_mask: ``(N, 1, 1, L)`` bool, True where the query may attend (the query's row of the
            full block's attention mask), or ``None`` for no mask.
        fold: compute the MLP's quick GELU as a folded ``silu`` (see `_mlp`).

    Returns:
        The block output at the query position, ``(N, D)``: what the full block gives there, at the
        cost of the keys and values of all tokens plus one token's query, attention output and MLP.
    """
    attn = block.self_attn
    n, length, _ = hidden.shape
    x = block.layer_norm1(hidden)
    if index is None:
        residual, xq = hidden[:, 0], x[:, 0]
    else:
        residual, xq = hidden[index], x[index]
    heads, head_dim = attn.num_heads, attn.head_dim
    q = attn.q_proj(xq).view(n, heads, 1, head_dim)
    k = attn.k_proj(x).view(n, length, heads, head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(n, length, heads, head_dim).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=attn.scale)
    h = residual + attn.out_proj(out.reshape(n, heads * head_dim))
    return h + _mlp(block.mlp, block.layer_norm2(h), fold)


#: transformers' quick GELU constant: ``x * sigmoid(QUICK_GELU * x)``.
QUICK_GELU = 1.702


def _mlp(mlp: nn.Module, x: Tensor, fold: bool) -> Tensor:
    """A CLIP MLP; quick GELU computed as ``silu`` with its factor folded into the weights when ``fold``.

    ``x * sigmoid(a x) = silu(a x) / a``, so ``fc2(qgelu(fc1(x))) = fc2'(silu(fc1'(x)))`` with
    ``fc1' = a * fc1`` and ``fc2'`` the weights of ``fc2`` divided by ``a`` (see `_folded_weights`).
    """
    act = getattr(mlp, "activation_fn", None)
    if not fold or type(act).__name__ != "QuickGELUActivation":
        return mlp(x)
    w1, b1, w2 = _folded_weights(mlp)
    return F.linear(F.silu(F.linear(x, w1, b1)), w2, mlp.fc2.bias)


def _folded_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``a * fc1.weight``, ``a * fc1.bias`` and ``fc2.weight / a``, computed once and kept on the MLP.

    The inner loop calls every upper block ``2 * (steps - 1)`` times per chunk: scaling the weights
    there would repeat the same product each time, and each call's copy would be kept for its
    backward pass. The cache is recomputed when the weights move, change dtype or are modified.
    """
    fc1, fc2 = mlp.fc1.weight, mlp.fc2.weight
    stamp = (fc1.data_ptr(), fc1._version, fc2.data_ptr(), fc2._version, fc1.dtype, fc1.device)
    cached = mlp.__dict__.get("_m2ib_folded")  # a plain attribute: not a buffer, not in state_dict
    if cached is None or cached[0] != stamp:
        with torch.no_grad():
            cached = (stamp, (fc1 * QUICK_GELU, mlp.fc1.bias * QUICK_GELU, fc2 / QUICK_GELU))
        mlp.__dict__["_m2ib_folded"] = cached
    return cached[1]


def _block(block: nn.Module, hidden: Tensor, mask: Tensor | None, fold: bool, **kwargs: Any) -> Tensor:
    """A pre-norm CLIP encoder block as transformers' ``CLIPEncoderLayer`` computes it, with `_mlp`."""
    attn, _ = block.self_attn(hidden_states=block.layer_norm1(hidden), attention_mask=mask, **kwargs)
    h = hidden + attn
    return h + _mlp(block.mlp, block.layer_norm2(h), fold)
