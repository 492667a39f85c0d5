"""The counter-based noise: a pure function of its coordinates, standard normal, without correlations."""

from __future__ import annotations

import math

import pytest
import torch

from m2ib_lightning.methods.noise import hash32, sample_keys, standard_normal

N_SAMPLES, COPIES, LENGTH, WIDTH = 8, 4, 20, 96


@pytest.fixture(scope="module")
def keys():
    return sample_keys(0, "vision", [f"pair-{i}" for i in range(N_SAMPLES)])


def hash32_reference(value: int) -> int:
    """The hash in plain Python integers (unsigned 32-bit)."""
    x = value & 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & 0xFFFFFFFF
    x ^= x >> 15
    x = (x * 0x735A2D97) & 0xFFFFFFFF
    return x ^ (x >> 15)


def test_hash_on_int32_tensors_is_the_unsigned_32_bit_hash():
    values = [0, 1, 2, 12345, 2**31 - 1, -1, -(2**31), -987654321, 0x7FEB352D]
    got = hash32(torch.tensor(values, dtype=torch.int32)).tolist()
    assert [g & 0xFFFFFFFF for g in got] == [hash32_reference(v) for v in values]
    # a bijection: no two of 2**20 consecutive counters collide
    assert hash32(torch.arange(1 << 20, dtype=torch.int32)).unique().numel() == 1 << 20


def test_keys_depend_on_seed_side_and_id_only():
    a = sample_keys(0, "vision", ["x", "y"])
    assert a.shape == (2, 2) and a.dtype == torch.int32
    assert torch.equal(a[1], sample_keys(0, "vision", ["y"])[0])
    assert not torch.equal(a[0], sample_keys(1, "vision", ["x"])[0])
    assert not torch.equal(a[0], sample_keys(0, "text", ["x"])[0])


def test_noise_is_a_function_of_its_coordinates_only(keys):
    full = standard_normal(keys, 3, (N_SAMPLES, COPIES, LENGTH, WIDTH))
    assert full.shape == (N_SAMPLES, COPIES, LENGTH, WIDTH) and full.dtype == torch.float32
    # one sample alone, at a shorter length, with the step as a tensor: the same numbers
    alone = standard_normal(keys[5:6], torch.tensor(3), (1, COPIES, 7, WIDTH))
    assert torch.equal(alone[0], full[5, :, :7])
    # another batch order: each sample keeps its noise
    order = torch.tensor([3, 1, 7])
    assert torch.equal(standard_normal(keys[order], 3, (3, COPIES, LENGTH, WIDTH)), full[order])
    # fewer copies are the first copies; another step is other noise
    assert torch.equal(standard_normal(keys, 3, (N_SAMPLES, 2, LENGTH, WIDTH)), full[:, :2])
    assert not torch.allclose(standard_normal(keys, 4, (N_SAMPLES, COPIES, LENGTH, WIDTH)), full)
    # an odd width D is drawn as D + 1 channels (Box-Muller pairs the two halves), the last one dropped
    odd = standard_normal(keys, 3, (N_SAMPLES, COPIES, LENGTH, WIDTH - 1))
    assert torch.equal(odd, full[..., : WIDTH - 1])


def test_standard_normal_moments_and_ks(keys):
    z = standard_normal(keys, 0, (N_SAMPLES, 64, 32, 128)).flatten().double()  # 2**21 values
    n = z.numel()
    mean, var = z.mean(), z.var()
    skew = ((z - mean) ** 3).mean() / var**1.5
    kurt = ((z - mean) ** 4).mean() / var**2
    # 5 standard errors of each moment's estimate
    assert abs(float(mean)) < 5 / math.sqrt(n)
    assert abs(float(var) - 1) < 5 * math.sqrt(2 / n)
    assert abs(float(skew)) < 5 * math.sqrt(6 / n)
    assert abs(float(kurt) - 3) < 5 * math.sqrt(24 / n)
    # Kolmogorov-Smirnov against N(0, 1): the 0.1% critical value is 1.95 / sqrt(n)
    sorted_z = z.sort().values
    cdf = torch.special.ndtr(sorted_z)
    ranks = torch.arange(1, n + 1, dtype=torch.float64)
    ks = torch.maximum(ranks / n - cdf, cdf - (ranks - 1) / n).max()
    assert float(ks) < 1.95 / math.sqrt(n), float(ks)
    assert z.abs().max() < 7 and z.abs().max() > 4.5  # tails are there, not cut at a few sigma


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    return float(torch.corrcoef(torch.stack((a, b)))[0, 1])


def test_no_correlation_between_neighbouring_ids_steps_copies_positions_channels():
    ids = [f"sample-{i:05d}" for i in range(64)]  # neighbouring ids
    keys = sample_keys(0, "vision", ids)
    shape = (64, 8, 16, 64)
    z = standard_normal(keys, 0, shape)
    z_next_step = standard_normal(keys, 1, shape)
    pairs = {
        "ids": (z[:-1], z[1:]),
        "steps": (z, z_next_step),
        "copies": (z[:, :-1], z[:, 1:]),
        "positions": (z[:, :, :-1], z[:, :, 1:]),
        "channels": (z[..., :-1], z[..., 1:]),
        "channel halves (Box-Muller pairs)": (z[..., :32], z[..., 32:]),
        "sides": (z, standard_normal(sample_keys(0, "text", ids), 0, shape)),
        "seeds": (z, standard_normal(sample_keys(1, "vision", ids), 0, shape)),
    }
    bound = 5 / math.sqrt(z.numel() / 2)  # 5 standard errors of a correlation near 0
    for name, (a, b) in pairs.items():
        r = correlation(a, b)
        assert abs(r) < bound, f"{name}: correlation {r:.2e} (bound {bound:.1e})"
    # ... and no shared values (a row a permutation of another would correlate nothing but repeat)
    rows = z.flatten(0, 1).flatten(1)
    assert rows[:, :16].unique(dim=0).shape[0] == rows.shape[0]


def test_operation_count_does_not_depend_on_the_shape(keys):
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.calls += 1
            return func(*args, **(kwargs or {}))

    counts = []
    for n, copies, length in ((1, 2, 5), (N_SAMPLES, 10, 50)):
        with Count() as count:
            standard_normal(keys[:n], torch.tensor(0), (n, copies, length, WIDTH))
        counts.append(count.calls)
    assert counts[0] == counts[1]
