"""A functional Adam update that gives exactly what ``torch.optim.Adam`` gives, for a compiled step.

The optimisation loop of :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution` with its default
optimiser (:func:`~m2ib_lightning.methods.m2ib.adam_lr1`, or any plain ``torch.optim.Adam``) runs its
update as tensor operations on ``(alpha, exp_avg, exp_avg_sq, t)`` instead of calling the optimiser:
no Python per parameter, no ``.item()`` of the step count (which ``torch.optim.Adam`` reads on the host
at every step), and the whole step, update included, can be one compiled graph.

The arithmetic is torch's single-tensor Adam (the CPU default; CUDA's foreach form computes the same):
``m = lerp(m, g, 1 - beta1)``, ``v = v * beta2 + (1 - beta2) g g``, ``denom = sqrt(v) / sqrt(1 - beta2**t)
+ eps``, ``alpha += (-lr / (1 - beta1**t)) m / denom``, with the two bias-correction factors computed on
the host in double precision, as torch does, once per run (:meth:`FunctionalAdam.table`) and read on the
device by step. In eager mode the result is bit for bit torch's (``tests/test_step.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["FunctionalAdam"]


@dataclass(frozen=True)
class FunctionalAdam:
    """Adam's hyperparameters (no weight decay, no AMSGrad), applied functionally."""

    lr: float = 1.0
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8

    @classmethod
    def of(cls, optimizer: Any) -> FunctionalAdam | None:
        """The functional form of ``optimizer``, or ``None`` when it is not a plain ``torch.optim.Adam``
        with one parameter group, float hyperparameters, no weight decay, AMSGrad, maximisation or
        differentiable mode (those run through the optimiser itself)."""
        if type(optimizer) is not torch.optim.Adam or len(optimizer.param_groups) != 1:
            return None
        group = optimizer.param_groups[0]
        plain = (not group.get("weight_decay") and not group.get("amsgrad") and not group.get("maximize")
                 and not group.get("differentiable") and not group.get("decoupled_weight_decay"))
        numbers = [group.get("lr"), *group.get("betas", (None, None)), group.get("eps")]
        if not plain or not all(isinstance(v, float | int) and not isinstance(v, bool) for v in numbers):
            return None
        lr, beta1, beta2, eps = (float(v) for v in numbers)
        return cls(lr=lr, beta1=beta1, beta2=beta2, eps=eps)

    def table(self, steps: int, device: torch.device) -> Tensor:
        """``(steps, 2)`` float32: for update ``t = 1 .. steps``, ``-lr / (1 - beta1**t)`` and
        ``sqrt(1 - beta2**t)``, computed in double as ``torch.optim.Adam`` does, then rounded to float32
        (as torch's kernels round a Python scalar)."""
        rows = []
        for t in range(1, steps + 1):
            step = float(t)
            rows.append((-(self.lr / (1 - self.beta1**step)), (1 - self.beta2**step) ** 0.5))
        return torch.tensor(rows, dtype=torch.float32, device=device).view(steps, 2)

    def update(self, alpha: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, grad: Tensor, t: Tensor,
               table: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """One update; ``t`` is the 0-d int64 count of updates done before this one (row ``t`` of
        ``table``). Returns the new ``(alpha, exp_avg, exp_avg_sq)``; the inputs are not modified."""
        row = torch.index_select(table, 0, t.view(1))  # (1, 2); no host read of t
        step_size, correction = row[0, 0], row[0, 1]
        exp_avg = torch.lerp(exp_avg, grad, 1 - self.beta1)
        exp_avg_sq = torch.addcmul(exp_avg_sq * self.beta2, grad, grad, value=1 - self.beta2)
        denom = torch.sqrt(exp_avg_sq) / correction + self.eps
        # torch's addcdiv_(exp_avg, denom, value=-step_size): param + (value * exp_avg) / denom
        return alpha + step_size * exp_avg / denom, exp_avg, exp_avg_sq
