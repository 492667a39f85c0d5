"""open_clip behind the backbone interface: the split reproduces the model, and M2IB runs on it end to end.

open_clip needs a torchvision matching torch, which the main venv's CPU torch lacks; these tests run
in their own venv (.ci/run, section "open_clip adapter") and skip elsewhere.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

open_clip = pytest.importorskip(
    "open_clip",
    reason="open_clip is not installed; run in its own venv: python3 -m venv .venv-openclip && "
    ". .venv-openclip/bin/activate && pip install torch==2.14.1 torchvision==0.29.1 open_clip_torch -e '.[test]'",
)

from conftest import split_run  # noqa: E402

from m2ib_lightning import BackboneLoadError, ConfigError, explain, load_attributions  # noqa: E402
from m2ib_lightning.assets.tiny_models import build_tiny_openclip  # noqa: E402
from m2ib_lightning.backbones.openclip import OpenCLIPBackbone  # noqa: E402
from m2ib_lightning.data import Preprocessor  # noqa: E402
from m2ib_lightning.run.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CAPTIONS = ["a red circle", "a blue square on the right with a small extra phrase", "a green triangle at the top"]
LAYERS = [-1, 0, 1, 2]  # -1: the token embeddings
ATOL = 1e-5


@pytest.fixture(scope="module")
def openclip_dir(tmp_path_factory) -> Path:
    return build_tiny_openclip(tmp_path_factory.mktemp("tiny-openclip"))


@pytest.fixture(scope="module", params=["clip", "custom-text", "bidirectional-last", "seq-first"])
def backbone(request, openclip_dir, tmp_path_factory) -> OpenCLIPBackbone:
    if request.param == "custom-text":
        return OpenCLIPBackbone(str(build_tiny_openclip(tmp_path_factory.mktemp("custom"), custom_text=True)))
    if request.param == "bidirectional-last":
        # SigLIP-style text pooling (no causal mask, last position pooled) in open_clip's "custom"
        # blocks (qk_norm); padding masked per caption, a TextTransformer option its config cannot set.
        text_cfg = {"no_causal_mask": True, "pool_type": "last", "qk_norm": True}
        out = build_tiny_openclip(tmp_path_factory.mktemp("bidirectional"), custom_text=True, text_cfg=text_cfg)
        loaded = OpenCLIPBackbone(str(out))
        loaded.model.text.use_pad_mask = True
        return loaded
    loaded = OpenCLIPBackbone(str(openclip_dir))
    if request.param == "seq-first":
        # Older open_clip runs its blocks sequence-first (L, N, D); the same weights laid out that way.
        for transformer in (loaded.model.visual.transformer, loaded.model.transformer):
            transformer.batch_first = False
            for block in transformer.resblocks:
                block.attn.batch_first = False
    return loaded


@pytest.mark.parametrize("layer", LAYERS)
def test_vision_split_reproduces_encode_image(backbone, images, layer):
    pixels = backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = backbone.model.encode_image(pixels)
        state = backbone.lower("vision", {"pixel_values": pixels}, layer)
        split = split_run(backbone, "vision", {"pixel_values": pixels}, layer, copies=2)
    assert pixels.shape == (3, 3, 64, 64) and backbone.vision_grid(pixels) == (4, 4)
    assert state.hidden.shape == (3, 1 + 16, 32) and state.valid.all()
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)
    torch.testing.assert_close(backbone.embed("vision", {"pixel_values": pixels}), reference, atol=0, rtol=0)


@pytest.mark.parametrize("layer", LAYERS)
def test_text_split_reproduces_encode_text(backbone, layer):
    text = dict(backbone.tokenizer(CAPTIONS, padding=True, truncation=True, max_length=77, return_tensors="pt"))
    # open_clip's own tokenisation, fixed length, plus the mask of start token, caption and end token.
    torch.testing.assert_close(text["input_ids"], open_clip.get_tokenizer(backbone.source)(CAPTIONS))
    assert text["input_ids"].shape == (3, 32)
    assert text["attention_mask"].sum(1).tolist() == [len(c.split()) + 2 for c in CAPTIONS]
    with torch.no_grad():
        reference = backbone.model.encode_text(text["input_ids"])
        state = backbone.lower("text", text, layer)
        split = split_run(backbone, "text", text, layer, copies=2)
    assert state.hidden.shape == (3, 32, 32) and torch.equal(state.valid, text["attention_mask"].bool())
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)


def test_tokenizer_and_tokens(backbone):
    tok = backbone.tokenizer
    assert Preprocessor.from_backbone(backbone).max_length == 32 == tok.model_max_length
    encoded = tok(CAPTIONS[:1], return_tensors="pt")
    assert backbone.tokens(encoded["input_ids"], encoded["attention_mask"].bool()) == [
        ["<start_of_text>", "a", "red", "circle", "<end_of_text>"]]
    # Truncation keeps the end token; the untruncated count is what the data module records.
    long = " ".join(["word"] * 40)
    ids = tok([long], return_tensors="pt")["input_ids"][0]
    assert ids[-1].item() == tok.tokenizer.eot_token_id and (ids != 0).all()
    assert len(tok([long], truncation=False)["input_ids"][0]) == 42








def test_other_checkpoint_formats(tmp_path, openclip_dir, images):
    reference = OpenCLIPBackbone(str(openclip_dir))
    pixels = reference.image_processor(images=images, return_tensors="pt")["pixel_values"]
    expected = reference.embed("vision", {"pixel_values": pixels})
    # A pickle checkpoint, addressed with open_clip's own local-dir: prefix.
    pickled = build_tiny_openclip(tmp_path / "bin", weights="open_clip_pytorch_model.bin")
    from_bin = OpenCLIPBackbone(f"local-dir:{pickled}")
    torch.testing.assert_close(from_bin.embed("vision", {"pixel_values": pixels}), expected, atol=0, rtol=0)
    # A built-in architecture name with a local checkpoint file.
    configs = tmp_path / "configs"
    configs.mkdir()
    model_cfg = json.loads((openclip_dir / "open_clip_config.json").read_text())["model_cfg"]
    (configs / "m2ib-tiny-test.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(configs)
    named = OpenCLIPBackbone("m2ib-tiny-test", pretrained=str(openclip_dir / "open_clip_model.safetensors"))
    torch.testing.assert_close(named.embed("vision", {"pixel_values": pixels}), expected, atol=0, rtol=0)


def test_load_errors_name_the_problem(tmp_path, openclip_dir):
    with pytest.raises(BackboneLoadError, match="does not exist"):
        OpenCLIPBackbone(str(tmp_path / "nope"))
    with pytest.raises(BackboneLoadError, match="no open_clip_config.json"):
        OpenCLIPBackbone(str(tmp_path))
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(openclip_dir / "open_clip_config.json", no_weights)
    with pytest.raises(BackboneLoadError, match="no weights; expected one of open_clip_model.safetensors"):
        OpenCLIPBackbone(str(no_weights))
    with pytest.raises(BackboneLoadError, match=r"hf-hub:nobody/no-such-model.*Offline mode is on"):
        OpenCLIPBackbone("hf-hub:nobody/no-such-model")
    with pytest.raises(BackboneLoadError, match="a hub id needs the prefix: hf-hub:nobody/model"):
        OpenCLIPBackbone("nobody/model")
    with pytest.raises(BackboneLoadError, match="without weights: pass pretrained"):
        OpenCLIPBackbone("ViT-B-32")
    with pytest.raises(BackboneLoadError, match="checkpoint file .* does not exist"):
        OpenCLIPBackbone("ViT-B-32", pretrained=str(tmp_path / "missing.safetensors"))


def test_unsupported_towers_are_refused(tmp_path):
    resnet = tmp_path / "resnet"
    resnet.mkdir()
    model_cfg = {"embed_dim": 16,
                 "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
                 "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (resnet / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    from safetensors.torch import save_file

    model = open_clip.create_model(f"local-dir:{resnet}")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, resnet / "open_clip_model.safetensors")
    with pytest.raises(ConfigError, match="ModifiedResNet image tower"):
        OpenCLIPBackbone(str(resnet))


def test_check_layer(openclip_dir):
    backbone = OpenCLIPBackbone(str(openclip_dir))
    with pytest.raises(ConfigError, match=r"vision bottleneck layer must be an int in \[-1, 2\].*got 3"):
        backbone.lower("vision", {"pixel_values": torch.zeros(1, 3, 64, 64)}, 3)
    with pytest.raises(ConfigError, match=r"text bottleneck layer .* got -2"):
        backbone.check_layer("text", -2)
    with pytest.raises(ConfigError, match="got True"):
        backbone.check_layer("text", True)
    with pytest.raises(ConfigError, match=r"vision bottleneck layer must be an int in \[-1, 2\].*got 5"):
        explain([Image.new("RGB", (64, 64))], ["a red circle"], backbone, vision_layer=5, steps=1, copies=1)


def test_tokenizer_fingerprint_reads_open_clip_tokenizers(backbone, biomed_dir):
    from m2ib_lightning.backbones import tokenizer_fingerprint

    bpe = tokenizer_fingerprint(backbone.tokenizer)  # open_clip's BPE tokenizer (its encoder dict)
    wordpiece = tokenizer_fingerprint(OpenCLIPBackbone(str(biomed_dir)).tokenizer)  # a transformers tokenizer
    assert bpe is not None and wordpiece is not None and bpe["vocab"] != wordpiece["vocab"]
    assert bpe["max_length"] == backbone.context_length


# BiomedCLIP's form: a timm ViT image tower and a Hugging Face BERT text tower with its WordPiece tokenizer.
BIOMED_WORDS = "a red blue green circle square triangle on the right with small extra phrase at top word".split()


def build_tiny_biomedclip(out: Path, pooler: str = "cls_last_hidden_state_pooler", proj: str = "mlp",
                          timm_model: str = "test_vit", context_length: int = 32) -> Path:
    """A tiny random model with BiomedCLIP's open_clip config layout, loadable offline.

    Like the hub repo: ``open_clip_config.json``, weights and the tokenizer files in ``out``; the BERT
    config (BiomedCLIP's ``hf_model_name``) in ``out / "bert"``. timm's ``test_vit`` (64 wide, 6 blocks,
    class token, dynamic image size) stands in for ``vit_base_patch16_224``.
    """
    from safetensors.torch import save_file
    from transformers import BertConfig, BertTokenizer

    bert = out / "bert"
    bert.mkdir(parents=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *BIOMED_WORDS]
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizer(str(bert / "vocab.txt"), model_max_length=64).save_pretrained(out)
    BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, pad_token_id=0).save_pretrained(bert)
    model_cfg = {
        "embed_dim": 16, "custom_text": True,
        "vision_cfg": {"timm_model_name": timm_model, "timm_model_pretrained": False, "timm_pool": "",
                       "timm_proj": "linear", "image_size": 64},
        "text_cfg": {"hf_model_name": str(bert), "hf_tokenizer_name": str(bert), "hf_proj_type": proj,
                     "hf_pooler_type": pooler, "context_length": context_length},
    }
    config = {"model_cfg": model_cfg, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3, "size": 64}}
    (out / "open_clip_config.json").write_text(json.dumps(config, indent=2))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = open_clip.create_model(f"local-dir:{out}", pretrained_hf=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "open_clip_model.safetensors")
    return out


@pytest.fixture(scope="module")
def biomed_dir(tmp_path_factory) -> Path:
    return build_tiny_biomedclip(tmp_path_factory.mktemp("tiny-biomedclip"))


@pytest.fixture(scope="module", params=["cls_last_hidden_state_pooler", "cls_pooler", "mean_pooler"])
def biomed(request, biomed_dir, tmp_path_factory) -> OpenCLIPBackbone:
    if request.param == "cls_last_hidden_state_pooler":  # BiomedCLIP's own config
        return OpenCLIPBackbone(str(biomed_dir))
    out = tmp_path_factory.mktemp(request.param)
    return OpenCLIPBackbone(str(build_tiny_biomedclip(out, pooler=request.param, proj="linear")))


@pytest.mark.parametrize("layer", range(-1, 6))
def test_biomedclip_vision_split_reproduces_encode_image(biomed, images, layer):
    pixels = biomed.image_processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = biomed.model.encode_image(pixels)
        state = biomed.lower("vision", {"pixel_values": pixels}, layer)
        split = split_run(biomed, "vision", {"pixel_values": pixels}, layer, copies=2)
    assert biomed.num_layers == {"vision": 6, "text": 3} and biomed.vision_prefix_tokens == 1
    assert pixels.shape == (3, 3, 64, 64) and biomed.vision_grid(pixels) == (4, 4)
    assert state.hidden.shape == (3, 1 + 16, 64) and state.valid.all()
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)


@pytest.mark.parametrize("layer", range(-1, 3))
def test_biomedclip_text_split_reproduces_encode_text(biomed, layer):
    text = dict(biomed.tokenizer(CAPTIONS, padding=True, truncation=True, max_length=32, return_tensors="pt"))
    # open_clip's own ids, cut to the longest caption; the mask is the BERT tokenizer's.
    hf = biomed.tokenizer.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    full = open_clip.get_tokenizer(biomed.source)(CAPTIONS)
    assert full.shape == (3, 32) and not full[:, 13:].any()
    torch.testing.assert_close(text["input_ids"], full[:, :13])
    torch.testing.assert_close(text["input_ids"], hf["input_ids"])
    torch.testing.assert_close(text["attention_mask"], hf["attention_mask"])
    with torch.no_grad():
        reference = biomed.model.encode_text(text["input_ids"])
        torch.testing.assert_close(biomed.model.encode_text(full), reference, atol=ATOL, rtol=0)
        state = biomed.lower("text", text, layer)
        split = split_run(biomed, "text", text, layer, copies=2)
    assert state.hidden.shape == (3, 13, 32) and torch.equal(state.valid, text["attention_mask"].bool())
    torch.testing.assert_close(split, reference.repeat_interleave(2, dim=0), atol=ATOL, rtol=0)
    torch.testing.assert_close(biomed.embed("text", text), reference, atol=0, rtol=0)


def test_biomedclip_tokenizer_and_tokens(biomed_dir):
    backbone = OpenCLIPBackbone(str(biomed_dir))
    tok = backbone.tokenizer
    assert Preprocessor.from_backbone(backbone).max_length == 32 == tok.model_max_length
    encoded = tok(CAPTIONS[:1], return_tensors="pt")
    assert backbone.tokens(encoded["input_ids"], encoded["attention_mask"].bool()) == [
        ["[CLS]", "a", "red", "circle", "[SEP]"]]
    assert tok(CAPTIONS[:1], padding="max_length", return_tensors="pt")["input_ids"].shape == (1, 32)
    long = " ".join(["word"] * 40)
    ids = tok([long], return_tensors="pt")["input_ids"][0]
    assert ids.shape == (32,) and ids[-1].item() == tok.tokenizer.sep_token_id and (ids != 0).all()
    assert len(tok([long], truncation=False)["input_ids"][0]) == 42
    assert tok(CAPTIONS[:1])["input_ids"] == [[2, 5, 6, 9, 3]]





def test_timm_tower_without_class_token_is_refused(tmp_path):
    # timm's test_vit2: register token, no class token, average pooling
    out = build_tiny_biomedclip(tmp_path / "no-cls", timm_model="test_vit2")
    with pytest.raises(ConfigError, match="timm VisionTransformer image tower .*with a class token"):
        OpenCLIPBackbone(str(out))



# What methods need beyond the split: attention traces, pooling, read-out, randomisation stages.

def text_parts(backbone) -> torch.nn.Module:
    """The module holding the text tower (a CLIP keeps it on the model itself)."""
    return backbone.model if hasattr(backbone.model, "transformer") else backbone.model.text


def reference_probabilities(backbone, side, inputs, layer) -> torch.Tensor:
    """Block ``layer``'s attention probabilities from its own modules' definition, on its input."""
    from m2ib_lightning.backbones.attention import eager_attention

    with torch.no_grad():
        hidden = backbone.lower(side, inputs, layer - 1).hidden
        if side == "vision" and backbone.timm_vision:
            block = backbone.model.visual.trunk.blocks[layer]
            attn, (n, length, _) = block.attn, hidden.shape
            qkv = attn.qkv(block.norm1(hidden)).reshape(n, length, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
            return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(-1)
        ids, text = inputs.get("input_ids"), text_parts(backbone)
        if side == "text" and backbone.hf_text:
            with eager_attention(text.transformer):
                out = text.transformer(input_ids=ids, attention_mask=(ids != text.config.pad_token_id).long(),
                                       output_attentions=True)
            return out.attentions[layer]
        transformer = backbone.model.visual.transformer if side == "vision" else text.transformer
        block, mask = transformer.resblocks[layer], None
        if side == "text" and text.attn_mask is not None:
            mask = text.attn_mask[: ids.shape[1], : ids.shape[1]]
        x = block.ln_1(hidden)
        x = x if getattr(transformer, "batch_first", True) else x.transpose(0, 1)
        return block.attn(x, x, x, need_weights=True, average_attn_weights=False, attn_mask=mask)[1]


def check_adapter_api(backbone, images, captions=CAPTIONS):
    """Traces, pooling, read-out and stages of both towers of ``backbone`` against the model."""
    from m2ib_lightning.methods.baselines import AttentionRollout

    pixels = backbone.image_processor(images=images, return_tensors="pt")["pixel_values"]
    inputs = {"pixel_values": pixels, **backbone.tokenizer(captions, padding=True, return_tensors="pt")}
    traced = []
    for side in ("vision", "text"):
        n = backbone.num_layers[side]
        reason = backbone.attention_unavailable(side)
        if reason is not None:
            with pytest.raises(NotImplementedError, match="cannot trace"):
                backbone.trace_attention(side, inputs)
            continue
        traced.append(side)
        trace = backbone.trace_attention(side, inputs, start_layer=1)
        assert len(trace.probabilities) == len(trace.hidden) == len(trace.attention_inputs) == n - 1
        for i, probs in enumerate(trace.probabilities):
            torch.testing.assert_close(probs, reference_probabilities(backbone, side, inputs, 1 + i), atol=1e-6,
                                       rtol=0)
            torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
            torch.testing.assert_close(trace.hidden[i], backbone.lower(side, inputs, 1 + i).hidden, atol=ATOL,
                                       rtol=0)
        embedding = backbone.embed(side, inputs)
        torch.testing.assert_close(trace.embedding, embedding, atol=ATOL, rtol=0)
        grads = torch.autograd.grad(trace.embedding.square().sum(), trace.probabilities, retain_graph=True)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
        # Queries, keys, values and attention outputs: each output is its head's probabilities times values.
        assert len(trace.queries) == len(trace.keys) == len(trace.values) == len(trace.outputs) == n - 1
        for probs, q, k, v, o in zip(trace.probabilities, trace.queries, trace.keys, trace.values, trace.outputs):
            heads = probs.shape[1]
            assert q.shape == k.shape == v.shape == o.shape and q.shape[:2] == (probs.shape[0], probs.shape[2])
            scores = (split(q, heads) @ split(k, heads).transpose(-1, -2)) * (q.shape[-1] // heads) ** -0.5
            torch.testing.assert_close(scores.masked_fill(probs == 0, -torch.inf).softmax(-1), probs, atol=1e-6,
                                       rtol=0)
            torch.testing.assert_close(o, (probs @ split(v, heads)).transpose(1, 2).flatten(2), atol=ATOL, rtol=0)
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(trace.embedding.square().sum(), trace.outputs))
        reason = backbone.pooled_attention_unavailable(side)
        if reason is None:
            att = backbone.pooled_attention(side, inputs)
            torch.testing.assert_close(att.embedding, embedding, atol=ATOL, rtol=0)
            (grad,) = torch.autograd.grad(att.embedding.square().sum(), att.output)
            rows = torch.arange(len(images))
            assert torch.equal(att.row, backbone.pool_positions(side, inputs)) and grad[rows, att.row].abs().sum() > 0
            grad[rows, att.row] = 0
            assert grad.abs().max() == 0  # only the pooled query's row reaches the embedding
        else:
            assert "pools no single token" in reason
        torch.testing.assert_close(trace.readout.sum(1), torch.ones(len(images)), atol=1e-6, rtol=0)
        try:
            positions = backbone.pool_positions(side, inputs)
        except NotImplementedError:  # mean pooling: no single token
            assert trace.readout.amax(1).max() < 1
        else:
            assert torch.equal(trace.readout.argmax(1), positions) and (trace.readout.amax(1) == 1).all()
            # The pooled token alone decides the embedding: move every other token and nothing changes.
            with torch.no_grad():
                state = backbone.lower(side, inputs, n - 1)
                keep = torch.nn.functional.one_hot(positions, state.hidden.shape[1]).bool().unsqueeze(-1)
                moved = torch.where(keep, state.hidden, state.hidden + 1)
                torch.testing.assert_close(backbone.pooled_readout(side, moved, state), embedding, atol=ATOL, rtol=0)
        # The randomisation stages hold every parameter of the tower exactly once.
        stages = backbone.randomization_stages(side)
        assert [name for name, _ in stages] == ["projection", *(f"block {i}" for i in reversed(range(n))),
                                                "embeddings"]
        staged = [id(p) for _, modules in stages for m in modules for p in m.parameters()]
        if side == "vision":
            tower = {id(p) for p in backbone.model.visual.parameters()}
        elif text_parts(backbone) is backbone.model:
            image = {id(p) for p in backbone.model.visual.parameters()}
            tower = {id(p) for name, p in backbone.model.named_parameters()
                     if id(p) not in image and not name.startswith("logit_")}
        else:
            tower = {id(p) for p in text_parts(backbone).parameters()}
        assert len(staged) == len(set(staged)) and set(staged) == tower
    from m2ib_lightning.methods.baselines import GradECLIP, LeGrad

    pooled = [side for side in traced if backbone.pooled_attention_unavailable(side) is None]
    for method, sides in ((AttentionRollout, traced), (LeGrad, traced), (GradECLIP, pooled)):
        out = method(backbone, sides=sides).explain_batch({"ids": list("abc"), **inputs})
        assert all(torch.isfinite(t).all() for t in (out.image_maps, out.patch_scores) if t is not None)
        assert all(torch.isfinite(t).all() for t in out.text_scores or [])
    return traced


def split(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``(B, L, H * d)`` -> ``(B, H, L, d)``."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def test_adapter_api(backbone, images, request):
    traced = check_adapter_api(backbone, images)
    custom_text = "bidirectional-last" in request.node.callspec.id
    assert traced == (["vision"] if custom_text else ["vision", "text"])
    if custom_text:
        assert "CustomResidualAttentionBlock" in backbone.attention_unavailable("text")
        with pytest.raises(ConfigError, match="needs an adapter with attention probabilities for the text tower"):
            from m2ib_lightning.methods.baselines import AttentionRollout

            AttentionRollout(backbone)
    text = backbone.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    positions = backbone.pool_positions("text", text) if not custom_text else None
    if positions is not None:  # open_clip's argmax pooling: the end-of-text token
        assert (text["input_ids"].gather(1, positions[:, None]) == backbone.tokenizer.tokenizer.eot_token_id).all()
    assert backbone.max_text_length == backbone.context_length == 32


def test_biomedclip_adapter_api(biomed, images):
    assert check_adapter_api(biomed, images) == ["vision", "text"]
    text = biomed.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    if type(biomed.model.text.pooler).__name__ == "MeanPooler":
        with pytest.raises(NotImplementedError, match="no single token"):
            biomed.pool_positions("text", text)
    else:
        assert biomed.pool_positions("text", text).tolist() == [0, 0, 0]  # [CLS]


# (model directory fixture, vision layer, text layer, first token, last token)
MODELS = {
    "openclip": ("openclip_dir", 1, 1, "<start_of_text>", "<end_of_text>"),
    "biomedclip": ("biomed_dir", 3, 1, "[CLS]", "[SEP]"),
}


@pytest.mark.parametrize("name", MODELS)
def test_m2ib_through_the_api(request, images, name):
    fixture, vision_layer, text_layer, first, last = MODELS[name]
    backbone = OpenCLIPBackbone(str(request.getfixturevalue(fixture)))
    records = explain(images[:2], CAPTIONS[:2], backbone, vision_layer=vision_layer, text_layer=text_layer,
                      steps=2, copies=2)
    for rec, caption in zip(records, CAPTIONS):
        assert rec.image_map.shape == (64, 64) and rec.patch_scores.shape == (4, 4)
        assert rec.image_map.min() == 0 and rec.image_map.max() == 1
        assert rec.tokens == [first, *caption.split(), last]
        assert len(rec.text_scores) == len(rec.tokens)
        assert 0 <= rec.text_scores.min() and rec.text_scores.max() <= 1
    assert all(p.grad is None and not p.requires_grad for p in backbone.parameters())


@pytest.mark.parametrize("name", MODELS)
def test_from_the_cli(request, tmp_path, pairs_dir, name):
    fixture, vision_layer, text_layer, first, last = MODELS[name]
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone", "m2ib_lightning.backbones.openclip.OpenCLIPBackbone",
        "--model.init_args.backbone.init_args.model", str(request.getfixturevalue(fixture)),
        "--model.init_args.vision_layer", str(vision_layer), "--model.init_args.text_layer", str(text_layer),
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "1",
    ])
    records = load_attributions(tmp_path / "attributions")
    ids = [json.loads(line)["id"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    assert sorted(records.keys()) == sorted(ids) and not records.skipped
    rec = next(iter(records.values()))
    assert rec.patch_scores.shape == (4, 4) and rec.tokens[0] == first and rec.tokens[-1] == last
    assert list((tmp_path / "attributions" / "overlays").glob("*.png"))
