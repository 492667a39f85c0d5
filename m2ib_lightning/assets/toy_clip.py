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

The result is saved with ``save_pretrained`` (model, tokenizer, image processor) and reloads with
:class:`m2ib_lightning.CLIPBackbone`; ``training.json`` next to it records the settings, the
loss curve, the wall time and the held-out retrieval accuracy.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from m2ib_lightning.assets.scenes import all_captions, caption_for, draw_scene, scene_rng
from m2ib_lightning.assets.tiny_models import CLIP_MEAN, CLIP_STD, build_tiny_clip, verify_tiny_clip

__all__ = ["SceneSet", "render_scenes", "retrieval_accuracy", "train_toy_clip"]


class SceneSet:
    """Pre-rendered scenes: ``images`` ``(N, 3, H, W)`` uint8 and, per scene, the caption index of
    each of its shapes (``kinds``) and of its named target (``targets``) in :func:`all_captions`."""

    def __init__(self, images: Tensor, kinds: list[list[int]], targets: list[int]) -> None:
        self.images, self.kinds, self.targets = images, kinds, targets
        n, k = len(kinds), len(all_captions())
        # presence[i, c]: scene i holds the shape that caption c names
        self.presence = torch.zeros(n, k, dtype=torch.bool)
        for i, ks in enumerate(kinds):
            self.presence[i, ks] = True

    def __len__(self) -> int:
        return len(self.kinds)


def render_scenes(seed: int | str, n: int, image_size: int = 224) -> SceneSet:
    """Render ``n`` scenes of the stream ``seed`` (see :func:`m2ib_lightning.assets.scenes.scene_rng`)."""
    index = {c: i for i, c in enumerate(all_captions())}
    images = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    kinds, targets = [], []
    for i in range(n):
        scene = draw_scene(scene_rng(seed, i), image_size)
        images[i] = torch.from_numpy(np.array(scene.image)).permute(2, 0, 1)
        kinds.append([index[caption_for(o)] for o in scene.objects])
        targets.append(index[scene.caption])
    return SceneSet(images, kinds, targets)


def normalise(images: Tensor) -> Tensor:
    """uint8 ``(B, 3, H, W)`` -> CLIP-normalised float, exactly what the saved image processor gives
    for images already at the model's size (resize and centre crop are then identities)."""
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    return (images.float() / 255.0 - mean) / std


def _features(out: Any) -> Tensor:
    # transformers >= 5 returns a model output whose pooler_output is the projection.
    return out if isinstance(out, Tensor) else out.pooler_output


def soft_clip_loss(logits: Tensor, positive: Tensor) -> Tensor:
    """CLIP's symmetric cross-entropy with several positives per row and column.

    Args:
        logits: ``(B, B)`` scaled image-caption similarities (rows: images).
        positive: ``(B, B)`` bool, True where image i holds the shape caption j names (the
            diagonal always is).
    """
    target = positive.float()
    image_to_text = -(target / target.sum(1, keepdim=True) * logits.log_softmax(1)).sum(1).mean()
    text_to_image = -(target / target.sum(0, keepdim=True) * logits.log_softmax(0)).sum(0).mean()
    return 0.5 * (image_to_text + text_to_image)


@torch.no_grad()
def retrieval_accuracy(model: Any, caption_ids: Tensor, scenes: SceneSet, batch_size: int = 256) -> dict[str, float]:
    """Held-out retrieval accuracy of a CLIP on ``scenes`` (every scene's caption names one of its shapes).

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
    return {
        "caption_to_image_r1": c2i,
        "caption_to_image_map": float(np.mean(aps)),
        "caption_to_image_p1": float(np.mean(tops)),
        "image_to_caption_r1": i2c,
        "chance_image_to_caption": present.float().mean().item(),
        "image_to_caption_set": (lowest_present > highest_absent).float().mean().item(),
        "n_scenes": n,
    }


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
) -> dict[str, Any]:
    """Train the toy CLIP from scratch and save it with its tokenizer and image processor.

    Args:
        out_dir: where to save (``save_pretrained`` layout, loadable by ``CLIPBackbone``).
        hidden_size: width of both towers.
        num_layers: transformer blocks per tower.
        num_heads: attention heads per block.
        intermediate_size: MLP width.
        projection_dim: size of the joint embedding.
        image_size: input resolution (the benchmark's images are drawn at this size).
        patch_size: ViT patch size.
        train_scenes: pre-rendered training scenes (stream ``train-{seed}``); each step names a
            fresh random shape of each sampled scene, so captions vary across epochs.
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
    captions = all_captions()
    build_tiny_clip(out, captions=captions, hidden_size=hidden_size, num_layers=num_layers, num_heads=num_heads,
                    intermediate_size=intermediate_size, projection_dim=projection_dim, image_size=image_size,
                    patch_size=patch_size, seed=seed)
    model = CLIPModel.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    caption_ids = tokenizer(captions, padding=True, return_tensors="pt")["input_ids"]
    if (caption_ids == tokenizer.unk_token_id).any():
        raise RuntimeError(f"the toy tokenizer does not cover the captions: {caption_ids.tolist()}")

    train = render_scenes(f"train-{seed}", train_scenes, image_size)
    heldout = render_scenes("heldout", eval_scenes, image_size)
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
        # A fresh named shape per scene per step: uniform over the scene's shapes.
        pick = (torch.rand(batch_size, generator=gen) * presence[idx].sum(1)).long()
        caps = torch.tensor([train.kinds[i][j] for i, j in zip(idx.tolist(), pick.tolist())])
        image = F.normalize(_features(model.get_image_features(pixel_values=normalise(train.images[idx]))), dim=-1)
        text = F.normalize(_features(model.get_text_features(input_ids=caption_ids[caps])), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * image @ text.T
        loss = soft_clip_loss(logits, presence[idx][:, caps])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"step {step:5d}  loss {loss.item():.4f}  scale {model.logit_scale.exp().item():.1f}  "
                  f"{time.perf_counter() - start:.0f}s", flush=True)
        if eval_every and step % eval_every == eval_every - 1 and step < steps - 1:
            acc = retrieval_accuracy(model, caption_ids, heldout)
            print(f"step {step:5d}  held-out caption->image R@1 {acc['caption_to_image_r1']:.3f}  "
                  f"mAP {acc['caption_to_image_map']:.3f}  image->caption R@1 {acc['image_to_caption_r1']:.3f}",
                  flush=True)
            model.save_pretrained(out, safe_serialization=True)  # a usable snapshot while training goes on
            model.train()

    model.eval()
    accuracy = retrieval_accuracy(model, caption_ids, heldout)
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
