"""The grounded synthetic benchmark: scenes, captions and masks; the shipped sample and toy CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning.assets.demo import COLOURS
from m2ib_lightning.assets.scenes import all_captions, draw_scene, make_benchmark, scene_rng
from m2ib_lightning.evaluation.ground_truth import decode_mask, encode_mask, ground_truth

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy"


def test_scenes_name_exactly_one_object_and_the_mask_is_its_pixels():
    shared = 0
    for index in range(40):
        scene = draw_scene(scene_rng(7, index))
        kinds = [(o.colour, o.shape) for o in scene.objects]
        assert 2 <= len(kinds) <= 4 and len(set(kinds)) == len(kinds)
        target = scene.objects[scene.target]
        assert scene.caption.endswith(f"{target.colour} {target.shape}")
        assert sum(scene.caption.endswith(f"{o.colour} {o.shape}") for o in scene.objects) == 1
        mask = scene.mask()
        pixels = np.asarray(scene.image)[mask]
        assert mask.sum() > 500 and (pixels == COLOURS[target.colour]).all()
        x0, y0, x1, y1 = target.box
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
        others = [o for i, o in enumerate(scene.objects) if i != scene.target]
        shared += any(o.colour == target.colour or o.shape == target.shape for o in others)
    assert shared > 10  # distractors sharing colour or shape with the target are common


def test_rle_round_trip():
    gen = np.random.default_rng(0)
    for first in (False, True):
        mask = gen.random((13, 17)) < 0.4
        mask[0, 0] = first
        rle = encode_mask(mask)
        assert rle["size"] == [13, 17] and sum(rle["counts"]) == 13 * 17
        assert (rle["counts"][0] == 0) == first
        assert (decode_mask(rle) == mask).all()
    with pytest.raises(ValueError, match="sum to 5, expected H \\* W = 6"):
        decode_mask({"size": [2, 3], "counts": [2, 3]})


def test_ground_truth_from_box_mask_and_other_resolutions():
    box = ground_truth([1, 2, 3, 4], (6, 6))
    assert box.sum() == 4 and box[2:4, 1:3].all()
    mask = np.zeros((6, 6), dtype=bool)
    mask[2:4, 1:3] = True
    assert torch.equal(ground_truth(encode_mask(mask), (6, 6)), box)
    assert torch.equal(ground_truth(mask, (6, 6)), box)
    # A 12 x 24 mask seen through resize-shortest-edge-to-6 + centre crop 6 x 6: columns 3..8 of 12.
    wide = np.zeros((12, 24), dtype=bool)
    wide[:, 12:] = True
    mapped = ground_truth(encode_mask(wide), (6, 6))
    assert mapped.shape == (6, 6) and mapped[:, 3:].all() and not mapped[:, :3].any()
    with pytest.raises(ValueError, match="a box must be"):
        ground_truth([1, 2, 3], (6, 6))


def test_make_benchmark_is_deterministic(tmp_path):
    a = make_benchmark(tmp_path / "a", n=3, image_size=64, seed=3)
    b = make_benchmark(tmp_path / "b", n=3, image_size=64, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for i in range(3):
        name = f"images/toy-{i:03d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    row = json.loads(a.read_text().splitlines()[0])
    assert set(row) == {"id", "image", "caption", "bbox", "mask"} and row["caption"] in all_captions()


def test_shipped_sample_is_what_the_generator_writes(tmp_path):
    rows = [json.loads(line) for line in (TOY / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 128
    fresh = make_benchmark(tmp_path, n=4)  # the defaults wrote data/toy
    assert fresh.read_text().splitlines() == (TOY / "pairs.jsonl").read_text().splitlines()[:4]
    for row in rows[:4]:
        assert (tmp_path / row["image"]).read_bytes() == (TOY / row["image"]).read_bytes()
    image = Image.open(TOY / rows[0]["image"])
    assert image.size == (224, 224) and decode_mask(rows[0]["mask"]).shape == (224, 224)


def test_toy_clip_checkpoint_is_small_loads_and_covers_the_captions():
    from m2ib_lightning import CLIPBackbone

    model_dir = TOY / "toy-clip"
    total = sum(f.stat().st_size for f in model_dir.iterdir())
    assert total < 4_000_000
    backbone = CLIPBackbone(str(model_dir))
    ids = backbone.tokenizer(all_captions())["input_ids"]
    assert all(backbone.tokenizer.unk_token_id not in row for row in ids)
    record = json.loads((model_dir / "training.json").read_text())
    assert record["retrieval"]["caption_to_image_map"] > 0.9
    assert record["retrieval"]["image_to_caption_r1"] > 0.9


def test_toy_clip_training_config_parses(capsys):
    from m2ib_lightning.assets.toy_clip import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs" / "pretrain" / "toy_clip.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "out_dir: data/toy/toy-clip" in printed and "steps: 2000" in printed


def test_toy_clip_training_runs_and_saves_a_loadable_model(tmp_path):
    from m2ib_lightning import CLIPBackbone
    from m2ib_lightning.assets.toy_clip import train_toy_clip

    record = train_toy_clip(str(tmp_path / "clip"), hidden_size=16, num_layers=1, num_heads=2,
                            intermediate_size=32, projection_dim=8, image_size=64, patch_size=16,
                            train_scenes=16, eval_scenes=8, steps=2, batch_size=4, warmup=1, log_every=0)
    assert record["settings"]["steps"] == 2 and len(record["loss_every_50"]) == 1
    assert set(record["retrieval"]) >= {"caption_to_image_map", "image_to_caption_r1", "caption_to_image_r1"}
    backbone = CLIPBackbone(str(tmp_path / "clip"))
    assert backbone.num_layers == {"vision": 1, "text": 1}


@pytest.mark.slow
def test_m2ib_points_at_the_named_shape_better_than_random_and_saliency():
    """The quality bar of the toy benchmark: on 32 scenes M2IB's maximum falls on the captioned shape
    more often than gradient saliency's and far more often than a random map's."""
    from m2ib_lightning import CLIPBackbone, M2IBAttribution, Preprocessor
    from m2ib_lightning.evaluation.metrics import pointing_game
    from m2ib_lightning.methods.baselines import GradientSaliency, RandomMap

    backbone = CLIPBackbone(str(TOY / "toy-clip"))
    rows = [json.loads(line) for line in (TOY / "pairs.jsonl").read_text().splitlines()][:32]
    images = [Image.open(TOY / r["image"]).convert("RGB") for r in rows]
    captions = [r["caption"] for r in rows]
    batch = {"ids": [r["id"] for r in rows], **Preprocessor.from_backbone(backbone)(images, captions)}
    masks = torch.stack([ground_truth(r["mask"], (224, 224)) for r in rows])
    scores = {}
    for name, module in (("m2ib", M2IBAttribution(backbone, vision_layer=0, text_layer=0, sides=["vision"])),
                         ("saliency", GradientSaliency(backbone, sides=["vision"])),
                         ("random", RandomMap(backbone, sides=["vision"]))):
        scores[name] = pointing_game(module.explain_batch(batch).image_maps, masks).item()
    print(f"pointing game on 32 scenes: {scores}")
    assert scores["m2ib"] >= 0.75 and scores["m2ib"] > scores["saliency"] > scores["random"]
