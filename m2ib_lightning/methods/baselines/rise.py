"""Randomised input sampling (Petsiuk, Das and Saenko, BMVC 2018)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.baselines.base import Baseline, drop_tokens
from m2ib_lightning.methods.noise import noise_generator
from m2ib_lightning.records import Explanation


class RISE(Baseline):
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
        backbone, sides, seed: see :class:`~m2ib_lightning.methods.base.AttributionModule`.
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

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        clean = self.clean(batch)
        pixel_maps = text_scores = None
        if "vision" in self.sides:
            pixel_maps = self._vision(batch["pixel_values"].float(), clean["text"])
        if "text" in self.sides:
            text_scores = self._text(list(batch["ids"]), batch["input_ids"], batch["attention_mask"], clean["vision"])
        return self.outputs(batch, clean["vision"], clean["text"], text_scores=text_scores, pixel_maps=pixel_maps)
