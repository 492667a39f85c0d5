"""Who reads which rows: disjoint parts per rank and per dataloader worker, and equal batch counts per rank.

Splitting (:func:`assign`). A streamed dataset is a list of shards (for local files and hub
datasets: one per data file). Every rank, then every dataloader worker of a rank, gets a disjoint
part of the rows, and the parts together cover every row exactly once:

* across ranks, whole shards when the shard count is a multiple of the world size (rank ``r`` opens
  shards ``r, r + W, ...``), otherwise rows (every rank reads the stream and keeps every ``W``-th
  row: reading is cheap, decoding is what is split);
* within a rank, the same rule again for its ``K`` workers: whole shards when the rank's shard count
  is a multiple of ``K``, otherwise every ``K``-th of the rank's rows;
* with a row ``limit`` the first ``limit`` rows of the stream are split by rows.

The rule never depends on the data, only on (shard count, world size, workers, limit), so every
process derives its part alone, without communication. Rows are identified by (shard, position in
shard) whatever the split, which is what derived sample ids are built from.

Equal batch counts (:class:`EvenBatches`). Parts differ in size, and skipped or already-done samples
make them differ more. Lightning runs collectives at every training step (DDP and the fit loop
broadcast from rank 0), so a rank that runs out of batches while the others continue pairs
mismatched collectives: a hang, or silent corruption on NCCL. :class:`EvenBatches` wraps a rank's
dataloader and, at every step, all-reduces one integer (does this rank still have a batch?): while
any rank has data, the ranks that have run out yield an empty padding batch (``ids == []``,
``padding == True``), which the attribution step passes over and the writer never writes; when no
rank has data left, all stop at the same step. Nothing is dropped or duplicated, whatever the
number of pairs, the world size, the batch size or the number of workers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import torch

#: rows read from ``datasets`` per call (columnar batches are much faster than row by row)
READ_BATCH = 256


class ShardedSource(Protocol):
    """What :func:`iter_part` needs from a streamed dataset (``datasets.IterableDataset`` has it)."""

    @property
    def num_shards(self) -> int: ...

    def shard(self, num_shards: int, index: int, contiguous: bool = True) -> Any: ...


@dataclass(frozen=True)
class Part:
    """The rows one reader (a rank's dataloader worker) yields.

    Attributes:
        shards: shard indices the reader opens, in order.
        stride: of the rows of ``shards``, counted in stream order, the reader keeps those whose
            position ``p`` satisfies ``p % stride == offset``.
        offset: see ``stride``.
        limit: stop once this many rows of ``shards`` have been read (``None``: all).
    """

    shards: tuple[int, ...]
    stride: int = 1
    offset: int = 0
    limit: int | None = None

    def describe(self) -> str:
        every = "" if self.stride == 1 else f", every {self.stride}th row from {self.offset}"
        first = "" if self.limit is None else f", first {self.limit} rows"
        return f"shards {list(self.shards)}{every}{first}"


def assign(num_shards: int, rank: int = 0, world_size: int = 1, worker: int = 0, num_workers: int = 1,
           limit: int | None = None) -> Part:
    """The part of the stream read by dataloader ``worker`` of ``num_workers`` on ``rank`` of ``world_size``.

    See the module docstring for the rule. Every (rank, worker) pair gets a disjoint part and the
    parts of all pairs cover every row exactly once.
    """
    for name, value, low in (("num_shards", num_shards, 1), ("world_size", world_size, 1),
                             ("num_workers", num_workers, 1)):
        if not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size - 1}], got {rank!r}")
    if not 0 <= worker < num_workers:
        raise ValueError(f"worker must be in [0, {num_workers - 1}], got {worker!r}")
    everything = tuple(range(num_shards))
    if limit is not None or num_shards % world_size:
        # Rows across ranks; rows across workers too (the rank's rows are not whole shards).
        return Part(everything, stride=world_size * num_workers, offset=rank + world_size * worker, limit=limit)
    mine = everything[rank::world_size]
    if len(mine) % num_workers == 0:
        return Part(mine[worker::num_workers])
    return Part(mine, stride=num_workers, offset=worker)


def shard_rows(source: ShardedSource, shard: int) -> Iterator[dict[str, Any]]:
    """The rows of one shard of ``source``, in order.

    Reads through ``IterableDataset.iter`` (columnar batches), which, unlike ``__iter__``, does not
    split the shard again among dataloader workers: the split is ours (:func:`assign`).
    """
    n = source.num_shards
    part = source.shard(num_shards=n, index=shard, contiguous=True) if n > 1 else source
    for batch in part.iter(batch_size=READ_BATCH):
        columns = list(batch)
        for values in zip(*(batch[c] for c in columns)):
            yield dict(zip(columns, values))


@dataclass(frozen=True)
class UnreadableRest:
    """Stands for the rows of a shard after a point where the reader itself failed and could not go on.

    ``datasets`` readers stop at the first row they cannot parse (a malformed JSON line, invalid
    UTF-8 in a JSON-lines file or in a tar member's ``.txt``, a dropped connection that outlasted
    its retries), taking the rest of the shard with them. Where the format allows it, the shard is
    read on from that point by a tolerant reader (:mod:`m2ib_lightning.data.recover`), which costs
    only the bad line, row group or tar sample (:class:`BadRows`). This record stands for what is
    still lost: a format without such a reader, a file that cannot be opened again, a tar archive
    whose structure breaks. The job goes on with the next shard and this record lands in the skip
    manifest, so the loss is visible and not silent.

    Attributes:
        where: the file, when known (else empty).
        transient: the failure may not repeat (a network error): a resumed run tries again.
    """

    shard: int
    index: int
    error: BaseException
    where: str = ""
    transient: bool = False


@dataclass(frozen=True)
class BadRows:
    """``count`` rows of a shard, from position ``index`` on, that a tolerant reader could not read.

    One JSON or CSV line, one parquet row group, one webdataset sample: the smallest unit the format
    lets us separate from its neighbours. The rows around it are read as usual, and keep their
    positions (so derived ids do not shift).

    Attributes:
        reason: why, naming the file and the line / row group / member.
        source: where, as data (see :class:`m2ib_lightning.records.Skip`).
        known: columns that could be read all the same (a tar sample's ``__key__``), so its id may
            come from the id column.
        transient: a failure that may not repeat (a network error while re-reading).
    """

    shard: int
    index: int
    count: int
    reason: str
    source: dict[str, Any]
    known: dict[str, Any] | None = None
    transient: bool = False


Item = dict[str, Any] | BadRows | UnreadableRest
#: ``resume(shard, index, error)``: the rows of ``shard`` from position ``index`` on, read again after the
#: fast reader failed there with ``error``; ``None`` when the shard's format has no tolerant reader
Resume = Callable[[int, int, BaseException], Iterator[Item] | None]


def iter_part(source: ShardedSource, part: Part, resume: Resume | None = None) -> Iterator[tuple[int, int, Item]]:
    """``(shard, position in shard, row)`` for every row of ``part``.

    Rows come from ``datasets``' fast columnar reader. Where it fails inside a shard at position
    ``i``, ``resume(shard, i, error)`` (if given and if it can) reads the shard on from ``i``,
    yielding rows and :class:`BadRows` (each covering ``count`` positions); otherwise, or if that
    fails too, yields ``(shard, i, UnreadableRest)`` once and goes on with the next shard. Items
    belong to the one reader whose part holds their (first) position, so every reader of the shard
    sees the same positions and each row or report comes out of exactly one reader.
    """
    position = 0
    for shard in part.shards:
        index = 0
        rows: Iterator[Item] = shard_rows(source, shard)
        recovering = False
        while True:
            if part.limit is not None and position >= part.limit:
                return
            try:
                row = next(rows)
            except StopIteration:
                break
            except Exception as err:  # noqa: BLE001 - any reader failure: read on tolerantly, else record it
                again = None if recovering or resume is None else resume(shard, index, err)
                if again is not None:
                    rows, recovering = again, True
                    continue
                row = UnreadableRest(shard, index, err, transient=isinstance(err, OSError))
            if isinstance(row, UnreadableRest):
                if position % part.stride == part.offset:
                    yield shard, index, row
                # Every reader of this shard failed at the same place; the part's positions stay aligned.
                position += 1
                break
            if position % part.stride == part.offset:
                yield shard, index, row
            step = row.count if isinstance(row, BadRows) else 1
            position += step
            index += step


def padding_batch() -> dict[str, Any]:
    """The batch a rank yields while others still have data: no pairs, no skips, flagged."""
    return {"ids": [], "skipped": [], "repaired": [], "padding": True}


class EvenBatches:
    """Iterates ``loader`` so that every rank of the process group yields the same number of batches.

    Each step costs one all-reduce of a single integer (negligible next to an attribution step).
    Needs ``torch.distributed`` initialised; all ranks must iterate in lockstep, as Lightning's fit
    loop does. See the module docstring.

    Args:
        loader: this rank's batches (a ``DataLoader``).
        group: process group (default: the global one).
    """

    def __init__(self, loader: Iterable[Any], group: Any = None) -> None:
        self.loader = loader
        self.group = group

    def _device(self) -> torch.device:
        import torch.distributed as dist

        # NCCL reduces CUDA tensors only; gloo (and "cpu:gloo,cuda:nccl") takes CPU tensors.
        if dist.get_backend(self.group) == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def __iter__(self) -> Iterator[Any]:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError("EvenBatches needs torch.distributed to be initialised (a multi-process run); "
                               "got an uninitialised process group")
        device = self._device()
        batches = iter(self.loader)
        exhausted = False
        while True:
            batch = None
            if not exhausted:
                batch = next(batches, None)
                exhausted = batch is None
            active = torch.tensor([0 if exhausted else 1], device=device)
            dist.all_reduce(active, op=dist.ReduceOp.SUM, group=self.group)
            if int(active.item()) == 0:
                return
            yield padding_batch() if exhausted else batch

    def __repr__(self) -> str:
        return f"EvenBatches({self.loader!r})"
