"""Weight formats: safetensors preferred, a .bin-only checkpoint loads with torch's weights-only
unpickler (PubMedCLIP, the headline model, has no safetensors file), a .bin that would run code is refused."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest
import torch

from m2ib_lightning import BackboneLoadError, CLIPBackbone, SigLIPBackbone
from m2ib_lightning.assets.tiny_models import build_tiny_siglip


def bin_only(source: Path, target: Path) -> Path:
    """``source`` (a save_pretrained directory) with its weights as ``pytorch_model.bin`` only.

    transformers 5 always writes safetensors (``save_pretrained(safe_serialization=False)`` is gone), so the
    ``.bin`` is written the way ``save_pretrained`` used to: ``torch.save`` of the state dict."""
    from safetensors.torch import load_file

    shutil.copytree(source, target)
    state = load_file(target / "model.safetensors")
    (target / "model.safetensors").unlink()
    torch.save(state, target / "pytorch_model.bin")
    return target


class RunsCode:
    """Unpickling this object would call ``Path.touch`` on ``marker``: what a malicious .bin does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def same_weights(a, b) -> bool:
    sa, sb = a.model.state_dict(), b.model.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_bin_only_checkpoint_loads_weights_only_by_default(tmp_path, tiny_clip_dir, backbone, caplog):
    checkpoint = bin_only(tiny_clip_dir, tmp_path / "bin-only")
    with caplog.at_level(logging.INFO, logger="m2ib_lightning.backbones.loading"):
        loaded = CLIPBackbone(str(checkpoint))
    assert same_weights(loaded, backbone)
    said = [r.getMessage() for r in caplog.records if r.name == "m2ib_lightning.backbones.loading"]
    assert len(said) == 1 and "weights-only unpickler" in said[0] and str(checkpoint) in said[0]
    # safetensors present: nothing said, and safetensors preferred over a .bin beside it
    caplog.clear()
    both = tmp_path / "both"
    shutil.copytree(checkpoint, both)
    shutil.copy(tiny_clip_dir / "model.safetensors", both / "model.safetensors")
    torch.save({k: torch.zeros_like(v) for k, v in torch.load(both / "pytorch_model.bin").items()},
               both / "pytorch_model.bin")
    with caplog.at_level(logging.INFO, logger="m2ib_lightning.backbones.loading"):
        assert same_weights(CLIPBackbone(str(both)), backbone)
    assert not [r for r in caplog.records if r.name == "m2ib_lightning.backbones.loading"]


def test_use_safetensors_true_is_strict(tmp_path, tiny_clip_dir):
    checkpoint = bin_only(tiny_clip_dir, tmp_path / "bin-only")
    with pytest.raises(BackboneLoadError, match="use_safetensors: true loads safetensors weights only"):
        CLIPBackbone(str(checkpoint), use_safetensors=True)


@pytest.mark.parametrize("use_safetensors", [None, False])
def test_a_bin_that_would_run_code_is_refused(tmp_path, tiny_clip_dir, use_safetensors):
    checkpoint = bin_only(tiny_clip_dir, tmp_path / "malicious")
    marker = tmp_path / "code-ran"
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    state["payload"] = RunsCode(marker)
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(BackboneLoadError) as info:
        CLIPBackbone(str(checkpoint), use_safetensors=use_safetensors)
    message = str(info.value)
    assert "refused the PyTorch .bin weights" in message and str(checkpoint) in message
    assert "asks for GLOBAL" in message  # names what the file tried to call
    assert "weights_only` set to `False`" not in message  # torch's advice to turn the check off is not passed on
    assert not marker.exists()


def test_bin_only_hub_repository_loads_from_the_cache_offline(tmp_path, tiny_clip_dir, backbone, monkeypatch, caplog):
    """The headline case: a hub id whose repository has only pytorch_model.bin (as PubMedCLIP's), from
    the hub cache, with the default settings."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = tmp_path / "cache"
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--m2ib-test--bin-only-clip"
    bin_only(tiny_clip_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    with caplog.at_level(logging.INFO, logger="m2ib_lightning.backbones.loading"):
        loaded = CLIPBackbone("m2ib-test/bin-only-clip", cache_dir=str(cache))
    assert same_weights(loaded, backbone)
    assert any("weights-only unpickler" in r.getMessage() for r in caplog.records)
    assert "DISABLE_SAFETENSORS_CONVERSION" not in os.environ  # set only while loading


def test_siglip_bin_only_loads_and_malicious_is_refused(tmp_path):
    source = build_tiny_siglip(tmp_path / "siglip", captions=["a red circle", "a blue square"])
    reference = SigLIPBackbone(str(source))
    checkpoint = bin_only(source, tmp_path / "siglip-bin")
    assert same_weights(SigLIPBackbone(str(checkpoint)), reference)
    state = torch.load(checkpoint / "pytorch_model.bin", weights_only=True)
    state["payload"] = RunsCode(tmp_path / "code-ran")
    torch.save(state, checkpoint / "pytorch_model.bin")
    with pytest.raises(BackboneLoadError, match="refused the PyTorch .bin weights of the SigLIP model"):
        SigLIPBackbone(str(checkpoint))
    assert not (tmp_path / "code-ran").exists()
    assert json.loads((checkpoint / "config.json").read_text())["model_type"] == "siglip"
