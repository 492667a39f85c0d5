"""Label-free scores of one batch's maps: what the selection ranks settings by (docs/selection.md).

Every score is per pair and needs nothing but the pair and the frozen model:

* image side (:func:`image_scores`): the deletion and insertion curves of the evaluation
  (:func:`~m2ib_lightning.evaluation.perturb.perturbation_curves`, the configured baselines and
  steps) and their areas; the curves' end points are kept, so that per-pair normalised areas can be
  formed (:mod:`.ranking`);
* text side (:func:`word_scores`): the same two curves over the caption's words (special tokens
  such as BOS and EOS always kept), one word at a time in score order, deleted words replaced by
  token id 0 as in the evaluation's text metric, scored against the clean image embedding;
* both sides (:func:`randomisation_scores`): how much of a map survives re-initialising the model
  above the bottleneck (:func:`randomised_above`): the Spearman correlation of the map with the map
  of the randomised model, and whether its peak stays in place.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.backbones import BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.evaluation import perturbation_curves, reinitialize_
from m2ib_lightning.evaluation.functional import auc_per_sample, spearman
from m2ib_lightning.methods.baselines import drop_tokens
from m2ib_lightning.records import Explanation

__all__ = ["caption_words", "image_scores", "randomisation_scores", "randomised_above", "stages_above", "word_curves",
           "word_scores"]


@torch.no_grad()
def image_scores(backbone: BackboneAdapter, pixels: Tensor, maps: Tensor, text: Tensor, steps: int,
                 deletion_baseline: str, insertion_baseline: str) -> dict[str, Tensor]:
    """Per pair: ``deletion`` and ``insertion`` areas, and the curves' end points ``clean`` (the pair's
    similarity), ``deleted`` (all pixels deleted) and ``inserted_from`` (the insertion's start)."""
    maps = maps.to(pixels.device, pixels.dtype)
    deletion = perturbation_curves(backbone, pixels, maps, text, steps, "deletion", deletion_baseline).float()
    insertion = perturbation_curves(backbone, pixels, maps, text, steps, "insertion", insertion_baseline).float()
    return {"deletion": auc_per_sample(deletion), "insertion": auc_per_sample(insertion),
            "clean": deletion[:, 0], "deleted": deletion[:, -1], "inserted_from": insertion[:, 0]}


def _words(backbone: BackboneAdapter, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """``(B, L)`` bool: the caption's words (valid tokens that are not special)."""
    return attention_mask.bool() & ~backbone.special_tokens(input_ids, attention_mask).to(attention_mask.device)


@torch.no_grad()
def word_curves(backbone: BackboneAdapter, input_ids: Tensor, attention_mask: Tensor, scores: list[Tensor],
                image: Tensor, mode: str = "deletion", max_rows: int = 256) -> list[Tensor]:
    """Per caption, the similarity to ``image`` ``(B, P)`` after deleting (or, ``mode="insertion"``, keeping
    only) its ``k`` highest-scoring words, ``k = 0 .. W`` (``W + 1`` values; ties broken by position).

    ``scores[i]`` has one value per valid token of caption ``i``, as in an Explanation; special tokens
    and padding are never deleted. Deleted words become token id 0.
    """
    if mode not in ("deletion", "insertion"):
        raise ConfigError(f"mode must be 'deletion' or 'insertion', got {mode!r}")
    words = _words(backbone, input_ids, attention_mask)
    valid = attention_mask.bool()
    rows, owners = [], []
    for i, s in enumerate(scores):
        where = valid[i].nonzero().flatten()
        if len(s) != len(where):
            raise ValueError(f"caption {i}: expected {len(where)} token scores (its valid tokens), got {len(s)}")
        is_word = words[i, where].cpu()
        order = where.cpu()[is_word][s.float().cpu()[is_word].argsort(descending=True, stable=True)]
        order = order.to(input_ids.device)
        for k in range(len(order) + 1):
            keep = torch.ones_like(valid[i])
            if mode == "deletion":
                keep[order[:k]] = False
            else:
                keep[order[k:]] = False
            rows.append(drop_tokens(input_ids[i], keep))
            owners.append(i)
    if not rows:
        return [input_ids.new_zeros(0, dtype=torch.float32) for _ in scores]
    ids = torch.stack(rows)
    owner = torch.tensor(owners, device=ids.device)
    sims = []
    for a in range(0, len(rows), max_rows):
        b = min(a + max_rows, len(rows))
        emb = backbone.embed("text", {"input_ids": ids[a:b], "attention_mask": attention_mask[owner[a:b]]})
        sims.append(F.cosine_similarity(emb.float(), image[owner[a:b]].float(), dim=-1))
    flat = torch.cat(sims)
    return [flat[owner == i] for i in range(len(scores))]


def _area(curve: Tensor) -> Tensor:
    """Trapezoid area of one curve on an evenly spaced [0, 1] axis; NaN without a word to move."""
    if curve.numel() < 2:
        return torch.tensor(float("nan"))
    return auc_per_sample(curve.view(1, -1))[0]


@torch.no_grad()
def word_scores(backbone: BackboneAdapter, input_ids: Tensor, attention_mask: Tensor, scores: list[Tensor],
                image: Tensor) -> dict[str, Tensor]:
    """Per pair: ``deletion`` and ``insertion`` areas of the word curves (NaN for a caption without
    words), and the end points ``clean``, ``deleted`` (every word deleted), ``inserted_from`` (the same)."""
    deletion = word_curves(backbone, input_ids, attention_mask, scores, image, "deletion")
    insertion = word_curves(backbone, input_ids, attention_mask, scores, image, "insertion")

    def end(curves: list[Tensor], i: int) -> Tensor:
        return torch.stack([c[i].cpu() if c.numel() else torch.tensor(float("nan")) for c in curves])

    return {"deletion": torch.stack([_area(c.cpu()) for c in deletion]),
            "insertion": torch.stack([_area(c.cpu()) for c in insertion]),
            "clean": end(deletion, 0), "deleted": end(deletion, -1), "inserted_from": end(insertion, 0)}


def _stage_seed(seed: int, side: str, stage: str) -> int:
    digest = hashlib.blake2b(f"select\x1f{seed}\x1f{side}\x1f{stage}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def stages_above(backbone: BackboneAdapter, side: Side, layer: int) -> list[tuple[str, list[Any]]]:
    """The randomisation stages of ``side`` above block ``layer``: the read-out and blocks ``layer + 1 ..``.

    From :meth:`~m2ib_lightning.backbones.BackboneAdapter.randomization_stages` (the read-out, each
    block from the last down, then the embeddings).
    """
    try:
        stages = backbone.randomization_stages(side)
    except NotImplementedError as err:
        raise ConfigError(f"the randomisation check needs an adapter that lists its {side} tower's stages "
                          f"(randomization_stages); run with --no-randomisation. {err}") from err
    n = backbone.num_layers[side]
    if len(stages) != n + 2:
        raise ConfigError(f"{type(backbone).__name__}.randomization_stages({side!r}) gave {len(stages)} stages; "
                          f"expected the read-out, {n} blocks and the embeddings")
    return stages[: n - layer]


@contextmanager
def randomised_above(backbone: BackboneAdapter, side: Side, layer: int, seed: int = 0) -> Iterator[None]:
    """Inside: every weight of ``side`` above block ``layer`` (the blocks after it and the read-out)
    replaced by noise of the same mean and spread (:func:`~m2ib_lightning.evaluation.reinitialize_`);
    restored on exit. Each stage's noise depends only on ``(seed, side, stage)``: the same on every
    rank, for every layer and batch."""
    stages = stages_above(backbone, side, layer)
    params = [p for _, modules in stages for m in modules for p in m.parameters()]
    saved = [p.detach().clone() for p in params]
    try:
        for name, modules in stages:
            reinitialize_(modules, torch.Generator().manual_seed(_stage_seed(seed, side, name)))
        yield
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)


def _peak_distance(a: Tensor, b: Tensor) -> Tensor:
    w = a.shape[-1]
    i, j = a.flatten(1).argmax(1), b.flatten(1).argmax(1)
    return (((i // w - j // w) ** 2 + (i % w - j % w) ** 2).float()).sqrt()


def caption_words(backbone: BackboneAdapter, input_ids: Tensor, attention_mask: Tensor) -> list[Tensor]:
    """Per caption, ``(L_i,)`` bool over its valid tokens (the order of an Explanation's ``text_scores``):
    True for a word, False for a special token."""
    words = _words(backbone, input_ids, attention_mask)
    valid = attention_mask.bool()
    return [w[v].cpu() for w, v in zip(words, valid)]


@torch.no_grad()
def randomisation_scores(side: Side, original: Explanation, randomised: Explanation, tolerance: float,
                         words: list[Tensor] | None = None) -> dict[str, Tensor]:
    """Per pair: ``rand_spearman`` (the map's rank correlation with the randomised model's map) and
    ``rand_peak_kept`` (1 where the peak stays: within ``tolerance`` pixels for an image map, the same
    top word for a caption).

    ``words``: for the text side, :func:`caption_words` of the batch: only the words are compared
    (the word curves never delete special tokens either). NaN for a caption with fewer than 2 words.
    """
    if side == "vision":
        a, b = original.image_maps.float(), randomised.image_maps.float()
        rho = torch.stack([spearman(x, y).float() for x, y in zip(a, b)])
        kept = (_peak_distance(a, b) <= tolerance).float()
        return {"rand_spearman": rho, "rand_peak_kept": kept}
    if words is None:
        raise ValueError("the text side's randomisation scores need the captions' words")
    rhos, kept = [], []
    for x, y, w in zip(original.text_scores, randomised.text_scores, words):
        x, y = x.float()[w], y.float()[w]
        if x.numel() < 2:
            rhos.append(torch.tensor(float("nan")))
            kept.append(torch.tensor(float("nan")))
            continue
        rhos.append(spearman(x, y).float())
        kept.append((x.argmax() == y.argmax()).float())
    return {"rand_spearman": torch.stack(rhos), "rand_peak_kept": torch.stack(kept)}
