"""Baselines: the output contract, agreement with direct computations on the full model, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2ib_lightning import Preprocessor, load_attributions
from m2ib_lightning.methods.baselines import (
    RISE,
    AttentionRollout,
    GradCAM,
    GradECLIP,
    GradientSaliency,
    LeGrad,
    RandomMap,
    drop_tokens,
)
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
LAYER = 1
BASELINES = {
    "RandomMap": (RandomMap, {}),
    "GradientSaliency": (GradientSaliency, {}),  # text gradients at the token embeddings (default -1)
    "GradCAM": (GradCAM, {"vision_layer": LAYER, "text_layer": LAYER}),
    "AttentionRollout": (AttentionRollout, {}),
    "LeGrad": (LeGrad, {}),
    "GradECLIP": (GradECLIP, {}),
    "RISE": (RISE, {"masks": 64, "text_masks": 32, "chunk": 64}),
}


def make_batch(backbone, pairs_dir, n=3, longer=True, only=None):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    images = [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]
    captions = [r["caption"] for r in rows]
    if longer:  # captions of different lengths: padding is exercised
        captions[-1] += " with a small extra phrase"
    if only is not None:  # one sample, tokenised (and padded) on its own
        rows, images, captions = rows[only : only + 1], images[only : only + 1], captions[only : only + 1]
    return {"ids": [r["id"] for r in rows], **Preprocessor.from_backbone(backbone)(images, captions)}


@pytest.mark.parametrize("name", BASELINES)
def test_output_contract(backbone, pairs_dir, name):
    cls, kwargs = BASELINES[name]
    batch = make_batch(backbone, pairs_dir)
    out = cls(backbone, **kwargs).explain_batch(batch)
    b, _, h, w = batch["pixel_values"].shape
    assert out.ids == batch["ids"] and out.similarity.shape == (b,)
    maps = out.image_maps
    assert maps.shape == (b, h, w) and maps.min() >= 0 and maps.max() <= 1
    assert torch.isfinite(maps).all() and (maps.amax((1, 2)) == 1).all()
    assert tuple(out.grid) == (4, 4) and out.patch_scores.shape == (b, 16)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert [len(s) for s in out.text_scores] == lengths == [len(t) for t in out.tokens]
    for s in out.text_scores:
        assert torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1
    assert not list(cls(backbone, **kwargs).parameters())  # nothing to train


@pytest.mark.parametrize("name", BASELINES)
def test_maps_do_not_depend_on_the_batch(backbone, pairs_dir, name):
    cls, kwargs = BASELINES[name]
    module = cls(backbone, **kwargs)
    # The last caption is longer: in the batch the others are padded further than on their own.
    full = module.explain_batch(make_batch(backbone, pairs_dir, n=3))
    alone = module.explain_batch(make_batch(backbone, pairs_dir, n=3, only=1))
    assert len(alone.tokens[0]) == len(full.tokens[1])
    torch.testing.assert_close(alone.image_maps[0], full.image_maps[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(alone.text_scores[0], full.text_scores[1], atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", ["RandomMap", "RISE"])
def test_seeded_methods_change_with_seed(backbone, pairs_dir, name):
    cls, kwargs = BASELINES[name]
    batch = make_batch(backbone, pairs_dir, n=2)
    a = cls(backbone, seed=0, **kwargs).explain_batch(batch)
    b = cls(backbone, seed=0, **kwargs).explain_batch(batch)
    c = cls(backbone, seed=1, **kwargs).explain_batch(batch)
    torch.testing.assert_close(a.image_maps, b.image_maps)
    assert not torch.allclose(a.image_maps, c.image_maps)


@pytest.mark.parametrize("side", ["vision", "text"])
def test_one_side_only(backbone, pairs_dir, side):
    batch = make_batch(backbone, pairs_dir, n=2)
    for cls, kwargs in BASELINES.values():
        out = cls(backbone, sides=[side], **kwargs).explain_batch(batch)
        assert (out.image_maps is not None) == (side == "vision") and (out.text_scores is not None) == (side == "text")


def test_gradient_saliency_equals_autograd_through_the_full_model(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir, n=2)
    out = GradientSaliency(backbone, sides=["vision"]).explain_batch(batch)
    model = backbone.model
    pixels = batch["pixel_values"].clone().requires_grad_(True)
    with torch.no_grad():
        text = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    s = F.cosine_similarity(model.get_image_features(pixel_values=pixels).pooler_output, text).sum()
    (grad,) = torch.autograd.grad(s, pixels)
    raw = grad.abs().amax(1)
    lo, hi = raw.amin((1, 2), keepdim=True), raw.amax((1, 2), keepdim=True)
    torch.testing.assert_close(out.image_maps, (raw - lo) / (hi - lo), atol=1e-5, rtol=0)


def test_gradient_saliency_text_is_the_gradient_at_the_token_embeddings(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir, n=3)  # padded: the last caption is longer
    module = GradientSaliency(backbone, sides=["text"])
    assert module.text_layer == -1  # the default
    out = module.explain_batch(batch)
    model = backbone.model
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
    held = {}

    def leaf(mod, args, output):  # the embeddings' output becomes a leaf to differentiate by
        held["h"] = output.detach().requires_grad_(True)
        return held["h"]

    handle = model.text_model.embeddings.register_forward_hook(leaf)
    try:
        text = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
        (grad,) = torch.autograd.grad(F.cosine_similarity(text, image).sum(), held["h"])
    finally:
        handle.remove()
    for i, scores in enumerate(out.text_scores):
        raw = grad[i, : int(batch["attention_mask"][i].sum())].norm(dim=-1)
        torch.testing.assert_close(scores, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5, rtol=0)


def test_rollout_starts_at_a_block(backbone):
    with pytest.raises(ValueError, match=r"layer must be an int in \[0, 2\].*got -1"):
        AttentionRollout(backbone, start_layer=-1)


def test_gradcam_equals_hooked_full_model(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir, n=2)
    out = GradCAM(backbone, vision_layer=LAYER, sides=["vision"]).explain_batch(batch)
    model = backbone.model
    with torch.no_grad():
        text = model.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    kept = {}

    def keep_output(module, args, output):
        kept["h"] = output.detach().requires_grad_(True)
        return kept["h"]

    handle = model.vision_model.encoder.layers[LAYER].register_forward_hook(keep_output)
    try:
        s = F.cosine_similarity(model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output, text).sum()
    finally:
        handle.remove()
    (grad,) = torch.autograd.grad(s, kept["h"])
    # Channel weights: the gradient's mean over the PATCH tokens (the CLS token is left out).
    cam = F.relu((grad[:, 1:].mean(1, keepdim=True) * kept["h"]).sum(-1))[:, 1:]
    torch.testing.assert_close(out.patch_scores, cam.detach(), atol=1e-5, rtol=1e-4)


def test_rollout_of_the_last_block_is_its_weighted_attention(tiny_clip_dir, backbone, pairs_dir):
    from transformers import CLIPModel

    batch = make_batch(backbone, pairs_dir, n=2)
    last = backbone.num_layers["vision"] - 1
    out = AttentionRollout(backbone, start_layer=last, sides=["vision"]).explain_batch(batch)
    # R = I + mean_h relu(dA * A) of the last block: the CLS row's patch entries are that term.
    eager = CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        text = eager.get_text_features(input_ids=batch["input_ids"],
                                       attention_mask=batch["attention_mask"]).pooler_output
    res = eager.get_image_features(pixel_values=batch["pixel_values"], output_attentions=True)
    attn = res.attentions[last]
    s = F.cosine_similarity(res.pooler_output, text).sum()
    (grad,) = torch.autograd.grad(s, attn)
    expected = (grad * attn).clamp_min(0).mean(1)[:, 0, 1:]
    torch.testing.assert_close(out.patch_scores, expected.detach(), atol=1e-6, rtol=1e-4)
    # and the backbone is back on its own attention implementation
    assert backbone.model.config.vision_config._attn_implementation != "eager"


def eager_clip(tiny_clip_dir):
    from transformers import CLIPModel

    return CLIPModel.from_pretrained(tiny_clip_dir, attn_implementation="eager").eval()


@pytest.mark.parametrize("readout", ["pooled", "mean"])
def test_legrad_is_each_layers_readout_gradient_wrt_the_models_own_attention(tiny_clip_dir, backbone, pairs_dir,
                                                                             readout):
    """Autograd of each layer's read-out similarity w.r.t. transformers' eager attention probabilities."""
    batch = make_batch(backbone, pairs_dir, n=3)  # padded captions: the text side's masks are exercised
    out = LeGrad(backbone, readout=readout).explain_batch(batch)
    model = eager_clip(tiny_clip_dir)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
    vision = model.vision_model(pixel_values=batch["pixel_values"], output_attentions=True, output_hidden_states=True)
    words = model.text_model(input_ids=ids, attention_mask=mask, output_attentions=True, output_hidden_states=True)
    rows = torch.arange(ids.shape[0])
    eos = (ids == model.config.text_config.eos_token_id).int().argmax(-1)
    ones = torch.ones(ids.shape[0], vision.attentions[0].shape[-1])

    def pooled(h, position, valid):  # the pooled token, or the mean of the valid tokens
        return h[rows, position] if readout == "pooled" else (h * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)

    sides = [(vision, lambda h: model.visual_projection(model.vision_model.post_layernorm(pooled(h, 0, ones))), text,
              ones),
             (words, lambda h: model.text_projection(model.text_model.final_layer_norm(pooled(h, eos, mask))), image,
              mask.float())]
    expected = []
    for res, read, target, valid in sides:
        layers = []
        for i, attn in enumerate(res.attentions):
            s = F.cosine_similarity(read(res.hidden_states[i + 1]), target).sum()
            (grad,) = torch.autograd.grad(s, attn, retain_graph=True)
            signal = (grad.clamp_min(0) * (attn > 0)).mean(1)  # heads; masked entries left out
            layers.append((signal * valid[:, :, None]).sum(1) / valid.sum(1, keepdim=True))  # valid query rows
        expected.append(torch.stack(layers).mean(0))
    torch.testing.assert_close(out.patch_scores, expected[0][:, 1:].detach(), atol=1e-7, rtol=1e-4)
    for i, scores in enumerate(out.text_scores):
        raw = expected[1][i, : int(mask[i].sum())].detach()
        torch.testing.assert_close(scores, (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5, rtol=0)


def test_grad_eclip_equals_a_hand_written_last_block(tiny_clip_dir, backbone, pairs_dir):
    """Each tower's last block written out from its modules; the channel weights are autograd's at its
    attention output, the spatial weights the min-max normalised query-key cosine of each head over the
    keys the pooled token attends (image: the patches; text: the caption up to EOS, causal mask)."""
    batch = make_batch(backbone, pairs_dir, n=3)  # padded captions
    out = GradECLIP(backbone).explain_batch(batch)
    model = eager_clip(tiny_clip_dir)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        text = model.get_text_features(input_ids=ids, attention_mask=mask).pooler_output
        image = model.get_image_features(pixel_values=batch["pixel_values"]).pooler_output
        vision = model.vision_model(pixel_values=batch["pixel_values"], output_hidden_states=True).hidden_states[-2]
        words = model.text_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-2]
    b, length = ids.shape
    rows, eos = torch.arange(b), (ids == model.config.text_config.eos_token_id).int().argmax(-1)
    causal = torch.ones(length, length).tril().bool() & mask.bool()[:, None, :]  # (B, L, L): query i, key j
    towers = {
        "vision": (model.vision_model, vision, None, torch.zeros(b, dtype=torch.long), image, text,
                   lambda h: model.visual_projection(model.vision_model.post_layernorm(h))),
        "text": (model.text_model, words, causal, eos, text, image,
                 lambda h: model.text_projection(model.text_model.final_layer_norm(h))),
    }
    for side, (tower, hidden, allowed, pool, clean, target, project) in towers.items():
        block = tower.encoder.layers[-1]
        attention = block.self_attn
        n = hidden.shape[1]
        heads, dim = attention.num_heads, attention.head_dim
        x = block.layer_norm1(hidden)

        def split(t):
            return t.view(b, n, heads, dim).transpose(1, 2)

        q, k, v = split(attention.q_proj(x)), split(attention.k_proj(x)), split(attention.v_proj(x))
        scores = (q @ k.transpose(-1, -2)) * attention.scale
        if allowed is not None:
            scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        o = scores.softmax(-1) @ v  # (B, H, L, d)
        after = hidden + attention.out_proj(o.transpose(1, 2).reshape(b, n, heads * dim))
        after = after + block.mlp(block.layer_norm2(after))
        embedding = project(after[rows, pool])
        torch.testing.assert_close(embedding, clean, atol=1e-5, rtol=0)
        (grad,) = torch.autograd.grad(F.cosine_similarity(embedding, target).sum(), o)
        weights = grad[rows, :, pool].unsqueeze(2)  # the pooled row: (B, H, 1, d)
        cosine = F.cosine_similarity(q[rows, :, pool].unsqueeze(2), k, dim=-1)  # (B, H, L)
        keys = torch.ones(b, n, dtype=torch.bool) if allowed is None else allowed[rows, pool]
        if side == "vision":
            keys[:, 0] = False  # the CLS key: not reported, not in the normalisation
        keys = keys[:, None].expand_as(cosine)
        low = cosine.masked_fill(~keys, 9).amin(-1, keepdim=True)
        high = cosine.masked_fill(~keys, -9).amax(-1, keepdim=True)
        loose = (cosine - low) / (high - low) * keys
        expected = F.relu((loose * (weights * v).sum(-1)).sum(1)).detach()
        if side == "vision":
            torch.testing.assert_close(out.patch_scores, expected[:, 1:], atol=1e-6, rtol=1e-4)
            continue
        for i, got in enumerate(out.text_scores):
            raw = expected[i, : int(mask[i].sum())]
            torch.testing.assert_close(got, (raw - raw.min()) / (raw.max() - raw.min()).clamp_min(1e-30),
                                       atol=1e-5, rtol=0)


def test_attention_methods_refuse_towers_the_adapter_cannot_trace():
    from m2ib_lightning.backbones import BackboneAdapter

    class NoAttention(BackboneAdapter):
        num_layers = {"vision": 2, "text": 2}

    with pytest.raises(ValueError, match="LeGrad needs an adapter that traces the attention of the vision tower: "
                                         "NoAttention does not expose"):
        LeGrad(NoAttention())
    with pytest.raises(ValueError, match="GradECLIP needs the attention that forms the pooled token of the text "
                                         "tower: NoAttention does not expose"):
        GradECLIP(NoAttention(), sides=["text"])


def test_rise_map_is_the_mask_weighted_mean_similarity(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir, n=1)
    rise = RISE(backbone, masks=16, chunk=5, sides=["vision"])
    out = rise.explain_batch(batch)
    pixels = batch["pixel_values"]
    masks = rise.image_masks(tuple(pixels.shape[-2:]), 0, 16, pixels.device)
    assert masks.min() >= 0 and masks.max() <= 1
    with torch.no_grad():
        text = backbone.embed("text", batch)
        s = F.cosine_similarity(backbone.embed("vision", {"pixel_values": pixels * masks.unsqueeze(1)}), text)
    raw = (s.view(-1, 1, 1) * masks).sum(0) / (16 * 0.5)
    torch.testing.assert_close(out.image_maps[0], (raw - raw.min()) / (raw.max() - raw.min()), atol=1e-5, rtol=0)


def test_text_helpers(backbone):
    tok = backbone.tokenizer
    bos, eos, red = tok.bos_token_id, tok.eos_token_id, tok.convert_tokens_to_ids("red</w>")
    ids = torch.tensor([[bos, red, red, eos, eos], [bos, red, eos, eos, eos]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    content = ~backbone.special_tokens(ids, mask)
    assert content.tolist() == [[False, True, True, False, False], [False, True, False, False, False]]
    assert drop_tokens(ids, ~content).tolist() == [[bos, 0, 0, eos, eos], [bos, 0, eos, eos, eos]]


def test_special_tokens_follow_the_tokenizer_not_the_positions(tmp_path, pairs_dir):
    """SigLIP has no start token: its first word is a word (the text metric and RISE perturb it)."""
    from m2ib_lightning import SigLIPBackbone
    from m2ib_lightning.assets.tiny_models import build_tiny_siglip
    from m2ib_lightning.evaluation import keep_above_median

    siglip = SigLIPBackbone(str(build_tiny_siglip(tmp_path / "siglip", captions=["red circle left"])))
    text = siglip.tokenizer(["red circle left"], return_tensors="pt")
    special = siglip.special_tokens(text["input_ids"], text["attention_mask"])
    assert special[0, :4].tolist() == [False, False, False, True] and special[0, 4:].all()  # words, </s>, pads
    keep = keep_above_median([torch.tensor([0.9, 0.1, 0.5, 0.2])], text["attention_mask"], special)
    assert keep[0, :4].tolist() == [True, False, False, True]  # median of 0.9 0.1 0.5 is 0.5


def test_rollout_rejects_backbones_without_attention_probabilities(backbone):
    from m2ib_lightning.backbones import BackboneAdapter

    class NoAttention(BackboneAdapter):
        num_layers = {"vision": 2, "text": 2}

    with pytest.raises(ValueError, match="AttentionRollout needs an adapter with attention probabilities for the "
                                         "vision tower: NoAttention does not expose"):
        AttentionRollout(NoAttention())


@pytest.mark.parametrize("name", BASELINES)
def test_cli_fit_with_each_baseline(tmp_path, tiny_clip_dir, pairs_dir, name):
    cls, kwargs = BASELINES[name]
    model_args = []
    for key, value in kwargs.items():
        model_args += [f"--model.init_args.{key}", str(value)]
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.class_path", f"m2ib_lightning.methods.baselines.{name}",
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir), *model_args,
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--data.init_args.limit", "4", "--trainer.default_root_dir", str(tmp_path),
    ])
    records = load_attributions(tmp_path / "attributions")
    assert len(records) == 4
    for rec in records.values():
        assert rec.image_map.shape == (64, 64) and rec.patch_scores.shape == (4, 4)
        assert len(rec.text_scores) == len(rec.tokens)
