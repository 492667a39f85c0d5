"""The inner loop built for GPUs: fixed work per step, no host reads, one compiled graph, static shapes.

Each guard here failed on the loop it replaced (per-sample generators, ``torch.optim.Adam.step``,
shapes that followed the batch): the operation count grew with the batch, Adam read its step count
on the host, and the compiled forward left the backward pass and the update to eager autograd.
"""

from __future__ import annotations

import logging

import pytest
import torch
from test_module import load_pairs, make_batch, make_module
from torch.profiler import ProfilerActivity, profile
from torch.utils._python_dispatch import TorchDispatchMode

from m2ib_lightning.methods.adam import FunctionalAdam
from m2ib_lightning.methods.plan import bucket_length

aten = torch.ops.aten


def batch_of(backbone, pairs_dir, n, long_caption=False):
    """``n`` pairs (the six demo pairs over again, with their own ids)."""
    ids, images, captions = load_pairs(pairs_dir)
    pick = [i % len(ids) for i in range(n)]
    caps = [captions[i] for i in pick]
    if long_caption:
        caps[0] += " and a long tail of extra words so that this caption needs the next bucket of tokens"
    return make_batch(backbone, [f"{ids[i]}-{j}" for j, i in enumerate(pick)], [images[i] for i in pick], caps)


# ------------------------------------------------------------------------------ functional Adam
def test_functional_adam_is_torch_adam_bit_for_bit():
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(4, 7, 5, generator=gen) * 3)
    opt = torch.optim.Adam([param], lr=1.0)
    adam = FunctionalAdam.of(opt)
    assert adam == FunctionalAdam(lr=1.0, beta1=0.9, beta2=0.999, eps=1e-8)
    table = adam.table(6, torch.device("cpu"))
    alpha, m, v, t = param.detach().clone(), torch.zeros_like(param), torch.zeros_like(param), torch.tensor(0)
    for _ in range(6):
        grad = torch.randn(param.shape, generator=gen) * 10 ** torch.randint(-6, 2, (), generator=gen)
        param.grad = grad.clone()
        opt.step()
        alpha, m, v = adam.update(alpha, m, v, grad, t, table)
        t = t + 1
        assert torch.equal(alpha, param.detach())
    assert torch.equal(m, opt.state[param]["exp_avg"]) and torch.equal(v, opt.state[param]["exp_avg_sq"])


def test_only_plain_adam_takes_the_functional_path():
    p = [torch.nn.Parameter(torch.zeros(2))]
    assert FunctionalAdam.of(torch.optim.Adam(p, lr=0.5, betas=(0.8, 0.99))) == FunctionalAdam(0.5, 0.8, 0.99, 1e-8)
    for other in (torch.optim.SGD(p, lr=1.0), torch.optim.AdamW(p, lr=1.0), torch.optim.Adam(p, weight_decay=0.1),
                  torch.optim.Adam(p, amsgrad=True), torch.optim.Adam(p, lr=torch.tensor(1.0))):
        assert FunctionalAdam.of(other) is None, other


def test_functional_loop_gives_the_optimiser_loop_maps(backbone, pairs_dir):
    """The same maps through torch.optim.Adam (a subclass, so the generic path runs it): the
    functional step is the reference loop's arithmetic, not an approximation of it."""

    class EagerAdam(torch.optim.Adam):
        pass

    batch = batch_of(backbone, pairs_dir, 5, long_caption=True)
    functional = make_module(backbone, chunk_size=8).explain_batch(batch)
    generic = make_module(backbone, chunk_size=8, optimizer=lambda p: EagerAdam(p, lr=1.0)).explain_batch(batch)
    torch.testing.assert_close(functional.image_maps, generic.image_maps, atol=1e-5, rtol=0)
    for a, b in zip(functional.text_scores, generic.text_scores, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    torch.testing.assert_close(functional.loss, generic.loss, atol=1e-4, rtol=1e-5)


# ------------------------------------------------------------------------------------ padding
def test_padding_changes_no_map(backbone, pairs_dir):
    """Captions padded to a bucket and a short batch padded with weight-0 rows give the maps of the
    unpadded batch: padded tokens are masked out of attention and of the compression mean."""
    batch = batch_of(backbone, pairs_dir, 3, long_caption=True)
    length = batch["input_ids"].shape[1]
    assert bucket_length(length, 16, 77) > length
    unpadded = make_module(backbone, text_bucket=1).explain_batch(batch)
    for bucket in (16, 64):
        module = make_module(backbone, text_bucket=bucket)
        plan = module.prepare(batch)
        assert plan.sides["text"].state.hidden.shape[1] == bucket_length(length, bucket, 77)
        padded = module.explain_batch(batch)
        torch.testing.assert_close(padded.image_maps, unpadded.image_maps, atol=1e-5, rtol=0)
        for a, b in zip(padded.text_scores, unpadded.text_scores, strict=True):
            assert a.shape == b.shape
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    # A batch of 1 after a batch of 3: padded to 3 rows (2 of weight 0), same maps as alone.
    module = make_module(backbone)
    module.explain_batch(batch)
    one = {k: (v[:1] if k != "ids" else v[:1]) for k, v in batch.items()}
    plan = module.prepare(one)
    assert plan.sides["vision"].weight.tolist() == [1.0, 0.0, 0.0]
    short = module.explain_batch(one)
    alone = make_module(backbone).explain_batch(one)
    torch.testing.assert_close(short.image_maps, alone.image_maps, atol=1e-5, rtol=0)
    torch.testing.assert_close(short.text_scores[0], alone.text_scores[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(short.loss, alone.loss, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------- work per inner step
def operator_calls(module, batch) -> int:
    """Operator calls (CPU profiler) of ``optimise`` on ``batch``: the aten operators the loop calls,
    not those an operator's kernel calls inside it (their number follows the kernel's tiling)."""
    plan = module.prepare(batch)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module.optimise(plan)
    return sum(1 for event in prof.events() if event.name.startswith("aten::")
               and (event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")))


def step_calls(backbone, batch) -> int:
    """Operator calls of ONE optimisation step: optimise with 3 steps minus optimise with 2."""
    rows = 4 * len(batch["ids"])  # one chunk whatever the batch
    return (operator_calls(make_module(backbone, steps=3, chunk_size=rows), batch)
            - operator_calls(make_module(backbone, steps=2, chunk_size=rows), batch))


def test_operator_calls_per_step_do_not_depend_on_the_batch_size(backbone, pairs_dir):
    small, large = (step_calls(backbone, batch_of(backbone, pairs_dir, n)) for n in (2, 64))
    print(f"operator calls per step: batch of 2: {small}, batch of 64: {large}")
    assert small == large
    assert small < 1000  # a fixed, modest number (the old loop: several per sample)


# ---------------------------------------------------------------------------------- host sync
#: operators that copy a value to the host (or whose result's size depends on tensor values)
HOST_READS = {aten._local_scalar_dense, aten.item, aten.is_nonzero, aten.equal, aten.allclose, aten.nonzero,
              aten.masked_select, aten.argwhere, aten._unique, aten._unique2, aten.unique_dim,
              aten.unique_consecutive, aten.bincount, aten.histc, aten.repeat_interleave}


class NoHostSync(TorchDispatchMode):
    """Fails on any operator that reads a tensor's value on the host."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        if packet in HOST_READS and not (packet is aten.repeat_interleave and isinstance(args[1], int)):
            raise AssertionError(f"host-device synchronisation in the loop: {func}")
        if packet in (aten.index, aten.index_put, aten.index_put_) and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1]):
            raise AssertionError(f"boolean-mask indexing (a host sync) in the loop: {func}")
        return func(*args, **kwargs)


def test_no_host_sync_between_the_first_and_the_last_step(backbone, pairs_dir, monkeypatch):
    module = make_module(backbone, chunk_size=8)  # two chunks per side, the last one padded
    plan = module.prepare(batch_of(backbone, pairs_dir, 3, long_caption=True))

    def forbidden(self, *args, **kwargs):
        raise AssertionError("Tensor.tolist in the loop")

    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    with NoHostSync():
        terms, loss, _ = module.optimise(plan)
    monkeypatch.undo()
    assert torch.isfinite(loss) and set(terms) == {"vision", "text"}

    # the mode does catch what it looks for
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoHostSync():
        torch.ones(2).sum().item()


# ------------------------------------------------------------------------------- compiled step
def test_reduce_overhead_falls_back_on_a_cpu_with_one_log_line(backbone, caplog, monkeypatch):
    from m2ib_lightning.methods import step

    monkeypatch.setattr(step, "_FELL_BACK", set())  # as in a fresh process
    with caplog.at_level(logging.WARNING, logger="m2ib_lightning.methods.step"):
        for _ in range(2):  # two modules, both sides: still one line
            module = make_module(backbone, torch_compile="reduce-overhead")
            for side in ("vision", "text", "vision"):
                module.step_function(side, FunctionalAdam())
    lines = [r.getMessage() for r in caplog.records if "CUDA graphs" in r.getMessage()]
    assert len(lines) == 1 and "on cpu" in lines[0]
    with pytest.raises(ValueError, match="torch_compile must be false, true or one of"):
        make_module(backbone, torch_compile="fastest")


@pytest.mark.slow
def test_the_step_compiles_into_one_graph_with_recompiles_bounded_by_the_buckets(backbone, pairs_dir):
    """``torch_compile: true`` compiles the whole step (noise, bottleneck, upper blocks, similarity,
    loss, gradient, Adam) with fullgraph=True: no graph break, no eager backward pass or optimiser
    step left, one graph per side and caption bucket over batches of other sizes and lengths, and
    the eager maps (about a minute to compile on 2 CPU cores)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    module = make_module(backbone, torch_compile=True, steps=3, copies=2)
    eager = make_module(backbone, steps=3, copies=2)
    batches = [batch_of(backbone, pairs_dir, 3),                     # bucket 16
               batch_of(backbone, pairs_dir, 2),                     # fewer samples: padded rows
               batch_of(backbone, pairs_dir, 3, long_caption=True),  # bucket 32
               batch_of(backbone, pairs_dir, 1)]                     # the last, short batch
    lengths = {module.prepare(b).sides["text"].state.hidden.shape[1] for b in batches}
    assert lengths == {16, 32}
    for batch in batches:
        compiled, reference = module.explain_batch(batch), eager.explain_batch(batch)
        torch.testing.assert_close(compiled.image_maps, reference.image_maps, atol=1e-4, rtol=0)
        for a, b in zip(compiled.text_scores, reference.text_scores, strict=True):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert not counters["graph_break"], dict(counters["graph_break"])
    graphs = counters["stats"]["unique_graphs"]
    print(f"compiled graphs: {graphs} (vision 1, text {len(lengths)} buckets); graph breaks: 0")
    assert graphs == 1 + len(lengths)

    # A compiled batch runs no eager backward pass, no optimiser, no host read.
    plan = module.prepare(batches[0])
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        module.optimise(plan)
    names = {event.name for event in prof.events()}
    eager_work = {n for n in names if n.startswith(("autograd::engine", "Optimizer.step", "aten::_local_scalar"))}
    assert not eager_work, eager_work
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled
