"""Mixed precision: a float16 loss scaler never silently drops a mask update; bf16 maps track fp32.

Lightning turns ``precision="16-mixed"`` into bf16 on a CPU, so the float16 runs here pass the
plugin explicitly (``MixedPrecision("16-mixed", "cpu", scaler)``): float16 autocast and a real
``torch.amp.GradScaler``, as on a GPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from m2ib_lightning import CLIPBackbone, ImageTextDataModule, M2IBAttribution

ROOT = Path(__file__).resolve().parents[1]
STEPS = 6


class Recorder(M2IBAttribution):
    """M2IB that keeps, per batch, its maps, the number of Adam updates applied to the masks, and
    the number of redone steps."""

    def __init__(self, *args, redo: bool = True, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.redo = redo
        self.maps: dict[str, np.ndarray] = {}
        self.updates: list[int] = []
        self.redone: list[int | None] = []

    def _loss_scaler(self):
        # redo=False leaves the scaler in the Lightning plugin but stops the module from checking
        # it: what a plain manual-optimisation loop does.
        return super()._loss_scaler() if self.redo else None

    def optimise(self, prepared):
        result = super().optimise(prepared)
        state = self.optimizers().optimizer.state.get(self.alpha["vision"], {})
        self.updates.append(int(state.get("step", 0)))
        self.redone.append(result[2])  # (terms, loss, redone steps or None)
        return result

    def explain_batch(self, batch):
        out = super().explain_batch(batch)
        for i, sample_id in enumerate(out.ids):
            self.maps[sample_id] = np.concatenate([out.image_maps[i].flatten().numpy(),
                                                   np.asarray(out.text_scores[i], dtype=np.float32)])
        return out


def run(backbone, data_file, layer, *, precision="32-true", plugins=None, limit=None, **kwargs) -> Recorder:
    module = Recorder(backbone, vision_layer=layer, text_layer=layer, steps=STEPS, copies=4, seed=0, **kwargs)
    data = ImageTextDataModule(path="json", data_files=str(data_file), batch_size=4, limit=limit)
    trainer_kwargs = {"plugins": plugins} if plugins else {"precision": precision}
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, **trainer_kwargs)
    trainer.fit(module, datamodule=data)
    return module


def fp16(init_scale: float) -> list:
    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))]


def max_diff(a: Recorder, b: Recorder) -> float:
    assert sorted(a.maps) == sorted(b.maps)
    return max(float(np.abs(a.maps[k] - b.maps[k]).max()) for k in a.maps)


def test_16_mixed_redoes_overflowing_steps_so_every_update_is_applied(backbone, pairs_dir):
    data = pairs_dir / "pairs.jsonl"
    calm = run(backbone, data, 1, plugins=fp16(2.0**8))  # a scale at which nothing overflows
    assert calm.redone and all(r == 0 for r in calm.redone)
    assert calm.updates == [STEPS - 1] * len(calm.updates)

    # 2**24 overflows float16 gradients at once: the scaler skips updates and halves the scale.
    hot = run(backbone, data, 1, plugins=fp16(2.0**24))
    assert hot.redone[0] > 0, "the scaler was expected to skip updates at scale 2**24"
    assert hot.updates == [STEPS - 1] * len(hot.updates)  # every step's update was applied in the end
    # The redone steps used the same noise; only the (power-of-two) scale differs, so the maps
    # are those of the calm run.
    print(f"16-mixed from scale 2**24: redone steps per batch {hot.redone}, max map difference to the run "
          f"at scale 2**8 {max_diff(hot, calm):.2e}")
    assert max_diff(hot, calm) < 1e-3

    # What a plain loop gets: silently fewer updates, different maps.
    plain = run(backbone, data, 1, plugins=fp16(2.0**24), redo=False)
    print(f"without redoing: updates per batch {plain.updates} of {STEPS - 1}, max map difference "
          f"{max_diff(plain, calm):.2e}")
    assert plain.updates[0] < STEPS - 1
    assert max_diff(plain, calm) > 1e-2


def test_16_mixed_gives_up_with_a_clear_error_when_the_forward_pass_overflows(backbone, pairs_dir):
    class Overflowing(Recorder):
        max_redone_steps = 3

    module = Overflowing(backbone, vision_layer=1, text_layer=1, steps=STEPS, copies=4, seed=0)
    data = ImageTextDataModule(path="json", data_files=str(pairs_dir / "pairs.jsonl"), batch_size=4)
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, plugins=fp16(2.0**60))
    with pytest.raises(Exception, match="bf16-mixed"):
        trainer.fit(module, datamodule=data)


def test_bf16_maps_agree_with_fp32_on_the_trained_toy_clip():
    """Per-map Pearson correlation of bf16-mixed against fp32 maps (image maps and text scores
    separately) on scenes of the grounded benchmark explained with the trained toy CLIP, by the
    functions of ``benchmarks/precision.py`` (which reports it on all 128 scenes). bf16-mixed is the
    documented choice on CPUs with bf16 matrix units (AMX) too (docs/performance.md): every map at
    least 0.999."""
    spec = importlib.util.spec_from_file_location("precision_benchmark", ROOT / "benchmarks" / "precision.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    backbone = CLIPBackbone(str(ROOT / "data" / "toy" / "toy-clip"))
    fp32 = bench.explain(backbone, "32-true", limit=8, steps=STEPS, copies=4)
    bf16 = bench.explain(backbone, "bf16-mixed", limit=8, steps=STEPS, copies=4)
    assert len(fp32["image"]) == 8
    image, text = bench.correlations(fp32["image"], bf16["image"]), bench.correlations(fp32["text"], bf16["text"])
    print(f"bf16 vs fp32 per-map Pearson, 8 toy scenes: image mean {image.mean():.5f} min {image.min():.5f}; "
          f"text mean {text.mean():.5f} min {text.min():.5f}")
    assert image.min() >= 0.999 and text.min() >= 0.999
