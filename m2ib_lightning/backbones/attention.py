"""Recording attention probabilities, in the autograd graph, while an adapter runs its blocks.

Fused attention kernels (SDPA) never materialise the probabilities; each recorder switches its blocks
to a path that computes them explicitly, hooks them out, and restores everything on exit:

* :func:`record_transformers`: transformers attention modules (CLIP, SigLIP, BERT) run with eager
  attention, whose modules return ``(output, probabilities)``;
* :func:`record_multihead`: ``nn.MultiheadAttention`` (open_clip's blocks), whose self-attention is
  recomputed with explicit per-head probabilities (the module's own weights are a copy outside the graph);
* :func:`record_timm`: timm ``Attention`` with its fused kernel off; the probabilities are the input
  of its (identity, in eval mode) attention dropout.

Each yields an :class:`~m2ib_lightning.backbones.base.AttentionRecorder` holding, per call in order,
the probabilities ``(B, H, L, L)`` and the attention's input ``(B, L, D)``, and the queries, keys,
values and attention output before the output projection, ``(B, L, H * d)`` (for transformers modules
when the adapter names their projection layers; for timm modules, before their optional output norm
and gate too).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from m2ib_lightning.backbones.traces import AttentionRecorder

__all__ = ["eager_attention", "multihead_parts", "multihead_self_attention", "multihead_unsupported", "record_bert",
           "record_multihead", "record_timm", "record_transformers"]


@contextmanager
def eager_attention(model: nn.Module) -> Iterator[None]:
    """Run a transformers model with eager attention (probabilities as tensors in the graph); the
    previous implementation of every config in it is restored on exit."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


@contextmanager
def _hooks(handles: Sequence[Any]) -> Iterator[None]:
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_transformers(model: nn.Module, attentions: Sequence[nn.Module],
                        projections: Sequence[tuple[nn.Module, nn.Module, nn.Module, nn.Module]] = ()
                        ) -> Iterator[AttentionRecorder]:
    """Record transformers attention modules (called with ``hidden_states`` first or by keyword) that
    return ``(output, probabilities)`` under eager attention, which ``model`` runs with meanwhile.

    ``projections``: per attention module, its ``(query, key, value, output)`` linear layers (e.g.
    ``q_proj, k_proj, v_proj, out_proj``); the first three's outputs are recorded as the queries, keys
    and values, the output layer's input as the attention output (the tensor the block goes on with).
    """
    recorder = AttentionRecorder()

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        recorder.inputs.append(kwargs["hidden_states"] if "hidden_states" in kwargs else args[0])
        recorder.probabilities.append(output[1])

    def keep(into: list[Tensor]) -> Any:
        return lambda module, args, output: into.append(output)

    def keep_input(module: nn.Module, args: tuple) -> None:
        recorder.outputs.append(args[0])

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attentions]
    for q, k, v, out in projections:
        handles += [q.register_forward_hook(keep(recorder.queries)), k.register_forward_hook(keep(recorder.keys)),
                    v.register_forward_hook(keep(recorder.values)), out.register_forward_pre_hook(keep_input)]
    with _hooks(handles), eager_attention(model):
        yield recorder


def record_bert(model: nn.Module, layers: Sequence[nn.Module]) -> AbstractContextManager[AttentionRecorder]:
    """:func:`record_transformers` for transformers BERT layers: each self-attention's ``query``, ``key`` and
    ``value``, and its output projection (``attention.output.dense``, before the post-norm)."""
    attentions = [layer.attention.self for layer in layers]
    return record_transformers(model, attentions, [(a.query, a.key, a.value, layer.attention.output.dense)
                                                   for a, layer in zip(attentions, layers)])


def multihead_self_attention(mha: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``nn.MultiheadAttention`` self-attention on batch-first ``x`` ``(B, L, D)``, computed with explicit
    probabilities: ``(output (B, L, D), probabilities (B, H, L, L))``, the output computed FROM the
    probabilities (``nn.MultiheadAttention`` returns a reshaped copy of its weights, outside the graph).

    ``attn_mask`` as the module takes it: ``(L, L)`` or ``(B * H, L, L)``, additive float or bool
    (True: not attended). Packed input projection, no ``bias_k`` / ``bias_v`` / ``add_zero_attn``, eval mode.
    """
    out, probs, _ = multihead_parts(mha, x, attn_mask)
    return mha.out_proj(out), probs


def multihead_parts(mha: nn.MultiheadAttention, x: Tensor, attn_mask: Tensor | None
                    ) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor, Tensor]]:
    """What :func:`multihead_self_attention` computes before the output projection: ``(output (B, L, D),
    probabilities (B, H, L, L), (queries, keys, values))``, the last three ``(B, L, D)``, heads concatenated."""
    b, length, d = x.shape
    heads = mha.num_heads
    qkv = F.linear(x, mha.in_proj_weight, mha.in_proj_bias)
    q, k, v = qkv.view(b, length, 3, heads, d // heads).permute(2, 0, 3, 1, 4)
    scores = (q * (d // heads) ** -0.5) @ k.transpose(-2, -1)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            attn_mask = torch.zeros_like(attn_mask, dtype=scores.dtype).masked_fill_(attn_mask, float("-inf"))
        scores = scores + (attn_mask.view(b, heads, length, length) if attn_mask.dim() == 3 else attn_mask)
    probs = scores.softmax(-1)
    out = (probs @ v).transpose(1, 2).reshape(b, length, d)
    return out, probs, tuple(qkv.chunk(3, dim=-1))


def multihead_unsupported(mha: nn.Module) -> str | None:
    """Why :func:`multihead_self_attention` cannot stand in for ``mha`` (``None``: it can)."""
    if not isinstance(mha, nn.MultiheadAttention):
        return f"{type(mha).__name__} is not an nn.MultiheadAttention"
    if not mha._qkv_same_embed_dim or mha.bias_k is not None or mha.add_zero_attn:
        return "an nn.MultiheadAttention with separate key/value sizes, bias_k/bias_v or add_zero_attn"
    return None


@contextmanager
def record_multihead(attentions: Sequence[nn.MultiheadAttention]) -> Iterator[AttentionRecorder]:
    """Record ``nn.MultiheadAttention`` self-attention modules: each call's output is replaced by
    :func:`multihead_self_attention` of the same input and mask, whose probabilities are kept (the
    module's own result is discarded). Sequence-first modules get and give ``(L, B, D)``."""
    recorder = AttentionRecorder()

    def hook(module: nn.MultiheadAttention, args: tuple, kwargs: dict, output: Any) -> tuple[Tensor, Tensor]:
        query = args[0] if args else kwargs["query"]
        x = query if module.batch_first else query.transpose(0, 1)
        out, probs, (q, k, v) = multihead_parts(module, x, kwargs.get("attn_mask"))
        recorder.inputs.append(x)
        recorder.probabilities.append(probs)
        for into, value in ((recorder.queries, q), (recorder.keys, k), (recorder.values, v), (recorder.outputs, out)):
            into.append(value)
        out = module.out_proj(out)
        return (out if module.batch_first else out.transpose(0, 1)), probs

    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in attentions]
    with _hooks(handles):
        yield recorder


@contextmanager
def record_timm(attentions: Sequence[nn.Module]) -> Iterator[AttentionRecorder]:
    """Record timm ``Attention`` modules: the fused kernel is switched off, so the probabilities pass
    through ``attn_drop`` (identity in eval mode), where a hook keeps them. Queries and keys are the
    outputs of ``q_norm`` / ``k_norm`` (identities without qk-norm), values the third of ``qkv``'s
    output, and the attention output the input of ``norm`` (before it, any gate and ``proj``)."""
    recorder = AttentionRecorder()

    def concatenated(t: Tensor) -> Tensor:  # (B, H, L, d) -> (B, L, H * d)
        return t.transpose(1, 2).flatten(2)

    def keep_input(module: nn.Module, args: tuple) -> None:
        recorder.inputs.append(args[0])

    def keep(into: list[Tensor], *, heads: bool = False, value_of: nn.Module | None = None) -> Any:
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            if value_of is not None:  # qkv: (B, L, 3 * H * d), laid out as (3, H, d) per token
                b, length, _ = output.shape
                output = output.view(b, length, 3, value_of.num_heads, -1)[:, :, 2].flatten(2)
            into.append(concatenated(output) if heads else output)
        return hook

    def keep_output(module: nn.Module, args: tuple) -> None:
        recorder.outputs.append(args[0])

    handles = [h for m in attentions for h in (
        m.register_forward_pre_hook(keep_input), m.attn_drop.register_forward_hook(keep(recorder.probabilities)),
        m.q_norm.register_forward_hook(keep(recorder.queries, heads=True)),
        m.k_norm.register_forward_hook(keep(recorder.keys, heads=True)),
        m.qkv.register_forward_hook(keep(recorder.values, value_of=m)), m.norm.register_forward_pre_hook(keep_output))]
    with ExitStack() as stack:
        stack.enter_context(_hooks(handles))
        saved = [(m, m.fused_attn) for m in attentions]
        stack.callback(lambda: [setattr(m, "fused_attn", fused) for m, fused in saved])
        for m in attentions:
            m.fused_attn = False
        yield recorder
