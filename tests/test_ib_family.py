"""The IB family beyond the reference: smoothing, scale-free capacity, several layers; what each promises."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import torch

from m2ib_lightning import (
    M2IB,
    ConfigError,
    JointM2IB,
    M2IBAttribution,
    MultiLayerM2IB,
    NIBAttribution,
    PerTokenM2IB,
    ScaledM2IB,
    SmoothM2IB,
)
from m2ib_lightning.methods.bottlenecks import TokenLayout
from m2ib_lightning.methods.bottlenecks.smooth import gaussian_matrix

ROOT = Path(__file__).resolve().parents[1]


def load(pairs_dir, n):
    from PIL import Image

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    return [r["id"] for r in rows], [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows], \
        [r["caption"] for r in rows]


def batch_of(backbone, ids, images, captions):
    from m2ib_lightning import Preprocessor

    return {"ids": list(ids), **Preprocessor.from_backbone(backbone)(list(images), list(captions))}


def small(**kwargs):
    return {"steps": 3, "copies": 2, "seed": 1, **kwargs}


# name -> (module class, its options): every shipped variant, at the options a run would use.
FAMILY = {
    "smooth": (M2IBAttribution, lambda: {"vision_bottleneck": SmoothM2IB(), "text_bottleneck": SmoothM2IB()}),
    "scaled": (M2IBAttribution, lambda: {"vision_bottleneck": ScaledM2IB(), "text_bottleneck": ScaledM2IB()}),
    "multilayer": (MultiLayerM2IB, lambda: {"vision_layers": [-1, 1], "text_layers": [-1, 0],
                                            "vision_bottleneck": SmoothM2IB()}),
    "joint": (JointM2IB, lambda: {"vision_layers": [-1, 1], "text_layers": [-1, 0],
                                  "vision_bottleneck": ScaledM2IB(), "text_bottleneck": ScaledM2IB()}),
}


@pytest.mark.parametrize("name", list(FAMILY))
def test_a_samples_map_is_the_same_alone_and_in_a_batch(name, backbone, pairs_dir):
    cls, options = FAMILY[name]
    ids, images, captions = load(pairs_dir, 4)
    captions[2] += " and a much longer caption than the others"  # padding in the text batch
    layers = {} if cls in (MultiLayerM2IB, JointM2IB) else {"vision_layer": 1, "text_layer": -1}
    module = cls(backbone, **small(**layers, **options()))
    full = module.explain_batch(batch_of(backbone, ids, images, captions))
    order = [2, 0, 3, 1]
    shuffled = module.explain_batch(batch_of(backbone, [ids[j] for j in order], [images[j] for j in order],
                                             [captions[j] for j in order]))
    for i in range(4):
        alone = module.explain_batch(batch_of(backbone, ids[i : i + 1], images[i : i + 1], captions[i : i + 1]))
        for other, j in ((alone, 0), (shuffled, order.index(i))):
            # Equal to float rounding, which two things magnify at isolated elements: Adam's first
            # steps (lr * g / |g|: a gradient near 0 may change sign with the batch's matmul order)
            # and the min-max read-out where a map's range is small (a random tiny CLIP after 3
            # steps gives nearly flat maps). So: tight on average, loose at the worst pixel.
            # Anything that read another sample (a batch statistic, padding) moves whole maps.
            # Where a map's range is 1e-4 of its values (JointM2IB's on this model), the raw scores
            # are what can be compared.
            # One patch of a 4x4 grid moved by 5e-3 after the read-out is a mean of 3e-4 over the
            # upsampled map (seen with MultiLayerM2IB, one element of 16): the mean bound allows that.
            def close(a, b):
                return bool((a - b).abs().mean() < 1e-3 and (a - b).abs().max() < 2e-2)

            raw_a, raw_b = other.patch_scores[j], full.patch_scores[i]
            assert (raw_a - raw_b).abs().max() <= 1e-6 * raw_b.abs().max() or close(other.image_maps[j],
                                                                                    full.image_maps[i])
            assert close(other.text_scores[j], full.text_scores[i])


@pytest.mark.parametrize("cls", [SmoothM2IB, ScaledM2IB, MultiLayerM2IB, JointM2IB, NIBAttribution])
def test_every_variant_is_built_with_defaults_alone(cls, backbone):
    """The label-free selection builds each variant with its defaults: nothing may be required."""
    required = [p.name for p in inspect.signature(cls).parameters.values()
                if p.default is inspect.Parameter.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
                and p.name != "backbone"]
    assert not required
    if cls in (MultiLayerM2IB, JointM2IB):
        cls(backbone)
    elif cls is NIBAttribution:
        cls(backbone, vision_layer=0, text_layer=0)
    else:
        M2IBAttribution(backbone, vision_layer=0, text_layer=0, vision_bottleneck=cls(), text_bottleneck=cls())


# ------------------------------------------------------------------------------------- smoothing
def test_gaussian_matrix_rows_sum_to_one_and_blur_symmetrically():
    m = gaussian_matrix(7, 1.0)
    torch.testing.assert_close(m.sum(1), torch.ones(7))
    assert m[3, 2] == m[3, 4] and m[3, 3] > m[3, 2] > m[3, 1] > 0
    assert m[0, 0] > m[3, 3]  # the edge keeps the weight of the offsets beyond it


def test_smoothing_blurs_patches_only_and_keeps_the_gates_complementary():
    b = SmoothM2IB(sigma=1.0)
    b.set_layout(TokenLayout("vision", prefix_tokens=1, grid=(4, 4)))
    alpha = torch.full((2, 17, 3), 5.0)
    alpha[:, 0] = -3.0  # CLS dropped: must stay as it is
    alpha[:, 1 + 5] = -3.0  # one patch dropped: its neighbours feel it
    lam, comp = b.gates(alpha)
    torch.testing.assert_close(lam + comp, torch.ones_like(lam))
    torch.testing.assert_close(lam[:, 0], torch.sigmoid(alpha[:, 0]))
    assert lam[0, 1 + 5, 0] > torch.sigmoid(torch.tensor(-3.0)) and lam[0, 1 + 4, 0] < torch.sigmoid(torch.tensor(5.0))
    capacity = b.capacity(torch.randn(2, 17, 3), alpha)
    assert capacity.shape == (2, 17, 3) and torch.isfinite(capacity).all()


def test_smoothing_leaves_the_text_side_and_sigma_zero_at_the_reference():
    alpha, hidden, noise = torch.randn(2, 9, 4) * 4, torch.randn(2, 9, 4), torch.randn(2, 3, 9, 4)
    ref = M2IB()
    for b, layout in ((SmoothM2IB(sigma=1.0), TokenLayout("text")),
                      (SmoothM2IB(sigma=0.0), TokenLayout("vision", 1, (2, 4)))):
        b.set_layout(layout)
        torch.testing.assert_close(b.capacity(hidden, alpha), ref.capacity(hidden, alpha), atol=0, rtol=0)
        torch.testing.assert_close(b.compress(hidden, alpha, noise), ref.compress(hidden, alpha, noise), atol=0, rtol=0)


def test_smoothing_without_a_layout_or_with_a_wrong_one_is_an_error():
    with pytest.raises(RuntimeError, match="token layout"):
        SmoothM2IB().gates(torch.zeros(1, 5, 2))
    b = SmoothM2IB()
    b.set_layout(TokenLayout("vision", 1, (3, 3)))
    with pytest.raises(ValueError, match="1 \\+ 3 x 3"):
        b.gates(torch.zeros(1, 5, 2))
    with pytest.raises(ConfigError, match="sigma"):
        SmoothM2IB(sigma=-1.0)


def test_smoothing_reaches_the_map_and_composes_with_per_token_masks(backbone, pairs_dir):
    class SmoothPerToken(SmoothM2IB, PerTokenM2IB):
        pass

    ids, images, captions = load(pairs_dir, 2)
    batch = batch_of(backbone, ids, images, captions)
    plain = M2IBAttribution(backbone, **small(vision_layer=1, text_layer=-1)).explain_batch(batch)
    module = M2IBAttribution(backbone, **small(vision_layer=1, text_layer=-1,
                                               vision_bottleneck=SmoothPerToken(sigma=1.0)))
    smooth = module.explain_batch(batch)
    assert module.alpha["vision"].shape == (2, 17, 1)
    assert not torch.allclose(smooth.patch_scores, plain.patch_scores)

    def roughness(gate):  # neighbouring patches' difference against the spread
        grid = gate[:, 1:, 0].reshape(-1, 4, 4)
        return ((grid[:, 1:] - grid[:, :-1]).abs().mean() / grid.std()).item()

    alpha = module.alpha["vision"].detach()
    assert roughness(module.bottlenecks["vision"].gates(alpha)[0]) < 0.8 * roughness(torch.sigmoid(alpha))
    torch.testing.assert_close(smooth.text_scores[0], plain.text_scores[0])  # the text side is the reference


# ------------------------------------------------------------------------------ scale-free capacity
def test_scaled_capacity_does_not_see_the_scale_of_the_hidden_states():
    b = ScaledM2IB()
    hidden, alpha, noise = torch.randn(2, 6, 8), torch.randn(2, 6, 8) * 3, torch.randn(2, 3, 6, 8)
    per_token = torch.rand(2, 6, 1) * 10 + 0.01  # any positive factor per token, a global one included
    torch.testing.assert_close(b.capacity(hidden * per_token, alpha), b.capacity(hidden, alpha))
    torch.testing.assert_close(b.compress(hidden * per_token, alpha, noise),
                               b.compress(hidden, alpha, noise) * per_token.repeat_interleave(3, 0))


def test_scaled_is_the_reference_on_unit_rms_tokens_and_drops_to_token_sized_noise():
    hidden = torch.randn(2, 6, 8)
    hidden = hidden / hidden.pow(2).mean(-1, keepdim=True).sqrt()
    alpha, noise = torch.randn(2, 6, 8) * 3, torch.randn(2, 3, 6, 8)
    torch.testing.assert_close(ScaledM2IB().capacity(hidden, alpha), M2IB().capacity(hidden, alpha))
    torch.testing.assert_close(ScaledM2IB().compress(hidden, alpha, noise), M2IB().compress(hidden, alpha, noise))
    dropped = ScaledM2IB().compress(hidden * 0.05, torch.full_like(alpha, -30.0), noise)
    torch.testing.assert_close(dropped, noise.flatten(0, 1) * 0.05)


def rescaled_twin(backbone, c):
    """The same CLIP with its residual stream ``c`` times larger: the vision tower's pre-norm output and
    every block's two residual branches (attention output, MLP output) scaled by ``c``. Pre-norm blocks
    and the final norm do not see the scale, so the embeddings are the original's."""
    import copy

    twin = copy.deepcopy(backbone)
    with torch.no_grad():
        vision = twin.model.vision_model
        vision.pre_layrnorm.weight.mul_(c)
        vision.pre_layrnorm.bias.mul_(c)
        for layer in vision.encoder.layers:
            for linear in (layer.self_attn.out_proj, layer.mlp.fc2):
                linear.weight.mul_(c)
                linear.bias.mul_(c)
    return twin


def test_one_beta_means_the_same_on_a_model_whose_states_are_ten_times_larger(backbone, pairs_dir):
    """The reference's map changes when the hidden states' scale does (its noise and KL are in absolute
    units); the scaled capacity gives the same map on the rescaled twin of the model."""
    ids, images, captions = load(pairs_dir, 3)
    batch = batch_of(backbone, ids, images, captions)
    twin = rescaled_twin(backbone, 10.0)
    inputs = {"pixel_values": batch["pixel_values"]}
    torch.testing.assert_close(twin.embed("vision", inputs), backbone.embed("vision", inputs), atol=1e-4, rtol=1e-4)
    assert twin.lower("vision", inputs, 1).hidden.std() > 5 * backbone.lower("vision", inputs, 1).hidden.std()
    maps, masks = {}, {}
    for name, cls in (("reference", M2IB), ("scaled", ScaledM2IB)):
        for which, bb in (("original", backbone), ("twin", twin)):
            module = M2IBAttribution(bb, **small(vision_layer=1, sides=["vision"], steps=5,
                                                 vision_bottleneck=cls(beta=1.0)))
            maps[name, which] = module.explain_batch(batch).image_maps
            masks[name, which] = torch.sigmoid(module.alpha["vision"].detach())
    torch.testing.assert_close(maps["scaled", "twin"], maps["scaled", "original"], atol=2e-3, rtol=0)
    torch.testing.assert_close(masks["scaled", "twin"], masks["scaled", "original"], atol=1e-3, rtol=0)
    # The reference keeps other features on the twin: the same beta is another compression there.
    assert (masks["reference", "twin"] - masks["reference", "original"]).abs().mean() > 0.01


# ---------------------------------------------------------------------------------- several layers
def test_one_layer_per_side_is_m2ib_at_that_layer(backbone, pairs_dir):
    ids, images, captions = load(pairs_dir, 2)
    batch = batch_of(backbone, ids, images, captions)
    single = M2IBAttribution(backbone, **small(vision_layer=1, text_layer=-1)).explain_batch(batch)
    multi = MultiLayerM2IB(backbone, **small(vision_layers=[1], text_layers=[-1])).explain_batch(batch)
    torch.testing.assert_close(multi.image_maps, single.image_maps, atol=1e-5, rtol=0)
    for a, b in zip(multi.text_scores, single.text_scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_several_layers_average_the_normalised_per_layer_maps(backbone, pairs_dir):
    from m2ib_lightning.methods.readout import minmax

    ids, images, captions = load(pairs_dir, 2)
    batch = batch_of(backbone, ids, images, captions)
    multi = MultiLayerM2IB(backbone, **small(vision_layers=[-1, 1], text_layers=[-1, 0]))
    out = multi.explain_batch(batch)
    assert multi.layers == {"vision": -1, "text": -1} and multi.seed == 1  # restored after the run
    parts = [M2IBAttribution(backbone, **small(vision_layer=v, text_layer=t, seed=1 + j)).explain_batch(batch)
             for j, (v, t) in enumerate(((-1, -1), (1, 0)))]
    mean = torch.stack([minmax(p.patch_scores, dims=(1,)) for p in parts]).mean(0)
    torch.testing.assert_close(out.patch_scores, mean, atol=1e-6, rtol=0)
    for i in range(2):
        text = (parts[0].text_scores[i] + parts[1].text_scores[i]) / 2
        torch.testing.assert_close(out.text_scores[i], minmax(text, dims=(0,)), atol=1e-6, rtol=0)
    assert {"compression/vision@-1", "compression/vision@1", "relevance/text@0"} <= set(out.terms)


def test_several_layers_reject_bad_lists(backbone):
    with pytest.raises(ConfigError, match="non-empty"):
        MultiLayerM2IB(backbone, text_layers=[])
    with pytest.raises(ConfigError, match="layer must be"):
        MultiLayerM2IB(backbone, vision_layers=[0, 7])


# ------------------------------------------------------------------------------- NIB (deterministic)
def test_nib_is_deterministic_and_batch_invariant(backbone, pairs_dir):
    ids, images, captions = load(pairs_dir, 3)
    captions[1] += " with more words"
    batch = batch_of(backbone, ids, images, captions)
    a = NIBAttribution(backbone, vision_layer=1, text_layer=-1, seed=0).explain_batch(batch)
    b = NIBAttribution(backbone, vision_layer=1, text_layer=-1, seed=5, chunk_size=10).explain_batch(batch)
    # Other chunks, other matmul shapes: equal to rounding, magnified by the min-max read-out.
    torch.testing.assert_close(a.image_maps, b.image_maps, atol=2e-3, rtol=0)
    alone = NIBAttribution(backbone, vision_layer=1, text_layer=-1).explain_batch(
        batch_of(backbone, ids[1:2], images[1:2], captions[1:2]))
    torch.testing.assert_close(alone.image_maps[0], a.image_maps[1], atol=2e-3, rtol=0)
    torch.testing.assert_close(alone.text_scores[0], a.text_scores[1], atol=2e-3, rtol=0)


def test_nib_is_the_path_average_of_gradient_times_input(backbone, pairs_dir):
    """``A = R * mean_i grad s(i R / n)``: with one step, gradient x input at the layer; with two, the
    average of the gradients at ``R / 2`` and ``R``."""
    from m2ib_lightning.methods.baselines import token_gradients

    ids, images, captions = load(pairs_dir, 2)
    batch = batch_of(backbone, ids, images, captions)
    inputs = {k: batch[k] for k in ("pixel_values", "input_ids", "attention_mask")}
    target = backbone.embed("text", inputs).float()
    grad, hidden = token_gradients(backbone, "vision", inputs, 0, target, return_hidden=True)
    one = NIBAttribution(backbone, vision_layer=0, text_layer=0, steps=1).token_attributions("vision", inputs, target)
    torch.testing.assert_close(one, (grad * hidden).sum(-1), atol=1e-5, rtol=1e-4)
    state = backbone.prepare_upper("vision", backbone.lower("vision", inputs, 0), 0)
    half = hidden.clone().mul_(0.5).requires_grad_(True)
    s = torch.nn.functional.cosine_similarity(backbone.upper("vision", half, state, 0).float(), target, dim=-1)
    (grad_half,) = torch.autograd.grad(s.sum(), half)
    two = NIBAttribution(backbone, vision_layer=0, text_layer=0, steps=2).token_attributions("vision", inputs, target)
    torch.testing.assert_close(two, (hidden * (grad + grad_half) / 2).sum(-1), atol=1e-5, rtol=1e-4)
    with pytest.raises(ConfigError, match="chunk_size"):
        NIBAttribution(backbone, vision_layer=0, text_layer=0, steps=10, chunk_size=5)


# ------------------------------------------------------------------------- one mask, several layers
def test_joint_with_one_layer_is_m2ib_and_with_more_another_problem(backbone, pairs_dir):
    ids, images, captions = load(pairs_dir, 2)
    batch = batch_of(backbone, ids, images, captions)
    single = M2IBAttribution(backbone, **small(vision_layer=0, text_layer=-1)).explain_batch(batch)
    one = JointM2IB(backbone, **small(vision_layers=[0], text_layers=[-1])).explain_batch(batch)
    torch.testing.assert_close(one.image_maps, single.image_maps, atol=1e-5, rtol=0)
    joint = JointM2IB(backbone, **small(vision_layers=[0, 1, 2], text_layers=[-1, 1]))
    two = joint.explain_batch(batch)
    assert joint.layers == {"vision": 0, "text": -1}  # the map is the first layer's capacity
    assert not torch.allclose(two.image_maps, single.image_maps, atol=1e-3)
    with pytest.raises(ConfigError, match="increasing"):
        JointM2IB(backbone, vision_layers=[1, 0])


# ------------------------------------------------------------------------- the fragments, by the CLI
@pytest.mark.parametrize(("fragment", "flags"), [
    # 3 steps at least: the first Adam update moves every mask logit by the same amount (its sign
    # aside), and a per-token mask on unit-RMS tokens is then flat.
    ("m2ib_scaled_per_token", ["--model.init_args.steps", "3", "--model.init_args.copies", "2"]),
    ("m2ib_multilayer", ["--model.init_args.steps", "3", "--model.init_args.copies", "2"]),
    ("m2ib_joint", ["--model.init_args.steps", "3", "--model.init_args.copies", "2"]),
    ("nib", ["--model.init_args.steps", "3"]),
])
def test_fragment_runs_end_to_end(fragment, flags, tmp_path, tiny_clip_dir, pairs_dir):
    """The method fragment after a run file (configs/README.md): it keeps the run's backbone and data."""
    from m2ib_lightning import load_attributions
    from m2ib_lightning.run.cli import main

    main(["fit", "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(ROOT / "configs" / "method" / f"{fragment}.yaml"),
          "--model.init_args.backbone.init_args.model", str(tiny_clip_dir), *flags,
          "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
          "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "0"])
    records = load_attributions(tmp_path / "attributions")
    assert len(records) == 6
    for rec in records.values():
        assert rec.image_map.min() == 0 and rec.image_map.max() == 1 and rec.text_scores.max() == 1
