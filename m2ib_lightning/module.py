"""M2IB attribution as a LightningModule.

The module's ONLY parameters are the mask logits of the current batch, one tensor per side. One
``training_step`` runs the whole inner optimisation of a batch (``steps`` updates, optimiser state
reset) for both sides at once, all pairs x ``copies`` noisy copies in one batched pass:

* below the bottleneck each tower runs once per batch, without grad;
* the clean embedding of the other tower (the relevance target) is computed once per batch;
* inside the loop only the blocks above the bottleneck run, with frozen weights (no weight grads);
* each sample's compression term is a mean over ITS OWN valid tokens and its relevance term a mean
  over ITS OWN copies, and the per-sample, per-side losses are summed: every mask element gets
  exactly the gradient it would get in a separate per-pair, per-side run, and Adam is
  element-wise, so the batched run reproduces the reference protocol (shared/M2IB_SPEC.md).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torch.optim import Optimizer

from m2ib_lightning.attribution import AttributionModule
from m2ib_lightning.backbones import SIDES, BackboneAdapter, Side, TowerState
from m2ib_lightning.bottlenecks import M2IB
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.noise import noise_generator


def adam_lr1(params: Iterable[Tensor]) -> Optimizer:
    """The reference optimiser: Adam with learning rate 1 (betas and eps at torch's defaults)."""
    return torch.optim.Adam(params, lr=1.0)


class M2IBAttribution(AttributionModule):
    """Explain image-text pairs with the multi-modal information bottleneck.

    Args:
        backbone: the frozen dual encoder, e.g. ``m2ib_lightning.CLIPBackbone``. Kept out of
            ``parameters()``, ``state_dict()`` and checkpoints; moved to the device with the module.
        vision_layer: 0-based encoder block whose OUTPUT the vision bottleneck replaces.
        text_layer: same for the text tower.
        vision_bottleneck: bottleneck variant of the vision side (default: reference ``M2IB()``).
        text_bottleneck: bottleneck variant of the text side (default: reference ``M2IB()``).
        sides: which maps to compute: ``["vision", "text"]``, or only one of them.
        steps: optimisation steps per batch (the map is read from the last forward pass).
        copies: noisy copies of each sample per step (K).
        seed: noise seed; each (seed, side, sample id) has its own noise stream.
        optimizer: callable building the optimiser over the masks (default: Adam, lr 1). Its state
            is reset for every batch.
    """

    transient_prefixes = ("alpha.",)

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
    ) -> None:
        super().__init__(backbone, sides=sides, seed=seed)
        for name, value, low in (("steps", steps, 1), ("copies", copies, 1)):
            if not isinstance(value, int) or value < low:
                raise ConfigError(f"{name} must be an int >= {low}, got {value!r}")
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
    def _noise(self, side: Side, ids: Sequence[str], shapes: Sequence[tuple[int, ...]], out: Tensor,
               generators: list[torch.Generator]) -> Tensor:
        """Fill ``out`` ``(B, K, L, D)`` with each sample's noise of shape ``shapes[i]`` (zeros beyond)."""
        bottleneck = self.bottlenecks[side]
        for i, (gen, shape) in enumerate(zip(generators, shapes)):
            out[i, :, : shape[1]] = bottleneck.sample_noise(shape, gen, out.device)
        return out

    @torch.no_grad()
    def prepare(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Everything constant during the optimisation: per side the bottleneck input, the clean
        embeddings, the repeated state for the upper blocks, and the noise generators."""
        ids = list(batch["ids"])
        inputs = self.model_inputs(batch)
        states: dict[str, TowerState] = {}
        clean: dict[str, Tensor] = {}
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
        prepared: dict[str, Any] = {"ids": ids, "inputs": inputs, "states": states, "clean": clean, "sides": {}}
        for side, state in states.items():
            lengths = state.valid.sum(1)
            other = "text" if side == "vision" else "vision"
            prepared["sides"][side] = {
                "state": state,
                "upper": self.backbone.prepare_upper(side, state.repeat(self.copies), self.layers[side]),
                "target": clean[other].repeat_interleave(self.copies, dim=0),
                "tokens": lengths.float() * state.hidden.shape[-1],
                "shapes": [(self.copies, int(n), state.hidden.shape[-1]) for n in lengths.tolist()],
                "generators": [noise_generator(self.seed, side, i, state.hidden.device) for i in ids],
            }
        return prepared

    def side_loss(self, side: Side, prep: dict[str, Any], noise: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per-sample compression ``(B,)``, relevance ``(B,)`` and the capacity ``(B, L, D)``."""
        state: TowerState = prep["state"]
        alpha = self.alpha[side]
        bottleneck = self.bottlenecks[side]
        hidden = state.hidden
        z = bottleneck.compress(hidden, alpha, noise)
        emb = self.backbone.upper(side, z, prep["upper"], self.layers[side]).float()
        cos = F.cosine_similarity(emb, prep["target"], dim=-1, eps=1e-6).view(-1, self.copies).mean(1)
        capacity = bottleneck.capacity(hidden, alpha)
        compression = (capacity * state.valid.unsqueeze(-1)).sum((1, 2)) / prep["tokens"]
        return compression, cos, capacity

    def optimise(self, prepared: dict[str, Any]) -> dict[str, Any]:
        """Run the inner optimisation; returns per side the last capacity and loss terms."""
        attached = self._trainer is not None
        if attached:
            opt = self.optimizers()
            inner = opt.optimizer
        else:  # used outside a Trainer (Python API): a private optimiser, plain backward
            if getattr(self, "_own_optimizer", None) is None:
                self._own_optimizer = self.configure_optimizers()
            opt = inner = self._own_optimizer
        inner.state.clear()
        buffers = {}
        for side, prep in prepared["sides"].items():
            h = prep["state"].hidden
            self.alpha[side].data = self.bottlenecks[side].initial_alpha(h)
            buffers[side] = torch.zeros(h.shape[0], self.copies, *h.shape[1:], device=h.device)
        result: dict[str, Any] = {}
        for step in range(self.steps):
            total = 0.0
            for side, prep in prepared["sides"].items():
                noise = self._noise(side, prepared["ids"], prep["shapes"], buffers[side], prep["generators"])
                compression, relevance, capacity = self.side_loss(side, prep, noise)
                total = total + (self.bottlenecks[side].beta * compression - relevance).sum()
                result[side] = {"compression": compression, "relevance": relevance, "capacity": capacity}
            # The map comes from the last forward pass; its update could not change any output.
            if step == self.steps - 1:
                result["loss"] = total.detach()
                break
            opt.zero_grad()
            if attached:
                self.manual_backward(total)
            else:
                total.backward()
            opt.step()
        return result

    def explain_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """Prepare, optimise and read out one batch (the whole M2IB procedure)."""
        prepared = self.prepare(batch)
        with torch.enable_grad():
            result = self.optimise(prepared)
        clean = prepared["clean"]
        scores = {
            side: self.bottlenecks[side].token_scores(result[side]["capacity"].detach()) if side in result else None
            for side in SIDES
        }
        out = self.outputs(batch, clean["vision"], clean["text"], scores["vision"], scores["text"])
        out["loss"] = result["loss"]
        out["terms"] = {
            f"{term}/{side}": result[side][term].detach().mean()
            for side in self.sides
            for term in ("compression", "relevance")
        }
        return out
