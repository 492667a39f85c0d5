"""SigLIP behind the backbone interface: the split reproduces the model, and M2IB runs on it end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import split_run

from m2ib_lightning import BackboneLoadError, ConfigError, SigLIPBackbone, explain, load_attributions
from m2ib_lightning.assets.tiny_models import build_tiny_siglip
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square on the right with a small extra phrase", "a green triangle at the top"]
LAYERS = [-1, 0, 1, 2]  # -1: the token embeddings
ATOL = 1e-5


def features(out) -> torch.Tensor:
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, pairs_dir) -> Path:
    captions = [json.loads(line)["caption"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"), captions=[*captions, *CAPTIONS])


@pytest.fixture(scope="module", params=[True, False], ids=["attend-padding", "mask-padding"])
def siglip(request, siglip_dir) -> SigLIPBackbone:
    return SigLIPBackbone(str(siglip_dir), attend_to_padding=request.param)


@pytest.mark.parametrize("layer", LAYERS)
def test_vision_split_reproduces_image_features(siglip, images, layer):
    pixels = siglip.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = features(siglip.model.get_image_features(pixel_values=pixels))
        split = split_run(siglip, "vision", {"pixel_values": pixels}, layer, copies=2)
    assert siglip.vision_prefix_tokens == 0 and siglip.vision_grid(pixels) == (4, 4)
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", LAYERS)
def test_text_split_reproduces_text_features(siglip, layer):
    text = dict(siglip.tokenizer(CAPTIONS, padding=True, return_tensors="pt"))
    # Always padded to the fixed length SigLIP pools at, whatever padding the caller asked for.
    assert text["input_ids"].shape[1] == siglip.model.config.text_config.max_position_embeddings
    lengths = text["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()
    attn = None if siglip.attend_to_padding else text["attention_mask"]
    with torch.no_grad():
        reference = features(siglip.model.get_text_features(input_ids=text["input_ids"], attention_mask=attn))
        split = split_run(siglip, "text", text, layer, copies=2)
        alone = features(siglip.model.get_text_features(**{
            k: v for k, v in siglip.tokenizer(CAPTIONS[0], return_tensors="pt").items()
            if k == "input_ids" or not siglip.attend_to_padding}))
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)
    # A caption's embedding does not depend on the other captions of its batch.
    torch.testing.assert_close(reference[0], alone[0], atol=ATOL, rtol=0)


def test_bottleneck_covers_every_position_the_upper_blocks_read(siglip):
    """Closing the mask on the positions the bottleneck covers (``valid``) and leaving the rest open,
    as an optimiser would if they cost nothing, removes the caption from the text embedding: no
    position carries it around the bottleneck. That needs the pads covered: attended or not, the
    pooled last position is a pad that has read the caption below the bottleneck."""
    from m2ib_lightning.methods.bottlenecks import M2IB

    text = dict(siglip.tokenizer(["a red circle", "a green triangle"], return_tensors="pt"))  # same length
    with torch.no_grad():
        state = siglip.lower("text", text, 0)
        alpha = torch.where(state.valid, -30.0, 5.0).unsqueeze(-1).expand_as(state.hidden)
        noise = torch.randn(1, 1, *state.hidden.shape[1:], generator=torch.Generator().manual_seed(0))
        z = M2IB().compress(state.hidden, alpha, noise.expand(2, -1, -1, -1) * state.valid[:, None, :, None])
        emb = siglip.upper("text", z, siglip.prepare_upper("text", state, 0), 0)
    assert bool(state.valid.all())
    torch.testing.assert_close(emb[0], emb[1], atol=1e-5, rtol=0)


def test_truncated_captions_are_reported(siglip_dir):
    from m2ib_lightning.data import Preprocessor

    pre = Preprocessor.from_backbone(SigLIPBackbone(str(siglip_dir), text_length=8))
    captions = [CAPTIONS[0], CAPTIONS[1]]  # 4 and 12 tokens with EOS
    assert pre.max_length == 8
    text = pre.tokenizer(captions, padding=True, truncation=True, max_length=pre.max_length, return_tensors="pt")
    kept = text["attention_mask"].sum(1).tolist()
    assert kept == [4, 8]
    assert pre.untruncated_lengths(captions, kept) == [4, 12]


def test_m2ib_on_siglip_through_the_api(siglip_dir, images):
    backbone = SigLIPBackbone(str(siglip_dir))
    records = explain(images[:2], CAPTIONS[:2], backbone, vision_layer=1, text_layer=1, steps=2, copies=2)
    for rec, caption in zip(records, CAPTIONS):
        assert rec.image_map.shape == (64, 64) and rec.patch_scores.shape == (4, 4)
        assert rec.image_map.min() == 0 and rec.image_map.max() == 1
        # SigLIP: no BOS, EOS appended; the pads are not part of the text map.
        assert rec.tokens == [*caption.split(), "</s>"] and len(rec.text_scores) == len(rec.tokens)
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())



@pytest.mark.parametrize("method", ["AttentionRollout", "LeGrad", "GradECLIP"])
def test_attention_methods_run_on_siglip(siglip, images, method):
    """Rollout, LeGrad and Grad-ECLIP through the adapter API. Rollout: the text relevance is the pooled
    last position's row, the image relevance the rows the attention-pooling head reads (SigLIP has no CLS
    token); LeGrad reads each layer out through that head; Grad-ECLIP weighs the head's attention."""
    from m2ib_lightning.data import Preprocessor
    from m2ib_lightning.methods import baselines

    batch = {"ids": ["a", "b", "c"], **Preprocessor.from_backbone(siglip)(images, CAPTIONS)}
    module = getattr(baselines, method)(siglip)
    out = module.explain_batch(batch)
    assert out.image_maps.shape == (3, 64, 64) and out.patch_scores.shape == (3, 16)
    maps = out.image_maps
    assert torch.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    varies = out.patch_scores.amax(1) > out.patch_scores.amin(1)  # a random tiny model's ReLU may zero all
    assert varies.any() or method == "GradECLIP"
    assert (maps.amax((1, 2))[varies] == 1).all()
    lengths = batch["attention_mask"].sum(1).tolist()
    assert [len(s) for s in out.text_scores] == lengths == [len(t) for t in out.tokens]
    assert all(torch.isfinite(s).all() and s.min() >= 0 and s.max() <= 1 for s in out.text_scores)
    assert any(s.max() == 1 for s in out.text_scores)
    # SigLIP pads every caption to the same length: a caption's scores do not depend on its batch.
    alone = module.explain_batch({"ids": ["b"], **Preprocessor.from_backbone(siglip)(images[1:2], CAPTIONS[1:2])})
    torch.testing.assert_close(alone.text_scores[0], out.text_scores[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.image_maps[0], out.image_maps[1], atol=1e-5, rtol=0)


def test_siglip_from_the_cli(tmp_path, siglip_dir, pairs_dir):
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone", "m2ib_lightning.SigLIPBackbone",
        "--model.init_args.backbone.init_args.model", str(siglip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "1",
    ])
    records = load_attributions(tmp_path / "attributions")
    assert len(records) == 6 and not records.skipped
    rec = next(iter(records.values()))
    assert rec.patch_scores.shape == (4, 4) and rec.tokens[-1] == "</s>"


def test_load_errors_name_the_problem(tmp_path, siglip_dir):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        SigLIPBackbone(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"text_length must be an int in \[2, 16\].*got 99"):
        SigLIPBackbone(str(siglip_dir), text_length=99)


def test_tokenizer_fingerprint_sees_through_the_fixed_length_wrapper(siglip_dir):
    from m2ib_lightning.backbones import tokenizer_fingerprint

    backbone = SigLIPBackbone(str(siglip_dir))
    first = tokenizer_fingerprint(backbone.tokenizer)
    assert first is not None and first["max_length"] == 16  # the fixed text length (max_position_embeddings)
    backbone.tokenizer.tokenizer.add_tokens(["zzqq"])
    assert tokenizer_fingerprint(backbone.tokenizer)["vocab"] != first["vocab"]
