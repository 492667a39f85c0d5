"""Baseline attribution methods in the same framework as M2IB: chosen by ``class_path``, same outputs.

Each baseline is an :class:`~m2ib_lightning.attribution.AttributionModule` that explains the same
target as M2IB, the cosine similarity between the image embedding and the caption embedding, and
returns the same output dict (so the writer, the store and the evaluation callback treat all
methods alike). None has trainable parameters.

=============================  ================================  =================================
class                          image map                         text scores
=============================  ================================  =================================
:class:`GradientSaliency`      ``max_c |ds/dx|`` per pixel        ``||ds/dh||`` per token at a block
:class:`GradCAM`               Grad-CAM on the tokens of block    same on the text tokens
                               ``vision_layer``
:class:`AttentionRollout`      gradient-weighted rollout          same, read at the pooled token
                               (Chefer et al. 2021), CLS row
:class:`RISE`                  random-mask saliency               random token-drop saliency
                               (Petsiuk et al. 2018)
:class:`RandomMap`             uniform noise per patch            uniform noise per token
=============================  ================================  =================================

Choose one in YAML::

    model:
      class_path: m2ib_lightning.baselines.GradCAM
      init_args:
        backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
        vision_layer: 2
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.attribution import AttributionModule
from m2ib_lightning.backbones import SIDES, BackboneAdapter, CLIPBackbone, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.noise import noise_generator

__all__ = ["RISE", "AttentionRollout", "GradCAM", "GradientSaliency", "RandomMap", "drop_tokens"]


def drop_tokens(input_ids: Tensor, keep: Tensor, replacement: int = 0) -> Tensor:
    """``input_ids`` with every position where ``keep`` is False replaced by ``replacement``.

    The M2IB paper's text metric replaces removed words by token id 0; RISE on text does the same.
    """
    return torch.where(keep, input_ids, torch.full_like(input_ids, replacement))


class _Baseline(AttributionModule):
    """Shared plumbing: clean embeddings and the similarity target of each side."""

    def clean(self, batch: dict[str, Any]) -> dict[Side, Tensor]:
        inputs = self.model_inputs(batch)
        with torch.no_grad():
            return {side: self.backbone.embed(side, inputs).float() for side in SIDES}

    @staticmethod
    def other(side: Side) -> Side:
        return "text" if side == "vision" else "vision"


class RandomMap(_Baseline):
    """Uniform random scores per vision token and per text token: the chance level of every metric.

    The image map is read out like M2IB's (patch grid, bilinear upsampling), so it is a fair chance
    baseline at the same resolution. Noise comes from the (seed, side, sample id) stream.

    Args:
        backbone, sides, seed: see :class:`~m2ib_lightning.attribution.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        scores: dict[str, Tensor | None] = {"vision": None, "text": None}
        if "vision" in self.sides:
            pixels = batch["pixel_values"]
            h, w = self.backbone.vision_grid(pixels)
            n = self.backbone.vision_prefix_tokens + h * w
            scores["vision"] = torch.stack([torch.rand(n, generator=noise_generator(self.seed, "vision", i))
                                            for i in batch["ids"]])
        if "text" in self.sides:
            length = batch["input_ids"].shape[1]
            scores["text"] = torch.stack([torch.rand(length, generator=noise_generator(self.seed, "text", i))
                                          for i in batch["ids"]])
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])


class GradientSaliency(_Baseline):
    """Vanilla gradients (Simonyan et al. 2014) of the image-text similarity.

    Image: ``max over channels |d s / d pixel|``. Text: the L2 norm of ``d s / d h`` for each token,
    with ``h`` the hidden states at the output of block ``text_layer``; the default ``-1`` is the
    token embeddings themselves (token ids are looked up, not differentiable, so the embeddings are
    the input that gradients reach).

    Args:
        text_layer: 0-based text block whose output tokens are differentiated (``-1``: the token
            embeddings, before block 0).
        backbone, sides, seed: see :class:`~m2ib_lightning.attribution.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, text_layer: int = -1, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if "text" in self.sides:
            backbone.check_layer("text", text_layer)
        self.text_layer = text_layer
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        out: dict[str, Tensor | None] = {"pixel_maps": None, "text_scores": None}
        with torch.enable_grad():
            if "vision" in self.sides:
                pixels = inputs["pixel_values"].detach().float().requires_grad_(True)
                emb = self.backbone.embed("vision", {**inputs, "pixel_values": pixels}).float()
                s = F.cosine_similarity(emb, clean["text"], dim=-1).sum()
                (grad,) = torch.autograd.grad(s, pixels)
                out["pixel_maps"] = grad.abs().amax(1)
            if "text" in self.sides:
                out["text_scores"] = token_gradients(self.backbone, "text", inputs, self.text_layer,
                                                     clean["vision"]).norm(dim=-1)
        return self.outputs(batch, clean["vision"], clean["text"], text_scores=out["text_scores"],
                            pixel_maps=out["pixel_maps"])


def token_gradients(backbone: BackboneAdapter, side: Side, inputs: dict[str, Tensor], layer: int, target: Tensor,
                    return_hidden: bool = False) -> Any:
    """``d cos(f_side, target) / d h`` ``(B, L, D)`` at the output ``h`` of block ``layer``.

    With ``return_hidden``, returns ``(grad, h)``.
    """
    with torch.no_grad():
        state = backbone.lower(side, inputs, layer)
    hidden = state.hidden.detach().float().requires_grad_(True)
    state = backbone.prepare_upper(side, state, layer)
    with torch.enable_grad():
        emb = backbone.upper(side, hidden.to(state.hidden.dtype), state, layer).float()
        s = F.cosine_similarity(emb, target, dim=-1).sum()
        (grad,) = torch.autograd.grad(s, hidden)
    return (grad, hidden.detach()) if return_hidden else grad


class GradCAM(_Baseline):
    """Grad-CAM (Selvaraju et al. 2017) on transformer tokens: ``ReLU(sum_c w_c h_c)`` per token,
    with ``w_c`` the mean over the sample's tokens of ``d s / d h_c`` at the output of a block
    (its patch tokens for an image: the CLS token is left out of the weights, as in ViT Grad-CAM).

    Use a block below the last one: CLIP pools the CLS (vision) or EOS (text) token, so the other
    tokens of the last block get no gradient at all.

    Args:
        vision_layer: 0-based vision block whose output tokens are weighted (default 9 of 12,
            the M2IB paper's layer; ``-1``: the patch embeddings, before block 0).
        text_layer: same for the text tower (``-1``: the token embeddings).
        backbone, sides, seed: see :class:`~m2ib_lightning.attribution.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, vision_layer: int = 9, text_layer: int = 9,
                 sides: Sequence[Side] = ("vision", "text"), seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        self.layers = {"vision": vision_layer, "text": text_layer}
        for side in self.sides:
            backbone.check_layer(side, self.layers[side])
        self.save_hyperparameters(ignore=["backbone"])

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores: dict[str, Tensor | None] = {"vision": None, "text": None}
        for side in self.sides:
            grad, hidden = token_gradients(self.backbone, side, inputs, self.layers[side], clean[self.other(side)],
                                           return_hidden=True)
            if side == "text":
                valid = batch["attention_mask"].bool()
            else:
                valid = torch.ones(hidden.shape[:2], dtype=torch.bool, device=hidden.device)
                valid[:, : self.backbone.vision_prefix_tokens] = False
            valid = valid.unsqueeze(-1)
            weights = (grad * valid).sum(1, keepdim=True) / valid.sum(1, keepdim=True)
            scores[side] = F.relu((weights * hidden).sum(-1))
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])


@contextmanager
def _eager_attention(model: Any) -> Iterator[None]:
    """Run a transformers model with eager attention, whose probabilities are tensors in the graph
    (SDPA never materialises them); the previous implementation is restored on exit."""
    configs = {id(c): c for c in (getattr(m, "config", None) for m in model.modules())
               if c is not None and hasattr(c, "_attn_implementation")}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = "eager"
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]


class AttentionRollout(_Baseline):
    """Gradient-weighted attention rollout (Chefer, Gur and Wolf, ICCV 2021).

    With ``A_b`` a block's attention probabilities ``(heads, L, L)``,
    ``Abar_b = mean_heads(relu(dA_b * A_b))`` where ``dA_b = d s / d A_b``, and from ``R = I``
    each block from ``start_layer`` up applies ``R <- R + Abar_b R``. The vision map is the CLS
    row of ``R`` (one score per token); the text scores are the row of the pooled (EOS) token,
    minus the identity, so that the pooled token's own residual path does not dominate.

    Needs a :class:`~m2ib_lightning.CLIPBackbone` (it reads transformers' attention modules).

    Args:
        start_layer: first block included in the rollout (0: all blocks).
        backbone, sides, seed: see :class:`~m2ib_lightning.attribution.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, start_layer: int = 0, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        if not isinstance(backbone, CLIPBackbone):
            raise ConfigError(f"AttentionRollout needs a CLIPBackbone (a transformers CLIPModel), got "
                              f"{type(backbone).__name__}")
        for side in self.sides:
            backbone.check_layer(side, start_layer, allow_embeddings=False)
        self.start_layer = start_layer
        self.save_hyperparameters(ignore=["backbone"])

    def _rollout(self, side: Side, inputs: dict[str, Tensor], target: Tensor) -> Tensor:
        model = self.backbone.model
        tower = model.vision_model if side == "vision" else model.text_model
        blocks = list(tower.encoder.layers)[self.start_layer :]
        probs: list[Tensor] = []
        hooks = [b.self_attn.register_forward_hook(lambda mod, args, out: probs.append(out[1])) for b in blocks]
        # The weights are frozen and token ids are not differentiable: start the graph at the
        # embeddings so that the attention probabilities have gradients.
        hooks.append(tower.embeddings.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True)))
        try:
            with _eager_attention(model), torch.enable_grad():
                emb = self.backbone.embed(side, inputs).float()
                s = F.cosine_similarity(emb, target, dim=-1).sum()
                grads = torch.autograd.grad(s, probs)
        finally:
            for h in hooks:
                h.remove()
        b, _, n, _ = probs[0].shape
        rel = torch.eye(n, device=target.device).expand(b, n, n).clone()
        for a, g in zip(probs, grads):
            cam = (g * a).clamp_min(0).mean(1).float()
            rel = rel + cam @ rel
        if side == "vision":
            return rel[:, 0]
        pool = self.backbone._pool_positions(inputs["input_ids"])
        return rel[torch.arange(b, device=rel.device), pool] - torch.eye(n, device=rel.device)[pool]

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        inputs = self.model_inputs(batch)
        scores = {side: self._rollout(side, inputs, clean[self.other(side)]) if side in self.sides else None
                  for side in SIDES}
        return self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])


class RISE(_Baseline):
    """Randomised input sampling (Petsiuk, Das and Saenko, BMVC 2018).

    Image: ``masks`` random binary grids of ``grid x grid`` cells (each cell kept with
    probability ``p``), upsampled bilinearly to ``(grid + 1)`` cells' size and cropped at a random
    shift; the map is ``sum_i s_i M_i / (masks * p)`` with ``s_i`` the similarity of the masked
    image (multiplied in normalised pixel space, where 0 is the mean colour). One mask set (drawn
    from ``seed``) serves every image, as in the paper.

    Text: ``text_masks`` random keep/drop draws of the caption's words (BOS and EOS always kept,
    dropped words replaced by token id 0, as in the M2IB paper's text metric), per sample; a
    token's score is the mean similarity of the draws that kept it, ``sum_i s_i M_i / sum_i M_i``
    (always-kept BOS and EOS get the mean of all draws, neither high nor low).

    Args:
        masks: number of image masks.
        grid: cells per side of the low-resolution masks.
        p: probability that a cell (or a word) is kept.
        text_masks: number of caption masks per sample.
        chunk: masked images per forward pass.
        backbone, sides, seed: see :class:`~m2ib_lightning.attribution.AttributionModule`.
    """

    def __init__(self, backbone: BackboneAdapter, masks: int = 1000, grid: int = 7, p: float = 0.5,
                 text_masks: int = 256, chunk: int = 256, sides: Sequence[Side] = ("vision", "text"),
                 seed: int = 0) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for name, value in (("masks", masks), ("grid", grid), ("text_masks", text_masks), ("chunk", chunk)):
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        if not 0 < p < 1:
            raise ConfigError(f"p must be in (0, 1), got {p!r}")
        self.n_masks, self.grid, self.p, self.text_masks, self.chunk = masks, grid, p, text_masks, chunk
        self.save_hyperparameters(ignore=["backbone"])

    def image_masks(self, size: tuple[int, int], start: int, stop: int, device: torch.device) -> Tensor:
        """Masks ``start:stop`` of the seeded set at ``size``, ``(stop - start, H, W)`` in [0, 1]."""
        gen = noise_generator(self.seed, "rise-vision", f"{size[0]}x{size[1]}")
        cells = (torch.rand(self.n_masks, 1, self.grid, self.grid, generator=gen) < self.p).float()[start:stop]
        shifts = torch.rand(self.n_masks, 2, generator=gen)[start:stop]
        cell = (size[0] / self.grid, size[1] / self.grid)
        big = (int((self.grid + 1) * cell[0]), int((self.grid + 1) * cell[1]))
        up = F.interpolate(cells, size=big, mode="bilinear", align_corners=False)[:, 0]
        out = torch.empty(len(cells), *size)
        for i, (dy, dx) in enumerate((shifts * torch.tensor(cell)).long().tolist()):
            out[i] = up[i, dy : dy + size[0], dx : dx + size[1]]
        return out.to(device)

    @torch.no_grad()
    def _vision(self, pixels: Tensor, target: Tensor) -> Tensor:
        b = pixels.shape[0]
        size = tuple(pixels.shape[-2:])
        saliency = torch.zeros(b, *size, device=pixels.device)
        for start in range(0, self.n_masks, max(1, self.chunk // b)):
            masks = self.image_masks(size, start, min(self.n_masks, start + max(1, self.chunk // b)), pixels.device)
            m = masks.shape[0]
            masked = (pixels.unsqueeze(1) * masks.unsqueeze(0).unsqueeze(2)).flatten(0, 1)
            emb = self.backbone.embed("vision", {"pixel_values": masked}).float()
            s = F.cosine_similarity(emb, target.repeat_interleave(m, dim=0), dim=-1).view(b, m)
            saliency += torch.einsum("bm,mhw->bhw", s, masks)
        return saliency / (self.n_masks * self.p)

    @torch.no_grad()
    def _text(self, ids: list[str], input_ids: Tensor, attention_mask: Tensor, target: Tensor) -> Tensor:
        scores = torch.zeros(input_ids.shape, device=input_ids.device)
        content = ~self.backbone.special_tokens(input_ids, attention_mask)
        for i, sample_id in enumerate(ids):
            gen = noise_generator(self.seed, "rise-text", sample_id)
            # Drawn over the caption's own tokens only, so the draws do not depend on how far the
            # batch is padded (i.e. on the other captions in it).
            length = int(attention_mask[i].sum())
            keep = torch.ones(self.text_masks, input_ids.shape[1], dtype=torch.bool, device=input_ids.device)
            keep[:, :length] = torch.rand(self.text_masks, length, generator=gen).to(input_ids.device) < self.p
            keep = keep | ~content[i]
            ids_i = drop_tokens(input_ids[i].expand_as(keep), keep)
            mask_i = attention_mask[i].expand_as(keep)
            emb = self.backbone.embed("text", {"input_ids": ids_i, "attention_mask": mask_i}).float()
            s = F.cosine_similarity(emb, target[i : i + 1], dim=-1)
            kept = keep.float()
            scores[i] = (s.unsqueeze(1) * kept).sum(0) / kept.sum(0).clamp_min(1.0)
        return scores

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        clean = self.clean(batch)
        pixel_maps = text_scores = None
        if "vision" in self.sides:
            pixel_maps = self._vision(batch["pixel_values"].float(), clean["text"])
        if "text" in self.sides:
            text_scores = self._text(list(batch["ids"]), batch["input_ids"], batch["attention_mask"], clean["vision"])
        return self.outputs(batch, clean["vision"], clean["text"], text_scores=text_scores, pixel_maps=pixel_maps)
