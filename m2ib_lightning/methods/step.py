"""M2IB's inner optimisation step as a pure function of tensors, and its compilation.

One step of one chunk of one side: draw the noise (:meth:`~m2ib_lightning.methods.bottlenecks.M2IB.sample_noise`,
a function of the sample keys and the step), run the bottleneck, the blocks above it and the cosine
similarity (:func:`relevance`), add the compression term (:func:`compression`), take the gradient with
``torch.func.grad_and_value`` and apply Adam (:class:`~m2ib_lightning.methods.adam.FunctionalAdam`):

    ``(alpha, exp_avg, exp_avg_sq, t) -> (alpha', exp_avg', exp_avg_sq', t + 1, compression, relevance)``

It reads no value on the host and its number of operations does not depend on the chunk's size, so
``torch.compile(step, fullgraph=True)`` makes it one graph (forward, backward and update), and with
``mode="reduce-overhead"`` on a GPU one CUDA graph replayed for every step of every chunk of a run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side, TowerState
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.adam import FunctionalAdam
from m2ib_lightning.methods.bottlenecks import M2IB
from m2ib_lightning.methods.plan import Chunk

__all__ = ["COMPILE_MODES", "compile_mode", "compile_step", "compression", "make_step", "relevance"]

log = logging.getLogger(__name__)

#: ``torch_compile`` values besides ``False`` / ``True`` (= ``"default"``): torch.compile's modes
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: device types on which reduce-overhead fell back (and said so)
_FELL_BACK: set[str] = set()
#: compiled entries a step may keep (one per side and caption bucket; torch's default limit is 8)
RECOMPILE_LIMIT = 64


def compile_mode(value: Any) -> str | None:
    """The torch.compile mode that a ``torch_compile`` setting asks for (``None``: eager)."""
    if value is None or value is False:
        return None
    if value is True:
        return "default"
    if isinstance(value, str) and value in COMPILE_MODES:
        return value
    raise ConfigError(f"torch_compile must be false, true or one of {list(COMPILE_MODES)}, got {value!r}")


def relevance(backbone: BackboneAdapter, bottleneck: M2IB, side: Side, layer: int, copies: int, hidden: Tensor,
              alpha: Tensor, noise: Tensor, upper: TowerState, target: Tensor) -> Tensor:
    """Each sample's cosine similarity to the other tower's clean embedding, averaged over its K noisy
    copies, ``(n,)``: ``hidden`` ``(n, L, D)``, ``alpha`` its mask logits, ``noise`` ``(n, K, L, D)``,
    ``upper`` the repeated state (``n * K`` rows), ``target`` ``(n, P)``."""
    z = bottleneck.compress(hidden, alpha, noise)
    emb = backbone.upper(side, z, upper, layer).float()
    emb = emb.view(target.shape[0], copies, -1)
    return F.cosine_similarity(emb, target.unsqueeze(1), dim=-1, eps=1e-6).mean(1)


def compression(bottleneck: M2IB, hidden: Tensor, alpha: Tensor, valid: Tensor, tokens: Tensor
                ) -> tuple[Tensor, Tensor]:
    """Per-sample compression ``(n,)`` (mean capacity over the sample's valid tokens and all channels)
    and the capacity ``(n, L, D)``; neither depends on the noise."""
    capacity = bottleneck.capacity(hidden, alpha)
    return (capacity * valid.unsqueeze(-1)).sum((1, 2)) / tokens, capacity


def make_step(owner: Any, side: Side, adam: FunctionalAdam, traced: bool = True) -> Callable[..., tuple[Tensor, ...]]:
    """The step function of one side (module docstring); call it as
    ``step(alpha, exp_avg, exp_avg_sq, t, chunk, table)`` with ``t`` the 0-d int64 number of updates
    done (it is also the noise's step) and ``table`` :meth:`FunctionalAdam.table`.

    ``owner`` is the attribution module: its ``bottlenecks[side]``, ``copies`` and ``side_loss`` (the
    relevance of a chunk, :func:`relevance` by default) are what the step runs. ``traced``: the
    gradient by ``torch.func.grad_and_value`` (what ``torch.compile`` traces into the graph); False,
    for eager steps, by ``torch.autograd.grad`` (the same gradient, without functorch's per-operator
    wrapping).
    """
    bottleneck, copies = owner.bottlenecks[side], owner.copies

    def step(alpha: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, t: Tensor, chunk: Chunk, table: Tensor
             ) -> tuple[Tensor, ...]:
        hidden = chunk.hidden
        shape = (hidden.shape[0], copies, *hidden.shape[1:])

        def objective(mask: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor]]:
            noise = bottleneck.sample_noise(chunk.keys, t, shape)
            rel = owner.side_loss(side, hidden, mask, noise, chunk.upper, chunk.target)
            comp = compression(bottleneck, hidden, mask, chunk.valid, chunk.tokens)[0]
            loss = ((bottleneck.beta * comp - rel) * chunk.weight).sum()
            return loss, (comp.detach(), rel.detach())

        if traced:
            grad, (_, (comp, rel)) = torch.func.grad_and_value(objective, has_aux=True)(alpha)
        else:
            with torch.enable_grad():
                mask = alpha.detach().requires_grad_(True)
                loss, (comp, rel) = objective(mask)
                (grad,) = torch.autograd.grad(loss, mask)
        alpha, exp_avg, exp_avg_sq = adam.update(alpha, exp_avg, exp_avg_sq, grad, t, table)
        return alpha, exp_avg, exp_avg_sq, t + 1, comp, rel

    return step


def compile_step(step: Callable[..., Any], mode: str, device: torch.device) -> Callable[..., Any]:
    """``torch.compile(step, fullgraph=True, dynamic=False)`` in ``mode``; ``"reduce-overhead"`` (CUDA
    graphs) needs a CUDA device and falls back to ``"default"`` elsewhere, saying so once per process."""
    if mode == "reduce-overhead" and device.type != "cuda":
        if device.type not in _FELL_BACK:  # one line per process and device type, not per side or module
            _FELL_BACK.add(device.type)
            log.warning("torch_compile reduce-overhead: CUDA graphs need a CUDA device; compiling the step without "
                        "them on %s", device.type)
        mode = "default"
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    if getattr(config, name) < RECOMPILE_LIMIT:
        setattr(config, name, RECOMPILE_LIMIT)
    return torch.compile(step, fullgraph=True, dynamic=False, mode=mode)
