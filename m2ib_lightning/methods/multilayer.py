"""M2IB at several layers of a tower, one bottleneck per layer, the maps combined.

A bottleneck at one layer sees what that layer holds: low layers keep the image's layout but little
of the caption's meaning, high layers the meaning but less of the layout (docs/evaluation.md: which
layer localises best differs between models). :class:`MultiLayerM2IB` runs the reference procedure
at each listed layer, independently and exactly as :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`
does at that layer, and averages the per-layer maps after normalising each to [0, 1].
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.m2ib import M2IBAttribution
from m2ib_lightning.methods.readout import image_map, minmax, text_map
from m2ib_lightning.records import Explanation

__all__ = ["JointM2IB", "MultiLayerM2IB"]


class MultiLayerM2IB(M2IBAttribution):
    """M2IB with a bottleneck at each of several layers per side, the maps averaged.

    For every layer ``l`` of ``vision_layers`` (and of ``text_layers``) the module runs the whole
    M2IB optimisation with the bottleneck at ``l`` alone, as ``M2IBAttribution(vision_layer=l)``
    would, with the noise seed ``seed + j`` for the ``j``-th layer of the list (so the layers do not
    share their noise; a layer may be listed twice, which averages two noise draws there). Each
    per-layer map is a faithful M2IB map of its layer. They are combined
    per sample: each layer's raw scores are min-max normalised over the sample's patches (vision)
    or its caption's tokens (text), the normalised maps are averaged, and the average is read out
    like any map (upsampled, min-max normalised). Normalising first gives every layer the same
    weight, whatever the scale of its capacity (it grows with the hidden states' size, which grows
    with depth). With one layer per side the maps are those of ``M2IBAttribution`` at that layer.

    The cost is one M2IB run per layer (the lists are walked together: step ``j`` explains the
    ``j``-th vision layer and the ``j``-th text layer in one pass, so the run takes the longer
    list's length of passes).

    Args:
        backbone: the frozen dual encoder.
        vision_layers: the vision tower's bottleneck layers (``-1``: the patch embeddings).
        text_layers: the text tower's bottleneck layers (default: the token embeddings only, the
            text layer the benchmarks chose).
        **kwargs: every other option of :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`
            (``vision_bottleneck``, ``text_bottleneck``, ``sides``, ``steps``, ``copies``, ``seed``,
            ``optimizer``, ``chunk_size``, ``torch_compile``); the bottlenecks are shared by the layers.
    """

    def __init__(self, backbone: BackboneAdapter, vision_layers: Sequence[int] = (-1, 0),
                 text_layers: Sequence[int] = (-1,), **kwargs: Any) -> None:
        lists = {"vision": list(vision_layers), "text": list(text_layers)}
        for side, layers in lists.items():
            if not layers:
                raise ConfigError(f"{side}_layers must be a non-empty list of layers, got {layers!r}")
        super().__init__(backbone, vision_layer=lists["vision"][0], text_layer=lists["text"][0], **kwargs)
        for side in self.sides:
            for layer in lists[side]:
                backbone.check_layer(side, layer)
            if len(lists[side]) > 1 and hasattr(self.bottlenecks[side], "fit_statistics"):
                raise ConfigError(f"MultiLayerM2IB: the {side} bottleneck {type(self.bottlenecks[side]).__name__} "
                                  "estimates statistics at one layer; give one layer for that side")
        self.layer_lists: dict[Side, list[int]] = lists  # type: ignore[assignment]

    def schedule(self) -> list[tuple[tuple[Side, ...], dict[Side, int]]]:
        """Per pass ``j``: the sides it explains and the layer of each side."""
        passes = max(len(self.layer_lists[s]) for s in self.sides)
        out = []
        for j in range(passes):
            active = tuple(s for s in self.sides if j < len(self.layer_lists[s]))
            out.append((active, {s: self.layer_lists[s][min(j, len(self.layer_lists[s]) - 1)] for s in SIDES}))
        return out

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        """One M2IB run per pass of :meth:`schedule`, then the per-layer maps combined."""
        sides, layers, seed = self.sides, dict(self.layers), self.seed
        runs: list[tuple[dict[Side, int], Explanation]] = []
        try:
            for j, (active, chosen) in enumerate(self.schedule()):
                self.sides, self.layers, self.seed = active, chosen, seed + j
                runs.append(({s: chosen[s] for s in active}, super().explain_batch(batch)))
        finally:
            self.sides, self.layers, self.seed = sides, layers, seed
        return self.combine(batch, runs)

    def combine(self, batch: dict[str, Any], runs: list[tuple[dict[Side, int], Explanation]]) -> Explanation:
        """The first pass's explanation with its maps replaced by the combined ones."""
        out = runs[0][1]
        vision = [r.patch_scores for active, r in runs if "vision" in active]
        if vision and vision[0] is not None:
            patches = torch.stack([minmax(p.float(), dims=(1,)) for p in vision]).mean(0)
            out.patch_scores = patches
            out.image_maps = image_map(patches, out.grid, tuple(batch["pixel_values"].shape[-2:])).cpu()
        text = [r.text_scores for active, r in runs if "text" in active]
        if text and text[0] is not None:
            out.text_scores = [text_map(torch.stack(per_layer).mean(0)) for per_layer in zip(*text)]
        loss: Tensor | None = None
        terms: dict[str, Tensor] = {}
        for active, r in runs:
            if r.loss is not None:
                loss = r.loss if loss is None else loss + r.loss
            for name, value in r.terms.items():
                side = name.rsplit("/", 1)[-1]
                terms[f"{name}@{active[side]}" if side in active else name] = value
        out.loss, out.terms = loss, terms
        return out


class JointM2IB(M2IBAttribution):
    """One mask shared by bottlenecks at several layers of a tower, in one forward pass (CoIBA-style).

    After Hong et al. (2025, "Comprehensive information bottleneck", CoIBA), from its description: the
    same damping ratio ``lambda`` (one mask per token, shared by the layers) compresses the tower at
    every targeted layer, so what a dropped token held cannot come back through a later layer. The
    forward pass of a copy is: ``Z = compress(R_l1)``, the blocks up to ``l2``, ``compress`` again
    with the same mask and fresh noise, ... , the rest of the tower; the relevance is M2IB's. The
    noise at the ``j``-th extra layer is the sample's noise with its channels rolled by ``j`` (each
    element independent of the element it replaces at the earlier layer; no new stream, so a sample's
    map still depends on its id and seed only).

    The compression term and the map are the capacity at the first layer. CoIBA bounds the
    information of every layer and sums the bounds; with the mask shared and measured on unit-RMS
    states (``ScaledM2IB`` with a per-token mask) each layer's bound is the same function of the
    mask, so their sum is this term times the number of layers, a factor absorbed in ``beta``; for
    other bottlenecks it is an approximation. With one layer it is ``M2IBAttribution``.

    Needs an adapter with ``run_blocks`` (CLIP, SigLIP, open_clip).

    Args:
        backbone: the frozen dual encoder.
        vision_layers: the vision bottleneck's layers, increasing (``-1``: the patch embeddings).
        text_layers: the text bottleneck's layers, increasing.
        **kwargs: every other option of :class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`.
    """

    def __init__(self, backbone: BackboneAdapter, vision_layers: Sequence[int] = (-1, 0, 1),
                 text_layers: Sequence[int] = (-1,), **kwargs: Any) -> None:
        lists = {"vision": list(vision_layers), "text": list(text_layers)}
        for side, layers in lists.items():
            if not layers or any(b <= a for a, b in zip(layers, layers[1:])):
                raise ConfigError(f"{side}_layers must be a non-empty increasing list of layers, got {layers!r}")
        super().__init__(backbone, vision_layer=lists["vision"][0], text_layer=lists["text"][0], **kwargs)
        for side in self.sides:
            for layer in lists[side]:
                backbone.check_layer(side, layer)
        self.layer_lists: dict[Side, list[int]] = lists  # type: ignore[assignment]

    def side_loss(self, side: Side, hidden: Tensor, alpha: Tensor, noise: Tensor, upper: Any,
                  target: Tensor) -> Tensor:
        """M2IB's relevance with the mask applied again at every further layer of the side's list."""
        bottleneck, layers = self.bottlenecks[side], self.layer_lists[side]
        z = bottleneck.compress(hidden, alpha, noise)
        rows = alpha.repeat_interleave(self.copies, 0) if alpha.shape[0] > 1 else alpha
        for j, (a, b) in enumerate(zip(layers, layers[1:]), start=1):
            z = self.backbone.run_blocks(side, z, upper, a + 1, b + 1)
            z = bottleneck.compress(z, rows, noise.roll(j, dims=-1).flatten(0, 1).unsqueeze(1))
        emb = self.backbone.upper(side, z, upper, layers[-1]).float()
        emb = emb.view(target.shape[0], self.copies, -1)
        return torch.nn.functional.cosine_similarity(emb, target.unsqueeze(1), dim=-1, eps=1e-6).mean(1)
