"""Shared fixtures: a tiny random CLIP and a few image-caption pairs, built locally (nothing is downloaded)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"

from m2ib_lightning.assets.demo import make_demo_pairs  # noqa: E402
from m2ib_lightning.assets.tiny_models import build_tiny_clip  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64


@pytest.fixture(scope="session")
def pairs_dir(tmp_path_factory) -> Path:
    """Six synthetic pairs at 64 px: ``pairs.jsonl`` + ``images/``."""
    out = tmp_path_factory.mktemp("pairs")
    make_demo_pairs(out, n=6, image_size=IMAGE_SIZE, seed=1)
    return out


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory, pairs_dir) -> Path:
    """A random CLIP (3 blocks per tower, 64 px images, 16 px patches) saved with save_pretrained."""
    captions = [json.loads(line)["caption"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    return build_tiny_clip(
        tmp_path_factory.mktemp("tiny-clip"), captions=captions, hidden_size=32, num_layers=3, num_heads=2,
        intermediate_size=64, projection_dim=16, image_size=IMAGE_SIZE, patch_size=16, seed=0,
    )


@pytest.fixture(scope="session")
def backbone(tiny_clip_dir):
    from m2ib_lightning import CLIPBackbone

    return CLIPBackbone(str(tiny_clip_dir))


@pytest.fixture(scope="session")
def images(pairs_dir) -> list:
    """The first three images of ``pairs_dir``, as RGB PIL images."""
    from PIL import Image

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:3]
    return [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]


def split_run(backbone, side, inputs, layer, copies=None) -> torch.Tensor:
    """A tower through the adapter's split: ``lower`` (optionally repeated ``copies`` times),
    ``prepare_upper`` and ``upper`` on the clean hidden states; tests compare it with the model."""
    state = backbone.lower(side, inputs, layer)
    if copies is not None:
        state = state.repeat(copies)
    state = backbone.prepare_upper(side, state, layer)
    return backbone.upper(side, state.hidden, state, layer)
