"""The dataset-statistics pre-pass of bottlenecks that ask for one (e.g. the IBA-style variant).

A bottleneck opts in by defining ``fit_statistics(hidden_states, context, all_gather, save)``;
:class:`BottleneckStatistics` (mixed into :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`) calls
it once before the first batch, with the hidden states at the bottleneck layer streamed lazily.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import Side, weights_fingerprint

__all__ = ["BottleneckStatistics"]


class BottleneckStatistics:
    """Mixin of an attribution module with ``bottlenecks``, ``layers``, ``sides`` and a ``backbone``."""

    def on_train_start(self) -> None:
        """Run the statistics pre-pass of bottlenecks that ask for one, before the first batch."""
        with self.trainer.precision_plugin.forward_context():
            self.fit_bottleneck_statistics(self.trainer.train_dataloader)

    def fit_bottleneck_statistics(self, batches: Iterable[dict[str, Any]]) -> None:
        """Give every bottleneck that defines ``fit_statistics`` the hidden states at its layer.

        A bottleneck opts in by defining ``fit_statistics(hidden_states, context, all_gather, save)``
        (e.g. :class:`~m2ib_lightning.methods.bottlenecks.IBAStyleM2IB`): ``hidden_states()`` streams
        ``(hidden (B, L, D) float32, valid (B, L) bool)`` of the tower's lower half for the batches
        of ``batches`` (model inputs as the datamodule yields them; ``None`` for a batch without
        samples, so that a limit on batches counts alike on every rank), lazily, so a bottleneck with
        cached statistics costs no data pass. Under DDP, ``all_gather`` merges the processes'
        estimates and only the global rank 0 saves.
        """
        for side in self.sides:
            fit = getattr(self.bottlenecks[side], "fit_statistics", None)
            if fit is None:
                continue
            context = {"side": side, "layer": self.layers[side],
                       "backbone": str(getattr(self.backbone, "source", type(self.backbone).__name__)),
                       "weights": weights_fingerprint(self.backbone)}
            attached = self._trainer is not None
            gather = None
            if attached and self.trainer.world_size > 1:
                def gather(t: Tensor) -> Tensor:
                    return self.all_gather(t.to(self.device))
            fit(lambda side=side: self._bottleneck_inputs(side, batches), context=context, all_gather=gather,
                save=not attached or self.trainer.is_global_zero)

    @torch.no_grad()
    def _bottleneck_inputs(self, side: Side, batches: Iterable[dict[str, Any]]
                           ) -> Iterable[tuple[Tensor, Tensor] | None]:
        for batch in batches:
            if not batch.get("ids"):  # skipped samples only, or padding: still one batch of the loader
                yield None
                continue
            inputs = {k: v.to(self.device) for k, v in self.model_inputs(batch).items()}
            state = self.backbone.lower(side, inputs, self.layers[side])
            yield state.hidden.float(), state.valid
