"""Speed-ups of transformers' CLIP encoder blocks for the optimisation loop, each exact.

* :func:`pooled_block`: the last block evaluated at the pooled position only;
* :func:`clip_mlp`: the quick-GELU MLP as a fused ``silu`` with the constant folded into the weights;
* :func:`clip_block`: a whole block as transformers computes it, with that MLP and :func:`attend`;
* :func:`attend`: attention of per-head queries, keys and values, written out as matrix products and
  a softmax on a CPU (where torch's flash-attention backward is several times slower than these on
  short sequences, and a compiled step fuses the softmax), ``F.scaled_dot_product_attention`` elsewhere.

They read the layout of transformers' ``CLIPEncoderLayer`` (:func:`prunable` says whether a block
has it) and are used by :class:`~m2ib_lightning.backbones.clip.CLIPBackbone`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def prunable(block: nn.Module) -> bool:
    """Whether ``block`` has the layout of transformers' ``CLIPEncoderLayer`` that `pooled_block` uses."""
    attn = getattr(block, "self_attn", None)
    names = ("q_proj", "k_proj", "v_proj", "out_proj", "num_heads", "head_dim", "scale")
    return attn is not None and all(hasattr(attn, n) for n in names) and all(
        hasattr(block, n) for n in ("layer_norm1", "layer_norm2", "mlp")
    )


def pooled_block(block: nn.Module, hidden: Tensor, index: tuple[Tensor, Tensor] | None,
                  key_mask: Tensor | None, fold: bool = False) -> Tensor:
    """A pre-norm CLIP encoder block evaluated at ONE query position per row.

    Args:
        block: a ``CLIPEncoderLayer`` (eval mode: no dropout).
        hidden: block input ``(N, L, D)``.
        index: ``(rows, positions)`` of the query token of each row, each ``(N,)``; ``None`` for
            position 0 (the vision CLS token).
        key_mask: ``(N, 1, 1, L)`` bool, True where the query may attend (the query's row of the
            full block's attention mask), or ``None`` for no mask.
        fold: compute the MLP's quick GELU as a folded ``silu`` (see `clip_mlp`).

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
    out = attend(q, k, v, key_mask, attn.scale)
    h = residual + attn.out_proj(out.reshape(n, heads * head_dim))
    return h + clip_mlp(block.mlp, block.layer_norm2(h), fold)


def attend(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, scale: float) -> Tensor:
    """``softmax(q k^T * scale) v`` per head, ``(N, H, Lq, d)``; ``key_mask`` (broadcastable to
    ``(N, H, Lq, L)``, bool, True where a query may attend; every query row attends somewhere) or
    ``None``. On a CPU: matrix products and a float32 softmax; elsewhere
    ``F.scaled_dot_product_attention`` (flash or memory-efficient kernels)."""
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


#: transformers' quick GELU constant: ``x * sigmoid(QUICK_GELU * x)``.
QUICK_GELU = 1.702


def clip_mlp(mlp: nn.Module, x: Tensor, fold: bool) -> Tensor:
    """A CLIP MLP; quick GELU computed as ``silu`` with its factor folded into the weights when ``fold``.

    ``x * sigmoid(a x) = silu(a x) / a``, so ``fc2(qgelu(fc1(x))) = fc2'(silu(fc1'(x)))`` with
    ``fc1' = a * fc1`` and ``fc2'`` the weights of ``fc2`` divided by ``a`` (see `folded_weights`).
    """
    act = getattr(mlp, "activation_fn", None)
    if not fold or type(act).__name__ != "QuickGELUActivation":
        return mlp(x)
    w1, b1, w2 = folded_weights(mlp)
    return F.linear(F.silu(F.linear(x, w1, b1)), w2, mlp.fc2.bias)


def folded_weights(mlp: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    """``a * fc1.weight``, ``a * fc1.bias`` and ``fc2.weight / a``, computed once and kept on the MLP.

    The inner loop calls every upper block ``2 * (steps - 1)`` times per chunk: scaling the weights
    there would repeat the same product each time, and each call's copy would be kept for its
    backward pass. The cache is recomputed when the weights move, change dtype or are modified.
    """
    fc1, fc2 = mlp.fc1.weight, mlp.fc2.weight
    if torch.compiler.is_compiling():
        # Inside a compiled graph: no stamp (data_ptr cannot be traced); the cache is refreshed
        # eagerly by `CLIPBackbone.prepare_upper` before the loop, else the product is in the graph.
        cached = mlp.__dict__.get("_m2ib_folded")
        return cached[1] if cached is not None else (fc1 * QUICK_GELU, mlp.fc1.bias * QUICK_GELU, fc2 / QUICK_GELU)
    stamp = (fc1.data_ptr(), fc1._version, fc2.data_ptr(), fc2._version, fc1.dtype, fc1.device)
    cached = mlp.__dict__.get("_m2ib_folded")  # a plain attribute: not a buffer, not in state_dict
    if cached is None or cached[0] != stamp:
        with torch.no_grad():
            cached = (stamp, (fc1 * QUICK_GELU, mlp.fc1.bias * QUICK_GELU, fc2 / QUICK_GELU))
        mlp.__dict__["_m2ib_folded"] = cached
    return cached[1]


def clip_block(block: nn.Module, hidden: Tensor, key_mask: Tensor | None, fold: bool) -> Tensor:
    """A pre-norm CLIP encoder block as transformers' ``CLIPEncoderLayer`` computes it, with `attend`
    and `clip_mlp`; ``key_mask`` ``(N, 1, L, L)`` bool (True: may attend; the causal and padding mask
    of a text tower) or ``None``."""
    attn = block.self_attn
    n, length, _ = hidden.shape
    x = block.layer_norm1(hidden)
    heads, head_dim = attn.num_heads, attn.head_dim
    q, k, v = (proj(x).view(n, length, heads, head_dim).transpose(1, 2)
               for proj in (attn.q_proj, attn.k_proj, attn.v_proj))
    out = attend(q, k, v, key_mask, attn.scale).transpose(1, 2).reshape(n, length, heads * head_dim)
    h = hidden + attn.out_proj(out)
    return h + clip_mlp(block.mlp, block.layer_norm2(h), fold)
