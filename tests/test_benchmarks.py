"""The throughput benchmark runs end to end (``--quick``: tiny model) and reports what it promises.

Timings are not asserted: they depend on the machine. The map agreement is: both implementations
draw the same noise, so their maps must match.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def throughput():
    # Imported from its file and run in this process: the script is not part of the package, and a
    # subprocess would pay the imports (tens of seconds on a busy 2-core machine) once more.
    spec = importlib.util.spec_from_file_location("throughput_benchmark", ROOT / "benchmarks" / "throughput.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run(throughput, capsys, *args: str) -> str:
    throughput.main(list(args))
    return capsys.readouterr().out


def test_quick_benchmark_prints_ratio_memory_flops_and_map_agreement(throughput, capsys):
    out = run(throughput, capsys, "--quick")
    assert re.search(r"^ours: +[\d.]+ s/pair +[\d.]+ pairs/s", out, re.M), out
    assert re.search(r"^reference: +[\d.]+ s/pair +[\d.]+ pairs/s", out, re.M), out
    assert re.search(r"^ratio: [\d.]+x the reference's pairs/s", out, re.M), out
    assert re.search(r"^peak memory: ours .* per pair", out, re.M), out
    assert re.search(r"^FLOPs per pair, ours: .*% of the matmul peak", out, re.M), out
    match = re.search(r"^map agreement .*: image ([\d.e+-]+), text ([\d.e+-]+): OK$", out, re.M)
    assert match, out
    assert float(match.group(1)) < 1e-3 and float(match.group(2)) < 1e-3


def test_quick_benchmark_at_the_token_embeddings(throughput, capsys):
    # Layer -1: the reference hooks the module that makes block 0's input, and the maps still agree.
    out = run(throughput, capsys, "--quick", "--vision-layer", "-1", "--text-layer", "-1")
    assert "layers -1/-1" in out
    match = re.search(r"^map agreement .*: image ([\d.e+-]+), text ([\d.e+-]+): OK$", out, re.M)
    assert match and float(match.group(1)) < 1e-3 and float(match.group(2)) < 1e-3, out


def test_benchmark_fails_when_the_maps_differ(throughput, capsys):
    """A mismatch is an error exit, not just a printed word."""
    with pytest.raises(SystemExit, match="differ beyond --tolerance"):
        throughput.main(["--quick", "--tolerance", "-1"])
    assert "MISMATCH" in capsys.readouterr().out


def test_quick_scaling_table(throughput, capsys):
    out = run(throughput, capsys, "--quick", "--scaling")
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| varied")]
    assert [r.split("|")[1].strip() for r in rows] == ["defaults", "steps", "batch"], out


def test_launch_bound_proxy_prints_operator_counts_and_time_per_step(throughput, capsys):
    """``--proxy``: operator calls per step at 2 and 64 pairs (equal) and the time per step of the old
    per-sample-generator loop and of today's (``--quick``: eager only, no compilation)."""
    out = run(throughput, capsys, "--proxy", "--quick", "--repeats", "1")
    match = re.search(r"^operator calls per step \(both sides\): batch of 2: (\d+), batch of 64: (\d+) "
                      r"\(before: (\d+) and (\d+)\)", out, re.M)
    assert match, out
    assert match.group(1) == match.group(2) and int(match.group(4)) > int(match.group(3))
    assert re.search(r"^launch-bound proxy .*256 pairs.*: before [\d.]+ ms, after [\d.]+ ms \(after: [\d.]+x faster",
                     out, re.M), out


@pytest.mark.slow
def test_gpu_check_runs_end_to_end_on_a_cpu(capsys):
    """``benchmarks/gpu_check.py`` (what ``gpu_check.sh`` runs on a GPU), on the tiny model and a CPU:
    every figure it promises is printed (GPU-only ones as n/a); about a minute for two compilations."""
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(["--device", "cpu", "--quick"])
    out = capsys.readouterr().out
    assert re.search(r"^bf16 matmul peak \(measured here\): [\d.]+ TFLOP/s", out, re.M), out
    calls = re.search(r"^operator calls per step \(eager, both sides\): batch of 2: (\d+), batch of 64: (\d+)$",
                      out, re.M)
    assert calls and calls.group(1) == calls.group(2), out
    for n in (4, 8):
        assert re.search(rf"^batch {n}: [\d.]+ pairs/s .*peak memory per pair .*% of the bf16 matmul peak; "
                         r"launches per step", out, re.M), out
    match = re.search(r"^bf16 vs fp32 maps .*image mean ([\d.]+) min ([\d.]+); text mean ([\d.]+) min ([\d.]+)$",
                      out, re.M)
    assert match and min(float(g) for g in match.groups()) > 0.99, out


def test_quick_selection_benchmark_prints_the_sweep_time(capsys):
    spec = importlib.util.spec_from_file_location("selection_benchmark", ROOT / "benchmarks" / "selection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick"])
    out = capsys.readouterr().out
    assert re.search(r"^select: [\d.]+ s wall \([\d.]+ min\), [\d.]+ s CPU", out, re.M), out
    # every layer of both towers of the tiny CLIP (3 blocks and the embeddings), the reference bottleneck
    assert len(result["settings"]) == 8
