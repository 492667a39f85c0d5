"""Tables of the quality benchmark that only ``scripts/benchmark_quality.py`` needs.

:func:`sanity_table` runs the cascading randomisation of every method on the first scenes of the
grounded benchmark (``data/toy``) and formats the result as a markdown table.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from m2ib_lightning.evaluation.ground_truth import ground_truth
from m2ib_lightning.evaluation.sanity import cascading_randomization
from m2ib_lightning.run.configs import load_method

__all__ = ["sanity_table"]


def sanity_table(methods: Sequence[str], root: Path, limit: int = 32, seed: int = 0) -> dict[str, Any]:
    """Cascading randomisation of every method on the first ``limit`` benchmark scenes.

    Returns ``{"results": {method: {stage: {measure: mean}}}, "table": markdown}``.
    """
    from PIL import Image

    from m2ib_lightning.data import Preprocessor

    pairs = root / "data" / "toy" / "pairs.jsonl"
    rows = [json.loads(line) for line in pairs.read_text().splitlines()][:limit]
    results: dict[str, dict[str, dict[str, float]]] = {}
    for method in methods:
        # The benchmark run's model: the method fragment on top of the benchmark config (its backbone, layers).
        module = load_method(root / "configs" / "toy_benchmark.yaml", root / "configs" / "method" / f"{method}.yaml")
        images = [Image.open(pairs.parent / r["image"]).convert("RGB") for r in rows]
        batch = {"ids": [r["id"] for r in rows],
                 **Preprocessor.from_backbone(module.backbone)(images, [r["caption"] for r in rows])}
        size = tuple(batch["pixel_values"].shape[-2:])
        masks = torch.stack([ground_truth(r["mask"], size) for r in rows])
        module.sides = ("vision",)
        with torch.no_grad():
            corr = cascading_randomization(module, batch, seed=seed, baseline_seed=seed + 1, masks=masks)
        results[method] = {stage: {k: float(v.float().mean()) for k, v in m.items()} for stage, m in corr.items()}
    stages = [s for s in next(iter(results.values())) if s not in ("original", "seed")]
    head = ["Method", "measure", "original", "other seed", *[f"+ {s}" if i else s for i, s in enumerate(stages)]]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] * len(head)) + "|"]
    for method, res in results.items():
        for measure, label in (("spearman", "rank corr."), ("peak_kept", "peak kept"), ("pointing", "pointing")):
            cells = [method if measure == "spearman" else "", label,
                     f"{res['original']['pointing']:.2f}" if measure == "pointing" else "-",
                     f"{res['seed'][measure]:.2f}", *[f"{res[s][measure]:.2f}" for s in stages]]
            lines.append("| " + " | ".join(cells) + " |")
    return {"results": results, "table": "\n".join(lines)}
