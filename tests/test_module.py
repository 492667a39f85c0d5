"""The batched module against a straightforward per-pair, per-side reference loop, and its invariances."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2ib_lightning import M2IB, M2IBAttribution, Preprocessor
from m2ib_lightning.methods.noise import sample_keys, standard_normal

STEPS, COPIES, BETA, LAYER = 6, 4, 0.1, 1


def load_pairs(pairs_dir, n=None):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    images = [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]
    return [r["id"] for r in rows], images, [r["caption"] for r in rows]


def make_batch(backbone, ids, images, captions):
    return {"ids": list(ids), **Preprocessor.from_backbone(backbone)(list(images), list(captions))}


def make_module(backbone, **kwargs):
    defaults = dict(vision_layer=LAYER, text_layer=LAYER, steps=STEPS, copies=COPIES, seed=3)
    return M2IBAttribution(backbone, **{**defaults, **kwargs})


def reference_map(model, side, pixel_values, input_ids, sample_id, seed, layer=LAYER):
    """One pair, one side, written from the spec: the full model every step, a hook at the layer,
    K copies, Adam with lr 1, the map from the capacity of the last forward pass. ``layer=-1``
    hooks the module that makes the input of block 0 (``hidden_states[0]``)."""
    tower = model.vision_model if side == "vision" else model.text_model
    with torch.no_grad():
        if side == "vision":
            hidden = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            target = model.get_text_features(input_ids=input_ids).pooler_output
        else:
            hidden = model.text_model(input_ids=input_ids, output_hidden_states=True).hidden_states
            target = model.get_image_features(pixel_values=pixel_values).pooler_output
    r = hidden[layer + 1][0]
    alpha = torch.nn.Parameter(torch.full_like(r, 5.0))
    opt = torch.optim.Adam([alpha], lr=1.0)
    key = sample_keys(seed, side, [sample_id])  # the same noise function, one sample at a time
    z_holder = {}
    if layer >= 0:
        hooked = tower.encoder.layers[layer]
    else:
        hooked = tower.pre_layrnorm if side == "vision" else tower.embeddings
    handle = hooked.register_forward_hook(lambda mod, args, out: z_holder["z"])
    try:
        for step in range(STEPS):
            eps = standard_normal(key, step, (1, COPIES, *r.shape))[0]
            lam = torch.sigmoid(alpha)
            z_holder["z"] = lam * r + (1 - lam) * eps
            if side == "vision":
                emb = model.get_image_features(pixel_values=pixel_values.repeat(COPIES, 1, 1, 1)).pooler_output
            else:
                emb = model.get_text_features(input_ids=input_ids.repeat(COPIES, 1)).pooler_output
            cos = F.cosine_similarity(emb, target, eps=1e-6).mean()
            kl = -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * r) ** 2 - (1 - lam) ** 2)
            loss = BETA * kl.mean() - cos
            capacity = kl.detach()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        handle.remove()
    scores = torch.nansum(capacity, dim=-1)
    if side == "text":
        return (scores - scores.min()) / (scores.max() - scores.min())
    patches = scores[1:]
    g = int(patches.numel() ** 0.5)
    up = F.interpolate(patches.view(1, 1, g, g), size=pixel_values.shape[-2:], mode="bilinear", align_corners=False)
    up = up[0, 0]
    return (up - up.min()) / (up.max() - up.min())


def test_trainable_parameters_are_exactly_the_masks(backbone):
    module = make_module(backbone)
    names = {n for n, p in module.named_parameters() if p.requires_grad}
    assert names == {"alpha.vision", "alpha.text"}
    assert all(not p.requires_grad for p in backbone.parameters())
    assert not any(k.startswith("backbone") for k in module.state_dict())


def test_batched_maps_equal_per_pair_reference_loop(backbone, pairs_dir):
    # Captions of different lengths in one batch, so text padding is exercised.
    ids, images, captions = load_pairs(pairs_dir, n=3)
    captions[1] = captions[1] + " with a small extra phrase at the end"
    batch = make_batch(backbone, ids, images, captions)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()
    out = make_module(backbone).explain_batch(batch)

    tok = backbone.tokenizer
    for i, sample_id in enumerate(ids):
        pixels = batch["pixel_values"][i : i + 1]
        input_ids = tok(captions[i], return_tensors="pt")["input_ids"]  # alone: no padding at all
        ref_image = reference_map(backbone.model, "vision", pixels, input_ids, sample_id, seed=3)
        ref_text = reference_map(backbone.model, "text", pixels, input_ids, sample_id, seed=3)
        torch.testing.assert_close(out.image_maps[i], ref_image, atol=2e-4, rtol=0)
        torch.testing.assert_close(out.text_scores[i], ref_text, atol=2e-4, rtol=0)
        assert out.tokens[i] == tok.convert_ids_to_tokens(input_ids[0].tolist())


def test_maps_at_the_token_embeddings_equal_reference_loop(backbone, pairs_dir):
    # layer -1: the bottleneck replaces hidden_states[0], the input of block 0, and every block runs in the loop.
    ids, images, captions = load_pairs(pairs_dir, n=2)
    batch = make_batch(backbone, ids, images, captions)
    out = make_module(backbone, vision_layer=-1, text_layer=-1).explain_batch(batch)
    other = make_module(backbone).explain_batch(batch)
    for i, sample_id in enumerate(ids):
        pixels = batch["pixel_values"][i : i + 1]
        input_ids = backbone.tokenizer(captions[i], return_tensors="pt")["input_ids"]
        ref_image = reference_map(backbone.model, "vision", pixels, input_ids, sample_id, seed=3, layer=-1)
        ref_text = reference_map(backbone.model, "text", pixels, input_ids, sample_id, seed=3, layer=-1)
        torch.testing.assert_close(out.image_maps[i], ref_image, atol=2e-4, rtol=0)
        torch.testing.assert_close(out.text_scores[i], ref_text, atol=2e-4, rtol=0)
        # ... and it is another problem than the default layer's: the maps differ.
        assert (out.text_scores[i] - other.text_scores[i]).abs().max() > 1e-2


def test_maps_do_not_depend_on_batch_position(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=4)
    module = make_module(backbone)
    full = module.explain_batch(make_batch(backbone, ids, images, captions))
    order = [2, 0, 3, 1]
    shuffled = module.explain_batch(make_batch(backbone, [ids[j] for j in order], [images[j] for j in order],
                                               [captions[j] for j in order]))
    for i in range(4):
        alone = module.explain_batch(make_batch(backbone, ids[i : i + 1], images[i : i + 1], captions[i : i + 1]))
        pos = order.index(i)
        for other, j in ((alone, 0), (shuffled, pos)):
            torch.testing.assert_close(other.image_maps[j], full.image_maps[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(other.text_scores[j], full.text_scores[i], atol=1e-5, rtol=0)
            torch.testing.assert_close(other.similarity[j], full.similarity[i], atol=1e-6, rtol=0)


def test_maps_depend_on_seed_and_are_normalised(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=2)
    batch = make_batch(backbone, ids, images, captions)
    a = make_module(backbone, seed=0).explain_batch(batch)
    b = make_module(backbone, seed=0).explain_batch(batch)
    c = make_module(backbone, seed=1).explain_batch(batch)
    torch.testing.assert_close(a.image_maps, b.image_maps)
    assert not torch.allclose(a.image_maps, c.image_maps)
    maps = a.image_maps
    assert maps.shape == (2, *batch["pixel_values"].shape[-2:])
    assert torch.allclose(maps.amin((1, 2)), torch.zeros(2)) and torch.allclose(maps.amax((1, 2)), torch.ones(2))
    for scores, tokens in zip(a.text_scores, a.tokens):
        assert len(scores) == len(tokens) and scores.min() == 0 and scores.max() == 1


def test_one_side_only(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=2)
    batch = make_batch(backbone, ids, images, captions)
    both = make_module(backbone).explain_batch(batch)
    vision = make_module(backbone, sides=["vision"]).explain_batch(batch)
    text = make_module(backbone, sides=["text"]).explain_batch(batch)
    assert vision.text_scores is None and text.image_maps is None
    # The sides are independent problems: explaining one alone gives the same map.
    torch.testing.assert_close(vision.image_maps, both.image_maps, atol=1e-5, rtol=0)
    for t, b in zip(text.text_scores, both.text_scores):
        torch.testing.assert_close(t, b, atol=1e-5, rtol=0)


def test_masks_move_away_from_init(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=1)
    module = make_module(backbone)
    module.explain_batch(make_batch(backbone, ids, images, captions))
    alpha = module.alpha["vision"].detach()
    assert alpha.shape == (1, 17, 32)
    assert (alpha != 5.0).float().mean() > 0.9


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"vision_layer": 3}, r"vision bottleneck layer must be an int in \[-1, 2\].*got 3"),
        ({"text_layer": -2}, r"text bottleneck layer must be an int in \[-1, 2\] \(-1: the token embeddings.*got -2"),
        ({"steps": 0}, r"steps must be an int >= 1, got 0"),
        ({"copies": 0}, r"copies must be an int >= 1, got 0"),
        ({"sides": ["audio"]}, r"sides must be a non-empty subset"),
    ],
)
def test_bad_arguments_are_clear_errors(backbone, kwargs, message):
    with pytest.raises(ValueError, match=message):
        make_module(backbone, **kwargs)


def test_bottleneck_rejects_bad_beta():
    with pytest.raises(ValueError, match="beta must be >= 0, got -1"):
        M2IB(beta=-1)


def test_injected_optimizer_is_used_and_reset_per_batch(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=2)
    batch = make_batch(backbone, ids, images, captions)
    frozen = make_module(backbone, optimizer=lambda params: torch.optim.SGD(params, lr=0.0))
    frozen.explain_batch(batch)
    assert torch.all(frozen.alpha["vision"] == 5.0) and torch.all(frozen.alpha["text"] == 5.0)
    # Adam state from one batch must not leak into the next: a repeat gives the same maps.
    module = make_module(backbone)
    first = module.explain_batch(batch)
    module.explain_batch(make_batch(backbone, ids[::-1], images[::-1], captions[::-1]))
    again = module.explain_batch(batch)
    torch.testing.assert_close(first.image_maps, again.image_maps)
