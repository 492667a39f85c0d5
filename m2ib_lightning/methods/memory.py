"""How many rows (pairs x noisy copies) one forward/backward chunk may hold, and clear out-of-memory errors.

The inner loop of :class:`~m2ib_lightning.M2IBAttribution` runs the blocks above the bottleneck on
``rows = pairs x copies`` noisy copies at once and keeps their activations for the backward pass.
Its memory grows linearly with the rows, so the batch is cut into chunks of at most ``chunk_size``
rows (whole samples per chunk); gradients are accumulated over the chunks, which is exact because
the loss is a sum over samples. ``chunk_size=None`` sizes the chunks from the memory the device has
free, with the estimate of :func:`bytes_per_row`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

#: share of the free device memory the automatic chunk size may fill (the rest is headroom for the
#: allocator's fragmentation, the backward pass's transient buffers and other processes)
AUTO_MEMORY_FRACTION = 0.5

#: floats per token and per unit of width that one pre-norm transformer block (MLP 4x wide) keeps
#: for its backward pass: 14 measured on CLIP blocks in float32 (sdpa attention), rounded up
FLOATS_PER_TOKEN_WIDTH_BLOCK = 16
#: a last block cut to the pooled token (``CLIPBackbone(prune_last_block=True)``) keeps its
#: normalised input, keys and values: 2.3 measured, i.e. this share of a full block
PRUNED_BLOCK_SHARE = 0.2
#: the bottleneck itself (noise, Z, the gates: 2.3 measured) plus the transient buffers of the
#: backward pass: silu's backward on a CPU (``CLIPBackbone(fold_activation=True)``) holds several
#: MLP-wide temporaries, and the whole loop peaked at 6.5 MB per row where the saved activations are
#: 2.9 (tests/test_memory.py measures it at ViT-B/32's width)
FLOATS_PER_TOKEN_WIDTH_EXTRA = 32


def bytes_per_row(tokens: int, width: int, blocks: int, pruned_last: bool = True) -> int:
    """Estimated activation memory of ONE noisy copy of one sample in the inner loop, in bytes.

    ``4 * tokens * width * (16 * blocks' + 32)``, where ``blocks'`` counts the blocks above the
    bottleneck (the last one as 0.2 when it is pruned to the pooled token): about 7.9 MB for the
    vision tower of ViT-B/32 at layer 9 (50 tokens, width 768, two blocks above), so about 79 MB per
    pair at 10 copies (measured peak on a CPU: 6.5 MB per copy, of which 2.9 are the activations
    saved for the backward pass). Counted in float32 whatever the precision (conservative under bf16); attention
    weights are not counted (sdpa does not keep them; ``attn_implementation="eager"`` does).

    Args:
        tokens: sequence length ``L``.
        width: hidden size ``D``.
        blocks: encoder blocks above the bottleneck (0 when the bottleneck is at the last block).
        pruned_last: whether the last block runs for the pooled token only.
    """
    full = blocks - (1 - PRUNED_BLOCK_SHARE) if pruned_last and blocks else blocks
    floats = tokens * width * (FLOATS_PER_TOKEN_WIDTH_BLOCK * full + FLOATS_PER_TOKEN_WIDTH_EXTRA)
    return int(4 * floats)


def available_memory(device: torch.device) -> int | None:
    """Bytes that new tensors on ``device`` can still take, or ``None`` when unknown.

    CUDA: free device memory plus what torch's caching allocator holds but does not use. CPU: the
    kernel's ``MemAvailable`` (Linux; else free physical pages), or less where a memory cgroup
    limit around the process (SLURM's ``task/cgroup``, a container) leaves less: exceeding that
    limit gets the process killed without a word, whatever the machine has free.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
        machine = _meminfo_available()
        limited = cgroup_available()
        known = [v for v in (machine, limited) if v is not None]
        return min(known) if known else None
    return None


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


#: cgroup "no limit" values are near 2**63
_UNLIMITED = 1 << 60


def cgroup_available(root: str | os.PathLike = "/sys/fs/cgroup",
                     membership: str | os.PathLike = "/proc/self/cgroup") -> int | None:
    """Bytes the tightest memory cgroup limit around this process still allows; ``None``: no limit.

    Reads cgroup v2 (``memory.max`` - ``memory.current``) and v1 (``memory.limit_in_bytes`` -
    ``memory.usage_in_bytes``) at the process's own cgroup and every ancestor up to the mount. Usage
    counts the file page cache (images read, say), which the kernel reclaims before it kills, so that
    is taken off.
    """
    try:
        lines = Path(membership).read_text().splitlines()
    except OSError:
        return None
    tightest: int | None = None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # v2 (unified)
            base, limit_file, usage_file, cache_keys = (Path(root), "memory.max", "memory.current",
                                                        ("inactive_file", "active_file"))
        elif "memory" in controllers.split(","):  # v1
            base, limit_file, usage_file, cache_keys = (Path(root) / "memory", "memory.limit_in_bytes",
                                                        "memory.usage_in_bytes",
                                                        ("total_inactive_file", "total_active_file"))
        else:
            continue
        names = [p for p in path.strip("/").split("/") if p]
        for depth in range(len(names), -1, -1):
            directory = base.joinpath(*names[:depth])
            limit = _read_int(directory / limit_file)
            if limit is None or limit >= _UNLIMITED:
                continue
            cache = sum(_stat(directory / "memory.stat", key) for key in cache_keys)
            used = (_read_int(directory / usage_file) or 0) - cache
            free = max(0, limit - max(0, used))
            tightest = free if tightest is None else min(tightest, free)
    return tightest


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):  # missing, or "max" (no limit)
        return None


def _stat(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key:
                return int(value)
    except (OSError, ValueError):
        pass
    return 0


def auto_chunk_rows(device: torch.device, row_bytes: int, fraction: float = AUTO_MEMORY_FRACTION,
                    processes: int = 1) -> int | None:
    """Rows per chunk that fill ``fraction`` of the free memory of ``device`` (``None``: no limit known).

    On a CPU the memory is shared by the ``processes`` ranks of the node, so each takes its share.
    """
    free = available_memory(device)
    if free is None:
        return None
    if device.type == "cpu":
        free //= max(1, processes)
    return max(1, int(fraction * free) // max(1, row_bytes))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or other accelerators, or the CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
