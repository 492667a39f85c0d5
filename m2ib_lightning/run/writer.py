"""The callback that writes attribution outputs (format: :mod:`m2ib_lightning.outputs`)."""

from __future__ import annotations

import json
import logging
import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info

from m2ib_lightning.errors import ConfigError
from m2ib_lightning.outputs import OVERLAYS, Attributions
from m2ib_lightning.outputs.format import next_sequence, remove_stale_temporaries, write_shard
from m2ib_lightning.outputs.overlays import overlay

log = logging.getLogger(__name__)


class AttributionWriter(pl.Callback):
    """Writes each rank's results to parquet shards in a background thread.

    Args:
        output_dir: where outputs go; ``None`` means ``<trainer.default_root_dir>/attributions``.
        shard_size: records per shard (a shard is written when this many are buffered, and at the end).
        overlays: write PNG overlays of the image map for the first this-many samples of each rank.
        resume: pass over samples that ``output_dir`` already holds (as records or in the skip
            manifest), so rerunning a killed or preempted job continues where it stopped. Set False
            to recompute everything (new shards are appended; the reader serves the first copy).

    Everything buffered is flushed whenever a checkpoint is saved (including Lightning's SLURM
    checkpoint on SIGUSR1 before requeue) and when a run ends or fails.
    """

    def __init__(self, output_dir: str | None = None, shard_size: int = 1024, overlays: int = 0,
                 resume: bool = True) -> None:
        super().__init__()
        if not isinstance(shard_size, int) or shard_size < 1:
            raise ConfigError(f"shard_size must be an int >= 1, got {shard_size!r}")
        if not isinstance(overlays, int) or overlays < 0:
            raise ConfigError(f"overlays must be an int >= 0, got {overlays!r}")
        self.output_dir = output_dir
        self.shard_size, self.overlays, self.resume = shard_size, overlays, resume
        self.directory: Path | None = None
        self._rows: list[dict[str, Any]] = []
        self._skipped: list[dict[str, str]] = []
        self._pending: list[Future] = []
        self._pool: ThreadPoolExecutor | None = None
        self.written = self.skipped = self._overlaid = 0

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        root = self.output_dir or str(Path(trainer.default_root_dir) / "attributions")
        self.directory = Path(root).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.rank = trainer.global_rank
        if remove_stale_temporaries(self.directory, self.rank):
            log.warning("removed half-written shard(s) of rank %d left by an interrupted run", self.rank)
        self._seq = next_sequence(self.directory, self.rank)
        settings = getattr(pl_module, "settings", None)
        self.metadata = {
            "format": 1,
            "precision": str(trainer.precision),
            **(settings() if settings is not None else {
                "backbone": getattr(pl_module.backbone, "source", type(pl_module.backbone).__name__),
                **{k: v for k, v in pl_module.hparams.items() if not k.startswith("_")}}),
        }
        existing = Attributions(self.directory)
        for path in existing.unreadable:  # its samples are computed again; keep the file for inspection
            if path.name.startswith(f"rank{self.rank:05d}-"):
                os.replace(path, path.with_name(f"unreadable-{path.name}"))
                log.warning("moved the unreadable shard %s aside (unreadable-%s); its samples are computed again",
                            path, path.name)
        if len(existing):
            self._check_settings(existing.metadata)
        #: ids this run passes over because their outputs are already there (read by the evaluator)
        self.excluded: frozenset[str] = frozenset()
        if self.resume and trainer.datamodule is not None and hasattr(trainer.datamodule, "exclude_ids"):
            done = existing.completed()
            self.excluded = trainer.datamodule.exclude_ids = frozenset(done)
            if done:
                rank_zero_info(f"M2IB: resuming in {self.directory}: {len(done)} samples already done are passed over")
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="m2ib-writer")

    #: settings that do not change the maps (or, for the backbone's name, are checked by its weights);
    #: ``chunk``: RISE's masks per forward pass
    SETTINGS_FREE_TO_CHANGE = frozenset({"format", "chunk_size", "chunk", "torch_compile", "backbone"})

    def _check_settings(self, stored: dict[str, Any]) -> None:
        """Refuse to add maps made with other settings to a directory (the reader could not tell them apart)."""
        ours = json.loads(json.dumps(self.metadata, sort_keys=True, default=str))
        if "weights" not in stored or "weights" not in ours:  # outputs of an older version: names only
            ours.pop("weights", None)
            stored = {k: v for k, v in stored.items() if k != "weights"}
        # The backbone's name may change (a moved or re-downloaded checkpoint) when its weights'
        # fingerprint is there to compare; without one, the name is all there is.
        free = self.SETTINGS_FREE_TO_CHANGE if "weights" in ours else self.SETTINGS_FREE_TO_CHANGE - {"backbone"}
        clash = {k: (stored[k], v) for k, v in ours.items() if k not in free and k in stored and stored[k] != v}
        if clash:
            detail = "; ".join(f"{k}: stored {a!r}, this run {b!r}" for k, (a, b) in sorted(clash.items()))
            raise ConfigError(
                f"writer.output_dir {self.directory} already holds maps made with other settings ({detail}). "
                "Adding to it would mix maps that load_attributions cannot tell apart: give this run another "
                "writer.output_dir (or trainer.default_root_dir)"
            )

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any,
                           batch: Any, batch_idx: int) -> None:
        # Pairs explained in a repaired form (caption truncated, image rescaled) are listed in the
        # manifest too, as kind "repaired"; logged on every step (0 included) so that every rank
        # logs the same keys, which the epoch-end sync needs.
        explained = set(outputs.get("ids", [])) if outputs else set()
        repaired = [r for r in (batch.get("repaired", []) if isinstance(batch, dict) else []) if r["id"] in explained]
        pl_module.log("repaired", float(len(repaired)), reduce_fx="sum", on_step=False, on_epoch=True,
                      sync_dist=True, batch_size=1)
        if not outputs:
            return
        self._skipped.extend(outputs.get("skipped", []))
        for reason in outputs.get("skipped", []):
            log.warning("skipped sample %s: %s", reason["id"], reason["reason"])
        self._skipped.extend({**r, "kind": "repaired"} for r in repaired)
        self._rows.extend(self._to_rows(outputs))
        self._overlay(pl_module, outputs, batch)
        if len(self._rows) >= self.shard_size:
            self._flush()

    def _to_rows(self, out: dict[str, Any]) -> list[dict[str, Any]]:
        rows = []
        for i, sample_id in enumerate(out["ids"]):
            row: dict[str, Any] = {"id": sample_id, "similarity": float(out["similarity"][i])}
            if "image_maps" in out:
                m = out["image_maps"][i].numpy()
                gh, gw = out["grid"]
                row.update(map_height=m.shape[0], map_width=m.shape[1], image_map=m,
                           grid_height=gh, grid_width=gw, patch_scores=out["patch_scores"][i].float().numpy())
            if "text_scores" in out:
                row.update(tokens=out["tokens"][i], text_scores=out["text_scores"][i].numpy())
            if out.get("metrics"):  # the evaluation's per-sample values, NaN (undefined) left out
                values = {name: float(v[i]) for name, v in out["metrics"].items()}
                row["metrics"] = {name: v for name, v in values.items() if v == v}
            rows.append(row)
        return rows

    def _overlay(self, pl_module: pl.LightningModule, out: dict[str, Any], batch: Any) -> None:
        if self._overlaid >= self.overlays or "image_maps" not in out:
            return
        processor = pl_module.backbone.image_processor
        mean = torch.tensor(processor.image_mean).view(3, 1, 1)
        std = torch.tensor(processor.image_std).view(3, 1, 1)
        target = self.directory / OVERLAYS
        target.mkdir(exist_ok=True)
        for i, sample_id in enumerate(out["ids"]):
            if self._overlaid >= self.overlays:
                break
            pixels = (batch["pixel_values"][i].detach().float().cpu() * std + mean).clamp(0, 1)
            image = (pixels.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
            safe = re.sub(r"[^A-Za-z0-9._-]", "_", sample_id)
            overlay(image, out["image_maps"][i].numpy()).save(target / f"{safe}.png")
            self._overlaid += 1

    def _flush(self) -> None:
        if not self._rows and not self._skipped:
            return
        rows, skipped = self._rows, self._skipped
        self._rows, self._skipped = [], []
        seq, self._seq = self._seq, self._seq + 1
        job = self._pool.submit(write_shard, self.directory, self.rank, seq, rows, skipped, self.metadata)
        self._pending.append(job)
        self.written += len(rows)
        self.skipped += sum(1 for s in skipped if s.get("kind") != "repaired")
        self._reap(block=False)

    def _reap(self, block: bool) -> None:
        still = []
        for fut in self._pending:
            if block or fut.done():
                fut.result()  # a failed write must fail the run, not vanish
            else:
                still.append(fut)
        self._pending = still

    def _finish(self) -> None:
        if self._pool is None:
            return
        self._flush()
        self._reap(block=True)
        self._pool.shutdown(wait=True)
        self._pool = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        # A checkpoint marks progress (and on SLURM precedes a requeue): make the outputs match it.
        if self._pool is not None:
            self._flush()
            self._reap(block=True)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._finish()
        print(
            f"M2IB rank {self.rank}: wrote {self.written} attribution records ({self.skipped} skipped, listed in "
            f"{self.directory / 'skipped'}) to {self.directory}",
            flush=True,
        )
        rank_zero_info(f"Load them with: m2ib_lightning.load_attributions({str(self.directory)!r})")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # Completed samples are kept even when the run dies.
        try:
            self._finish()
        except Exception:  # noqa: BLE001 - never mask the original exception
            log.exception("could not flush attribution outputs after an exception")
