"""IBA-style M2IB: hidden states normalised with per-feature statistics estimated over the dataset.

As in the per-sample bottleneck of Schulz et al. (ICLR 2020, "IBA"). The statistics come from the
generic, opt-in ``fit_statistics`` hook described in :mod:`m2ib_lightning.methods.bottlenecks`.
"""

from __future__ import annotations

import itertools
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.files import atomic_write
from m2ib_lightning.methods.bottlenecks.reference import M2IB

log = logging.getLogger(__name__)

__all__ = ["IBAStyleM2IB", "Welford"]


class Welford:
    """Streaming mean and variance per (token position, channel) over valid tokens.

    Batches are merged with the parallel form of Welford's update (Chan, Golub and LeVeque 1979), in
    float64, so the result does not depend on how the data was batched or split across processes.
    Positions grow as longer sequences arrive (captions have different lengths).

    Attributes:
        count: ``(L,)`` float64, valid tokens seen per position.
        mean: ``(L, D)`` float64.
        m2: ``(L, D)`` float64, sum of squared deviations from the mean.
    """

    def __init__(self, count: Tensor | None = None, mean: Tensor | None = None, m2: Tensor | None = None) -> None:
        self.count, self.mean, self.m2 = count, mean, m2

    def update(self, hidden: Tensor, valid: Tensor) -> None:
        """Add a batch: ``hidden`` ``(B, L, D)``, ``valid`` ``(B, L)`` (False for padding)."""
        x = hidden.detach().to(torch.float64)
        w = valid.to(device=x.device, dtype=torch.float64).unsqueeze(-1)
        n = w.sum(0)  # (L, 1)
        mean = (x * w).sum(0) / n.clamp_min(1)
        m2 = (((x - mean) * w) ** 2).sum(0)
        self.merge(Welford(n[:, 0], mean, m2))

    def merge(self, other: Welford) -> None:
        """Fold another accumulator into this one."""
        if other.count is None:
            return
        if self.count is None:
            self.count, self.mean, self.m2 = other.count.clone(), other.mean.clone(), other.m2.clone()
            return
        length = max(len(self.count), len(other.count))
        (na, ma, sa), (nb, mb, sb) = self.padded(length), other.padded(length)
        n = na + nb
        delta = mb - ma
        ratio = (nb / n.clamp_min(1)).unsqueeze(-1)
        self.count = n
        self.mean = ma + delta * ratio
        self.m2 = sa + sb + delta**2 * (na * ratio[:, 0]).unsqueeze(-1)

    def padded(self, length: int) -> tuple[Tensor, Tensor, Tensor]:
        """``(count, mean, m2)`` zero-padded to ``length`` positions (positions never seen count 0)."""
        extra = length - len(self.count)
        pad = (0, 0, 0, extra)
        return (torch.nn.functional.pad(self.count, (0, extra)), torch.nn.functional.pad(self.mean, pad),
                torch.nn.functional.pad(self.m2, pad))

    def tensors(self) -> dict[str, Tensor]:
        """The state as plain tensors (for a file or a collective)."""
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def channel_stats(self) -> tuple[Tensor, Tensor]:
        """Mean and unbiased std per channel over all positions, ``(D,)`` each."""
        n = self.count.sum()
        mean = (self.count.unsqueeze(-1) * self.mean).sum(0) / n
        m2 = (self.m2 + self.count.unsqueeze(-1) * (self.mean - mean) ** 2).sum(0)
        return mean, (m2 / (n - 1).clamp_min(1)).sqrt()


class IBAStyleM2IB(M2IB):
    """M2IB on normalised features: per-feature mean and std estimated over the dataset.

    As in IBA (Schulz et al. 2020), the hidden states are standardised, ``R~ = (R - mu) / sigma``,
    the noise has the data's mean and spread, ``Z = sigma * (lambda R~ + (1 - lambda) eps) + mu``
    (``eps ~ N(0, I)``), and the capacity is ``KL(N(lambda R~, (1 - lambda)^2) || N(0, 1))`` on
    ``R~``: "dropping" a feature replaces it by a typical value instead of by N(0, 1), and every
    feature's cost is measured on the same scale. ``mu`` and ``sigma`` are per (token position,
    channel) like IBA's per-element estimate; positions seen fewer than ``min_count`` times (long
    captions) use the channel's statistics over all positions.

    The statistics are read from ``stats_file`` when it exists; otherwise they are estimated, once
    before the optimisation, from the bottleneck-layer hidden states of the first
    ``estimate_batches`` batches (streaming, float64), merged across processes, and written to
    ``stats_file`` for later runs. The file records the side, layer and backbone it was estimated
    for (the backbone's weights by fingerprint), and using it for another one is an error.

    Give a ``stats_file``: without one, every run (a resumed one too, from the samples it has left)
    estimates again.

    The noise ``eps`` is the reference hook's (:meth:`M2IB.sample_noise`, a function of the sample
    keys and the step); ``compress`` scales and shifts it, so the variant runs in the compiled step
    unchanged (the statistics are buffers, fitted before the first batch).

    Args:
        stats_file: safetensors cache of the statistics (``None``: estimate every run, keep nothing).
        estimate_batches: data batches the estimate streams through (per process under DDP).
        per_position: statistics per (position, channel); False: per channel only.
        min_count: fewest valid tokens a position needs to get its own statistics.
        min_std: floor on ``sigma`` relative to the channel's std over all positions (a feature that
            never varies, e.g. the first text token under causal attention, would divide by 0); a
            channel that never varies at all gets ``min_std`` times the mean channel std.
        **kwargs: options of :class:`~m2ib_lightning.methods.bottlenecks.M2IB` (``beta``, ``init_alpha``).
    """

    def __init__(self, stats_file: str | None = None, estimate_batches: int = 10, per_position: bool = True,
                 min_count: int = 2, min_std: float = 1e-3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if not isinstance(estimate_batches, int) or estimate_batches < 1:
            raise ConfigError(f"estimate_batches must be an int >= 1, got {estimate_batches!r}")
        if not isinstance(min_count, int) or min_count < 2:
            raise ConfigError(f"min_count must be an int >= 2, got {min_count!r}")
        if not min_std > 0:
            raise ConfigError(f"min_std must be > 0, got {min_std!r}")
        self.stats_file = stats_file
        self.estimate_batches, self.per_position = estimate_batches, per_position
        self.min_count, self.min_std = min_count, float(min_std)
        # Not saved in checkpoints (the stats file is their source); moved to the device with the module.
        self.register_buffer("mu", torch.zeros(0), persistent=False)
        self.register_buffer("sigma", torch.zeros(0), persistent=False)
        self.register_buffer("mu_channel", torch.zeros(0), persistent=False)
        self.register_buffer("sigma_channel", torch.zeros(0), persistent=False)

    # ----------------------------------------------------------------------------- the two hooks
    def compress(self, hidden: Tensor, alpha: Tensor, noise: Tensor) -> Tensor:
        """``sigma * (lambda R~ + (1 - lambda) eps) + mu``, ``(B * K, L, D)``."""
        mu, sigma = self.statistics(hidden)
        return super().compress((hidden - mu) / sigma, alpha, noise) * sigma + mu

    def capacity(self, hidden: Tensor, alpha: Tensor) -> Tensor:
        """The reference capacity of the normalised features ``R~``, ``(B, L, D)``."""
        mu, sigma = self.statistics(hidden)
        return super().capacity((hidden - mu) / sigma, alpha)

    # ------------------------------------------------------------------------------ statistics
    @property
    def fitted(self) -> bool:
        return self.mu_channel.numel() > 0

    def statistics(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """``mu`` and ``sigma`` ``(1, L, D)`` for hidden states ``(B, L, D)``."""
        if not self.fitted:
            raise RuntimeError(
                "IBAStyleM2IB has no dataset statistics yet: run it through the Trainer (the pre-pass runs in "
                "on_train_start), give a stats_file written by an earlier run, or call "
                "M2IBAttribution.fit_bottleneck_statistics(batches) first"
            )
        length, dim = hidden.shape[-2:]
        if dim != self.mu_channel.shape[0]:
            raise ConfigError(f"IBAStyleM2IB statistics have {self.mu_channel.shape[0]} channels, the hidden states "
                              f"at the bottleneck have {dim} (stats_file={self.stats_file!r} is for another model?)")
        mu = self.mu_channel.expand(length, dim)
        sigma = self.sigma_channel.expand(length, dim)
        if self.per_position and self.mu.numel():
            n = min(length, self.mu.shape[0])
            mu = torch.cat([self.mu[:n], mu[n:]])
            sigma = torch.cat([self.sigma[:n], sigma[n:]])
        return mu.unsqueeze(0), sigma.unsqueeze(0)

    def set_statistics(self, acc: Welford) -> None:
        """Turn an accumulator into the float32 ``mu`` / ``sigma`` buffers (channel fallback included)."""
        if acc.count is None or acc.count.sum() < self.min_count:
            raise ConfigError(f"IBAStyleM2IB needs at least {self.min_count} valid tokens to estimate statistics, "
                              f"got {0 if acc.count is None else int(acc.count.sum())}")
        mean_c, std_c = acc.channel_stats()
        # A channel that never varies gets a floor scaled by the typical channel's spread.
        floor = (self.min_std * torch.maximum(std_c, std_c.mean())).clamp_min(torch.finfo(torch.float32).tiny)
        own = acc.count >= self.min_count
        std = (acc.m2 / (acc.count - 1).clamp_min(1).unsqueeze(-1)).sqrt()
        mean = torch.where(own.unsqueeze(-1), acc.mean, mean_c)
        std = torch.where(own.unsqueeze(-1), std, std_c)
        device = self.mu.device
        self.mu = mean.float().to(device)
        self.sigma = torch.maximum(std, floor).float().to(device)
        self.mu_channel = mean_c.float().to(device)
        self.sigma_channel = torch.maximum(std_c, floor).float().to(device)

    def fit_statistics(self, hidden_states: Callable[[], Iterator[tuple[Tensor, Tensor]]],
                       context: dict[str, Any] | None = None,
                       all_gather: Callable[[Tensor], Tensor] | None = None, save: bool = True) -> None:
        """The statistics hook (module docstring): load ``stats_file`` or estimate and cache it.

        Args:
            hidden_states: returns an iterator of ``(hidden (B, L, D), valid (B, L))`` per data batch,
                ``None`` for a batch without samples (all skipped, or padding under DDP).
            context: what the statistics belong to (side, layer, backbone); stored in and checked
                against the file.
            all_gather: gathers a tensor from every process, stacked on a new dim 0 (None: one process).
            save: write ``stats_file`` from this process (the global rank 0 only, under DDP).
        """
        if self.fitted:  # estimated or loaded before (an earlier fit, or an earlier explain() call)
            return
        context = dict(context or {})
        path = Path(self.stats_file).expanduser() if self.stats_file else None
        found = path is not None and path.is_file()
        if all_gather is not None:
            # Every process must take the same branch (loading, or estimating with collectives).
            seen = all_gather(torch.tensor([int(found)]))
            if int(seen.min()) != int(seen.max()):
                raise ConfigError(f"stats_file {path} exists for {int(seen.sum())} of {seen.numel()} processes; "
                                  "put it on a filesystem that every node shares, or delete it")
        if found:
            self.set_statistics(self._load(path, context))
            log.info("IBAStyleM2IB: statistics loaded from %s", path)
            return
        acc = Welford()
        # The limit counts batches as the loader yields them, empty ones (None) included, so that
        # every process reads the same number of batches (each may hold a collective).
        for item in itertools.islice(hidden_states(), self.estimate_batches):
            if item is not None:
                acc.update(*item)
        if all_gather is not None:
            acc = _gather(acc, all_gather)
        self.set_statistics(acc)
        if path is not None and save:
            path.parent.mkdir(parents=True, exist_ok=True)
            meta = {"format": "m2ib-welford-1", "context": json.dumps(context, sort_keys=True, default=str)}
            tensors = {k: v.cpu().contiguous() for k, v in acc.tensors().items()}
            from safetensors.torch import save_file

            atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))
            log.info("IBAStyleM2IB: statistics of %d tokens written to %s", int(acc.count.sum()), path)

    @staticmethod
    def _load(path: Path, context: dict[str, Any]) -> Welford:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != "m2ib-welford-1" or set(tensors) != {"count", "mean", "m2"}:
            raise ConfigError(f"stats_file {path} is not an IBAStyleM2IB statistics file (format "
                              f"{meta.get('format')!r}, tensors {sorted(tensors)})")
        stored = json.loads(meta.get("context", "{}"))
        clash = {k: (stored[k], v) for k, v in json.loads(json.dumps(context, default=str)).items()
                 if k in stored and stored[k] != v}
        # The same checkpoint can be named differently (relative path, hub id, cache dir): the name
        # only warns; the weights' fingerprint (in the context when the module gives one) decides.
        if "backbone" in clash:
            old, new = clash.pop("backbone")
            log.warning("stats_file %s was estimated with backbone %r; this run uses %r", path, old, new)
        if "weights" in clash:
            old, new = clash.pop("weights")
            raise ConfigError(f"stats_file {path} was estimated with other backbone weights (fingerprint "
                              f"{old}, this run's {new}); delete it or point stats_file elsewhere")
        if clash:
            detail = ", ".join(f"{k}: file {a!r}, this run {b!r}" for k, (a, b) in sorted(clash.items()))
            raise ConfigError(f"stats_file {path} was estimated for another bottleneck ({detail}); "
                              "delete it or point stats_file elsewhere")
        return Welford(tensors["count"].double(), tensors["mean"].double(), tensors["m2"].double())


def _gather(acc: Welford, all_gather: Callable[[Tensor], Tensor]) -> Welford:
    """Merge the accumulators of all processes (each may have seen different caption lengths)."""
    dim = acc.mean.shape[-1] if acc.mean is not None else 0
    sizes = all_gather(torch.tensor([len(acc.count) if acc.count is not None else 0, dim]))
    length, dim = int(sizes[:, 0].max()), int(sizes[:, 1].max())
    if acc.count is None:  # this process saw no data: contribute zeros
        acc = Welford(torch.zeros(length, dtype=torch.float64), torch.zeros(length, dim, dtype=torch.float64),
                      torch.zeros(length, dim, dtype=torch.float64))
    parts = [all_gather(t) for t in acc.padded(length)]
    merged = Welford()
    for count, mean, m2 in zip(*parts):
        merged.merge(Welford(count, mean, m2))
    return merged
