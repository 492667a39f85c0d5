"""M2IB attribution as a LightningModule.

The module's ONLY parameters are the mask logits of the current batch, one tensor per side. One
``training_step`` runs the whole inner optimisation of a batch (``steps`` updates, optimiser state
reset) for both sides, all pairs x ``copies`` noisy copies in batched passes:

* below the bottleneck each tower runs once per batch, without grad;
* the clean embedding of the other tower (the relevance target) is computed once per batch;
* inside the loop only the blocks above the bottleneck run, with frozen weights (no weight grads),
  in chunks of at most ``chunk_size`` rows (pairs x copies), so any batch fits the device
  (``m2ib_lightning.methods.memory``); every chunk of a side has the same shape, across batches too
  (captions padded to a bucket length, a short batch padded with rows of weight 0: ``methods.plan``);
* the noise is a pure function of (seed, side, sample id, step, copy, position, channel)
  (``methods.noise``): a fixed number of tensor operations per chunk, nothing read on the host;
* with the default optimiser (a plain ``torch.optim.Adam``) each step of a chunk is one function
  of tensors, gradient and Adam update included (``methods.step``), that ``torch_compile`` compiles
  into one graph; the chunks' samples are independent problems, so each chunk runs all its steps
  in turn. Other optimisers (and ``16-mixed``'s loss scaler) run the same maths through the
  optimiser object, step by step over all chunks, eagerly;
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
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer

from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side, TowerState
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.adam import FunctionalAdam
from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.methods.bottlenecks import M2IB, TokenLayout
from m2ib_lightning.methods.loop import InnerLoop
from m2ib_lightning.methods.memory import auto_chunk_rows, bytes_per_row, is_out_of_memory
from m2ib_lightning.methods.noise import MAX_COPIES, MAX_STEPS, NOISE_FUNCTION, sample_keys
from m2ib_lightning.methods.plan import BatchPlan, Chunk, SidePlan, bucket_length, pad_rows, pad_text
from m2ib_lightning.methods.prepass import BottleneckStatistics
from m2ib_lightning.methods.step import compile_mode, relevance
from m2ib_lightning.records import Explanation


def adam_lr1(params: Iterable[Tensor]) -> Optimizer:
    """The reference optimiser: Adam with learning rate 1 (betas and eps at torch's defaults)."""
    return torch.optim.Adam(params, lr=1.0)


class M2IBAttribution(InnerLoop, BottleneckStatistics, AttributionModule):
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
        seed: noise seed; the noise is a function of (seed, side, sample id, step, copy, token, channel).
        optimizer: callable building the optimiser over the masks (default: Adam, lr 1). Its state
            is reset for every batch. A plain ``torch.optim.Adam`` runs as a functional update inside
            the (compilable) step; any other optimiser runs through the optimiser object, eagerly.
        chunk_size: most rows (pairs x copies) per forward/backward pass of the loop; a chunk holds
            whole samples, so it must be >= ``copies``. ``None``: as many as fit in half of the
            device's free memory, by the estimate of ``m2ib_lightning.methods.memory.bytes_per_row``
            (about 79 MB per pair at ViT-B/32, layer 9, 10 copies), fixed at the first batch of each
            caption length so that shapes stay static. The maps do not depend on it. Lower it (or
            ``data.batch_size``) when a run stops for lack of memory.
        torch_compile: compile the optimisation step (noise, bottleneck, upper blocks, similarity,
            loss, gradient and Adam update) with ``torch.compile(fullgraph=True)``: ``true`` (mode
            ``default``) or a mode, ``reduce-overhead`` for CUDA graphs on GPUs (on a CPU it falls back
            to ``default``, saying so once). The first batch of each shape waits for the compiler.
        text_bucket: captions are padded (masked out) to a multiple of this many tokens, at most the
            text tower's maximum, so the loop sees a few shapes only; 1 pads to the batch's longest.
            Default (``None``): 16 with ``torch_compile`` (a few shapes, a few compilations), 1
            without (an eager step gains nothing from static shapes, and padding is work).
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
        torch_compile: bool | str = False,
        text_bucket: int | None = None,
    ) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for name, value, low, high in (("steps", steps, 1, MAX_STEPS), ("copies", copies, 1, MAX_COPIES),
                                       ("text_bucket", 1 if text_bucket is None else text_bucket, 1, None)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
            if high is not None and value > high:
                raise ConfigError(f"{name} must be <= {high} (a limit of the noise function's counter), got {value!r}")
        if chunk_size is not None and (
            not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size < copies
        ):
            raise ConfigError(
                f"chunk_size must be None (automatic) or an int >= copies ({copies}): a chunk holds all "
                f"copies of its samples; got {chunk_size!r}"
            )
        self.chunk_size = chunk_size
        self.compile_mode = compile_mode(torch_compile)
        self.torch_compile = self.compile_mode is not None
        self.text_bucket = text_bucket if text_bucket is not None else (16 if self.torch_compile else 1)
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
        #: most samples a batch has had: a smaller batch is padded to it (static shapes)
        self.batch_rows = 0
        #: samples per chunk, per (side, caption length), fixed when first computed (static shapes)
        self._chunk_samples: dict[tuple[Side, int], int] = {}
        self._steps: dict[Side, Any] = {}
        self.save_hyperparameters(ignore=["backbone", "vision_bottleneck", "text_bottleneck", "optimizer"])

    def configure_optimizers(self) -> Optimizer:
        return self.optimizer_factory([self.alpha[s] for s in SIDES])

    def settings(self) -> dict[str, Any]:
        """The base settings plus the noise function (:data:`~m2ib_lightning.methods.noise.NOISE_FUNCTION`):
        maps made with another noise are other maps."""
        return {**super().settings(), "noise": NOISE_FUNCTION}

    # ------------------------------------------------------------------------- the batch's plan
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

    def samples_per_chunk(self, side: Side, hidden: Tensor) -> int:
        """Samples per chunk: :meth:`chunk_rows` over ``copies`` (computed once per side and caption
        length, so the free memory of a later moment does not change the shapes), at most the most
        samples a batch has had."""
        key = (side, int(hidden.shape[1]))
        if key not in self._chunk_samples:
            self._chunk_samples[key] = max(1, self.chunk_rows(side, hidden) // self.copies)
        return max(1, min(self._chunk_samples[key], self.batch_rows))

    def _bucketed(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], int, int | None]:
        """``inputs`` with the captions padded to the bucket length; the caption positions' offset and
        the length before padding."""
        ids = inputs.get("input_ids")
        if ids is None or "text" not in self.sides:
            return inputs, 0, None
        length = bucket_length(ids.shape[1], self.text_bucket, self.backbone.max_text_length)
        tok = self.backbone.tokenizer
        pad_id = next((v for v in (getattr(tok, "pad_token_id", None), getattr(tok, "eos_token_id", None))
                       if v is not None), 0)
        left = getattr(tok, "padding_side", "right") == "left"
        return pad_text(inputs, length, pad_id, left), (length - ids.shape[1]) if left else 0, ids.shape[1]

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> BatchPlan:
        """Everything constant during the optimisation: per side the bottleneck input, the clean
        embeddings, the chunks with their repeated states for the upper blocks, and the noise keys."""
        ids = [str(i) for i in batch["ids"]]
        n = len(ids)
        self.batch_rows = max(self.batch_rows, n)
        inputs, offset, length = self._bucketed(self.model_inputs(batch))
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
        plan = BatchPlan(ids=ids, inputs=inputs, clean=clean, text_offset=offset, text_length=length)
        for side in states:  # the bottleneck's token layout (e.g. the patch grid, for smoothing variants)
            vision = side == "vision"
            self.bottlenecks[side].set_layout(TokenLayout(
                side, self.backbone.vision_prefix_tokens if vision else 0,
                tuple(self.backbone.vision_grid(inputs["pixel_values"])) if vision else None))
        for side, state in states.items():
            device = state.hidden.device
            per_chunk = self.samples_per_chunk(side, state.hidden)
            padded = -(-n // per_chunk) * per_chunk
            index = torch.tensor(list(range(n)) + [0] * (padded - n), device=device)
            if padded > n:
                state = pad_rows(state, index)
            keys = sample_keys(self.seed, side, ids, device).index_select(0, index)
            weight = (torch.arange(padded, device=device) < n).float()
            target = clean["text" if side == "vision" else "vision"].index_select(0, index)
            tokens = state.valid.sum(1).float() * state.hidden.shape[-1]
            chunks = []
            for a in range(0, padded, per_chunk):
                b = a + per_chunk
                part = TowerState(state.hidden[a:b], state.valid[a:b], {k: v[a:b] for k, v in state.extras.items()})
                repeated = part.repeat(self.copies, with_hidden=False)
                upper = self.backbone.prepare_upper(side, repeated, self.layers[side])
                # Own storage per chunk (clones): a compiled step then sees the same layout for every chunk.
                chunks.append(Chunk(start=a, stop=b, hidden=part.hidden.clone(), valid=part.valid.clone(),
                                    tokens=tokens[a:b].clone(), keys=keys[a:b].clone(), weight=weight[a:b].clone(),
                                    upper=upper, target=target[a:b].clone()))
            plan.sides[side] = SidePlan(state=state, chunks=chunks, rows=per_chunk * self.copies, samples=n,
                                        tokens=tokens, keys=keys, weight=weight, target=target)
        return plan

    def side_loss(self, side: Side, hidden: Tensor, alpha: Tensor, noise: Tensor, upper: TowerState,
                  target: Tensor) -> Tensor:
        """Relevance of the ``n`` samples of one chunk (:func:`m2ib_lightning.methods.step.relevance`), ``(n,)``."""
        return relevance(self.backbone, self.bottlenecks[side], side, self.layers[side], self.copies, hidden, alpha,
                         noise, upper, target)

    # --------------------------------------------------------------------------- Lightning glue
    def _optimizer(self) -> tuple[Any, Optimizer]:
        """The optimiser to step (Lightning's wrapper under a Trainer) and the torch optimiser inside."""
        if self._trainer is not None:
            opt = self.optimizers()
            return opt, opt.optimizer
        if getattr(self, "_own_optimizer", None) is None:  # the Python API: a private optimiser
            self._own_optimizer = self.configure_optimizers()
        return self._own_optimizer, self._own_optimizer

    def _count_updates(self, n: int) -> None:
        """Count ``n`` mask updates of the functional loop as optimiser steps of the Trainer. That loop
        never calls the wrapped optimiser's ``step``, which is what advances ``trainer.global_step``
        under manual optimisation; without this the step count stays 0, and step-based checkpointing
        (``ModelCheckpoint`` skips a save at an unchanged step), logging and ``max_steps`` stop working."""
        if self._trainer is None:
            return
        progress = self.trainer.fit_loop.epoch_loop.manual_optimization.optim_step_progress
        for _ in range(n):
            progress.increment_ready()
            progress.increment_completed()

    def _functional_adam(self, inner: Optimizer) -> FunctionalAdam | None:
        return FunctionalAdam.of(inner)

    def _backward(self, loss: Tensor) -> None:
        if self._trainer is not None:
            self.manual_backward(loss)  # precision plugin (loss scaling) and strategy hooks
        else:
            loss.backward()

    def _precision_scaler(self) -> Any:
        """The Trainer's float16 loss scaler (``precision="16-mixed"``), or None: with one, the loop runs
        through the optimiser (generic path), whose update the scaler may skip."""
        if self._trainer is None:
            return None
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        return scaler if scaler is not None and scaler.is_enabled() else None

    def _loss_scaler(self) -> Any:
        """The loss scaler whose skipped updates are redone (:meth:`_precision_scaler`), or None."""
        return self._precision_scaler()

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
        scores: dict[Side, Tensor | None] = {}
        for side in SIDES:
            if side not in terms:
                scores[side] = None
                continue
            raw = self.bottlenecks[side].token_scores(terms[side].capacity.detach())
            if side == "text" and plan.text_length is not None:  # the caption's own positions
                raw = raw[:, plan.text_offset : plan.text_offset + plan.text_length]
            scores[side] = raw
        out = self.outputs(batch, plan.clean["vision"], plan.clean["text"], scores["vision"], scores["text"])
        out.loss = loss
        out.terms = {f"{name}/{side}": getattr(terms[side], name).detach().mean()
                     for side in self.sides for name in ("compression", "relevance")}
        if redone is not None:
            out.terms["redone_steps"] = torch.tensor(float(redone))
        return out
