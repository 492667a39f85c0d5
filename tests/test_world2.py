"""World 2 of the grounded benchmark: textured objects, counts and relations; its shipped sample and CLIP."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from m2ib_lightning.assets.world2 import (
    COLOURS,
    LIGHT,
    CaptionSpec,
    NounPhrase,
    SceneObject,
    all_captions,
    all_specs,
    caption_holds,
    draw_scene,
    foils,
    make_world2,
    relation,
    resolve,
    scene_rng,
    true_specs,
)
from m2ib_lightning.evaluation.ground_truth import decode_mask, encode_mask

ROOT = Path(__file__).resolve().parents[1]
WORLD2 = ROOT / "data" / "world2"


def test_scenes_are_deterministic_and_streams_differ():
    a, b = draw_scene(scene_rng(5, 3)), draw_scene(scene_rng(5, 3))
    assert a.objects == b.objects and a.spec == b.spec and a.image.tobytes() == b.image.tobytes()
    assert draw_scene(scene_rng(6, 3)).image.tobytes() != a.image.tobytes()


def test_caption_names_exactly_the_masked_objects():
    kinds = set()
    for index in range(40):
        scene = draw_scene(scene_rng("test", index))
        spec = scene.spec
        kinds.add(spec.kind)
        assert 3 <= len(scene.objects) <= 6
        assert resolve(scene.objects, spec) == scene.referents
        assert len(scene.referents) == (2 if spec.kind == "count" else 1)
        assert all(spec.subject.matches(scene.objects[i]) for i in scene.referents)
        masks = [scene.object_mask(i) for i in range(len(scene.objects))]
        assert all(m.sum() > 150 for m in masks)
        assert not (np.sum(masks, axis=0) > 1).any()  # objects never overlap
        mask = scene.mask()
        assert mask.shape == (224, 224) and mask.any()
        assert np.array_equal(mask, np.logical_or.reduce([masks[i] for i in scene.referents]))
        x0, y0, x1, y1 = scene.bbox()
        ys, xs = np.nonzero(mask)
        assert x0 <= xs.min() and xs.max() <= x1 and y0 <= ys.min() and ys.max() <= y1
        pixels = np.asarray(scene.image)
        for i in scene.referents:  # the mask is the object's pixels: its colour or its fill's light colour
            inside = pixels[masks[i]]
            colour = COLOURS[scene.objects[i].colour]
            assert ((inside == colour).all(1) | (inside == LIGHT).all(1)).all()
            assert (inside == colour).all(1).mean() > 0.4
        if spec.kind == "relation":
            anchors = [j for j, o in enumerate(scene.objects) if spec.anchor.matches(o)]
            assert anchors == [scene.anchor]
            assert relation(scene.objects[scene.referents[0]], scene.objects[scene.anchor]) == spec.relation
            assert scene.anchor not in scene.referents
        else:
            assert scene.anchor == -1
            count = sum(spec.subject.matches(o) for o in scene.objects)
            assert count == len(scene.referents)
    assert kinds == {"single", "count", "relation"}


def test_distractors_share_attributes_with_the_target_and_relations_rule_some_out():
    shared = ruled_out = relations = 0
    for index in range(120):
        scene = draw_scene(scene_rng("distractors", index))
        spec = scene.spec
        others = [o for i, o in enumerate(scene.objects) if i not in scene.referents and i != scene.anchor]
        shared += any(o.shape == spec.subject.shape or spec.subject.attribute in (o.colour, o.fill) for o in others)
        if spec.kind == "relation":
            relations += 1
            ruled_out += any(spec.subject.matches(o) for o in others)  # same phrase, wrong place
    assert shared > 90
    assert relations > 25 and ruled_out > relations // 4


def test_relations_are_geometric_and_exclusive():
    def box(x, y, side=20):
        return SceneObject("red", "plain", "star", (x, y, x + side, y + side))

    a, b = box(10, 100), box(60, 105)
    assert relation(a, b) == "left of" and relation(b, a) == "right of"
    c = box(14, 150)
    assert relation(a, c) == "above" and relation(c, a) == "below"
    assert relation(a, box(28, 112)) is None  # overlapping boxes, no gap: no relation
    assert relation(a, box(40, 130)) is None  # diagonal by as much horizontally as vertically


def test_true_specs_are_every_caption_that_holds():
    assert len(all_specs()) == len(set(all_captions())) == 40 + 40 + 40 * 4 * 39
    for index in range(4):
        scene = draw_scene(scene_rng("truth", index))
        brute = [s for s in all_specs() if caption_holds(scene, s)]
        assert true_specs(scene.objects) == brute and scene.spec in brute
        assert caption_holds(scene, scene.caption)


def test_foils_are_one_edit_away():
    star = NounPhrase("striped", "star")
    ring = NounPhrase("blue", "ring")
    spec = CaptionSpec("relation", star, "left of", ring)
    found = foils(spec)
    assert found[0] == CaptionSpec("relation", star, "right of", ring)
    assert found[1] == CaptionSpec("relation", ring, "left of", star)
    assert all(f in all_specs() and f != spec for f in found)
    assert foils(CaptionSpec("single", star))[0] == CaptionSpec("count", star)
    assert CaptionSpec("count", NounPhrase("dotted", "cross")).text == "two dotted crosses"
    assert spec.text == "the striped star left of the blue ring"


def test_make_world2_is_deterministic(tmp_path):
    a = make_world2(tmp_path / "a", n=3, seed=3)
    b = make_world2(tmp_path / "b", n=3, seed=3)
    assert a.read_bytes() == b.read_bytes()
    for i in range(3):
        name = f"images/w2-{i:03d}.png"
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    row = json.loads(a.read_text().splitlines()[0])
    assert set(row) == {"id", "image", "caption", "kind", "bbox", "mask", "objects", "referents", "anchor"}
    assert row["caption"] in all_captions()
    scene = draw_scene(scene_rng(3, 0))
    assert decode_mask(row["mask"]).tolist() == scene.mask().tolist()
    assert row["mask"] == encode_mask(scene.mask())


def test_shipped_sample_is_what_the_generator_writes(tmp_path):
    rows = [json.loads(line) for line in (WORLD2 / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and len({r["id"] for r in rows}) == 200
    assert {r["kind"] for r in rows} == {"single", "count", "relation"}
    fresh = make_world2(tmp_path, n=4)  # the defaults wrote data/world2
    assert fresh.read_text().splitlines() == (WORLD2 / "pairs.jsonl").read_text().splitlines()[:4]
    for row in rows[:4]:
        assert (tmp_path / row["image"]).read_bytes() == (WORLD2 / row["image"]).read_bytes()
    image = Image.open(WORLD2 / rows[0]["image"])
    assert image.size == (224, 224) and decode_mask(rows[0]["mask"]).shape == (224, 224)
    total = sum(f.stat().st_size for f in WORLD2.rglob("*") if f.is_file())
    assert total < 6_000_000


def test_world2_clip_loads_has_six_vision_blocks_and_covers_the_captions():
    from m2ib_lightning import CLIPBackbone

    model_dir = WORLD2 / "world2-clip"
    assert sum(f.stat().st_size for f in model_dir.iterdir()) < 5_000_000
    backbone = CLIPBackbone(str(model_dir))
    assert backbone.num_layers["vision"] >= 6
    ids = backbone.tokenizer(all_captions())["input_ids"]
    assert all(backbone.tokenizer.unk_token_id not in row for row in ids)
    record = json.loads((model_dir / "training.json").read_text())
    retrieval = record["retrieval"]
    assert retrieval["image_to_caption_r1"] > 10 * retrieval["chance_image_to_caption"]
    assert record["settings"]["world"] == "world2" and record["settings"]["num_layers"] >= 6


def test_world2_clip_retrieves_true_captions_on_held_out_scenes():
    """Image -> caption R@1 over all 6320 captions on 32 held-out scenes: far above chance (0.7 %)."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer, CLIPModel

    from m2ib_lightning.assets.toy_clip import normalise, render_scenes

    model = CLIPModel.from_pretrained(WORLD2 / "world2-clip").eval()
    tokenizer = AutoTokenizer.from_pretrained(WORLD2 / "world2-clip")
    scenes = render_scenes("heldout", 32, world="world2")
    with torch.no_grad():
        images = model.get_image_features(pixel_values=normalise(scenes.images))
        texts = model.get_text_features(**tokenizer(all_captions(), padding=True, return_tensors="pt"))
    images, texts = (x if isinstance(x, torch.Tensor) else x.pooler_output for x in (images, texts))
    best = (F.normalize(images, dim=-1) @ F.normalize(texts, dim=-1).T).argmax(1)
    r1 = scenes.presence[torch.arange(32), best].float().mean().item()
    chance = scenes.presence.float().mean().item()
    print(f"image -> caption R@1 {r1:.3f}, chance {chance:.4f}")
    assert r1 > max(0.3, 20 * chance)


def test_world2_clip_training_config_parses(capsys):
    from m2ib_lightning.assets.toy_clip import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(ROOT / "configs" / "pretrain" / "world2_clip.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "out_dir: data/world2/world2-clip" in printed and "world: world2" in printed


def test_training_on_world2_runs_with_hard_negatives_and_separate_depths(tmp_path):
    from m2ib_lightning import CLIPBackbone
    from m2ib_lightning.assets.toy_clip import train_toy_clip

    record = train_toy_clip(str(tmp_path / "clip"), world="world2", hidden_size=16, num_layers=2, text_layers=1,
                            num_heads=2, intermediate_size=32, projection_dim=8, train_scenes=16, eval_scenes=8,
                            steps=2, batch_size=4, warmup=1, log_every=0, hard_negatives=True)
    assert {"foil_accuracy_single", "image_to_caption_r1"} <= set(record["retrieval"])
    assert CLIPBackbone(str(tmp_path / "clip")).num_layers == {"vision": 2, "text": 1}
    with pytest.raises(ValueError, match="hard_negatives needs a world with foils"):
        train_toy_clip(str(tmp_path / "toy"), hard_negatives=True, steps=1, train_scenes=2, eval_scenes=2)


def test_world2_benchmark_config_parses(capsys):
    from m2ib_lightning.run.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / "world2_benchmark.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model: data/world2/world2-clip" in printed and "mask_column: mask" in printed
