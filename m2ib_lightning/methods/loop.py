"""M2IB's inner optimisation over a prepared batch: the functional (compilable) loop and the generic one.

:class:`InnerLoop` is mixed into :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`. Its
:meth:`~InnerLoop.optimise` takes a :class:`~m2ib_lightning.methods.plan.BatchPlan` and runs
``steps - 1`` updates of every mask:

* functional (a plain ``torch.optim.Adam``, masks per sample, no loss scaler): per side, chunk after
  chunk, the step function of :mod:`m2ib_lightning.methods.step`, eager or compiled, on
  ``(alpha, exp_avg, exp_avg_sq, t)`` tensors. Nothing is read on the host between the first step and
  the map, and the operations per step do not depend on the number of samples in the chunk;
* generic (any other optimiser, a mask shared by the batch, or ``16-mixed``): per step, every chunk's
  forward and backward pass (gradients accumulated, exact: the loss is a sum over samples), then
  one ``optimizer.step()``; with a float16 loss scaler a step whose update was skipped is redone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.adam import FunctionalAdam
from m2ib_lightning.methods.plan import BatchPlan, SideTerms
from m2ib_lightning.methods.step import compile_step, compression, make_step

__all__ = ["InnerLoop"]


class InnerLoop:
    """Mixin of :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`: ``optimise`` and its two loops."""

    def optimise(self, plan: BatchPlan) -> tuple[dict[Side, SideTerms], Tensor, int | None]:
        """Run the inner optimisation; returns per side the capacity after ``steps - 1`` updates and
        the loss terms of the last update step (of the batch's own samples), the total loss of that
        step, and the number of redone steps (``None`` without a loss scaler).

        Under ``precision="16-mixed"`` a loss scaler skips the update of a step whose float16
        gradients overflowed and halves its scale. With only ``steps`` updates per batch a skipped
        one would silently change the map, so the step is redone instead, at the lower scale, with
        the same noise (a function of the step), until its update is applied. Every batch thus gets
        exactly ``steps - 1`` updates computed from the same noise as in float32; ``redone_steps``
        (logged) counts the repeats. The check reads the scale back, one host-device synchronisation
        per step, paid only with a loss scaler.
        """
        opt, inner = self._optimizer()
        inner.state.clear()
        scaler = self._loss_scaler()
        adam = None if self._precision_scaler() is not None else self._functional_adam(inner)
        per_sample = all(self.bottlenecks[s].mask_shape(p.state.hidden)[0] == p.state.hidden.shape[0]
                         for s, p in plan.sides.items())
        if adam is not None and per_sample and self.steps > 1:
            return self._optimise_functional(plan, adam)
        return self._optimise_generic(plan, opt, scaler)

    # ------------------------------------------------------------------------------ functional
    def step_function(self, side: Side, adam: FunctionalAdam) -> Any:
        """The step of ``side`` (:func:`~m2ib_lightning.methods.step.make_step`), compiled once with
        ``torch_compile``."""
        key = (side, adam, self.compile_mode)
        cache = self.__dict__.setdefault("_step_cache", {})
        if key not in cache:
            step = make_step(self, side, adam, traced=self.compile_mode is not None)
            if self.compile_mode is not None:
                step = compile_step(step, self.compile_mode, self.alpha[side].device)
            cache[key] = step
        return cache[key]

    def _optimise_functional(self, plan: BatchPlan, adam: FunctionalAdam) -> tuple[dict[Side, SideTerms], Tensor, None]:
        terms: dict[Side, SideTerms] = {}
        total: Tensor | float = 0.0
        graphs = self.compile_mode in ("reduce-overhead", "max-autotune")
        with torch.no_grad():  # torch.func takes the gradient; nothing else needs autograd
            for side, prep in plan.sides.items():
                device = prep.state.hidden.device
                graphs_here = graphs and device.type == "cuda"
                step = self.step_function(side, adam)
                table = adam.table(self.steps - 1, device)
                bottleneck = self.bottlenecks[side]
                alphas, comps, rels = [], [], []
                for chunk in prep.chunks:
                    alpha = bottleneck.initial_alpha(chunk.hidden)
                    state = (alpha, torch.zeros_like(alpha), torch.zeros_like(alpha),
                             torch.zeros((), dtype=torch.long, device=device))
                    for _ in range(self.steps - 1):
                        if graphs_here:  # outputs of the previous replay are this one's inputs
                            torch.compiler.cudagraph_mark_step_begin()
                        *state, comp, rel = step(*state, chunk, table)
                    alpha = state[0]
                    if graphs_here:  # the next chunk's replays overwrite the graph's outputs
                        alpha, comp, rel = alpha.clone(), comp.clone(), rel.clone()
                    alphas.append(alpha)
                    comps.append(comp)
                    rels.append(rel)
                n = prep.samples
                alpha = torch.cat(alphas)
                self.alpha[side].data = alpha[:n]  # the masks, for inspection (no optimiser state)
                capacity = bottleneck.capacity(prep.state.hidden[:n], alpha[:n])
                comp, rel = torch.cat(comps)[:n], torch.cat(rels)[:n]
                total = total + (bottleneck.beta * comp - rel).sum()
                terms[side] = SideTerms(compression=comp, relevance=rel, capacity=capacity)
        self._count_updates(self.steps - 1)
        return terms, total, None

    # --------------------------------------------------------------------------------- generic
    def _one_pass(self, plan: BatchPlan, step: int, backward: bool) -> tuple[dict[Side, SideTerms], Tensor]:
        """One forward pass of every side at ``step`` (and its backward pass if ``backward``): per side
        the loss terms and capacity of the batch's samples, and their total loss (detached)."""
        terms: dict[Side, SideTerms] = {}
        total: Tensor | float = 0.0
        with torch.set_grad_enabled(backward):
            for side, prep in plan.sides.items():
                hidden, alpha = prep.state.hidden, self.alpha[side]
                bottleneck = self.bottlenecks[side]
                comp, capacity = compression(bottleneck, hidden, alpha, prep.state.valid, prep.tokens)
                relevance = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
                step_t = torch.full((), step, dtype=torch.int32, device=hidden.device)
                for chunk in prep.chunks:
                    a, b = chunk.start, chunk.stop
                    noise = bottleneck.sample_noise(chunk.keys, step_t, (b - a, self.copies, *hidden.shape[1:]))
                    # A mask shared by the batch (leading dim 1) broadcasts; otherwise each
                    # chunk reads (and sends gradient to) its own samples' rows.
                    part = alpha if alpha.shape[0] == 1 else alpha[a:b]
                    rel = self.side_loss(side, hidden[a:b], part, noise, chunk.upper, chunk.target)
                    if backward:
                        self._backward(-(rel * chunk.weight).sum())
                    relevance[a:b] = rel.detach()
                if backward:
                    self._backward(bottleneck.beta * (comp * prep.weight).sum())
                n = prep.samples
                comp, relevance = comp.detach()[:n], relevance[:n]
                total = total + (bottleneck.beta * comp - relevance).sum()
                terms[side] = SideTerms(compression=comp, relevance=relevance, capacity=capacity.detach()[:n])
        return terms, total

    def _optimise_generic(self, plan: BatchPlan, opt: Any, scaler: Any
                          ) -> tuple[dict[Side, SideTerms], Tensor, int | None]:
        for side, prep in plan.sides.items():
            self.alpha[side].data = self.bottlenecks[side].initial_alpha(prep.state.hidden)
        redone = 0
        terms = loss = None
        for step in range(self.steps - 1):
            for _attempt in range(self.max_redone_steps + 1):
                opt.zero_grad()
                terms, loss = self._one_pass(plan, step, backward=True)
                if scaler is None:
                    opt.step()
                    break
                scale = scaler.get_scale()
                opt.step()  # the scaler skips the update if a gradient is not finite, and lowers its scale
                if scaler.get_scale() >= scale:
                    break
                redone += 1  # redone with the same noise: it is a function of the step
            else:
                raise ConfigError(
                    f"precision 16-mixed: the mask gradients were not finite at {self.max_redone_steps + 1} loss "
                    f"scales down to {scaler.get_scale():g}; float16 overflows in the forward pass itself. Use "
                    f"trainer.precision bf16-mixed (or 32-true)"
                )
        if terms is None:  # steps == 1: no update; one forward pass gives the loss terms
            terms, loss = self._one_pass(plan, 0, backward=False)
        else:
            # The map is the capacity after steps - 1 updates: the reference reads it from its last
            # forward pass, but the capacity depends on the mask alone, so that pass through the
            # upper blocks (one of the 2 * steps - 1 passes) is not run. The loss terms reported
            # are those of the last update step.
            with torch.no_grad():
                for side, prep in plan.sides.items():
                    capacity = self.bottlenecks[side].capacity(prep.state.hidden, self.alpha[side])
                    terms[side].capacity = capacity[: prep.samples]
        for side, prep in plan.sides.items():  # the masks of the batch's own samples, for inspection
            if self.alpha[side].shape[0] > prep.samples:
                self.alpha[side].data = self.alpha[side].data[: prep.samples]
        return terms, loss, redone if scaler is not None else None
