"""Mixed-precision maps against float32 ones, on the trained toy CLIP and the grounded benchmark.

For every precision it explains the same scenes of ``data/toy`` with M2IB (the demo's settings:
layer 0 of the toy CLIP, 10 steps, 10 copies) through a Lightning Trainer, and prints the per-map
Pearson correlation with the float32 maps (image maps and caption scores separately: mean, min,
5th percentile) plus, for float16, the steps redone after the loss scaler skipped an update.

On a CPU, float16 runs through ``MixedPrecision("16-mixed", "cpu")`` (Lightning itself turns
``precision="16-mixed"`` into bf16 on a CPU), so its loss scaler is exercised as on a GPU.

Usage::

    python benchmarks/precision.py                       # 128 scenes, CPU: fp32, bf16-mixed, 16-mixed
    python benchmarks/precision.py --limit 16 --device cuda
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lightning.pytorch as pl  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.plugins import MixedPrecision  # noqa: E402

from m2ib_lightning import CLIPBackbone, ImageTextDataModule, M2IBAttribution  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TOY = ROOT / "data" / "toy"


class _Collect(pl.Callback):
    """Keeps each sample's image map and text scores, and sums the logged ``redone_steps``."""

    def __init__(self) -> None:
        self.image: dict[str, np.ndarray] = {}
        self.text: dict[str, np.ndarray] = {}
        self.redone = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        explanation = outputs["explanation"]
        for i, sample_id in enumerate(explanation.ids):
            self.image[sample_id] = explanation.image_maps[i].flatten().numpy()
            self.text[sample_id] = np.asarray(explanation.text_scores[i], dtype=np.float32)
        if "redone_steps" in trainer.callback_metrics:
            self.redone += int(trainer.callback_metrics["redone_steps"].item())


def explain(backbone: CLIPBackbone, precision: str, limit: int | None, device: str = "cpu",
            layer: int = 0, steps: int = 10, copies: int = 10, batch_size: int = 16) -> dict[str, Any]:
    """Explain the first ``limit`` toy scenes at ``precision``; returns the maps, redone steps and time."""
    module = M2IBAttribution(backbone, vision_layer=layer, text_layer=layer, steps=steps, copies=copies, seed=0)
    data = ImageTextDataModule(path="json", data_files=str(TOY / "pairs.jsonl"), batch_size=batch_size, limit=limit)
    collect = _Collect()
    if precision == "16-mixed":
        precision_kwargs: dict[str, Any] = {"plugins": [MixedPrecision("16-mixed", device)]}
    else:
        precision_kwargs = {"precision": precision}
    trainer = pl.Trainer(accelerator=device, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, callbacks=[collect], **precision_kwargs)
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    return {"image": collect.image, "text": collect.text, "redone": collect.redone,
            "seconds": time.perf_counter() - start}


def correlations(reference: dict[str, np.ndarray], other: dict[str, np.ndarray]) -> np.ndarray:
    """Per-sample Pearson correlation of two maps (a constant map counts as agreeing only with itself)."""
    out = []
    for key, ref in reference.items():
        a, b = ref.astype(np.float64), other[key].astype(np.float64)
        if a.std() == 0 or b.std() == 0:
            out.append(1.0 if np.array_equal(a, b) else 0.0)
        else:
            out.append(float(np.corrcoef(a, b)[0, 1]))
    return np.asarray(out)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="first N scenes (default: all 128)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--precisions", nargs="+", default=["bf16-mixed", "16-mixed"])
    args = parser.parse_args(argv)
    backbone = CLIPBackbone(str(TOY / "toy-clip"))
    reference = explain(backbone, "32-true", args.limit, args.device)
    n = len(reference["image"])
    print(f"float32: {n} toy scenes in {reference['seconds']:.1f} s")
    report: dict[str, Any] = {}
    for precision in args.precisions:
        run = explain(backbone, precision, args.limit, args.device)
        row = {"seconds": run["seconds"], "redone_steps": run["redone"]}
        for side in ("image", "text"):
            r = correlations(reference[side], run[side])
            row[side] = {"mean": float(r.mean()), "min": float(r.min()), "p5": float(np.percentile(r, 5))}
        report[precision] = row
        print(f"{precision}: Pearson with float32 per map over {n} scenes: image mean {row['image']['mean']:.5f} "
              f"min {row['image']['min']:.5f} p5 {row['image']['p5']:.5f}; text mean {row['text']['mean']:.5f} "
              f"min {row['text']['min']:.5f}; redone steps {run['redone']}; {run['seconds']:.1f} s")
    print(f"torch {torch.__version__}, device {args.device}")
    return report


if __name__ == "__main__":
    main()
