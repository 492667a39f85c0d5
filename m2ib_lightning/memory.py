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
    kernel's ``MemAvailable`` (Linux), else free physical pages.
    """
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device))
    if device.type == "cpu":
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
    return None


def auto_chunk_rows(device: torch.device, row_bytes: int, fraction: float = AUTO_MEMORY_FRACTION) -> int | None:
    """Rows per chunk that fill ``fraction`` of the free memory of ``device`` (``None``: no limit known)."""
    free = available_memory(device)
    if free is None:
        return None
    return max(1, int(fraction * free) // max(1, row_bytes))


def is_out_of_memory(err: BaseException) -> bool:
    """Whether ``err`` is an allocation failure (CUDA or other accelerators, or the CPU allocator)."""
    if isinstance(err, torch.OutOfMemoryError):
        return True
    text = str(err)
    return isinstance(err, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())
