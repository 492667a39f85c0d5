"""Chunked optimisation (exact), the automatic chunk size, and out-of-memory errors that name the setting."""

from __future__ import annotations

import pytest
import torch
from test_module import load_pairs, make_batch, make_module

from m2ib_lightning import ConfigError, memory


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
    torch.testing.assert_close(a["image_maps"], b["image_maps"], atol=atol, rtol=0)
    for x, y in zip(a["text_scores"], b["text_scores"], strict=True):
        torch.testing.assert_close(x, y, atol=atol, rtol=0)
    torch.testing.assert_close(a["loss"], b["loss"], atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [4, 9])  # copies = 4: one sample per chunk; 2 samples, uneven last chunk
def test_chunked_maps_equal_unchunked(backbone, batch, whole, chunk_size):
    module = make_module(backbone, chunk_size=chunk_size)
    prepared = module.prepare(batch)
    per_chunk = chunk_size // 4
    assert [c["bounds"] for c in prepared["sides"]["vision"]["chunks"]] == [
        (a, min(a + per_chunk, 5)) for a in range(0, 5, per_chunk)
    ]
    assert_same_maps(module.explain_batch(batch), whole)


def test_automatic_chunk_size_follows_free_memory(backbone, batch, whole, monkeypatch):
    module = make_module(backbone)  # chunk_size=None
    hidden = torch.zeros(5, 17, 32)
    row = memory.bytes_per_row(17, 32, blocks=1, pruned_last=True)
    # Room for 2.5 samples x 4 copies in the usable share of "free" memory: chunks of 2 samples.
    monkeypatch.setattr(memory, "available_memory", lambda device: int(10 * row / memory.AUTO_MEMORY_FRACTION))
    assert module.chunk_rows("vision", hidden) == 10
    prepared = module.prepare(batch)
    assert [c["bounds"] for c in prepared["sides"]["vision"]["chunks"]] == [(0, 2), (2, 4), (4, 5)]
    assert_same_maps(module.explain_batch(batch), whole)
    # Even with no room at all a chunk holds one whole sample (its copies); unknown memory: one chunk.
    monkeypatch.setattr(memory, "available_memory", lambda device: 0)
    assert module.chunk_rows("vision", hidden) == 4
    monkeypatch.setattr(memory, "available_memory", lambda device: None)
    assert module.chunk_rows("vision", hidden) == 20


def test_bytes_per_row_matches_the_documented_vit_b32_estimate():
    # 50 tokens x 768 channels, two blocks above layer 9, the last one pruned to the CLS token.
    per_pair = 10 * memory.bytes_per_row(50, 768, blocks=2, pruned_last=True)
    assert 40e6 < per_pair < 55e6
    assert memory.bytes_per_row(50, 768, blocks=2, pruned_last=False) > memory.bytes_per_row(50, 768, 2)


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
