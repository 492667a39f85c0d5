"""The Python API: explain() for one pair or a few, on the CLI's code path."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from m2ib_lightning import ConfigError, IBAStyleM2IB, M2IBAttribution, explain, load_attributions, overlay_image
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {"vision_layer": 1, "text_layer": 1, "steps": 3, "copies": 2, "seed": 0}


@pytest.fixture(scope="module")
def rows(pairs_dir):
    return [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]


def test_one_pair(backbone, pairs_dir, rows):
    [rec] = explain(pairs_dir / rows[0]["image"], rows[0]["caption"], backbone, **SETTINGS)
    assert rec.image_map.shape == (64, 64) and rec.image_map.dtype == np.float32
    assert rec.image_map.min() == 0 and rec.image_map.max() == 1 and rec.patch_scores.shape == (4, 4)
    assert rec.tokens == ["<|startoftext|>", *rows[0]["caption"].split(), "<|endoftext|>"]
    assert len(rec.text_scores) == len(rec.tokens) and -1 <= rec.similarity <= 1
    assert rec.id.startswith("pair-")
    picture = overlay_image(pairs_dir / rows[0]["image"], rec, backbone.image_processor)
    assert picture.size == (64, 64) and picture.mode == "RGB"


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_same_maps_as_a_cli_run(tmp_path, tiny_clip_dir, backbone, pairs_dir, rows, precision):
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        *[arg for k, v in SETTINGS.items() for arg in (f"--model.init_args.{k}", str(v))],
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "0", "--trainer.precision", precision,
    ])
    written = load_attributions(tmp_path / "attributions")
    images = [Image.open(pairs_dir / r["image"]) for r in rows]
    records = explain(images, [r["caption"] for r in rows], backbone, ids=[r["id"] for r in rows], batch_size=3,
                      precision=precision, **SETTINGS)
    assert [r.id for r in records] == [r["id"] for r in rows]
    for rec in records:
        run = written[rec.id]
        # Both are float16 on the way out; the batching differs (4 + 2 vs 3 + 3), the maps do not.
        np.testing.assert_allclose(rec.image_map, run.image_map, atol=2e-3, rtol=0)
        np.testing.assert_allclose(rec.text_scores, run.text_scores, atol=1e-4, rtol=0)
        assert rec.tokens == run.tokens and rec.similarity == pytest.approx(run.similarity, abs=1e-6)


def test_default_ids_make_a_pair_reproducible_wherever_it_is(backbone, pairs_dir, rows):
    images = [Image.open(pairs_dir / r["image"]) for r in rows[:3]]
    captions = [r["caption"] for r in rows[:3]]
    together = explain(images, captions, backbone, **SETTINGS)
    alone = explain(images[2], captions[2], backbone, **SETTINGS)[0]
    assert together[2].id == alone.id
    np.testing.assert_allclose(together[2].image_map, alone.image_map, atol=2e-3, rtol=0)
    np.testing.assert_allclose(together[2].text_scores, alone.text_scores, atol=1e-4, rtol=0)


def test_one_image_with_several_captions(backbone, pairs_dir, rows):
    image = np.asarray(Image.open(pairs_dir / rows[0]["image"]).convert("RGB"))
    captions = [rows[0]["caption"], "a small thing on the left"]
    records = explain(image, captions, backbone, sides=["text"], **SETTINGS)
    assert [r.tokens[1:-1] for r in records] == [c.split() for c in captions]
    assert all(r.image_map is None for r in records)


def test_variants_need_no_trainer(backbone, pairs_dir, rows):
    records = explain([pairs_dir / r["image"] for r in rows[:2]], [r["caption"] for r in rows[:2]], backbone,
                      vision_bottleneck=IBAStyleM2IB(), sides=["vision"], **SETTINGS)
    assert all(np.isfinite(r.image_map).all() and r.image_map.max() == 1 for r in records)


@pytest.mark.parametrize(
    "images, texts, message",
    [
        (["a.png", "b.png"], ["x", "y", "z"], "expected as many images as texts, or one of either; got 2 images and 3"),
        ([], ["x"], "got 0 images and 1 texts"),
        ([b"not an image"], ["x"], "image 0: unreadable image"),
        (["/no/such/file.png"], ["x"], "image 0: unreadable image"),
    ],
)
def test_bad_input_is_a_clear_error(backbone, images, texts, message):
    with pytest.raises(ValueError, match=message):
        explain(images, texts, backbone, **SETTINGS)


def test_empty_caption_and_misplaced_options(backbone, pairs_dir, rows):
    with pytest.raises(ValueError, match="text 1 must be a non-empty string, got '  '"):
        explain(pairs_dir / rows[0]["image"], ["a cat", "  "], backbone, **SETTINGS)
    module = M2IBAttribution(backbone, vision_layer=1, text_layer=1)
    with pytest.raises(ConfigError, match=r"options \['steps'\] only apply when model is not an M2IBAttribution"):
        explain(pairs_dir / rows[0]["image"], "a cat", module, steps=3)


def test_the_readme_example_runs(tmp_path, monkeypatch):
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Python API", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository
    code = code.replace('"toy-000-m2ib.png"', repr(str(tmp_path / "toy-000-m2ib.png")))
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    rec = namespace["rec"]
    assert rec.image_map.shape == (224, 224) and rec.tokens[1:-1] == ["a", "purple", "circle"]
    assert Image.open(tmp_path / "toy-000-m2ib.png").size == (224, 224)
    # The trained toy CLIP points at the purple circle the caption names (box in data/toy/pairs.jsonl).
    x0, y0, x1, y1 = json.loads((ROOT / "data" / "toy" / "pairs.jsonl").read_text().splitlines()[0])["bbox"]
    peak_y, peak_x = divmod(int(rec.image_map.argmax()), 224)
    assert x0 - 15 <= peak_x <= x1 + 15 and y0 - 15 <= peak_y <= y1 + 15
