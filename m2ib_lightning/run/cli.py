"""The command line: ``python train.py fit -c configs/demo.yaml``.

A LightningCLI whose model is any :class:`~m2ib_lightning.methods.base.AttributionModule` chosen by
``class_path`` (:class:`~m2ib_lightning.methods.m2ib.M2IBAttribution`, a variant, or a baseline of
:mod:`m2ib_lightning.methods.baselines`), whose data is any LightningDataModule chosen by ``class_path``, and
whose one sink callback (:class:`~m2ib_lightning.run.writer.AttributionWriter`: evaluate, then write) is
always present, configured under ``writer:`` and ``evaluation:`` (the evaluation is off unless
``evaluation.enabled``). Configs are parsed with
omegaconf, so values can be interpolated (``${data.batch_size}``). Several ``-c`` files compose in order
(``configs/README.md``); :func:`parse` gives the config a command line would run without running it.
"""

from __future__ import annotations

import sys
import warnings
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_info

from m2ib_lightning.errors import ConfigError, RunOutcomeError, user_error
from m2ib_lightning.evaluation import AttributionEvaluator
from m2ib_lightning.methods.base import AttributionModule
from m2ib_lightning.methods.strategy import NAME, auto_strategy, check_strategy, device_count
from m2ib_lightning.run.preemption import SlurmRequeue
from m2ib_lightning.run.writer import AttributionWriter

#: the share of skipped rows above which a run fails, for data that does not say (``data.max_skip_fraction``)
DEFAULT_MAX_SKIP_FRACTION = 0.5

TRAINER_DEFAULTS = {
    "max_epochs": 1,
    "num_sanity_val_steps": 0,
    "enable_model_summary": False,
    "logger": False,
    "enable_checkpointing": False,
}


class M2IBCLI(LightningCLI):
    """LightningCLI with M2IB defaults: one pass over the data, the sink callback always on.

    The composition root: it opens the run directory once, before any data is read, gives the data
    its finished ids and the writer the directory, and wires the evaluation settings into the writer.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_class_arguments(AttributionEvaluator, "evaluation")
        parser.add_lightning_class_args(AttributionWriter, "writer")
        # The sink evaluates, then writes: the evaluation settings are handed to it, not configured twice.
        parser.link_arguments("evaluation", "writer.evaluation", apply_on="instantiate")
        # SLURM preemption handled at a batch boundary on every rank (no-op outside SLURM).
        parser.add_lightning_class_args(SlurmRequeue, "preemption")

    def _writer(self) -> AttributionWriter:
        return next(cb for cb in self.trainer.callbacks if isinstance(cb, AttributionWriter))

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with ``strategy: auto`` on several devices or nodes resolved to ``m2ib_ddp``
        (Lightning would pick plain DDP there, which averages mask gradients and is refused)."""
        flags = {**self._get(self.config_init, "trainer", default={}), **kwargs}
        accelerator, devices = flags.get("accelerator", "auto"), flags.get("devices", "auto")
        chosen = auto_strategy(flags.get("strategy", "auto"), accelerator, devices, flags.get("num_nodes", 1))
        if chosen is not None:
            rank_zero_info(f"trainer.strategy auto on {device_count(accelerator, devices)} device(s) x "
                           f"{flags.get('num_nodes', 1)} node(s): using {NAME} (one process per device, each "
                           "optimising its own samples' masks)")
            kwargs["strategy"] = chosen
        return super().instantiate_trainer(**kwargs)

    def before_fit(self) -> None:
        # Refuse a gradient-averaging strategy before it starts processes or a process group.
        check_strategy(self.trainer)
        writer = self._writer()
        run = writer.open(self.trainer, self.model)
        pass_over = getattr(self.datamodule, "pass_over", None)
        if callable(pass_over):
            pass_over(run.finished)
        elif run.finished:
            raise ConfigError(f"{run.directory} already holds {len(run.finished)} finished samples, and "
                              f"{type(self.datamodule).__name__} cannot be told to pass over them (it has no "
                              "pass_over(ids) method): use another writer.output_dir, or writer.resume false")
        writer.use(run)

    def after_fit(self) -> None:
        """Judge the whole run's summary: the exit status says whether it did its job."""
        summary = self._writer().summary
        if summary is None:  # nothing was trained (e.g. no batches at all)
            return
        limit = getattr(self.datamodule, "max_skip_fraction", DEFAULT_MAX_SKIP_FRACTION)
        problem = summary.problem(DEFAULT_MAX_SKIP_FRACTION if limit is None else limit)
        if problem is not None:
            raise RunOutcomeError(problem, show=self.trainer.is_global_zero)



def main(args: list[str] | None = None) -> M2IBCLI:
    """Run the CLI (``args`` default to ``sys.argv[1:]``).

    A checkpoint or dataset that cannot be found or fetched ends the run with a one-paragraph
    message naming it (exit status 2) instead of a stack trace from inside a library. A run that
    went to its end without doing its job (no record written of the rows it had, or more skipped
    than ``data.max_skip_fraction``) ends with exit status 3 and a message naming the top reasons.
    """
    try:
        return _cli(args)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        if getattr(cause, "show", True):
            print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(getattr(cause, "exit_status", 2)) from None


def parse(args: list[str]) -> Any:
    """The config ``python train.py <args>`` would run, as the CLI's own parser reads it; nothing is built or run.

    ``args`` start with the subcommand (``["fit", "-c", "configs/toy_benchmark.yaml", "-c", ...]``); the
    result is that subcommand's namespace (``cfg.model``, ``cfg.data``, ``cfg.trainer``, ``cfg.writer``...),
    with every default filled in. A config the CLI would refuse raises ``jsonargparse.ArgumentError``.
    """
    try:
        with warnings.catch_warnings():  # args without sys.argv is this function's whole point
            warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
            _cli(args, cli_class=_ParseOnly, exit_on_error=False)
    except _Parsed as parsed:
        return parsed.config[parsed.config.subcommand]
    raise AssertionError("unreachable: _ParseOnly always raises _Parsed")  # pragma: no cover


class _Parsed(Exception):
    """Not an error: carries the parsed config out of ``LightningCLI.__init__`` (see :func:`parse`)."""

    def __init__(self, config: Any) -> None:
        super().__init__("parsed")
        self.config = config


class _ParseOnly(M2IBCLI):
    """M2IBCLI that stops right after parsing: before the seed is set and before anything is instantiated."""

    def parse_arguments(self, parser, args) -> None:
        super().parse_arguments(parser, args)
        raise _Parsed(self.config)


def _cli(args: list[str] | None, cli_class: type[M2IBCLI] = M2IBCLI, **parser_kwargs: Any) -> M2IBCLI:
    return cli_class(
        AttributionModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        parser_kwargs={"parser_mode": "omegaconf+", **parser_kwargs},
        trainer_defaults=TRAINER_DEFAULTS,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
