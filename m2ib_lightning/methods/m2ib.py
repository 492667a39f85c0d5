"""M2IB attribution as a LightningModule.

The module's ONLY parameters are the mask logits of the current batch, one tensor per side. One
``training_step`` runs the whole inner optimisation of a batch (``steps`` updates, optimiser state
reset) for both sides at once, all pairs x ``copies`` noisy copies in one batched pass:

* below the bottleneck each tower runs once per batch, without grad;
* the clean embedding of the other tower (the relevance target) is computed once per batch;
* inside the loop only the blocks above the bottleneck run, with frozen weights (no weight grads),
  in chunks of at most ``chunk_size`` rows (pairs x copies) whose gradients are accumulated (exact:
  the loss is a sum over samples), so any batch fits the device (``m2ib_lightning.methods.memory``);
* the last step runs no forward pass: the map is the capacity of the masks after ``steps - 1``
  updates, which needs no noise and no upper blocks (its update could not change the map either);
* each sample's compression term is a mean over ITS OWN valid tokens and its relevance term a mean
  over ITS OWN copies, and the per-sample, per-side losses are summed: every mask element gets
  exactly the gradient it would get in a separate per-pair, per-side run, and Adam is
  element-wise, so the batched run reproduces the reference protocol (docs/method.md).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side, TowerState
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.methods.bottlenecks import M2IB, TokenLayout
from m2ib_lightning.methods.memory import auto_chunk_rows, bytes_per_row, is_out_of_memory
from m2ib_lightning.methods.noise import noise_generator
from m2ib_lightning.methods.plan import BatchPlan, Chunk, SidePlan, SideTerms
from m2ib_lightning.methods.prepass import BottleneckStatistics
from m2ib_lightning.records import Explanation


def adam_lr1(params: Iterable[Tensor]) -> Optimizer:
    """The reference optimiser: Adam with learning rate 1 (betas and eps at torch's defaults)."""
    return torch.optim.Adam(params, lr=1.0)


class M2IBAttribution(BottleneckStatistics, AttributionModule):
    """Explain image-text pairs with the multi-modal information bottleneck.

    Args:
        backbone: the frozen dual encoder, e.g. ``m2ib_lightning.CLIPBackbone``. Kept out of
            ``parameters()``, ``state_dict()`` and checkpoints; moved to the device with the module.
        vision_layer: 0-based encoder block whose OUTPUT the vision bottleneck replaces; ``-1``
            puts it on the patch embeddings (after CLIP's pre-norm), before block 0.
        text_layer: same for the text tower. In a causal text encoder the pooled EOS token has
            read the whole caption by the output of block 0, so a bottleneck there or above can keep
            the caption's information in EOS alone; on the toy CLIP the words' scores then ranked
            the words no better than chance (docs/evaluation.md). At ``-1`` each token holds only
            its own word.
        vision_bottleneck: bottleneck variant of the vision side (default: reference ``M2IB()``).
        text_bottleneck: bottleneck variant of the text side (default: reference ``M2IB()``).
        sides: which maps to compute: ``["vision", "text"]``, or only one of them.
        steps: optimisation steps per batch (the map is read from the last forward pass).
        copies: noisy copies of each sample per step (K).
        seed: noise seed; each (seed, side, sample id) has its own noise stream.
        optimizer: callable building the optimiser over the masks (default: Adam, lr 1). Its state
            is reset for every batch.
        chunk_size: most rows (pairs x copies) per forward/backward pass of the loop; a chunk holds
            whole samples, so it must be >= ``copies``. ``None``: as many as fit in half of the
            device's free memory, by the estimate of ``m2ib_lightning.methods.memory.bytes_per_row``
            (about 79 MB per pair at ViT-B/32, layer 9, 10 copies). The maps do not depend on it.
            Lower it (or ``data.batch_size``) when a run stops for lack of memory.
        torch_compile: run the loop's forward (bottleneck, upper blocks, similarity) through
            ``torch.compile``. Pays on GPUs with large chunks; the first batches wait for the compiler.
    """

    transient_prefixes = ("alpha.",)
    #: Under 16-mixed, how often one step may be redone at a halved loss scale before giving up.
    max_redone_steps = 24

    def __init__(
        self,
        backbone: BackboneAdapter,
        vision_layer: int = 9,
        text_layer: int = 9,
        vision_bottleneck: M2IB | None = None,
        text_bottleneck: M2IB | None = None,
        sides: Sequence[Side] = ("vision", "text"),
        steps: int = 10,
        copies: int = 10,
        seed: int = 0,
        optimizer: OptimizerCallable = adam_lr1,
        chunk_size: int | None = None,
        torch_compile: bool = False,
    ) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for name, value, low in (("steps", steps, 1), ("copies", copies, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < copies
        ):
            raise ConfigError(
                f"chunk_size must be None (automatic) or an int >= copies ({copies}): a chunk holds all "
                f"copies of its samples; got {chunk_size!r}"
            )
        self.chunk_size = chunk_size
        self.torch_compile = bool(torch_compile)
        self._compiled: Any = None
        self.layers = {"vision": vision_layer, "text": text_layer}
        for side in self.sides:
            backbone.check_layer(side, self.layers[side])
        self.bottlenecks = nn.ModuleDict(
            {"vision": vision_bottleneck or M2IB(), "text": text_bottleneck or M2IB()}
        )
        self.steps, self.copies = steps, copies
        self.optimizer_factory = optimizer
        # Mask logits of the current batch; resized in place per batch so the optimiser keeps them.
        self.alpha = nn.ParameterDict({s: nn.Parameter(torch.zeros(0)) for s in SIDES})
        self.save_hyperparameters(ignore=["backbone", "vision_bottleneck", "text_bottleneck", "optimizer"])

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory([self.alpha[s] for s in SIDES])

    # ----------------------------------------------------------------------- the optimisation
    def chunk_rows(self, side: Side, hidden: Tensor) -> int:
        """Rows (pairs x copies) per chunk for ``side`` with bottleneck input ``hidden`` ``(B, L, D)``:
        ``chunk_size``, or the automatic choice (module ``m2ib_lightning.methods.memory``), at least ``copies``."""
        if self.chunk_size is not None:
            return self.chunk_size
        blocks = self.backbone.num_layers[side] - self.layers[side] - 1
        row = bytes_per_row(hidden.shape[1], hidden.shape[2], blocks,
                            pruned_last=bool(getattr(self.backbone, "prune_last_block", False)))
        # CPU ranks of one node share its memory (devices per node = processes per node).
        processes = self.trainer.num_devices if self._trainer is not None else 1
        rows = auto_chunk_rows(hidden.device, row, processes=processes)
        return max(self.copies, rows if rows is not None else hidden.shape[0] * self.copies)

    def _noise(self, side: Side, prep: SidePlan, start: int, stop: int) -> Tensor:
        """Next step's noise of samples ``start:stop``, ``(n, K, L, D)``, in ``prep``'s reused buffer.

        Each sample draws ``(K, L_i, D)`` from its own generator (its valid tokens ``L_i``; zeros
        beyond), so its noise does not depend on the batch it is in. Drawing only enqueues work on
        an accelerator: no host-device synchronisation.
        """
        bottleneck = self.bottlenecks[side]
        out = prep.noise[: stop - start]
        length, reused = out.shape[2], len(prep.chunks) > 1
        for row, i in enumerate(range(start, stop)):
            shape = prep.shapes[i]
            out[row, :, : shape[1]] = bottleneck.sample_noise(shape, prep.generators[i], out.device)
            if shape[1] < length and reused:  # the row may hold a longer sample's noise
                out[row, :, shape[1] :] = 0
        return out

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> BatchPlan:
        """Everything constant during the optimisation: per side the bottleneck input, the clean
        embeddings, the chunks with their repeated states for the upper blocks, and the noise
        generators."""
        ids = list(batch["ids"])
        inputs = self.model_inputs(batch)
        states: dict[Side, TowerState] = {}
        clean: dict[Side, Tensor] = {}
        for side in SIDES:
            if side in self.sides:
                state = self.backbone.lower(side, inputs, self.layers[side])
                state.hidden = state.hidden.float()
                states[side] = state
                base = TowerState(state.hidden, state.valid, state.extras)
                base = self.backbone.prepare_upper(side, base, self.layers[side])
                clean[side] = self.backbone.upper(side, state.hidden, base, self.layers[side]).float()
            else:
                clean[side] = self.backbone.embed(side, inputs).float()
        plan = BatchPlan(ids=ids, inputs=inputs, clean=clean)
        for side in states:  # the bottleneck's token layout (e.g. the patch grid, for smoothing variants)
            vision = side == "vision"
            self.bottlenecks[side].set_layout(TokenLayout(
                side, self.backbone.vision_prefix_tokens if vision else 0,
                tuple(self.backbone.vision_grid(inputs["pixel_values"])) if vision else None))
        for side, state in states.items():
            hidden, valid = state.hidden, state.valid
            lengths = valid.sum(1)
            other = "text" if side == "vision" else "vision"
            per_chunk = max(1, self.chunk_rows(side, hidden) // self.copies)
            chunks = []
            for a in range(0, len(ids), per_chunk):
                b = min(a + per_chunk, len(ids))
                part = TowerState(hidden[a:b], valid[a:b], {k: v[a:b] for k, v in state.extras.items()})
                repeated = part.repeat(self.copies, with_hidden=False)
                upper = self.backbone.prepare_upper(side, repeated, self.layers[side])
                chunks.append(Chunk(start=a, stop=b, upper=upper, target=clean[other][a:b]))
            plan.sides[side] = SidePlan(
                state=state,
                chunks=chunks,
                rows=min(per_chunk, len(ids)) * self.copies,
                tokens=lengths.float() * hidden.shape[-1],
                shapes=[(self.copies, int(n), hidden.shape[-1]) for n in lengths.tolist()],
                generators=[noise_generator(self.seed, side, i, hidden.device) for i in ids],
                noise=hidden.new_zeros(min(per_chunk, len(ids)), self.copies, *hidden.shape[1:]),
            )
        return plan

    def compression(self, side: Side, prep: SidePlan) -> tuple[Tensor, Tensor]:
        """Per-sample compression ``(B,)`` (mean capacity over the sample's valid tokens and all
        channels) and the capacity ``(B, L, D)``; neither depends on the noise."""
        capacity = self.bottlenecks[side].capacity(prep.state.hidden, self.alpha[side])
        compression = (capacity * prep.state.valid.unsqueeze(-1)).sum((1, 2)) / prep.tokens
        return compression, capacity

    def side_loss(self, side: Side, hidden: Tensor, alpha: Tensor, noise: Tensor, upper: TowerState,
                  target: Tensor) -> Tensor:
        """Relevance of the ``n`` samples of one chunk: each one's cosine similarity to the other
        tower's clean embedding, averaged over its K copies, ``(n,)``.

        Args:
            hidden: bottleneck input ``(n, L, D)``; ``alpha``: its mask logits (broadcastable).
            noise: ``(n, K, L, D)``; ``upper``: the chunk's repeated state (``n * K`` rows).
            target: the other tower's clean embeddings ``(n, P)``.
        """
        z = self.bottlenecks[side].compress(hidden, alpha, noise)
        emb = self.backbone.upper(side, z, upper, self.layers[side]).float()
        emb = emb.view(target.shape[0], self.copies, -1)
        return F.cosine_similarity(emb, target.unsqueeze(1), dim=-1, eps=1e-6).mean(1)

    def _relevance_fn(self) -> Any:
        if not self.torch_compile:
            return self.side_loss
        if self._compiled is None:
            # dynamic=None: the first shapes are specialised, later ones (last chunk, other caption
            # lengths) get one dynamic recompile instead of one per shape.
            self._compiled = torch.compile(self.side_loss, dynamic=None)
        return self._compiled

    def _backward(self, loss: Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)  # precision plugin (loss scaling) and strategy hooks
        else:
            loss.backward()

    def _loss_scaler(self) -> Any:
        """The Trainer's float16 loss scaler (``precision="16-mixed"``), or None."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _one_pass(self, plan: BatchPlan, relevance_fn: Any, backward: bool) -> tuple[dict[Side, SideTerms], Tensor]:
        """One forward pass of every side (and its backward pass if ``backward``): per side the loss
        terms and capacity, and the total loss (detached)."""
        terms: dict[Side, SideTerms] = {}
        total: Tensor | float = 0.0
        with torch.set_grad_enabled(backward):
            for side, prep in plan.sides.items():
                hidden, alpha = prep.state.hidden, self.alpha[side]
                beta = self.bottlenecks[side].beta
                compression, capacity = self.compression(side, prep)
                relevance = hidden.new_empty(hidden.shape[0], dtype=torch.float32)
                for chunk in prep.chunks:
                    a, b = chunk.start, chunk.stop
                    noise = self._noise(side, prep, a, b)
                    # A mask shared by the batch (leading dim 1) broadcasts; otherwise each
                    # chunk reads (and sends gradient to) its own samples' rows.
                    part = alpha if alpha.shape[0] == 1 else alpha[a:b]
                    rel = relevance_fn(side, hidden[a:b], part, noise, chunk.upper, chunk.target)
                    if backward:
                        self._backward(-rel.sum())
                    relevance[a:b] = rel.detach()
                if backward:
                    self._backward(beta * compression.sum())
                compression = compression.detach()
                total = total + (beta * compression - relevance).sum()
                terms[side] = SideTerms(compression=compression, relevance=relevance, capacity=capacity.detach())
        return terms, total

    def optimise(self, plan: BatchPlan) -> tuple[dict[Side, SideTerms], Tensor, int | None]:
        """Run the inner optimisation; returns per side the last capacity and loss terms, the total
        loss of the last update step, and the number of redone steps (``None`` without a loss scaler).

        Per step and side: the compression term on the whole batch (it needs no noise), then the
        relevance chunk by chunk, each chunk's backward pass right after its forward pass so only
        one chunk's activations are alive; Adam steps once all gradients are in.

        Under ``precision="16-mixed"`` a loss scaler skips the update of a step whose float16
        gradients overflowed and halves its scale. With only ``steps`` updates per batch a skipped
        one would silently change the map, so the step is redone instead: the per-sample noise
        generators are rewound and the same step runs again at the lower scale, until its update
        is applied. Every batch thus gets exactly ``steps - 1`` updates computed from the same noise
        as in float32; ``redone_steps`` (logged) counts the repeats. The check reads the scale
        back, one host-device synchronisation per step, paid only with a loss scaler.
        """
        if self._trainer is not None:
            opt = self.optimizers()
            inner = opt.optimizer
        else:  # used outside a Trainer (Python API): a private optimiser, plain backward
            if getattr(self, "_own_optimizer", None) is None:
                self._own_optimizer = self.configure_optimizers()
            opt = inner = self._own_optimizer
        inner.state.clear()
        for side, prep in plan.sides.items():
            self.alpha[side].data = self.bottlenecks[side].initial_alpha(prep.state.hidden)
        relevance_fn = self._relevance_fn()
        scaler = self._loss_scaler()
        redone = 0
        terms = loss = None
        for _ in range(self.steps - 1):
            rewind = None
            if scaler is not None:
                rewind = {side: [g.get_state() for g in prep.generators] for side, prep in plan.sides.items()}
            for _attempt in range(self.max_redone_steps + 1):
                opt.zero_grad()
                terms, loss = self._one_pass(plan, relevance_fn, backward=True)
                if scaler is None:
                    opt.step()
                    break
                scale = scaler.get_scale()
                opt.step()  # the scaler skips the update if a gradient is not finite, and lowers its scale
                if scaler.get_scale() >= scale:
                    break
                redone += 1
                for side, states in rewind.items():
                    for gen, state in zip(plan.sides[side].generators, states):
                        gen.set_state(state)
            else:
                raise ConfigError(
                    f"precision 16-mixed: the mask gradients were not finite at {self.max_redone_steps + 1} loss "
                    f"scales down to {scaler.get_scale():g}; float16 overflows in the forward pass itself. Use "
                    f"trainer.precision bf16-mixed (or 32-true)"
                )
        if terms is None:  # steps == 1: no update; one forward pass gives the loss terms
            terms, loss = self._one_pass(plan, relevance_fn, backward=False)
        else:
            # The map is the capacity after steps - 1 updates: the reference reads it from its last
            # forward pass, but the capacity depends on the mask alone, so that pass through the
            # upper blocks (one of the 2 * steps - 1 passes) is not run. The loss terms reported
            # are those of the last update step.
            with torch.no_grad():
                for side, prep in plan.sides.items():
                    terms[side].capacity = self.compression(side, prep)[1]
        return terms, loss, redone if scaler is not None else None

    def _out_of_memory(self, err: BaseException, batch: dict[str, Any], plan: BatchPlan | None) -> ConfigError:
        """The error to raise for an allocation failure: what was running and which setting to lower."""
        pairs = len(batch["ids"])
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if plan is None:
            where = f"while running the towers below the bottleneck on a batch of {pairs} pairs"
        else:
            rows = ", ".join(f"{side}: {prep.rows}" for side, prep in plan.sides.items())
            where = (f"in the optimisation loop on a batch of {pairs} pairs x {self.copies} copies, in chunks of "
                     f"at most {rows} rows")
        setting = f"{self.chunk_size}" if self.chunk_size is not None else "None, i.e. automatic"
        return ConfigError(
            f"out of memory {where} ({first}). Lower model.init_args.chunk_size (rows of pairs x copies per "
            f"forward/backward pass; now {setting}; it must stay >= copies = {self.copies}) or "
            f"data.init_args.batch_size (now {pairs}); the maps do not depend on either"
        )

    def explain_batch(self, batch: dict[str, Any]) -> Explanation:
        """Prepare, optimise and read out one batch (the whole M2IB procedure).

        Raises:
            ConfigError: the device ran out of memory; the message names the settings to lower.
        """
        plan = None
        try:
            plan = self.prepare(batch)
            with torch.enable_grad():
                terms, loss, redone = self.optimise(plan)
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not is_out_of_memory(err):
                raise
            error = self._out_of_memory(err, batch, plan)
            # Free the failed batch's tensors (held by the frames of the trace, which keeps its file
            # and line information) before the error travels up: a caller may retry smaller.
            plan = None
            traceback.clear_frames(err.__traceback__)
            raise error from err
        scores = {side: self.bottlenecks[side].token_scores(terms[side].capacity.detach()) if side in terms else None
                  for side in SIDES}
        out = self.outputs(batch, plan.clean["vision"], plan.clean["text"], scores["vision"], scores["text"])
        out.loss = loss
        out.terms = {f"{name}/{side}": getattr(terms[side], name).detach().mean()
                     for side in self.sides for name in ("compression", "relevance")}
        if redone is not None:
            out.terms["redone_steps"] = torch.tensor(float(redone))
        return out
