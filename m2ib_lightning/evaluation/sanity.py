"""The model-parameter randomisation sanity check (Adebayo et al. 2018), cascading from the top.

A faithful map must change when the weights that produced it are replaced by noise:
:func:`cascading_randomization` re-initialises the vision tower stage by stage from the top (the
stages come from the adapter, :meth:`~m2ib_lightning.backbones.BackboneAdapter.randomization_stages`)
and compares each sample's map with the original.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from m2ib_lightning.backbones import BackboneAdapter
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.evaluation.metrics import pointing_hits, spearman

__all__ = ["cascading_randomization", "reinitialize_", "vision_cascade"]


def vision_cascade(backbone: BackboneAdapter) -> list[tuple[str, list[nn.Module]]]:
    """Stages of the cascading randomisation of a vision tower, from the top (Adebayo et al. 2018).

    Each stage re-initialises its modules ON TOP of the previous stages': first the projection
    and the final norm, then each block from the last down, then the patch embeddings
    (:meth:`~m2ib_lightning.backbones.BackboneAdapter.randomization_stages`).
    """
    try:
        return backbone.randomization_stages("vision")
    except NotImplementedError as err:
        raise ConfigError(f"cascading randomisation needs an adapter that lists its vision tower's stages: {err}") \
            from err


@torch.no_grad()
def reinitialize_(modules: Sequence[nn.Module], generator: torch.Generator) -> None:
    """Replace every parameter by Gaussian noise with the mean and std of its own trained values.

    Keeping each tensor's scale keeps activations in range, so a map that changes does so because
    the learned structure is gone, not because the network's numbers blew up or vanished.
    """
    for module in modules:
        for p in module.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32).to(p.device, p.dtype)
            std = p.float().std() if p.numel() > 1 else torch.tensor(0.0)
            p.copy_(p.float().mean() + std * noise)


def cascading_randomization(module: Any, batch: dict[str, Any], seed: int = 0, baseline_seed: int | None = None,
                            masks: Tensor | None = None, tolerance: float = 15.0) -> dict[str, dict[str, Tensor]]:
    """Compare each sample's image map before and after cascading randomisation of the vision tower.

    Per stage (each includes the previous ones, see :func:`vision_cascade`) and per sample:

    * ``spearman``: rank correlation of the whole map with the original map;
    * ``peak_kept``: 1 where the map's maximum stays within ``tolerance`` pixels of the original
      maximum (the whole-map correlation can stay high when the background ranks below the
      objects either way, while the object the map points at changes);
    * ``pointing``: pointing-game hits against ``masks`` ``(B, H, W)``, when given.

    Args:
        module: an attribution module (its backbone is changed in place, then restored).
        batch: a batch with ``ids`` and model inputs.
        seed: seed of the re-initialisation noise.
        baseline_seed: when set, stage ``"seed"`` compares the maps of ``module.seed`` and of this
            seed on the ORIGINAL model: the agreement a stochastic method has with itself.
        masks: ground-truth regions for the pointing game.
        tolerance: pixels, for ``peak_kept`` and the pointing game.

    Returns:
        ``{stage: {measure: (B,) tensor}}``; stage ``"original"`` holds only ``pointing``.
    """

    def maps() -> Tensor:
        return module.explain_batch(batch).image_maps.float()

    def compare(original: Tensor, new: Tensor) -> dict[str, Tensor]:
        w = original.shape[-1]
        a, b = original.flatten(1).argmax(1), new.flatten(1).argmax(1)
        dist2 = (a // w - b // w) ** 2 + (a % w - b % w) ** 2
        out = {"spearman": torch.stack([spearman(x, y) for x, y in zip(original, new)]),
               "peak_kept": (dist2 <= tolerance**2).float()}
        if masks is not None:
            out["pointing"] = pointing_hits(new, masks.to(new.device), tolerance)
        return out

    backbone = module.backbone
    stages = vision_cascade(backbone)
    # The adapter is an nn.Module: its state dict covers the model it wraps.
    saved = {k: v.detach().clone() for k, v in backbone.state_dict().items()}
    original = maps()
    result: dict[str, dict[str, Tensor]] = {}
    if masks is not None:
        result["original"] = {"pointing": pointing_hits(original, masks.to(original.device), tolerance)}
    if baseline_seed is not None:
        own = module.seed
        module.seed = baseline_seed
        try:
            result["seed"] = compare(original, maps())
        finally:
            module.seed = own
    gen = torch.Generator().manual_seed(seed)
    try:
        for name, modules in stages:
            reinitialize_(modules, gen)
            result[name] = compare(original, maps())
    finally:
        backbone.load_state_dict(saved)
    return result

