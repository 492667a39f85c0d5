"""GPU check of the compiled bf16 loop: pairs/s, operator calls, memory, matmul-peak fraction, fp32 agreement.

Run by ``benchmarks/gpu_check.sh`` on one GPU (sized to finish in under 8 minutes on an H100-class
device; NOT measured by this project yet, see docs/performance.md). For the ViT-B/32 and ViT-B/16
geometries (transformers' ``CLIPConfig`` with random weights, patch 32 or 16 at 224 px, layers 9/9,
10 steps, 10 copies, both maps) it prints:

* pairs/s of ``M2IBAttribution`` at batch 64 and 256 in bf16 (``torch.autocast``, as
  ``trainer.precision: bf16-mixed``), the step compiled with ``torch_compile`` (default
  ``reduce-overhead``: CUDA graphs); the compilation is timed apart;
* operator calls per step (eager, at 2 and 64 pairs: the same number) and kernel or graph launches
  per step of the compiled loop (profiler: ``cudaLaunchKernel`` / ``cudaGraphLaunch`` calls of one
  batch's optimisation over its ``steps - 1`` steps);
* the allocator's peak memory per pair of a timed batch;
* FLOPs per pair (torch's counter, eager) and the fraction of the device's bf16 matmul peak measured
  in the same run;
* the agreement of the bf16 maps with fp32 ones (per-map Pearson of image maps and token scores, 16
  pairs, fp32 eager).

``--device cpu --quick`` runs the same code on a tiny model in seconds (how it is tested without a GPU).

Usage::

    bash benchmarks/gpu_check.sh                       # python benchmarks/gpu_check.py
    python benchmarks/gpu_check.py --batches 64 --geometries 32
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))
import throughput as bench  # noqa: E402
from loop_overhead import step_operator_calls  # noqa: E402

from m2ib_lightning import CLIPBackbone, M2IBAttribution  # noqa: E402
from m2ib_lightning.assets.demo import make_demo_pairs  # noqa: E402


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 1.0 if np.array_equal(a, b) else 0.0
    return float(np.corrcoef(a, b)[0, 1])


def launches_per_step(module: M2IBAttribution, batch: dict[str, Any], device: torch.device) -> float:
    """CUDA kernel and graph launches of one batch's optimisation, per step (compiled, warm)."""
    if device.type != "cuda":
        return float("nan")
    plan = module.prepare(batch)
    with torch.autocast("cuda", dtype=torch.bfloat16), torch.enable_grad(), \
            profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        module.optimise(plan)
        torch.cuda.synchronize(device)
    names = ("cudaLaunchKernel", "cudaGraphLaunch", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")
    launches = sum(1 for e in prof.events() if e.name in names)
    return launches / max(1, module.steps - 1)


def check(args: argparse.Namespace, patch: int, root: Path, pairs_dir: Path, device: torch.device,
          peak: float) -> None:
    model_dir, _ = bench.build_assets(root / f"p{patch}", args.quick, 2, patch)
    backbone = CLIPBackbone(str(model_dir)).to(device)
    vcfg = backbone.model.config.vision_config
    layer = 1 if args.quick else 9
    settings = dict(vision_layer=layer, text_layer=layer, steps=args.steps, copies=args.copies)
    pairs = bench.load_pairs(pairs_dir, max(args.batches))
    print(f"\n== geometry: vision {vcfg.num_hidden_layers} blocks x {vcfg.hidden_size}, {vcfg.image_size} px / patch "
          f"{vcfg.patch_size} ({(vcfg.image_size // vcfg.patch_size) ** 2 + 1} tokens); layers {layer}/{layer}, "
          f"{args.steps} steps, {args.copies} copies", flush=True)

    def batch_of(n: int) -> dict[str, Any]:
        return bench.make_batch(backbone, tuple(p[:n] for p in pairs), device)

    def eager(steps: int, n: int) -> M2IBAttribution:
        return M2IBAttribution(backbone, **{**settings, "steps": steps}, chunk_size=args.copies * n).to(device)

    with torch.autocast(device.type, dtype=torch.bfloat16):
        calls = {n: step_operator_calls(lambda s, n=n: eager(s, n), batch_of(n)) for n in (2, 64)}
    print(f"operator calls per step (eager, both sides): batch of 2: {calls[2]}, batch of 64: {calls[64]}")
    # FLOPs per pair: two short eager runs give the whole run (throughput.py explains why)
    flops = []
    for steps in (2, 3):
        with bench.measured(device) as m:
            bench.run_ours(eager(steps, 2), batch_of(2), device, "bf16")
        flops.append(m["flops"] / 2)
    per_pair = flops[0] + (args.steps - 2) * (flops[1] - flops[0])
    print(f"FLOPs per pair: {per_pair / 1e9:.4g} GFLOP")

    maps: dict[str, Any] = {}
    for n in args.batches:
        module = M2IBAttribution(backbone, **settings, torch_compile=args.mode).to(device)
        batch = batch_of(n)
        out, seconds = bench.timed(lambda: bench.run_ours(module, batch, device, "bf16"), device)
        print(f"batch {n}: compiling ({args.mode}) and a first batch: {seconds:.1f} s", flush=True)
        times, peaks = [], []
        for _ in range(args.repeats):
            if device.type == "cuda":
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
            out, seconds = bench.timed(lambda: bench.run_ours(module, batch, device, "bf16"), device)
            times.append(seconds)
            if device.type == "cuda":
                peaks.append(torch.cuda.max_memory_allocated(device) - base)
        median = statistics.median(times)
        rate = n / median
        memory = f"{max(peaks) / n / 2**20:.1f} MiB" if peaks else "n/a (CUDA only)"
        print(f"batch {n}: {rate:.1f} pairs/s (median of {len(times)}: {median:.3f} s per batch); peak memory "
              f"per pair {memory}; {per_pair * rate / 1e12:.1f} TFLOP/s = {100 * per_pair * rate / peak:.0f}% of the "
              f"bf16 matmul peak; launches per step (compiled): {launches_per_step(module, batch, device):.1f}",
              flush=True)
        maps.setdefault("bf16", out)
    # Agreement with fp32 (eager) on the first pairs of the first batch size.
    k = min(args.agreement_pairs, min(args.batches))
    bf16 = maps["bf16"]
    fp32 = bench.run_ours(M2IBAttribution(backbone, **settings).to(device), batch_of(k), device, "fp32")
    image = [pearson(bf16.image_maps[i].numpy(), fp32.image_maps[i].numpy()) for i in range(k)]
    text = [pearson(np.asarray(bf16.text_scores[i]), np.asarray(fp32.text_scores[i])) for i in range(k)]
    print(f"bf16 vs fp32 maps ({k} pairs, per-map Pearson): image mean {np.mean(image):.5f} min {np.min(image):.5f}; "
          f"text mean {np.mean(text):.5f} min {np.min(text):.5f}", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--geometries", type=int, nargs="+", default=[32, 16], help="vision patch sizes")
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 256], help="pairs per batch")
    parser.add_argument("--mode", default="reduce-overhead", help="torch_compile mode")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3, help="timed batches per setting")
    parser.add_argument("--agreement-pairs", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="tiny model (plumbing check, e.g. --device cpu)")
    args = parser.parse_args(argv)
    if args.quick:
        args.batches, args.steps, args.copies, args.repeats, args.agreement_pairs = [4, 8], 3, 2, 1, 2
        args.geometries = args.geometries[:1]  # the tiny model has one geometry
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device: {name}; torch {torch.__version__}")
    peak, shape = bench.matmul_peak(device, torch.bfloat16, args.quick)
    print(f"bf16 matmul peak (measured here): {peak / 1e12:.1f} TFLOP/s ({shape})")
    with tempfile.TemporaryDirectory(prefix="m2ib-gpu-check-") as tmp:
        pairs_dir = Path(tmp) / "pairs"
        make_demo_pairs(pairs_dir, n=max(args.batches), image_size=64 if args.quick else 224, seed=0)
        for patch in args.geometries:
            check(args, patch, Path(tmp), pairs_dir, device, peak)


if __name__ == "__main__":
    main()
