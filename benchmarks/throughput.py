"""Throughput of ``M2IBAttribution`` against the reference protocol, on the ViT-B/32 geometry.

Two implementations explain the same image-caption pairs, in the same process on the same machine:

* ours: :class:`m2ib_lightning.M2IBAttribution` (towers split at the bottleneck, no backbone
  gradients, all pairs x copies x both sides in one batched optimisation, chunked to fit memory);
* the reference protocol, re-implemented below from ``docs/method.md``: one pair and one side
  at a time, the FULL ``CLIPModel`` on K copies at every step (both towers, backbone parameters with
  ``requires_grad``), a forward hook replacing the output of block ``layer`` by ``Z``, Adam (lr 1)
  on the mask logits for 10 steps, the map from the capacity of the last forward pass.

Both draw each sample's noise from the same function (``m2ib_lightning.methods.noise.standard_normal``, the
reference one sample at a time), so their maps must agree up to float rounding; the script prints the largest
difference.

The model is transformers' ``CLIPConfig()`` (ViT-B/32 vision tower at 224 px, 12 + 12 blocks; ViT-B/16 with
``--patch-size 16``) with random weights, built locally with the demo tokenizer; the pairs are the synthetic
demo pairs.
Printed: seconds and pairs/s of both, their ratio (medians of interleaved rounds, so a busy machine
slows both alike), peak memory (per pair), FLOPs per pair (torch's flop counter) and the fraction
of the measured matmul peak of the device that they reach.

Usage::

    python benchmarks/throughput.py                      # CPU, fp32, a few minutes
    python benchmarks/throughput.py --scaling            # time per pair against steps, copies, layer, batch
    python benchmarks/throughput.py --device cuda --precision bf16 --pairs 256 --ref-pairs 4
    python benchmarks/throughput.py --precision bf16 --compile   # bf16 (AMX on this CPU), compiled step
    python benchmarks/throughput.py --proxy              # launch-bound proxy: time per step before / after
    python benchmarks/throughput.py --quick              # tiny model, seconds (tests/test_benchmarks.py)

``--proxy`` (``benchmarks/loop_overhead.py``): the tiny CLIP, 256 pairs, 2 copies, where compute is small:
the operator calls per step at 2 and 64 pairs, and the time per step of the loop before its noise became
counter-based (a faithful copy of that loop, kept in the benchmark only) and now, eager and compiled.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.autograd import DeviceType  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from m2ib_lightning import CLIPBackbone, M2IBAttribution, Preprocessor  # noqa: E402
from m2ib_lightning.assets.demo import make_demo_pairs  # noqa: E402
from m2ib_lightning.assets.tiny_models import build_tiny_clip  # noqa: E402
from m2ib_lightning.methods.noise import sample_keys, standard_normal  # noqa: E402

SIDES = ("vision", "text")


# --------------------------------------------------------------------------------------- set-up
def build_assets(root: Path, quick: bool, pairs: int, patch_size: int = 32) -> tuple[Path, Path]:
    """A random CLIP with the ViT-B/32 geometry (``patch_size`` 16: ViT-B/16; tiny with ``quick``) and
    ``pairs`` demo pairs."""
    from transformers import AutoTokenizer, CLIPConfig, CLIPModel

    image_size = 64 if quick else 224
    pairs_dir = root / "pairs"
    make_demo_pairs(pairs_dir, n=pairs, image_size=image_size, seed=0)
    captions = [json.loads(line)["caption"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    model_dir = root / "model"
    if quick:
        build_tiny_clip(model_dir, captions=captions, hidden_size=32, num_layers=3, num_heads=2,
                        intermediate_size=64, projection_dim=16, image_size=image_size, patch_size=16)
        return model_dir, pairs_dir
    # The demo tokenizer and image processor, then the model replaced by CLIPConfig() defaults with
    # the tokenizer's special ids (pooling looks for the EOS id).
    build_tiny_clip(model_dir, captions=captions, hidden_size=32, num_layers=1, num_heads=2,
                    intermediate_size=64, projection_dim=16, image_size=image_size, patch_size=32)
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        CLIPModel(CLIPConfig(text_config=ids, vision_config={"patch_size": patch_size})).save_pretrained(
            model_dir, safe_serialization=True)
    return model_dir, pairs_dir


def load_pairs(pairs_dir: Path, n: int) -> tuple[list[str], list[Image.Image], list[str]]:
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    images = [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]
    return [r["id"] for r in rows], images, [r["caption"] for r in rows]


def make_batch(backbone: CLIPBackbone, pairs: tuple[list[str], list[Image.Image], list[str]],
               device: torch.device) -> dict[str, Any]:
    ids, images, captions = pairs
    inputs = Preprocessor.from_backbone(backbone)(images, captions)
    return {"ids": list(ids), **{k: v.to(device) for k, v in inputs.items()}}


# ------------------------------------------------------------------------------------ measuring
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """``fn()`` and its wall-clock seconds (the device's queue drained before and after)."""
    return timed_cpu(fn, device)[:2]


def timed_cpu(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float, float]:
    """``fn()``, its wall-clock seconds and the CPU seconds this process spent meanwhile (all threads).

    On a machine shared with other jobs the wall clock measures the other jobs too; with
    ``--threads 1`` the CPU time is the steadier measure of the work itself.
    """
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start, time.process_time() - cpu


@contextlib.contextmanager
def measured(device: torch.device) -> Iterator[dict[str, int]]:
    """FLOPs (torch's flop counter) and peak tensor memory above the level at entry, in the dict
    yielded (``flops``, ``bytes``).

    CUDA: the caching allocator's peak. CPU: the profiler's record of every tensor allocation and
    release (``profile_memory``), replayed in time order; -1 where that record is unavailable. Both
    count tensors only (not allocator caches or library workspaces).
    """
    result = {"flops": 0, "bytes": -1}
    counter = FlopCounterMode(display=False)
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with counter:
            yield result
        sync(device)
        result["bytes"] = torch.cuda.max_memory_allocated(device) - base
    else:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, counter:
            yield result
        with contextlib.suppress(AttributeError):  # a private record: no number rather than a crash
            events = [e for e in prof.profiler.kineto_results.events()
                      if e.name() == "[memory]" and e.device_type() == DeviceType.CPU]
            level = peak = 0
            for event in sorted(events, key=lambda e: e.start_ns()):
                level += event.nbytes()
                peak = max(peak, level)
            result["bytes"] = peak
    result["flops"] = counter.get_total_flops()


def matmul_peak(device: torch.device, dtype: torch.dtype, quick: bool) -> tuple[float, str]:
    """Best FLOP/s of plain matmuls on ``device``: square sizes and the shapes of a ViT-B MLP."""
    shapes = [(512, 512, 512)] if quick else [(2048, 2048, 2048), (4096, 4096, 4096), (8000, 768, 3072),
                                              (8000, 3072, 768)]
    if device.type == "cuda" and not quick:
        shapes += [(8192, 8192, 8192)]
    best, where = 0.0, ""
    for m, k, n in shapes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        a @ b
        repeats = max(2, min(50, int(2e10 / (2 * m * k * n)))) if device.type == "cpu" else 20
        for _ in range(3):  # best of three: a shared machine's slow moments are not the peak
            _, seconds = timed(lambda: [a @ b for _ in range(repeats)], device)
            rate = 2 * m * k * n * repeats / seconds
            if rate > best:
                best, where = rate, f"{m}x{k} @ {k}x{n}"
    return best, where


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ------------------------------------------------------------------------ the reference protocol
def reference_maps(model: Any, pixel_values: Tensor, input_ids: Tensor, sample_id: str, *, seed: int,
                   layers: dict[str, int], steps: int, copies: int, beta: float = 0.1,
                   init_alpha: float = 5.0) -> dict[str, Tensor]:
    """Both maps of ONE pair, each side optimised on its own, as the reference code does.

    Args:
        model: a transformers ``CLIPModel`` whose parameters keep ``requires_grad`` (as in the reference).
        pixel_values: ``(1, 3, H, W)``; ``input_ids``: ``(1, L)``, the caption alone (no padding).
        sample_id: the pair's id, which (with the seed, the side, the step...) determines its noise.

    Returns:
        ``{"vision": (H, W) map in [0, 1], "text": (L,) scores in [0, 1]}``.
    """
    device = pixel_values.device
    images = pixel_values.expand(copies, -1, -1, -1)
    texts = input_ids.expand(copies, -1)
    maps = {}
    for side in SIDES:
        layer = layers[side]
        tower = model.vision_model if side == "vision" else model.text_model
        with torch.no_grad():  # the batch-1 feature pass giving R, the output of block `layer`
            if side == "vision":
                states = model.vision_model(pixel_values=pixel_values, output_hidden_states=True).hidden_states
            else:
                states = model.text_model(input_ids=input_ids, output_hidden_states=True).hidden_states
        r = states[layer + 1][0]  # (L, D)
        alpha = torch.nn.Parameter(torch.full_like(r, init_alpha))
        optimizer = torch.optim.Adam([alpha], lr=1.0)
        key = sample_keys(seed, side, [sample_id], device)
        held: dict[str, Tensor] = {}
        # Layer -1 (the token embeddings, hidden_states[0]): the module that makes block 0's input.
        hooked = tower.encoder.layers[layer] if layer >= 0 else (
            tower.pre_layrnorm if side == "vision" else tower.embeddings)
        handle = hooked.register_forward_hook(lambda module, args, output: held["z"])
        try:
            for step in range(steps):
                eps = standard_normal(key, step, (1, copies, *r.shape))[0]
                lam = torch.sigmoid(alpha)
                held["z"] = lam * r + (1 - lam) * eps
                # The full model on K copies, both towers, every step (the other tower unbottlenecked).
                image = model.get_image_features(pixel_values=images).pooler_output
                text = model.get_text_features(input_ids=texts).pooler_output
                explained, other = (image, text) if side == "vision" else (text, image)
                relevance = F.cosine_similarity(explained, other, eps=1e-6).mean()
                capacity = -0.5 * (1 + torch.log((1 - lam) ** 2) - (lam * r) ** 2 - (1 - lam) ** 2)
                loss = beta * capacity.mean() - relevance
                last = capacity.detach()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        finally:
            handle.remove()
        scores = torch.nansum(last, dim=-1)
        if side == "text":
            maps[side] = ((scores - scores.min()) / (scores.max() - scores.min())).cpu()
            continue
        patches = scores[1:]
        grid = int(math.isqrt(patches.numel()))
        up = F.interpolate(patches.view(1, 1, grid, grid), size=tuple(pixel_values.shape[-2:]), mode="bilinear",
                           align_corners=False)[0, 0]
        maps[side] = ((up - up.min()) / (up.max() - up.min())).cpu()
    return maps


# -------------------------------------------------------------------------------------- reports
def fmt_bytes(n: float) -> str:
    return "n/a" if n < 0 else f"{n / 2**20:.1f} MiB"


def run_ours(module: M2IBAttribution, batch: dict[str, Any], device: torch.device, precision: str) -> dict[str, Any]:
    with autocast(device, precision):
        return module.explain_batch(batch)


def make_module(backbone: CLIPBackbone, args: argparse.Namespace, device: torch.device, **overrides: Any):
    settings = dict(vision_layer=args.vision_layer, text_layer=args.text_layer, steps=args.steps,
                    copies=args.copies, seed=args.seed, chunk_size=args.chunk_size,
                    torch_compile=args.compile or False)
    settings.update(overrides)
    return M2IBAttribution(backbone, **settings).to(device)


def benchmark(args: argparse.Namespace, backbone: CLIPBackbone, model_dir: Path, pairs_dir: Path,
              device: torch.device) -> bool:
    """Print the comparison; returns whether the maps agree (always True for bf16, informative only)."""
    from transformers import CLIPModel

    pairs = load_pairs(pairs_dir, args.pairs)
    batch = make_batch(backbone, pairs, device)
    layers = {"vision": args.vision_layer, "text": args.text_layer}
    n = len(batch["ids"])

    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    peak, peak_shape = matmul_peak(device, dtype, args.quick)
    print(f"matmul peak ({args.precision}, measured here): {peak / 1e9:.1f} GFLOP/s ({peak_shape})")

    # FLOPs: every step but the last costs the same (the last differs: the reference runs its forward
    # and backward, ours reads the capacity only), so two short runs give the whole run:
    # flops(s) = flops(2) + (s - 2) * (flops(3) - flops(2)). The 2-step run holds the same
    # activations at its peak as a longer one: it also gives the peak memory.
    module = make_module(backbone, args, device)
    reference = CLIPModel.from_pretrained(model_dir).to(device).eval()  # requires_grad stays True
    tok = backbone.tokenizer
    ref_inputs = [(batch["pixel_values"][i : i + 1], tok(pairs[2][i], return_tensors="pt")["input_ids"].to(device))
                  for i in range(args.ref_pairs)]
    counts: dict[str, list[dict[str, int]]] = {"ours": [], "reference": []}
    for steps in (2, 3):  # eager (a compiled step has the same FLOPs; compiling under the counter would not pay)
        with measured(device) as m:
            run_ours(make_module(backbone, args, device, steps=steps, torch_compile=False), batch, device,
                     args.precision)
        counts["ours"].append(m)
        with measured(device) as m:
            reference_maps(reference, *ref_inputs[0], batch["ids"][0], seed=args.seed, layers=layers, steps=steps,
                           copies=args.copies)
        counts["reference"].append(m)
    ours_flops, ref_flops = (c[0]["flops"] + (args.steps - 2) * (c[1]["flops"] - c[0]["flops"])
                             for c in (counts["ours"], counts["reference"]))
    ours_bytes, ref_bytes = counts["ours"][0]["bytes"], counts["reference"][0]["bytes"]

    if args.compile:  # the first batch of a shape waits for the compiler: not part of the timing
        _, seconds = timed(lambda: run_ours(module, batch, device, args.precision), device)
        print(f"  compiling the step ({args.compile}) and a first batch: {seconds:.1f} s", flush=True)
    # Interleaved rounds: ours on the whole batch, then the reference on one pair, and again.
    ours_times, ref_times, ref_maps = [], [], []
    ours_cpu, ref_cpu = [], []
    out: dict[str, Any] = {}
    rounds = max(args.repeats, args.ref_pairs)
    for r in range(rounds):
        if r < args.repeats:
            out, seconds, cpu = timed_cpu(lambda: run_ours(module, batch, device, args.precision), device)
            ours_times.append(seconds)
            ours_cpu.append(cpu)
            print(f"  round {r}: ours {seconds:.2f} s for {n} pairs ({seconds / n:.3f} s/pair; CPU time "
                  f"{cpu / n:.3f} s/pair)", flush=True)
        if r < args.ref_pairs:
            maps, seconds, cpu = timed_cpu(lambda: reference_maps(reference, *ref_inputs[r], batch["ids"][r],
                                                                  seed=args.seed, layers=layers, steps=args.steps,
                                                                  copies=args.copies), device)
            ref_times.append(seconds)
            ref_cpu.append(cpu)
            ref_maps.append(maps)
            print(f"  round {r}: reference {seconds:.2f} s for 1 pair (CPU time {cpu:.2f} s)", flush=True)

    ours_s = statistics.median(ours_times) / n
    ref_s = statistics.median(ref_times)
    ratio = ref_s / ours_s
    cpu_ratio = statistics.median(ref_cpu) / (statistics.median(ours_cpu) / n)
    print()
    print(f"ours:      {ours_s:.3f} s/pair  {1 / ours_s:.3f} pairs/s  (batch of {n} pairs, median of "
          f"{len(ours_times)} runs; chunk rows {module_rows(module, batch)})")
    print(f"reference: {ref_s:.3f} s/pair  {1 / ref_s:.4f} pairs/s  (median of {len(ref_times)} pairs)")
    low, high = min(ref_times) / (max(ours_times) / n), max(ref_times) / (min(ours_times) / n)
    print(f"ratio: {ratio:.1f}x the reference's pairs/s (medians; {low:.1f}x to {high:.1f}x from the slowest and "
          f"fastest runs)" + (f"; by CPU time: {cpu_ratio:.1f}x" if device.type == "cpu" else ""))
    print(f"peak memory: ours {fmt_bytes(ours_bytes)} for {n} pairs ({fmt_bytes(ours_bytes / n)} per pair); "
          f"reference {fmt_bytes(ref_bytes)} for 1 pair (tensors above the loaded models; the reference's "
          f"includes the weight gradients it allocates)")
    for name, flops, seconds in (("ours", ours_flops / n, ours_s), ("reference", ref_flops, ref_s)):
        print(f"FLOPs per pair, {name}: {flops / 1e9:.4g} GFLOP -> {flops / seconds / 1e9:.3g} GFLOP/s = "
              f"{100 * flops / seconds / peak:.0f}% of the matmul peak (limit {peak / flops:.3f} pairs/s)")
    print(f"model FLOPs per pair: reference / ours = {ref_flops / (ours_flops / n):.1f}")

    image_diff = max(float((out.image_maps[i] - m["vision"]).abs().max()) for i, m in enumerate(ref_maps))
    text_diff = max(float((out.text_scores[i] - m["text"]).abs().max()) for i, m in enumerate(ref_maps))
    worst = max(image_diff, text_diff)
    if args.precision == "fp32":
        verdict = "OK" if worst <= args.tolerance else f"MISMATCH (tolerance {args.tolerance})"
    else:
        verdict = "informative only: ours ran in bf16, the reference in fp32"
    print(f"map agreement (max |ours - reference| over {len(ref_maps)} pairs, same noise): image {image_diff:.2e}, "
          f"text {text_diff:.2e}: {verdict}")
    return args.precision != "fp32" or worst <= args.tolerance


def module_rows(module: M2IBAttribution, batch: dict[str, Any]) -> str:
    with torch.no_grad():
        states = {s: module.backbone.lower(s, module.model_inputs(batch), module.layers[s]).hidden
                  for s in module.sides}
    return ", ".join(f"{s}: {min(module.chunk_rows(s, h), h.shape[0] * module.copies)}" for s, h in states.items())


def scaling(args: argparse.Namespace, backbone: CLIPBackbone, pairs_dir: Path, device: torch.device) -> None:
    """Time per pair of ours, one factor at a time around the defaults, as a markdown table."""
    pairs = load_pairs(pairs_dir, max(args.pairs, 32 if not args.quick else args.pairs))
    base = dict(steps=args.steps, copies=args.copies, vision_layer=args.vision_layer, text_layer=args.text_layer)
    points: list[tuple[str, dict[str, Any], int]] = [("defaults", {}, args.pairs)]
    if args.quick:
        points += [("steps", {"steps": 2 * args.steps}, args.pairs), ("batch", {}, 1)]
    else:
        points += [("steps", {"steps": s}, args.pairs) for s in (5, 20)]
        points += [("copies", {"copies": c}, args.pairs) for c in (5, 20)]
        points += [("layer", {"vision_layer": v, "text_layer": t}, args.pairs) for v, t in ((11, 11), (6, 6))]
        points += [("batch", {}, b) for b in (1, 4, 32)]
    warm = make_module(backbone, args, device, steps=2)
    run_ours(warm, make_batch(backbone, tuple(p[:2] for p in pairs), device), device, args.precision)
    print("| varied | steps | copies | layers (vision/text) | pairs per batch | s/pair | pairs/s | CPU s/pair | "
          "peak MiB/pair |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, change, size in points:
        settings = {**base, **change}
        module = make_module(backbone, args, device, **change)
        batch = make_batch(backbone, tuple(p[:size] for p in pairs), device)
        with measured(device) as mem:  # peak memory of a 2-step run (the same activations at the peak)
            run_ours(make_module(backbone, args, device, **{**change, "steps": 2}), batch, device, args.precision)
        _, seconds, cpu = timed_cpu(lambda: run_ours(module, batch, device, args.precision), device)
        per = seconds / size
        print(f"| {name} | {settings['steps']} | {settings['copies']} | {settings['vision_layer']}/"
              f"{settings['text_layer']} | {size} | {per:.3f} | {1 / per:.3f} | {cpu / size:.3f} | "
              f"{mem['bytes'] / size / 2**20 if mem['bytes'] >= 0 else float('nan'):.0f} |", flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"],
                        help="ours under bf16 autocast or in fp32 (the reference always runs in fp32)")
    parser.add_argument("--pairs", type=int, default=16, help="pairs in our batch")
    parser.add_argument("--ref-pairs", type=int, default=2, help="pairs the reference explains (about 25 s each "
                        "on 2 CPU cores); the first ones of our batch, so their maps are compared")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of our batch")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--copies", type=int, default=10)
    parser.add_argument("--vision-layer", type=int, default=None,
                        help="bottleneck layer, -1: the token embeddings (default 9; 1 with --quick)")
    parser.add_argument("--text-layer", type=int, default=None, help="same for the text tower")
    parser.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: automatic)")
    parser.add_argument("--compile", nargs="?", const="default", default=None,
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="ours with the step compiled (torch_compile; mode default, or the one given: "
                             "reduce-overhead uses CUDA graphs on a GPU)")
    parser.add_argument("--patch-size", type=int, default=32, help="vision patch size: 32 (ViT-B/32) or 16 (ViT-B/16)")
    parser.add_argument("--proxy", action="store_true",
                        help="only the launch-bound proxy (tiny model, 256 pairs): time per step before/after")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: torch's choice; 1 with --quick)")
    parser.add_argument("--tolerance", type=float, default=1e-3, help="largest map difference accepted (fp32)")
    parser.add_argument("--scaling", action="store_true", help="print the scaling table instead")
    parser.add_argument("--quick", action="store_true",
                        help="tiny model and settings (seconds; for tests): 3 blocks, 64 px, 3 steps, 2 copies")
    args = parser.parse_args(argv)
    if args.quick:
        args.pairs, args.ref_pairs, args.repeats = min(args.pairs, 3), 1, 1
        args.steps, args.copies = 3, 2
    default_layer = 1 if args.quick else 9
    args.vision_layer = default_layer if args.vision_layer is None else args.vision_layer
    args.text_layer = default_layer if args.text_layer is None else args.text_layer
    if args.ref_pairs > args.pairs:
        parser.error(f"--ref-pairs ({args.ref_pairs}) must be <= --pairs ({args.pairs})")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    threads = torch.get_num_threads()
    try:
        # --quick and --proxy: one thread, because a tiny model's many small ops mostly wait on
        # thread hand-offs, badly so when other processes share the cores.
        torch.set_num_threads(args.threads or (1 if args.quick or args.proxy else threads))
        agree = run(args)
    finally:
        torch.set_num_threads(threads)
    if not agree:
        sys.exit("the maps of ours and of the reference differ beyond --tolerance (see above)")


def run(args: argparse.Namespace) -> bool:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: no CUDA device is visible")
    with tempfile.TemporaryDirectory(prefix="m2ib-bench-") as tmp:
        if args.proxy:
            return proxy(args, Path(tmp), device)
        model_dir, pairs_dir = build_assets(Path(tmp), args.quick, max(args.pairs, 32 if args.scaling else 0),
                                            args.patch_size)
        backbone = CLIPBackbone(str(model_dir))
        vcfg, tcfg = backbone.model.config.vision_config, backbone.model.config.text_config
        name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"CPU, {torch.get_num_threads()} threads")
        print(f"device: {name}; torch {torch.__version__}; precision {args.precision}")
        print(f"model: vision {vcfg.num_hidden_layers} blocks x {vcfg.hidden_size} at {vcfg.image_size} px / "
              f"patch {vcfg.patch_size}; text {tcfg.num_hidden_layers} blocks x {tcfg.hidden_size}; random weights")
        print(f"settings: steps {args.steps}, copies {args.copies}, layers {args.vision_layer}/{args.text_layer}, "
              f"both maps, chunk_size {args.chunk_size or 'auto'}, compile {args.compile}")
        if args.scaling:
            scaling(args, backbone, pairs_dir, device)
            return True
        return benchmark(args, backbone, model_dir, pairs_dir, device)


def proxy(args: argparse.Namespace, root: Path, device: torch.device) -> bool:
    """The launch-bound proxy of ``loop_overhead.py``: 256 pairs on a CLIP so small (width 8, 3 blocks,
    32 px images in 16 px patches: 5 image tokens) that the time per step is the loop's overhead."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from loop_overhead import launch_proxy

    pairs_dir, model_dir = root / "pairs", root / "model"
    make_demo_pairs(pairs_dir, n=256, image_size=32, seed=0)
    captions = [json.loads(line)["caption"] for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    build_tiny_clip(model_dir, captions=captions, hidden_size=8, num_layers=3, num_heads=2, intermediate_size=16,
                    projection_dim=8, image_size=32, patch_size=16)
    backbone = CLIPBackbone(str(model_dir)).to(device)
    pairs = load_pairs(pairs_dir, 256)
    print(f"device: {device}, {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    launch_proxy(backbone, lambda n: make_batch(backbone, tuple(p[:n] for p in pairs), device), layer=1,
                 repeats=args.repeats, copies=1, compiled=not args.quick)
    return True


if __name__ == "__main__":
    main()
