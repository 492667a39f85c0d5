"""Chunked optimisation (exact), the automatic chunk size, and out-of-memory errors that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_module import load_pairs, make_batch, make_module

from m2ib_lightning import ConfigError
from m2ib_lightning.methods import memory


@pytest.fixture(scope="module")
def batch(backbone, pairs_dir):
    ids, images, captions = load_pairs(pairs_dir, n=5)
    captions[2] = captions[2] + " with a small extra phrase at the end"  # padded text in the batch
    return make_batch(backbone, ids, images, captions)


@pytest.fixture(scope="module")
def whole(backbone, batch):
    """Maps of the batch in one chunk per side."""
    return make_module(backbone, chunk_size=10_000).explain_batch(batch)


def assert_same_maps(a, b, atol=1e-5):
    torch.testing.assert_close(a.image_maps, b.image_maps, atol=atol, rtol=0)
    for x, y in zip(a.text_scores, b.text_scores, strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 9])  # copies = 4: one sample per chunk; 2 samples, uneven last chunk
def test_chunked_maps_equal_unchunked(backbone, batch, whole, chunk_size):
    module = make_module(backbone, chunk_size=chunk_size)
    prepared = module.prepare(batch)
    per_chunk = chunk_size // 4
    # Every chunk has the same shape: the last one is padded with rows of weight 0 (static shapes).
    assert [(c.start, c.stop) for c in prepared.sides["vision"].chunks] == [
        (a, a + per_chunk) for a in range(0, 5, per_chunk)
    ]
    assert prepared.sides["vision"].samples == 5
    assert prepared.sides["vision"].weight.tolist() == [1.0] * 5 + [0.0] * (len(prepared.sides["vision"].weight) - 5)
    assert_same_maps(module.explain_batch(batch), whole)


def test_automatic_chunk_size_follows_free_memory(backbone, batch, whole, monkeypatch):
    module = make_module(backbone)  # chunk_size=None
    hidden = torch.zeros(5, 17, 32)
    row = memory.bytes_per_row(17, 32, blocks=1, pruned_last=True)
    # Room for 2.5 samples x 4 copies in the usable share of "free" memory: chunks of 2 samples.
    monkeypatch.setattr(memory, "available_memory", lambda device: int(10 * row / memory.AUTO_MEMORY_FRACTION))
    assert module.chunk_rows("vision", hidden) == 10
    prepared = module.prepare(batch)
    assert [(c.start, c.stop) for c in prepared.sides["vision"].chunks] == [(0, 2), (2, 4), (4, 6)]  # 1 padding row
    assert_same_maps(module.explain_batch(batch), whole)
    # Even with no room at all a chunk holds one whole sample (its copies); unknown memory: one chunk.
    monkeypatch.setattr(memory, "available_memory", lambda device: 0)
    assert module.chunk_rows("vision", hidden) == 4
    monkeypatch.setattr(memory, "available_memory", lambda device: None)
    assert module.chunk_rows("vision", hidden) == 20


def test_cpu_memory_respects_cgroup_limits(tmp_path, monkeypatch):
    """A SLURM task/cgroup or container limit is what the kernel enforces (with a silent kill), not
    the machine's free memory; every level up to the mount counts, the file page cache does not."""
    def tree(files: dict[str, str]) -> Path:
        for name, text in files.items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_text(text)
        return tmp_path

    v2 = tree({"v2/memory.max": "max\n", "v2/job/memory.max": "4000\n", "v2/job/memory.current": "1500\n",
               "v2/job/memory.stat": "anon 1000\nactive_file 200\ninactive_file 500\n",
               "v2/job/step/memory.max": "max\n", "v2/job/step/memory.current": "900\n",
               "v2.cgroup": "0::/job/step\n"})
    assert memory.cgroup_available(v2 / "v2", v2 / "v2.cgroup") == 4000 - (1500 - 700)
    v1 = tree({"v1/memory/memory.limit_in_bytes": "9223372036854771712\n",
               "v1/memory/slurm/memory.limit_in_bytes": "3000\n", "v1/memory/slurm/memory.usage_in_bytes": "1000\n",
               "v1/memory/slurm/task/memory.limit_in_bytes": "2500\n",
               "v1/memory/slurm/task/memory.usage_in_bytes": "2000\n",
               "v1/memory/slurm/task/memory.stat": "cache 950\ntotal_active_file 100\ntotal_inactive_file 800\n",
               "v1.cgroup": "12:cpu,cpuacct:/slurm/task\n5:memory:/slurm/task\n0::/\n"})
    assert memory.cgroup_available(v1 / "v1", v1 / "v1.cgroup") == min(3000 - 1000, 2500 - (2000 - 900))
    none = tree({"free/memory/memory.limit_in_bytes": "9223372036854771712\n", "free.cgroup": "4:memory:/\n"})
    assert memory.cgroup_available(none / "free", none / "free.cgroup") is None
    assert memory.cgroup_available(tmp_path / "nowhere", tmp_path / "missing") is None

    monkeypatch.setattr(memory, "cgroup_available", lambda: 1 << 20)
    assert memory.available_memory(torch.device("cpu")) == 1 << 20
    # The ranks of a node share its memory.
    one = memory.auto_chunk_rows(torch.device("cpu"), 1000)
    assert memory.auto_chunk_rows(torch.device("cpu"), 1000, processes=2) == one // 2


def test_bytes_per_row_covers_the_measured_peak_at_vit_b32_width(tmp_path, pairs_dir):
    """The estimate that sizes automatic chunks against the real peak of tensor memory (CPU
    profiler) of the vision loop at ViT-B/32's geometry: 224 px / patch 32 (50 tokens), width 768,
    MLP 3072, two blocks above the bottleneck, the last one pruned (layer 9 of 12's situation)."""
    import importlib.util
    from pathlib import Path

    from m2ib_lightning import CLIPBackbone, M2IBAttribution
    from m2ib_lightning.assets.tiny_models import build_tiny_clip

    spec = importlib.util.spec_from_file_location(
        "throughput_benchmark", Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    captions = [line for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    build_tiny_clip(tmp_path, captions=[c.split('"caption": "')[1].split('"')[0] for c in captions],
                    hidden_size=768, num_layers=3, num_heads=12, intermediate_size=3072, projection_dim=64,
                    image_size=224, patch_size=32)
    wide = CLIPBackbone(str(tmp_path))
    ids, images, texts = load_pairs(pairs_dir, n=2)
    batch = make_batch(wide, ids, images, texts)
    # The text side too (causal and padding masks, the pooled EOS row), at the same width.
    for side in ("vision", "text"):
        module = M2IBAttribution(wide, vision_layer=0, text_layer=0, sides=[side], steps=2, copies=10)
        tokens = module.prepare(batch).sides[side].state.hidden.shape[1]  # 50; captions padded to their bucket
        module.explain_batch(batch)  # resident state (folded MLP weights) is allocated once, like the weights
        with bench.measured(torch.device("cpu")) as peak:
            module.explain_batch(batch)
        rows = 2 * 10
        estimate = rows * memory.bytes_per_row(tokens, 768, blocks=2, pruned_last=True)
        print(f"{side}: peak {peak['bytes'] / rows / 1e6:.2f} MB per row, estimate {estimate / rows / 1e6:.2f} MB")
        assert 0 < peak["bytes"] <= estimate, side
        assert peak["bytes"] > estimate / 4, side  # an estimate, not a blanket


@pytest.mark.parametrize(
    "error",
    [
        torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
        RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: you tried "
                     "to allocate 123456789 bytes. Error code 12 (Cannot allocate memory)"),
    ],
)
def test_out_of_memory_in_the_loop_names_the_settings(backbone, batch, monkeypatch, error):
    module = make_module(backbone, chunk_size=8)

    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(module, "side_loss", fail)
    with pytest.raises(ConfigError) as info:
        module.explain_batch(batch)
    message = str(info.value)
    assert "out of memory in the optimisation loop on a batch of 5 pairs x 4 copies" in message
    assert "chunks of at most vision: 8, text: 8 rows" in message
    assert "model.init_args.chunk_size" in message and "now 8" in message and ">= copies = 4" in message
    assert "data.init_args.batch_size (now 5)" in message
    assert info.value.__cause__ is error


def test_out_of_memory_below_the_bottleneck_names_the_batch_size(backbone, batch, monkeypatch):
    module = make_module(backbone)

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(backbone, "lower", fail)
    with pytest.raises(ConfigError, match=r"below the bottleneck on a batch of 5 pairs.*None, i.e. automatic.*"
                                          r"data.init_args.batch_size \(now 5\)"):
        module.explain_batch(batch)


def test_other_runtime_errors_pass_through(backbone, batch, monkeypatch):
    module = make_module(backbone)

    def fail(*args, **kwargs):
        raise RuntimeError("shape mismatch")

    monkeypatch.setattr(module, "side_loss", fail)
    with pytest.raises(RuntimeError, match="shape mismatch"):
        module.explain_batch(batch)


@pytest.mark.parametrize("chunk_size", [3, 0, 2.5, True])
def test_chunk_size_must_hold_the_copies(backbone, chunk_size):
    with pytest.raises(ConfigError, match=rf"chunk_size must be None \(automatic\) or an int >= copies \(4\).*"
                                          rf"got {chunk_size!r}"):
        make_module(backbone, chunk_size=chunk_size)
