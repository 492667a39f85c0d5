"""Distributed strategy for attribution: every rank optimises its own masks, nothing is averaged.

In M2IB the "parameters" are the masks of the samples a rank holds. Averaging their gradients across
ranks, which is what ``DistributedDataParallel`` exists to do, would mix unrelated samples' masks;
and because Adam normalises every element by its own gradient history, the damage is small enough
(about 1e-6 on a toy problem) to slip past a tolerance-based check. The masks are also resized for
every batch, which DDP's gradient buckets (sized once, at wrap time) cannot follow.

:class:`IndependentDDPStrategy` is Lightning's DDP strategy (process launching, process group,
device placement, barriers and broadcasts for checkpointing and logging) with the model left
UNWRAPPED: there is no reducer, so a backward pass on one rank never waits for, or reduces with,
another. It is registered as ``strategy: m2ib_ddp`` (and ``m2ib_ddp_spawn``), and
:func:`auto_strategy` picks it when ``strategy: auto`` meets more than one device or node (where
Lightning would pick plain DDP).
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import DDPStrategy, ParallelStrategy, StrategyRegistry

from m2ib_lightning.errors import ConfigError

NAME = "m2ib_ddp"


class IndependentDDPStrategy(DDPStrategy):
    """DDP without gradient synchronisation: one process per device, each explaining its own shard.

    Accepts every argument of Lightning's ``DDPStrategy`` (``process_group_backend``,
    ``start_method``, ``timeout``, ...); ``DistributedDataParallel``-specific keyword arguments are
    meaningless here because the model is never wrapped.
    """

    strategy_name = NAME

    def configure_ddp(self) -> None:
        # Deliberately no DistributedDataParallel wrapper (module docstring): the LightningModule
        # stays `self.model`, so `manual_backward` is a plain local backward.
        assert isinstance(self.model, pl.LightningModule)

    @classmethod
    def register_strategies(cls, strategy_registry: StrategyRegistry) -> None:
        for name, start_method in ((NAME, "popen"), (f"{NAME}_spawn", "spawn")):
            if name not in strategy_registry:
                strategy_registry.register(
                    name, cls, description=f"per-rank independent M2IB optimisation ({start_method})",
                    start_method=start_method,
                )


IndependentDDPStrategy.register_strategies(StrategyRegistry)


def check_strategy(trainer: pl.Trainer) -> None:
    """Refuse every multi-process strategy but ours (DDP, FSDP, DeepSpeed, ... reduce or shard the
    mask gradients across ranks), naming the strategy to use instead."""
    strategy = trainer.strategy
    if isinstance(strategy, ParallelStrategy) and not isinstance(strategy, IndependentDDPStrategy):
        raise ConfigError(
            f"trainer.strategy is {type(strategy).__name__} ({getattr(strategy, 'strategy_name', '?')}), which "
            f"averages (or shards) mask gradients across ranks and cannot follow masks that change shape per "
            f"batch; use `--trainer.strategy {NAME}` (or `{NAME}_spawn`) for multi-device attribution"
        )


def device_count(accelerator: Any = "auto", devices: Any = "auto") -> int:
    """How many devices a Trainer built with these ``accelerator`` and ``devices`` flags runs on, as
    Lightning resolves them (``auto``: CUDA if available, else MPS, else CPU; ``devices: auto``: every
    GPU, one CPU process). 1 when the flags cannot be resolved here: the Trainer then reports them."""
    from lightning.pytorch.accelerators import Accelerator, AcceleratorRegistry

    try:
        if isinstance(accelerator, Accelerator):
            kind = type(accelerator)
        else:
            name = "auto" if accelerator is None else str(accelerator)
            mps = torch.backends.mps.is_available()
            if name == "auto":
                name = "mps" if mps else "cuda" if torch.cuda.is_available() else "cpu"
            elif name == "gpu":
                name = "mps" if mps else "cuda"
            kind = AcceleratorRegistry[name]["accelerator"]
        if not kind.is_available():
            return 1
        if devices is None or devices == "auto":
            return int(kind.auto_device_count())
        return len(kind.get_parallel_devices(kind.parse_devices(devices)))
    except Exception:  # noqa: BLE001 - an unresolvable flag is the Trainer's to report, with its message
        return 1


def auto_strategy(strategy: Any, accelerator: Any = "auto", devices: Any = "auto", num_nodes: Any = 1) -> str | None:
    """``m2ib_ddp`` when ``strategy`` is ``"auto"`` and the run spans more than one device or node (where
    Lightning would choose plain DDP, which :func:`check_strategy` refuses); ``None``: keep ``strategy``.
    An explicit strategy (``ddp`` included) is left as given."""
    if strategy not in ("auto", None):
        return None
    try:
        nodes = int(num_nodes or 1)
    except (TypeError, ValueError):
        nodes = 1
    return NAME if nodes > 1 or device_count(accelerator, devices) > 1 else None
