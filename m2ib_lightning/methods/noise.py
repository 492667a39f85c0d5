"""Noise as a pure function of its coordinates, and per-sample generators for the baselines.

M2IB's noise (:func:`standard_normal`) is counter-based: the value at (seed, side, sample id, step,
copy, token position, channel) is a fixed function of those seven numbers, so a sample's noise, hence
its map, does not depend on the batch it is in, its position there, the chunking, the rank or the
world size, and a step can be recomputed (a redone step under ``16-mixed``) without rewinding any
state. A whole chunk's noise is produced by the same few dozen tensor operations whatever its size,
with no Python loop over samples and no host-device synchronisation; inside a compiled step they fuse
into one kernel.

The function, named :data:`NOISE_FUNCTION` in the settings stored with the maps:

1. each (seed, side, sample id) becomes a 64-bit key once per batch (:func:`sample_keys`: a blake2b
   digest, two 32-bit lanes ``k0``, ``k1``);
2. per row (sample, step, copy), on ``(n, K)`` tensors: ``a = H(H(k0) ^ (step * 2**16 + copy))`` and
   ``b = H(k1 ^ a)``, where ``H`` is a 32-bit integer hash (``x ^= x >> 16; x *= 0x21f0aaad;
   x ^= x >> 15; x *= 0x735a2d97; x ^= x >> 15``, a bijection);
3. per element: ``c = H(position * D' + channel)`` (``D'``: the width rounded up to even), then
   ``x = a ^ c``, ``x ^= x >> 16``, ``x *= 0x21f0aaad``, ``x ^= b``, ``x ^= x >> 15``,
   ``x *= 0x735a2d97``, ``x ^= x >> 15``; the top 24 bits make a uniform ``u = (x >> 8 + 0.5) / 2**24``
   in (0, 1). For a fixed row every channel gets a different ``x``;
4. Box-Muller on the two halves of the channels: channel ``j < D'/2`` is ``sqrt(-2 ln u_j) cos(2 pi
   u_{j + D'/2})``, channel ``j + D'/2`` the same radius times the sine.

All integer arithmetic is on int32 tensors with wrap-around multiplication (two's complement: the
low 32 bits of the unsigned product) and masked right shifts, which CPU kernels, inductor's C++ and
Triton code all compute alike, so eager and compiled steps, CPUs and GPUs draw the same noise (up to
the last bit of ``log``/``cos``/``sin``). Limits: at most 2**15 steps and 2**16 copies.

Python's ``hash`` is salted per process, so the keys come from a cryptographic digest.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["LEGACY_NOISE", "MAX_COPIES", "MAX_STEPS", "NOISE_FUNCTION", "hash32", "noise_generator", "sample_keys",
           "standard_normal", "stream_seed"]

#: the name of :func:`standard_normal`, stored in the settings of M2IB runs (``noise``)
NOISE_FUNCTION = "counter-hash32-boxmuller-v1"
#: what runs before :data:`NOISE_FUNCTION` used (no ``noise`` setting stored): a torch.Generator per sample
LEGACY_NOISE = "torch-generator-per-sample"
#: the counter ``step * 2**16 + copy`` must stay below 2**31
MAX_STEPS, MAX_COPIES = 1 << 15, 1 << 16

_M1, _M2 = 0x21F0AAAD, 0x735A2D97
_SALT_KEY, _SALT_COLUMN = 0x2545F491, 0x1B873593


def stream_seed(seed: int, side: str, sample_id: str) -> int:
    """A 63-bit seed that depends only on ``(seed, side, sample_id)``."""
    digest = hashlib.blake2b(f"{seed}\x1f{side}\x1f{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def noise_generator(seed: int, side: str, sample_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one sample's random numbers on ``device`` (the baselines' masks and maps)."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(stream_seed(seed, side, sample_id))
    return gen


def _int32(value: int) -> int:
    """``value``'s low 32 bits as a signed int32."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def sample_keys(seed: int, side: str, ids: Sequence[str], device: torch.device | str | None = None) -> Tensor:
    """``(n, 2)`` int32: the 64-bit key of each (seed, side, sample id), as two 32-bit lanes.

    Computed on the host once per batch (one digest per sample), outside the optimisation loop.
    """
    lanes = []
    for sample_id in ids:
        key = stream_seed(seed, side, str(sample_id))
        lanes.append((_int32(key), _int32(key >> 32)))
    return torch.tensor(lanes, dtype=torch.int32, device=device).view(len(lanes), 2)


def _shift(x: Tensor, bits: int) -> Tensor:
    """``x >> bits`` as on an unsigned 32-bit integer."""
    return (x >> bits) & ((1 << (32 - bits)) - 1)


def hash32(x: Tensor) -> Tensor:
    """The 32-bit integer hash ``H`` (module docstring) of an int32 tensor, element-wise; a bijection."""
    x = x ^ _shift(x, 16)
    x = x * _M1
    x = x ^ _shift(x, 15)
    x = x * _M2
    return x ^ _shift(x, 15)


def standard_normal(keys: Tensor, step: int | Tensor, shape: Sequence[int]) -> Tensor:
    """Standard-normal noise ``(n, K, L, D)`` float32 for ``n`` samples at optimisation step ``step``.

    Args:
        keys: ``(n, 2)`` int32, the samples' keys (:func:`sample_keys`).
        step: the step (0-based), an int or a 0-d integer tensor on the keys' device (a tensor keeps
            a compiled step from specialising on it).
        shape: ``(n, K, L, D)``: samples, copies, token positions, channels.

    Element ``[i, k, l, d]`` depends only on ``keys[i]``, ``step``, ``k``, ``l`` and ``d``: the noise of a
    sample is the same in any batch, at any length ``L`` (its first positions), and a sample alone gets
    ``standard_normal(keys[i:i+1], step, (1, K, L, D))``. The number of tensor operations does not
    depend on the shape.
    """
    n, copies, length, width = (int(s) for s in shape)
    device = keys.device
    if isinstance(step, Tensor):
        step = step.to(device=device, dtype=torch.int32)
    else:
        step = torch.full((), int(step), dtype=torch.int32, device=device)
    even = width + width % 2
    # Rows (sample, step, copy): (n, K), small.
    counter = step * (1 << 16) + torch.arange(copies, dtype=torch.int32, device=device)
    a = hash32(hash32(keys[:, :1] ^ _SALT_KEY) ^ counter)
    b = hash32(keys[:, 1:] ^ a)
    # Columns (position, channel): (L, D'), distinct for distinct elements of a row.
    column = hash32(torch.arange(length * even, dtype=torch.int32, device=device).view(length, even) ^ _SALT_COLUMN)
    # Elements: (n, K, L, D'); in-place on the one fresh tensor (eager CPU speed: fewer allocations).
    x = a.view(n, copies, 1, 1) ^ column
    x ^= _shift(x, 16)
    x *= _M1
    x ^= b.view(n, copies, 1, 1)
    x ^= _shift(x, 15)
    x *= _M2
    x ^= _shift(x, 15)
    u = _shift(x, 8).float()
    u += 0.5
    u *= 2.0**-24
    half = even // 2
    radius = u[..., :half].log().mul_(-2.0).sqrt_()
    angle = u[..., half:] * (2.0 * math.pi)
    noise = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)), dim=-1)
    return noise if even == width else noise[..., :width]
