"""The split backbone against the unsplit transformers model, freezing, and load errors."""

from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import torch
from conftest import split_run
from PIL import Image

from m2ib_lightning import BackboneLoadError, CLIPBackbone

CAPTIONS = [
    "a red circle",
    "a blue square on the right with a small extra phrase",
    "a green triangle at the top",
]
LAYERS = [-1, 0, 1, 2]  # the tiny CLIP has 3 blocks per tower; -1: the token embeddings
ATOL = 1e-5


def features(out) -> torch.Tensor:
    # transformers >= 5: a ModelOutput whose pooler_output is the projected embedding.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def eager_backbone(tiny_clip_dir):
    return CLIPBackbone(str(tiny_clip_dir), attn_implementation="eager")


@pytest.fixture(params=["sdpa", "eager"])
def any_backbone(request, backbone, eager_backbone):
    return backbone if request.param == "sdpa" else eager_backbone


@pytest.fixture(scope="module")
def pixels(pairs_dir, backbone):
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:3]
    images = [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]
    return backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def text(backbone):
    batch = backbone.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # the batch really is padded
    return dict(batch)


def alone(backbone, caption: str) -> dict[str, torch.Tensor]:
    return dict(backbone.tokenizer(caption, return_tensors="pt"))


@pytest.mark.parametrize("layer", LAYERS)
def test_vision_split_reproduces_image_features(any_backbone, pixels, layer):
    with torch.no_grad():
        reference = features(any_backbone.model.get_image_features(pixel_values=pixels))
        split = split_run(any_backbone, "vision", {"pixel_values": pixels}, layer)
        repeated = split_run(any_backbone, "vision", {"pixel_values": pixels}, layer, copies=3)
    assert split.shape == reference.shape == (3, any_backbone.model.config.projection_dim)
    torch.testing.assert_close(split, reference, atol=ATOL, rtol=0)
    torch.testing.assert_close(repeated, reference.repeat_interleave(3, dim=0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", LAYERS)
def test_text_split_reproduces_text_features_of_each_caption_alone(any_backbone, text, layer):
    with torch.no_grad():
        reference = torch.cat(
            [features(any_backbone.model.get_text_features(**alone(any_backbone, c))) for c in CAPTIONS]
        )
        split = split_run(any_backbone, "text", text, layer)
        repeated = split_run(any_backbone, "text", text, layer, copies=4)
    torch.testing.assert_close(split, reference, atol=ATOL, rtol=0)
    assert repeated.shape == (len(CAPTIONS) * 4, reference.shape[1])
    torch.testing.assert_close(repeated, reference.repeat_interleave(4, dim=0), atol=ATOL, rtol=0)


def test_upper_uses_the_hidden_it_is_given(backbone, text, pixels):
    # upper must read the (bottlenecked) hidden argument, not state.hidden.
    for side, inputs in (("text", text), ("vision", {"pixel_values": pixels})):
        state = backbone.prepare_upper(side, backbone.lower(side, inputs, 1), 1)
        with torch.no_grad():
            clean = backbone.upper(side, state.hidden, state, 1)
            noisy = backbone.upper(side, state.hidden + torch.randn_like(state.hidden), state, 1)
        assert not torch.allclose(clean, noisy, atol=1e-3)


def test_repeat_is_interleaved_and_drops_context(backbone, text):
    state = backbone.prepare_upper("text", backbone.lower("text", text, 0), 0)
    assert "mask" in state.context
    rep = state.repeat(2)
    assert rep.context == {}
    assert rep.hidden.shape[0] == rep.valid.shape[0] == 2 * state.hidden.shape[0]
    torch.testing.assert_close(rep.hidden[2], state.hidden[1])
    torch.testing.assert_close(rep.hidden[3], state.hidden[1])
    assert torch.equal(rep.extras["pool"], state.extras["pool"].repeat_interleave(2))
    assert torch.equal(rep.extras["attention_mask"][4], state.extras["attention_mask"][2])


@pytest.mark.parametrize("layer", LAYERS)
def test_lower_equals_hidden_states(any_backbone, pixels, text, layer):
    model = any_backbone.model
    with torch.no_grad():
        vision = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states
        state = any_backbone.lower("vision", {"pixel_values": pixels}, layer)
        torch.testing.assert_close(state.hidden, vision[layer + 1], atol=ATOL, rtol=0)
        assert state.valid.shape == state.hidden.shape[:2] and state.valid.all()

        txt = model.text_model(**text, output_hidden_states=True).hidden_states
        state = any_backbone.lower("text", text, layer)
    valid = text["attention_mask"].bool()
    torch.testing.assert_close(state.hidden[valid], txt[layer + 1][valid], atol=ATOL, rtol=0)
    assert torch.equal(state.valid, valid)
    assert len(vision) == len(txt) == len(LAYERS)  # embeddings + 3 blocks


def test_embed_equals_get_features(backbone, pixels, text):
    model = backbone.model
    with torch.no_grad():
        torch.testing.assert_close(
            backbone.embed("vision", {"pixel_values": pixels}),
            features(model.get_image_features(pixel_values=pixels)),
        )
        per_caption = torch.cat([features(model.get_text_features(**alone(backbone, c))) for c in CAPTIONS])
        torch.testing.assert_close(backbone.embed("text", text), per_caption, atol=ATOL, rtol=0)


def test_backbone_is_frozen_and_stays_in_eval_mode(backbone):
    params = list(backbone.parameters())
    assert params and not any(p.requires_grad for p in params)
    assert backbone.train() is backbone
    assert not backbone.training
    assert not any(m.training for m in backbone.modules())
    # A parent's train() cannot switch it on either.
    parent = torch.nn.Sequential(backbone)
    parent.train()
    assert parent.training and not any(m.training for m in backbone.modules())


def test_vision_grid(backbone, pixels):
    assert backbone.vision_grid(pixels) == (4, 4)  # 64 px / 16 px patches
    assert backbone.lower("vision", {"pixel_values": pixels}, 0).hidden.shape[1] == 1 + 4 * 4


@pytest.mark.parametrize(
    "side, layer, message",
    [
        ("vision", 3, r"vision bottleneck layer must be an int in \[-1, 2\].*got 3"),
        ("text", -2, r"text bottleneck layer must be an int in \[-1, 2\].*got -2"),
        ("text", 1.0, r"text bottleneck layer must be an int in \[-1, 2\].*got 1\.0"),
        ("vision", "1", r"vision bottleneck layer must be an int in \[-1, 2\].*got '1'"),
    ],
)
def test_check_layer_names_range_and_value(backbone, side, layer, message):
    with pytest.raises(ValueError, match=message):
        backbone.check_layer(side, layer)
    with pytest.raises(ValueError, match=message):
        inputs = {"pixel_values": torch.zeros(1, 3, 64, 64), "input_ids": torch.ones(1, 3).long()}
        backbone.lower(side, inputs, layer)


def test_embeddings_layer_is_opt_in_for_adapters():
    # An adapter that has not declared it handles -1 is not handed it (blocks[-1] is the LAST block).
    from m2ib_lightning.backbones import BackboneAdapter

    class Indexing(BackboneAdapter):
        num_layers = {"vision": 3, "text": 3}

    with pytest.raises(ValueError, match=r"text bottleneck layer must be an int in \[0, 2\] for .*got -1"):
        Indexing().check_layer("text", -1)
    Indexing.embeddings_layer = True
    Indexing().check_layer("text", -1)


def test_tokens_are_the_valid_positions_only(backbone, text):
    tokens = backbone.tokens(text["input_ids"], text["attention_mask"])
    for row, caption, mask in zip(tokens, CAPTIONS, text["attention_mask"]):
        ids = alone(backbone, caption)["input_ids"][0].tolist()
        assert row == backbone.tokenizer.convert_ids_to_tokens(ids)
        assert len(row) == int(mask.sum())
        assert row[0] == backbone.tokenizer.bos_token and row[-1] == backbone.tokenizer.eos_token
    assert len(tokens[1]) > len(tokens[0])


def test_missing_local_directory_is_named(tmp_path, monkeypatch):
    missing = tmp_path / "nope"
    with pytest.raises(BackboneLoadError, match="nope.*does not exist"):
        CLIPBackbone(str(missing))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(BackboneLoadError, match="./does/not/exist"):
        CLIPBackbone("./does/not/exist")


def test_directory_without_config_is_named(tmp_path, tiny_clip_dir):
    broken = tmp_path / "no-config"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "config.json").unlink()
    with pytest.raises(BackboneLoadError, match="no-config.*config.json"):
        CLIPBackbone(str(broken))


def test_directory_without_weights_is_a_load_error(tmp_path, tiny_clip_dir):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_clip_dir, broken)
    (broken / "model.safetensors").unlink()
    with pytest.raises(BackboneLoadError, match="local directory .*no-weights"):
        CLIPBackbone(str(broken))


def test_hub_id_offline_fails_fast_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    attempts = []

    def no_connect(sock, address):
        attempts.append(address)
        raise OSError(f"test forbids network access (to {address!r})")

    monkeypatch.setattr(socket.socket, "connect", no_connect)
    start = time.monotonic()
    # An empty cache_dir: the answer must not depend on what this machine has cached.
    with pytest.raises(BackboneLoadError) as info:
        CLIPBackbone("openai/clip-vit-base-patch32", cache_dir=str(tmp_path / "cache"))
    assert time.monotonic() - start < 10
    assert attempts == []
    message = str(info.value)
    assert "openai/clip-vit-base-patch32" in message
    # transformers' own text says "offline mode" too; the adapter's hint names the setting that is on.
    assert "Offline mode is on (HF_HUB_OFFLINE" in message


@pytest.mark.parametrize("layer", [0, 1])
def test_fast_upper_blocks_equal_transformers_blocks_with_gradients(tiny_clip_dir, text, pixels, layer):
    # prune_last_block runs the top block for the pooled token only; values and input gradients
    # must be those of the full blocks, for noisy (bottlenecked) hidden states and padded text.
    full = CLIPBackbone(str(tiny_clip_dir), prune_last_block=False, fold_activation=False)
    pruned = CLIPBackbone(str(tiny_clip_dir))  # also folds quick GELU into silu (exact function)
    assert pruned.prune_last_block and not full.prune_last_block
    assert pruned.fold_activation and not full.fold_activation
    for side, inputs in (("vision", {"pixel_values": pixels}), ("text", text)):
        state = pruned.prepare_upper(side, pruned.lower(side, inputs, layer).repeat(2), layer)
        noisy = (state.hidden + torch.randn_like(state.hidden)).requires_grad_()
        weights = torch.randn(state.hidden.shape[0], pruned.model.config.projection_dim)
        outs, grads = [], []
        for bb in (pruned, full):
            out = bb.upper(side, noisy, state, layer)
            (grad,) = torch.autograd.grad((out * weights).sum(), noisy)
            outs.append(out)
            grads.append(grad)
        torch.testing.assert_close(outs[0], outs[1], atol=ATOL, rtol=0)
        torch.testing.assert_close(grads[0], grads[1], atol=ATOL, rtol=0)
