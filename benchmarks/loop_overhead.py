"""The inner loop's fixed costs: operator calls per step, and a launch-bound proxy (before / after).

Used by ``benchmarks/throughput.py`` (``--proxy``, and at the end of a full run) and
``benchmarks/gpu_check.py``; not part of the package.

* :func:`step_operator_calls`: the aten operators ONE optimisation step calls (CPU profiler; the
  operators that an operator's kernel calls inside it are not counted, their number follows the
  kernel's tiling), from ``optimise`` with 3 steps minus ``optimise`` with 2.
* :class:`LegacyLoop`: a faithful copy of the loop this package ran before its noise became
  counter-based (commit 62ab711, ``M2IBAttribution._noise``, ``_one_pass``, ``optimise``): a
  ``torch.Generator`` per sample and side, one ``randn`` and one copy per sample per step,
  ``torch.optim.Adam.step()`` (which reads its step count on the host). Kept here only, as the
  "before" of the proxy.
* :func:`launch_proxy`: a tiny CLIP, a batch of 256, one copy: compute is small, so the time per step
  is the loop's overhead (operator launches, Python). Before: :class:`LegacyLoop`; after: the
  package's loop, eager and compiled.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from m2ib_lightning import M2IBAttribution
from m2ib_lightning.backbones import SIDES
from m2ib_lightning.methods.noise import noise_generator
from m2ib_lightning.methods.plan import BatchPlan

__all__ = ["LegacyLoop", "launch_proxy", "step_operator_calls"]


def operator_calls(optimise: Callable[[Any], Any], plan: Any) -> int:
    """Top-level aten operator calls of ``optimise(plan)`` (CPU profiler)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        optimise(plan)
    return sum(1 for event in prof.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def step_operator_calls(make: Callable[[int], M2IBAttribution], batch: dict[str, Any],
                        legacy: bool = False) -> int:
    """Operator calls of ONE step on ``batch``: ``make(steps)`` builds the module (one chunk per side)."""
    counts = []
    for steps in (3, 2):
        module = make(steps)
        plan = module.prepare(batch)
        counts.append(operator_calls(LegacyLoop(module).optimise if legacy else module.optimise, plan))
    return counts[0] - counts[1]


class LegacyLoop:
    """The per-sample-generator loop of commit 62ab711 on ``module``'s plans (see the module docstring).

    The plan must have no padding rows and unpadded captions (``text_bucket=1``, a first batch), as
    the old ``prepare`` made it; everything else is the old code, with ``loss.backward`` (no Trainer).
    """

    def __init__(self, module: M2IBAttribution) -> None:
        self.module = module

    def _streams(self, plan: BatchPlan) -> dict[str, tuple[list[tuple[int, int, int]], list[torch.Generator], Any]]:
        """What the old ``prepare`` added per side: noise shapes, generators, the reused noise buffer."""
        m, out = self.module, {}
        for side, prep in plan.sides.items():
            hidden = prep.state.hidden
            lengths = prep.state.valid.sum(1)
            per_chunk = prep.chunks[0].stop - prep.chunks[0].start
            out[side] = ([(m.copies, int(n), hidden.shape[-1]) for n in lengths.tolist()],
                         [noise_generator(m.seed, side, i, hidden.device) for i in plan.ids],
                         hidden.new_zeros(min(per_chunk, len(plan.ids)), m.copies, *hidden.shape[1:]))
        return out

    @staticmethod
    def _noise(streams: Any, chunks: int, start: int, stop: int) -> torch.Tensor:
        shapes, generators, buffer = streams
        out = buffer[: stop - start]
        length, reused = out.shape[2], chunks > 1
        for row, i in enumerate(range(start, stop)):
            shape = shapes[i]
            out[row, :, : shape[1]] = torch.randn(shape, generator=generators[i], device=out.device,
                                                  dtype=torch.float32)
            if shape[1] < length and reused:  # the row may hold a longer sample's noise
                out[row, :, shape[1] :] = 0
        return out

    def _one_pass(self, plan: BatchPlan, streams: Any) -> None:
        m = self.module
        for side, prep in plan.sides.items():
            hidden, alpha = prep.state.hidden, m.alpha[side]
            beta = m.bottlenecks[side].beta
            capacity = m.bottlenecks[side].capacity(hidden, alpha)
            compression = (capacity * prep.state.valid.unsqueeze(-1)).sum((1, 2)) / prep.tokens
            relevance = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
            for chunk in prep.chunks:
                a, b = chunk.start, chunk.stop
                noise = self._noise(streams[side], len(prep.chunks), a, b)
                part = alpha if alpha.shape[0] == 1 else alpha[a:b]
                rel = m.side_loss(side, hidden[a:b], part, noise, chunk.upper, chunk.target)
                (-rel.sum()).backward()
                relevance[a:b] = rel.detach()
            (beta * compression.sum()).backward()

    def optimise(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """``steps - 1`` updates; returns the capacity per side (the maps' raw material)."""
        m = self.module
        if any(p.samples != p.state.hidden.shape[0] for p in plan.sides.values()):
            raise ValueError("LegacyLoop needs a plan without padding rows")
        streams = self._streams(plan)
        opt = torch.optim.Adam([m.alpha[s] for s in SIDES], lr=1.0)
        for side, prep in plan.sides.items():
            m.alpha[side].data = m.bottlenecks[side].initial_alpha(prep.state.hidden)
        with torch.enable_grad():
            for _ in range(m.steps - 1):
                opt.zero_grad()
                self._one_pass(plan, streams)
                opt.step()
        with torch.no_grad():
            return {side: m.bottlenecks[side].capacity(prep.state.hidden, m.alpha[side])
                    for side, prep in plan.sides.items()}


def _seconds_per_step(make: Callable[[int], M2IBAttribution], batch: dict[str, Any], legacy: bool, repeats: int,
                      steps: int = 6) -> float:
    """Median over ``repeats`` of (time of ``steps`` steps - time of 2 steps) / (steps - 2): the
    per-step time without the per-batch work (plan, read-out)."""
    runs = {}
    for n in (steps, 2):
        module = make(n)
        plan = module.prepare(batch)
        optimise = LegacyLoop(module).optimise if legacy else module.optimise
        optimise(plan)  # warm-up (and, compiled, the compilation)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            optimise(plan)
            times.append(time.perf_counter() - start)
        runs[n] = times
    return statistics.median((a - b) / (steps - 2) for a, b in zip(runs[steps], runs[2]))


def launch_proxy(backbone: Any, make_batch: Callable[[int], dict[str, Any]], layer: int, repeats: int = 5,
                 pairs: int = 256, copies: int = 1, compiled: bool = True) -> dict[str, float]:
    """Time per step on ``pairs`` pairs of the tiny model, before (legacy loop) and after (eager and,
    with ``compiled``, compiled), and the operator calls per step at 2 and 64 pairs; prints them."""
    batch = make_batch(pairs)

    def maker(**extra: Any) -> Callable[[int], M2IBAttribution]:
        return lambda steps: M2IBAttribution(backbone, vision_layer=layer, text_layer=layer, steps=steps,
                                             copies=copies, chunk_size=copies * pairs, text_bucket=1, **extra)

    calls = {n: step_operator_calls(maker(), make_batch(n)) for n in (2, 64)}
    old_calls = {n: step_operator_calls(maker(), make_batch(n), legacy=True) for n in (2, 64)}
    print(f"operator calls per step (both sides): batch of 2: {calls[2]}, batch of 64: {calls[64]} "
          f"(before: {old_calls[2]} and {old_calls[64]})")
    result = {"before": _seconds_per_step(maker(), batch, legacy=True, repeats=repeats),
              "after": _seconds_per_step(maker(), batch, legacy=False, repeats=repeats)}
    if compiled:
        result["after, compiled"] = _seconds_per_step(maker(torch_compile=True), batch, legacy=False,
                                                      repeats=repeats)
    line = ", ".join(f"{name} {1e3 * s:.1f} ms" for name, s in result.items())
    gains = ", ".join(f"{name}: {result['before'] / s:.1f}x" for name, s in result.items() if name != "before")
    print(f"launch-bound proxy (tiny CLIP, {pairs} pairs x {copies} copies, both sides), time per step: {line} "
          f"({gains} faster; medians of {repeats})")
    return result
