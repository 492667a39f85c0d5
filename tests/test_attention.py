"""What adapters expose for methods (attention traces, pooling, read-out, randomisation stages, text length),
checked against transformers' own computations for CLIP and SigLIP. open_clip's are in test_openclip.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from m2ib_lightning import CLIPBackbone, Preprocessor, SigLIPBackbone
from m2ib_lightning.assets.tiny_models import build_tiny_siglip
from m2ib_lightning.backbones import BackboneAdapter

CAPTIONS = ["a red circle", "a blue square on the right with a small extra phrase", "a green triangle at the top"]
ATOL = 1e-5


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory, pairs_dir):
    captions = [json.loads(line)["caption"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    return build_tiny_siglip(tmp_path_factory.mktemp("tiny-siglip"), captions=[*captions, *CAPTIONS])


@pytest.fixture(scope="module", params=["clip-sdpa", "clip-eager", "siglip-attend", "siglip-mask"])
def adapter(request, tiny_clip_dir, siglip_dir) -> BackboneAdapter:
    kind, variant = request.param.split("-")
    if kind == "clip":
        return CLIPBackbone(str(tiny_clip_dir), attn_implementation=variant)
    return SigLIPBackbone(str(siglip_dir), attend_to_padding=variant == "attend")


@pytest.fixture(scope="module")
def inputs(adapter, images) -> dict[str, torch.Tensor]:
    batch = Preprocessor.from_backbone(adapter)(images, CAPTIONS)
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max()  # padded
    return batch


def tower_call(adapter, side, inputs):
    """The model's own tower forward, eager attention, returning attentions and hidden states."""
    from transformers import CLIPModel, SiglipModel

    cls = CLIPModel if isinstance(adapter, CLIPBackbone) else SiglipModel
    model = cls.from_pretrained(adapter.source, attn_implementation="eager").eval()
    if side == "vision":
        return model, model.vision_model(pixel_values=inputs["pixel_values"], output_attentions=True,
                                         output_hidden_states=True)
    attn = inputs["attention_mask"]
    if isinstance(adapter, SigLIPBackbone) and adapter.attend_to_padding:
        attn = None
    return model, model.text_model(input_ids=inputs["input_ids"], attention_mask=attn, output_attentions=True,
                                   output_hidden_states=True)


@pytest.mark.parametrize("side", ["vision", "text"])
@pytest.mark.parametrize("start", [0, 2])
def test_trace_matches_the_models_eager_attention_and_hidden_states(adapter, inputs, side, start):
    configs = [m.config for m in adapter.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    before = [c._attn_implementation for c in configs]
    trace = adapter.trace_attention(side, inputs, start_layer=start)
    assert [c._attn_implementation for c in configs] == before  # restored after the eager pass
    model, out = tower_call(adapter, side, inputs)
    n = adapter.num_layers[side]
    assert len(trace.probabilities) == len(trace.hidden) == len(trace.attention_inputs) == n - start
    for i, probs in enumerate(trace.probabilities):
        assert probs.requires_grad and probs.shape == out.attentions[start + i].shape
        torch.testing.assert_close(probs, out.attentions[start + i], atol=1e-6, rtol=0)
        torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
        torch.testing.assert_close(trace.hidden[i], out.hidden_states[start + i + 1], atol=ATOL, rtol=0)
    # The attention reads the block's first norm of the block input (pre-norm blocks).
    tower = model.vision_model if side == "vision" else model.text_model
    norm = tower.encoder.layers[n - 1].layer_norm1
    torch.testing.assert_close(trace.attention_inputs[-1], norm(out.hidden_states[n - 1]), atol=ATOL, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(trace.embedding, adapter.embed(side, inputs), atol=ATOL, rtol=0)


def heads(t: torch.Tensor, h: int) -> torch.Tensor:
    """``(B, n, H * d)`` -> ``(B, H, n, d)``."""
    return t.view(t.shape[0], t.shape[1], h, -1).transpose(1, 2)


@pytest.mark.parametrize("side", ["vision", "text"])
def test_trace_records_queries_keys_values_and_the_attention_output(adapter, inputs, side):
    """The projections of the model's own modules, and the attention output the block goes on with."""
    trace = adapter.trace_attention(side, inputs, start_layer=1)
    model, out = tower_call(adapter, side, inputs)
    tower = model.vision_model if side == "vision" else model.text_model
    n = adapter.num_layers[side]
    assert len(trace.queries) == len(trace.keys) == len(trace.values) == len(trace.outputs) == n - 1
    for i in range(n - 1):
        block, before = tower.encoder.layers[1 + i], out.hidden_states[1 + i]
        attention, x = block.self_attn, block.layer_norm1(before)
        with torch.no_grad():
            for got, projection in ((trace.queries[i], attention.q_proj), (trace.keys[i], attention.k_proj),
                                    (trace.values[i], attention.v_proj)):
                torch.testing.assert_close(got, projection(x), atol=ATOL, rtol=0)
            # per head: the probabilities times the values, heads concatenated ...
            h = trace.probabilities[i].shape[1]
            expected = (trace.probabilities[i] @ heads(trace.values[i], h)).transpose(1, 2).flatten(2)
            torch.testing.assert_close(trace.outputs[i], expected, atol=ATOL, rtol=0)
            # ... and the rest of the block, from it, gives the block's output
            middle = before + attention.out_proj(trace.outputs[i])
            torch.testing.assert_close(middle + block.mlp(block.layer_norm2(middle)), trace.hidden[i], atol=ATOL,
                                       rtol=0)
    grads = torch.autograd.grad(trace.embedding.square().sum(), trace.outputs)
    assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("side", ["vision", "text"])
def test_pooled_attention(adapter, inputs, side):
    """Grad-ECLIP's input: the attention that forms the pooled token, in the embedding's graph."""
    with torch.no_grad():  # gradients are on inside, whatever the caller's mode
        att = adapter.pooled_attention(side, inputs)
        embedding = adapter.embed(side, inputs)
    torch.testing.assert_close(att.embedding, embedding, atol=ATOL, rtol=0)
    b, rows = embedding.shape[0], torch.arange(embedding.shape[0])
    probs = att.probabilities[rows, :, att.row]  # (B, H, L)
    assert probs.shape[1] == att.heads and att.keys.shape == att.values.shape
    assert att.keys.shape[:2] == (b, probs.shape[-1])
    torch.testing.assert_close(probs.sum(-1), torch.ones_like(probs.sum(-1)), atol=1e-5, rtol=0)
    pooled = (probs.unsqueeze(2) @ heads(att.values, att.heads)).squeeze(2).flatten(1)
    torch.testing.assert_close(att.output[rows, att.row], pooled, atol=ATOL, rtol=0)
    (grad,) = torch.autograd.grad(att.embedding.square().sum(), att.output)
    assert grad[rows, att.row].abs().sum() > 0
    grad[rows, att.row] = 0
    assert grad.abs().max() == 0  # only the pooled query's row reaches the embedding
    if isinstance(adapter, SigLIPBackbone) and side == "vision":
        # The pooling head's own attention, its probe as the one query, over the final norm of the last block.
        tower = adapter.model.vision_model
        head = tower.head
        with torch.no_grad():
            x = tower.post_layernorm(adapter.lower(side, inputs, adapter.num_layers[side] - 1).hidden)
            out, weights = head.attention(head.probe.repeat(b, 1, 1), x, x, need_weights=True,
                                          average_attn_weights=False)
            torch.testing.assert_close(head.attention.out_proj(att.output), out, atol=ATOL, rtol=0)
        torch.testing.assert_close(att.probabilities, weights, atol=1e-6, rtol=0)
        assert att.row.tolist() == [0] * b and att.queries.shape[1] == 1
    else:
        assert torch.equal(att.row, adapter.pool_positions(side, inputs))


@pytest.mark.parametrize("side", ["vision", "text"])
def test_gradients_reach_every_attention_map_and_each_layers_readout_its_own(adapter, inputs, side):
    target = torch.randn(inputs["input_ids"].shape[0], adapter.embed(side, inputs).shape[-1])
    with torch.no_grad():  # the trace builds its graph whatever the caller's mode
        embedding, probs = adapter.attention_probabilities(side, inputs)
    grads = torch.autograd.grad(F.cosine_similarity(embedding, target).sum(), probs)
    for g in grads:
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    # LeGrad's per-layer read-out: layer 0's read-out depends on block 0's attention, not on block 1's.
    trace = adapter.trace_attention(side, inputs)
    s0 = F.cosine_similarity(adapter.pooled_readout(side, trace.hidden[0], trace.state), target).sum()
    g0, g1 = torch.autograd.grad(s0, trace.probabilities[:2], allow_unused=True)
    assert g0.abs().sum() > 0 and g1 is None


@pytest.mark.parametrize("side", ["vision", "text"])
def test_pooled_readout_and_readout_weights(adapter, inputs, side):
    last = adapter.num_layers[side] - 1
    with torch.no_grad():
        state = adapter.lower(side, inputs, last)
        torch.testing.assert_close(adapter.pooled_readout(side, state.hidden, state), adapter.embed(side, inputs),
                                   atol=ATOL, rtol=0)
        weights = adapter.readout_weights(side, state.hidden, state)
    assert weights.shape == state.hidden.shape[:2] and (weights >= 0).all()
    torch.testing.assert_close(weights.sum(1), torch.ones(weights.shape[0]), atol=1e-6, rtol=0)
    if isinstance(adapter, SigLIPBackbone) and side == "vision":
        # The pooling head's probe attention, from its definition, averaged over the heads.
        head, tower = adapter.model.vision_model.head, adapter.model.vision_model
        mha = head.attention
        w_q, w_k, _ = mha.in_proj_weight.chunk(3)
        b_q, b_k, _ = mha.in_proj_bias.chunk(3)
        with torch.no_grad():
            x = tower.post_layernorm(state.hidden)
            q = F.linear(head.probe, w_q, b_q).view(1, mha.num_heads, 1, -1)
            k = F.linear(x, w_k, b_k).view(x.shape[0], x.shape[1], mha.num_heads, -1).transpose(1, 2)
            expected = ((q @ k.transpose(-1, -2)) * k.shape[-1] ** -0.5).softmax(-1).mean(1)[:, 0]
        torch.testing.assert_close(weights, expected, atol=1e-6, rtol=0)
    else:
        positions = adapter.pool_positions(side, inputs)
        assert torch.equal(weights.argmax(1), positions) and (weights.amax(1) == 1).all()


def test_pool_positions_match_the_models_pooling(adapter, inputs, monkeypatch):
    _, out = tower_call(adapter, "text", inputs)
    positions = adapter.pool_positions("text", inputs)
    rows = torch.arange(positions.shape[0])
    if isinstance(adapter, CLIPBackbone):
        # CLIPTextModel pools last_hidden_state (after the final norm) at its pooled token.
        torch.testing.assert_close(out.last_hidden_state[rows, positions], out.pooler_output, atol=0, rtol=0)
        assert adapter.pool_positions("vision", inputs).tolist() == [0] * len(CAPTIONS)
        assert (positions < inputs["attention_mask"].sum(1)).all()  # the first EOS, not a pad
        monkeypatch.setattr(adapter, "eos_token_id", 2)  # legacy configs: argmax of the ids
        assert torch.equal(adapter.pool_positions("text", inputs), inputs["input_ids"].argmax(-1))
    else:
        head = adapter.model.text_model.head
        with torch.no_grad():
            torch.testing.assert_close(head(out.last_hidden_state[rows, positions]), out.pooler_output,
                                       atol=0, rtol=0)
        assert (positions == inputs["input_ids"].shape[1] - 1).all()
        with pytest.raises(NotImplementedError, match="attention-pooling head"):
            adapter.pool_positions("vision", inputs)


def test_max_text_length(adapter, tiny_clip_dir, siglip_dir):
    tok, config = adapter.tokenizer, adapter.model.config.text_config
    expected = min(v for v in (tok.model_max_length, config.max_position_embeddings) if v < 100_000)
    assert adapter.max_text_length == expected == Preprocessor.from_backbone(adapter).max_length
    assert SigLIPBackbone(str(siglip_dir), text_length=8).max_text_length == 8

    class Bare(BackboneAdapter):  # the preprocessor reads nothing else of the backbone
        tokenizer, image_processor, text_positions = adapter.tokenizer, adapter.image_processor, 5

    assert Preprocessor.from_backbone(Bare()).max_length == 5


@pytest.mark.parametrize("side", ["vision", "text"])
def test_randomization_stages_cover_the_tower_exactly_once(adapter, side):
    stages = adapter.randomization_stages(side)
    n = adapter.num_layers[side]
    assert [name for name, _ in stages] == ["projection", *(f"block {i}" for i in reversed(range(n))), "embeddings"]
    staged = [p for _, modules in stages for m in modules for p in m.parameters()]
    assert len({id(p) for p in staged}) == len(staged)  # no parameter twice
    model = adapter.model
    prefixes = {"vision": ("vision_model.", "visual_projection."), "text": ("text_model.", "text_projection.")}[side]
    tower = {id(p) for name, p in model.named_parameters() if name.startswith(prefixes)}
    assert {id(p) for p in staged} == tower


def test_trace_needs_an_adapter_that_implements_it():
    class Bare(BackboneAdapter):
        num_layers = {"vision": 2, "text": 2}

    with pytest.raises(NotImplementedError, match="Bare does not expose its attention probabilities"):
        Bare().attention_probabilities("vision", {"pixel_values": torch.zeros(1, 3, 8, 8)})
    for call in (lambda b: b.pool_positions("text", {}), lambda b: b.randomization_stages()):
        with pytest.raises(NotImplementedError, match="Bare"):
            call(Bare())

