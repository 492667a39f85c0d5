"""Train the toy CLIP of the grounded synthetic benchmark, from scratch, on a CPU, in minutes.

The model is a small ``CLIPModel`` (ViT-B/32 geometry: 224 px images, 32 px patches, 50 vision
tokens) with the word-level tokenizer and CLIP image processor of :func:`build_tiny_clip`,
trained contrastively on scenes from :mod:`m2ib_lightning.assets.scenes`: each image is paired with a
caption naming one of its shapes, and a batch's image-caption similarity matrix is trained with
CLIP's symmetric cross-entropy. Several shapes share a caption ("a red circle" appears in many
scenes), so every pair where the image holds the named shape counts as a positive (the target
distribution spreads evenly over them) instead of being pushed apart as a false negative.

Run (writes ``data/toy/toy-clip``; see docs/evaluation.md for timings)::

    python -m m2ib_lightning.assets.toy_clip --config configs/pretrain/toy_clip.yaml

The scenes come from a *world* (``world``): ``toy`` (the default, above) or ``world2``
(:mod:`m2ib_lightning.assets.world2`: textured objects, counts and relations; its CLIP is
``configs/pretrain/world2_clip.yaml``). A world supplies its caption set, and for each scene the
captions true of it; with ``hard_negatives`` each caption of a batch also brings one caption a
single edit away (another relation, count, attribute or shape; the world's ``foil_table``) as an
extra negative, unless that foil happens to be true of the image too.

The result is saved with ``save_pretrained`` (model, tokenizer, image processor) and reloads with
:class:`m2ib_lightning.CLIPBackbone`; ``training.json`` next to it records the settings, the
loss curve, the wall time and the held-out retrieval accuracy.
"""

from __future__ import annotations

import json
import math
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.assets.scenes import all_captions, caption_for, draw_scene, scene_rng
from m2ib_lightning.assets.tiny_models import CLIP_MEAN, CLIP_STD, build_tiny_clip, verify_tiny_clip

__all__ = ["SceneSet", "World", "get_world", "render_scenes", "retrieval_accuracy", "train_toy_clip"]


class World(Protocol):
    """A source of scenes the trainer learns from (``toy``: :class:`ToyWorld`; ``world2``:
    :data:`m2ib_lightning.assets.world2.WORLD`)."""

    name: str

    def captions(self) -> list[str]:
        """The world's caption set, in a fixed order (caption indices refer to it)."""

    def scene(self, seed: int | str, index: int, image_size: int) -> tuple[Any, list[int], int]:
        """Scene ``index`` of the stream ``seed``: its RGB image, the caption indices a training step
        draws from (uniformly; each true of the scene, repeats allowed as weights; every caption
        true of the scene among them) and the index of the scene's own caption."""

    def foil_table(self) -> tuple[Tensor, Tensor] | None:
        """``(C, F)`` long caption indices one edit away from each caption (padded) and ``(C,)``
        their counts, or None if the world has none."""

    def caption_kinds(self) -> list[str] | None:
        """Each caption's kind (for the foil accuracy by kind), or None."""


class ToyWorld:
    """The coloured shapes of :mod:`m2ib_lightning.assets.scenes`: a step draws one of the scene's shapes."""

    name = "toy"

    def captions(self) -> list[str]:
        return all_captions()

    def scene(self, seed: int | str, index: int, image_size: int) -> tuple[Any, list[int], int]:
        position = _toy_index()
        scene = draw_scene(scene_rng(seed, index), image_size)
        return scene.image, [position[caption_for(o)] for o in scene.objects], position[scene.caption]

    def foil_table(self) -> None:
        return None

    def caption_kinds(self) -> None:
        return None


@lru_cache(maxsize=1)
def _toy_index() -> dict[str, int]:
    return {c: i for i, c in enumerate(all_captions())}


def get_world(name: str) -> World:
    """The world called ``name``: ``toy`` or ``world2``."""
    if name == "toy":
        return ToyWorld()
    if name == "world2":
        from m2ib_lightning.assets.world2 import WORLD

        return WORLD
    raise ValueError(f"world must be 'toy' or 'world2', got {name!r}")


class SceneSet:
    """Pre-rendered scenes: ``images`` ``(N, 3, H, W)`` uint8 and, per scene, the caption indices a
    training step draws from (``kinds``: for the toy world, the caption of each of its shapes) and
    the index of its own caption (``targets``), in the world's caption set (``n_captions`` of them;
    default: the toy world's)."""

    def __init__(self, images: Tensor, kinds: list[list[int]], targets: list[int],
                 n_captions: int | None = None) -> None:
        self.images, self.kinds, self.targets = images, kinds, targets
        n, k = len(kinds), n_captions or len(all_captions())
        # presence[i, c]: caption c is true of scene i (toy: scene i holds the shape that c names)
        self.presence = torch.zeros(n, k, dtype=torch.bool)
        for i, ks in enumerate(kinds):
            self.presence[i, ks] = True
        self.lengths = torch.tensor([len(ks) for ks in kinds], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.kinds)


def render_scenes(seed: int | str, n: int, image_size: int = 224, world: str = "toy") -> SceneSet:
    """Render ``n`` scenes of the stream ``seed`` of ``world`` (see :func:`get_world`)."""
    source = get_world(world)
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    kinds, targets = [], []
    for i in range(n):
        image, candidates, target = source.scene(seed, i, image_size)
        images[i] = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        kinds.append(candidates)
        targets.append(target)
    return SceneSet(images, kinds, targets, n_captions=len(source.captions()))


def normalise(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> CLIP-normalised float, exactly what the saved image processor gives
    for images already at the model's size (resize and centre crop are then identities)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _features(out: Any) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projection.
    return out if isinstance(out, Tensor) else out.pooler_output


def soft_clip_loss(logits: Tensor, positive: Tensor, queries: int | None = None) -> Tensor:
    """CLIP's symmetric cross-entropy with several positives per row and column.

    Args:
        logits: ``(B, B)`` scaled image-caption similarities (rows: images), or ``(B, B + F)`` with
            ``F`` extra captions (hard negatives) after the batch's own.
        positive: same shape, bool, True where caption j is true of image i (the diagonal always is).
        queries: with extra captions, ``B``: only the first ``B`` columns are text->image queries
            (a foil may be true of no image of the batch); the image->text side sees every column.
    """
    target = positive.float()
    image_to_text = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    if queries is not None:
        logits, target = logits[:, :queries], target[:, :queries]
    text_to_image = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


@torch.no_grad()
def retrieval_accuracy(model: Any, caption_ids: Tensor, scenes: SceneSet, batch_size: int = 256,
                       foils: tuple[Tensor, Tensor] | None = None,
                       caption_kinds: list[str] | None = None) -> dict[str, float]:
    """Held-out retrieval accuracy of a CLIP on ``scenes`` (every scene's caption names one of its shapes).

    "Holds the named shape" below reads "the caption is true of the image" in other worlds.

    * ``caption_to_image_r1``: for each scene, does its caption score the scene's image above
      EVERY held-out image that lacks the named shape (distractors sharing its colour or kind
      included)? Strict: one query per scene against hundreds of negatives.
    * ``caption_to_image_map``: mean over the captions of the average precision of ranking all
      held-out images by similarity, images holding the named shape being the positives;
      ``caption_to_image_p1``: mean over the captions of "the top image holds the named shape".
    * ``image_to_caption_r1``: for each image, does the most similar of all captions name one of
      its shapes? (``chance_image_to_caption``: the mean fraction of captions that do.)
    * ``image_to_caption_set``: for each image, do the captions of its shapes all rank above every
      other caption (the whole set of shapes recovered)?
    * with ``foils`` (see :meth:`World.foil_table`) and ``caption_kinds``, per kind of the scenes'
      own captions: ``foil_accuracy_<kind>``, how often the image scores its own caption above each
      foil of it that is false of the image (chance 0.5), and ``first_foil_accuracy_<kind>``, the
      same for the first foil only (world 2: the opposite relation, or "a" <-> "two").
    """
    model.eval()
    images = torch.cat([_features(model.get_image_features(pixel_values=normalise(scenes.images[i : i + batch_size])))
                        for i in range(0, len(scenes), batch_size)])
    texts = _features(model.get_text_features(input_ids=caption_ids))
    sim = F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T  # (N images, C captions)
    present = scenes.presence
    n = len(scenes)
    targets = torch.tensor(scenes.targets)
    own = sim[torch.arange(n), targets]
    negatives = sim[:, targets].masked_fill(present[:, targets], float("-inf"))  # (images, queries)
    c2i = (own > negatives.amax(0)).float().mean().item()
    aps, tops = [], []
    for c in range(sim.shape[1]):
        labels = present[:, c][sim[:, c].argsort(descending=True)].float()
        if labels.sum() > 0:
            precision = labels.cumsum(0) / torch.arange(1, n + 1)
            aps.append((precision * labels).sum().item() / labels.sum().item())
            tops.append(labels[0].item())
    i2c = present[torch.arange(n), sim.argmax(1)].float().mean().item()
    lowest_present = sim.masked_fill(~present, float("inf")).amin(1)
    highest_absent = sim.masked_fill(present, float("-inf")).amax(1)
    result = {
        "caption_to_image_r1": c2i,
        "caption_to_image_map": float(np.mean(aps)),
        "caption_to_image_p1": float(np.mean(tops)),
        "image_to_caption_r1": i2c,
        "chance_image_to_caption": present.float().mean().item(),
        "image_to_caption_set": (lowest_present > highest_absent).float().mean().item(),
        "n_scenes": n,
    }
    if foils is not None and caption_kinds is not None:
        table, counts = foils
        wins: dict[str, list[float]] = {}
        first: dict[str, list[float]] = {}
        for i, t in enumerate(scenes.targets):
            kind = caption_kinds[t]
            for j, f in enumerate(dict.fromkeys(table[t, : counts[t]].tolist())):  # each foil once
                if present[i, f]:
                    continue  # the foil is true of this image too
                win = float(sim[i, t] > sim[i, f])
                wins.setdefault(kind, []).append(win)
                if j == 0:
                    first.setdefault(kind, []).append(win)
        result.update({f"foil_accuracy_{k}": float(np.mean(v)) for k, v in sorted(wins.items())})
        result.update({f"first_foil_accuracy_{k}": float(np.mean(v)) for k, v in sorted(first.items())})
    return result


def train_toy_clip(
    out_dir: str = "data/toy/toy-clip",
    hidden_size: int = 64,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 256,
    projection_dim: int = 64,
    image_size: int = 224,
    patch_size: int = 32,
    train_scenes: int = 8192,
    eval_scenes: int = 512,
    steps: int = 800,
    batch_size: int = 128,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    warmup: int = 50,
    seed: int = 0,
    threads: int | None = 1,
    log_every: int = 50,
    eval_every: int = 0,
    world: str = "toy",
    text_layers: int | None = None,
    hard_negatives: bool = False,
) -> dict[str, Any]:
    """Train the toy CLIP from scratch and save it with its tokenizer and image processor.

    Args:
        out_dir: where to save (``save_pretrained`` layout, loadable by ``CLIPBackbone``).
        hidden_size: width of both towers.
        num_layers: transformer blocks per tower (the vision tower's when ``text_layers`` is set).
        num_heads: attention heads per block.
        intermediate_size: MLP width.
        projection_dim: size of the joint embedding.
        image_size: input resolution (the benchmark's images are drawn at this size).
        patch_size: ViT patch size.
        train_scenes: pre-rendered training scenes (stream ``train-{seed}``); each step names a
            fresh random shape of each sampled scene (another world: draws a fresh caption true of
            it), so captions vary across epochs.
        eval_scenes: held-out scenes (stream ``heldout``) for the retrieval accuracy.
        steps: optimisation steps.
        batch_size: image-caption pairs per step (the contrastive batch).
        lr: peak AdamW learning rate (linear warm-up, cosine decay to 0).
        weight_decay: AdamW weight decay (not applied to norms, biases, embeddings' scale).
        warmup: warm-up steps.
        seed: seed of the weight initialisation, the training scenes and the batch sampling.
        threads: torch CPU threads (results are bit-reproducible for a fixed thread count).
        log_every: print the loss every this many steps.
        eval_every: also print the held-out retrieval accuracy (and save a snapshot) every this many
            steps (0: only at the end).
        world: where the scenes come from: ``toy`` or ``world2`` (:func:`get_world`).
        text_layers: transformer blocks of the text tower, if not ``num_layers``.
        hard_negatives: add, for each caption of a batch, one of the world's foils of it (a caption
            one edit away) as an extra negative caption (the world must have foils).

    Returns:
        The record also written to ``out_dir/training.json``.
    """
    # The record lives in out_dir; everything else needed to reproduce the model is kept.
    settings = {k: v for k, v in locals().items() if k != "out_dir"}
    from transformers import AutoTokenizer, CLIPModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    out = Path(out_dir)
    source = get_world(world)
    captions = source.captions()
    foils = source.foil_table()
    if hard_negatives and foils is None:
        raise ValueError(f"hard_negatives needs a world with foils; {world!r} has none")
    build_tiny_clip(out, captions=captions, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    intermediate_size=intermediate_size, projection_dim=projection_dim, image_size=image_size,
                    patch_size=patch_size, seed=seed, text_layers=text_layers)
    model = CLIPModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    caption_ids = tokenizer(captions, padding=True, return_tensors="pt")["input_ids"]
    if (caption_ids == tokenizer.unk_token_id).any():
        raise RuntimeError(f"the toy tokenizer does not cover the captions: {caption_ids.tolist()}")

    train = render_scenes(f"train-{seed}", train_scenes, image_size, world)
    heldout = render_scenes("heldout", eval_scenes, image_size, world)
    kinds = source.caption_kinds()
    render_s = time.perf_counter() - start

    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    gen = torch.Generator().manual_seed(seed)
    presence = train.presence
    losses = []
    model.train()
    for step in range(steps):
        idx = torch.randint(len(train), (batch_size,), generator=gen)
        # A fresh named shape per scene per step: uniform over the scene's shapes (other worlds:
        # over the scene's candidate captions).
        pick = (torch.rand(batch_size, generator=gen) * train.lengths[idx]).long()
        caps = torch.tensor([train.kinds[i][j] for i, j in zip(idx.tolist(), pick.tolist())])
        if hard_negatives:
            table, counts = foils
            foil = table[caps, (torch.rand(batch_size, generator=gen) * counts[caps]).long()]
            texts = torch.cat([caps, foil])
        else:
            texts = caps
        image = F.normalize(_features(model.get_image_features(pixel_values=normalise(train.images[idx]))), dim=-1)
        text = F.normalize(_features(model.get_text_features(input_ids=caption_ids[texts])), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = soft_clip_loss(logits, presence[idx][:, texts], batch_size if hard_negatives else None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if eval_every and step % eval_every == eval_every - 1 and step < steps - 1:
            acc = retrieval_accuracy(model, caption_ids, heldout, foils=foils, caption_kinds=kinds)
            foil_text = "".join(f"  {k} {v:.3f}" for k, v in acc.items() if "foil" in k)
            print(f"step {step:5d}  held-out caption->image R@1 {acc['caption_to_image_r1']:.3f}  "
                  f"mAP {acc['caption_to_image_map']:.3f}  image->caption R@1 {acc['image_to_caption_r1']:.3f}"
                  f"{foil_text}", flush=True)
            model.save_pretrained(out, safe_serialization=True)  # a usable snapshot while training goes on
            model.train()

    model.eval()
    accuracy = retrieval_accuracy(model, caption_ids, heldout, foils=foils, caption_kinds=kinds)
    model.save_pretrained(out, safe_serialization=True)
    verify_tiny_clip(out)
    record = {
        "settings": settings,
        "retrieval": accuracy,
        "final_loss": float(np.mean(losses[-20:])),
        "loss_every_50": [round(float(np.mean(losses[i : i + 50])), 4) for i in range(0, len(losses), 50)],
        "render_s": round(render_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        "torch": torch.__version__,
    }
    (out / "training.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    print(json.dumps({"retrieval": accuracy, "wall_s": record["wall_s"]}, indent=2))
    return record


def main(args: list[str] | None = None) -> None:
    """``python -m m2ib_lightning.assets.toy_clip --config configs/pretrain/toy_clip.yaml`` (``--help``: settings)."""
    from jsonargparse import CLI

    CLI(train_toy_clip, args=args, as_positional=False)


if __name__ == "__main__":
    main()
