"""Per-sample noise streams.

Each (seed, side, sample id) owns a ``torch.Generator`` seeded from a stable hash, so a sample's
noise (hence its map) does not depend on the batch size, its position in the batch, the rank or
the world size. Python's ``hash`` is salted per process, so a cryptographic digest is used.
"""

from __future__ import annotations

import hashlib

import torch


def stream_seed(seed: int, side: str, sample_id: str) -> int:
    """A 63-bit seed that depends only on ``(seed, side, sample_id)``."""
    digest = hashlib.blake2b(f"{seed}\x1f{side}\x1f{sample_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def noise_generator(seed: int, side: str, sample_id: str, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator for one sample's noise on ``device``."""
    gen = torch.Generator(device=torch.device(device))
    gen.manual_seed(stream_seed(seed, side, sample_id))
    return gen
