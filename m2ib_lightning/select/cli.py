"""The command: ``python -m m2ib_lightning.select -c CONFIG [-c ...] [--key value ...] [options]``.

It reads the configs and overrides exactly as ``python train.py fit`` does (the CLI's own parser,
:func:`m2ib_lightning.run.cli.parse`), sweeps M2IB's layers and bottleneck variants of each side on the
first ``--limit`` pairs of the configured data, scores every setting without labels, prints a ranked
table per side and writes a YAML fragment (``--out``) that, given as one more ``-c`` after the same
configs, makes ``train.py fit`` use the choice. See docs/selection.md.

The sweep runs under the configured trainer's accelerator, devices, strategy (``m2ib_ddp``: each rank
explains its own pairs for every setting) and precision; it writes nothing but the fragment (and
``--scores``). A bad option, a config the CLI would refuse or data without pairs ends it with one
message (exit status 2).
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Any

from m2ib_lightning.errors import ConfigError, user_error
from m2ib_lightning.select.cache import LayerCache
from m2ib_lightning.select.candidates import Setting, describe, settings_for, variants_for
from m2ib_lightning.select.ranking import DEFAULT_RULE, RULES, choose, fragment, partner, summarise, table, to_check

__all__ = ["Selection", "main", "options", "prepare", "run"]

#: the scores a side's table shows (ranking.py says what each measures)
COLUMNS = ["gap_rank", "gap", "deletion", "insertion", "rand_spearman", "rand_peak_kept"]


def options() -> argparse.ArgumentParser:
    """The command's own options; everything else (``-c``, ``--model...``) goes to the CLI's parser."""
    parser = argparse.ArgumentParser(
        prog="python -m m2ib_lightning.select", allow_abbrev=False,
        description="Choose M2IB's bottleneck layers and variants without labels: sweep them on the first pairs "
                    "of the configured data, score each setting's maps by deletion/insertion and a randomisation "
                    "check, and write a YAML fragment for train.py fit (docs/selection.md). Configs (-c) and "
                    "--key value overrides are read as by `python train.py fit`.")
    parser.add_argument("--limit", type=int, default=32, help="pairs of the configured data to select on (32)")
    parser.add_argument("--out", type=Path, default=Path("selected.yaml"), help="the YAML fragment to write")
    parser.add_argument("--layers", type=int, nargs="+", default=None, metavar="L",
                        help="vision layers to sweep (default: every block, and -1 where the backbone allows)")
    parser.add_argument("--text-layers", type=int, nargs="+", default=None, metavar="L",
                        help="text layers to sweep (default: every block, and -1 where the backbone allows)")
    parser.add_argument("--variants", nargs="+", default=None, metavar="CLASS",
                        help="bottleneck variants to sweep, by class name or path (default: the configured one and "
                             "every variant that needs no extra input)")
    parser.add_argument("--rule", choices=sorted(RULES), default=DEFAULT_RULE,
                        help=f"how a side's setting is chosen (default {DEFAULT_RULE}; docs/selection.md)")
    parser.add_argument("--randomisation", choices=["needed", "all", "none"], default="needed",
                        help="the randomisation check (each costs as much as the setting's sweep): 'needed' (default) "
                             "runs it for the settings whose check can change the choice, which is then the choice "
                             "checking all would give; 'all' for every setting (the table shows all); 'none' skips it")
    parser.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the pairs (1000)")
    parser.add_argument("--scores", type=Path, default=None, help="also write every per-pair score as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    return parser


class Selection:
    """A configured sweep, ready to run: the parsed options, the configs' namespace and the components.

    Attributes:
        opts: the command's own options; ``cfg``: the ``fit`` namespace of the configs.
        model: the configured ``M2IBAttribution`` (its backbone is shared by every setting).
        settings: the sweep.
        left_out: bottleneck classes not swept, with the reason.
    """

    def __init__(self, opts: argparse.Namespace, cfg: Any) -> None:
        from jsonargparse import ArgumentParser
        from lightning.pytorch import LightningDataModule

        from m2ib_lightning.methods import AttributionModule, M2IBAttribution

        self.opts, self.cfg = opts, cfg
        if cfg.get("data") is None:
            raise ConfigError("the configs give no data: set data.class_path (and its init_args)")
        self.parser = ArgumentParser(exit_on_error=False)
        self.parser.add_subclass_arguments(AttributionModule, "model")
        self.parser.add_subclass_arguments(LightningDataModule, "data")
        ns = self.parser.parse_object({"model": cfg.model, "data": cfg.data})
        built = _instantiate(self.parser, ns)
        self.model, self.data = built.model, built.data
        if not isinstance(self.model, M2IBAttribution):
            raise ConfigError(f"select chooses M2IB's layers: the configured model is {type(self.model).__name__}; "
                              "configure m2ib_lightning.M2IBAttribution (model.class_path)")
        self.namespace = ns
        self.backbone = LayerCache(self.model.backbone)
        variants, self.left_out = {}, {}
        for side in self.model.sides:
            configured = describe(getattr(cfg.model.init_args, f"{side}_bottleneck", None))
            variants[side], left = variants_for(configured, opts.variants)
            self.left_out.update(left)
        layers = {"vision": opts.layers, "text": opts.text_layers}
        self.settings = settings_for(self.backbone, self.model.sides, layers, variants)

    def build(self, setting: Setting) -> Any:
        """The configured M2IB module with ``setting`` applied, explaining that side only."""
        ns = self.namespace.clone()
        init = ns.model.init_args
        init.backbone = self.backbone
        init.sides = [setting.side]
        init[f"{setting.side}_layer"] = setting.layer
        init[f"{setting.side}_bottleneck"] = setting.variant.config()
        return _instantiate(self.parser, ns).model

    def evaluation(self) -> dict[str, Any]:
        from m2ib_lightning.evaluation.functional import tolerance_pixels

        ev = self.cfg.evaluation
        size = self.backbone.image_processor
        side = _input_size(size)
        return {"steps": ev.steps, "deletion_baseline": ev.deletion_baseline,
                "insertion_baseline": ev.insertion_baseline,
                "tolerance": tolerance_pixels(ev.tolerance, (side, side), ev.tolerance_units)}


def _input_size(processor: Any) -> int:
    """The square input size of an image processor (224 when it does not say)."""
    for key in ("crop_size", "size"):
        value = getattr(processor, key, None)
        if isinstance(value, dict):
            value = value.get("height") or value.get("shortest_edge")
        if isinstance(value, int):
            return value
    return 224


def _instantiate(parser: Any, ns: Any) -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*instantiate_classes.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return parser.instantiate_classes(ns)


def prepare(argv: list[str]) -> Selection:
    """Parse the command line and build the sweep (nothing runs yet)."""
    from m2ib_lightning.run.cli import parse

    opts, rest = options().parse_known_args(argv)
    if opts.limit < 1:
        raise ConfigError(f"--limit must be >= 1, got {opts.limit}")
    if opts.resamples < 1:
        raise ConfigError(f"--resamples must be >= 1, got {opts.resamples}")
    cfg = parse(["fit", *rest, "--data.init_args.limit", str(opts.limit)])
    return Selection(opts, cfg)


def trainer_for(selection: Selection) -> Any:
    """A Trainer with the configs' accelerator, devices, nodes, strategy and precision, and nothing else:
    no logger, checkpoints, callbacks or progress bar; one pass over the data."""
    import lightning.pytorch as pl

    t = selection.cfg.trainer
    precision = str(t.precision) if t.precision is not None else "32-true"
    if precision in ("16", "16-mixed", "16-true"):
        raise ConfigError(f"select runs in 32-true or bf16-mixed, not trainer.precision {precision}: float16 needs "
                          "the loss scaler of a fit; use --trainer.precision bf16-mixed (or 32-true)")
    strategy = t.strategy
    if not isinstance(strategy, str):
        from jsonargparse import ArgumentParser
        from lightning.pytorch.strategies import Strategy

        parser = ArgumentParser(exit_on_error=False)
        parser.add_subclass_arguments(Strategy, "strategy")
        strategy = _instantiate(parser, parser.parse_object({"strategy": strategy})).strategy
    return pl.Trainer(accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=strategy,
                      precision=precision, max_epochs=1, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      default_root_dir=t.default_root_dir)


def _progress(index: int | None, total: int | None, setting: Setting, values: dict[str, dict[str, float]],
              seconds: float) -> None:
    from m2ib_lightning.select.ranking import derive

    derived = derive(values)

    def mean(name: str) -> str:
        v = [x for x in derived.get(name, {}).values() if x == x]
        return f"{sum(v) / len(v):.3f}" if v else "n/a"

    if index is None:  # a randomisation check
        print(f"[check] {setting.label():<36} randomised above the bottleneck: rand_spearman {mean('rand_spearman')}  "
              f"rand_peak_kept {mean('rand_peak_kept')}  {seconds:6.1f} s", flush=True)
        return
    print(f"[{index + 1:>3}/{total}] {setting.label():<36} gap {mean('gap')}  deletion {mean('deletion')}  "
          f"insertion {mean('insertion')}  {seconds:6.1f} s", flush=True)


def run(argv: list[str] | None = None, scorers: list[Any] | None = None) -> dict[str, Any] | None:
    """Run the command; returns, on the global rank 0, ``{"chosen", "summaries", "scores", "pairs", ...}``
    (``None`` on the other ranks). ``scorers``: extra per-sample scores (labelled ones, for validation)."""
    import lightning.pytorch as pl

    from m2ib_lightning.select.sweep import SweepModule

    argv = list(sys.argv[1:] if argv is None else argv)
    selection = prepare(argv)
    opts, cfg = selection.opts, selection.cfg
    if cfg.get("seed_everything") is not None:
        pl.seed_everything(cfg.seed_everything, verbose=False)
    trainer = trainer_for(selection)
    quiet = opts.quiet or not trainer.is_global_zero
    if not quiet:
        print(f"select: {len(selection.settings)} settings on the first {opts.limit} pairs "
              f"({', '.join(f'{s}: {sum(x.side == s for x in selection.settings)}' for s in selection.model.sides)})"
              + (", each rank on its own pairs (progress: rank 0's pairs)" if trainer.world_size > 1 else ""),
              flush=True)
        for path, reason in sorted(selection.left_out.items()):
            print(f"select: not swept: {path.rsplit('.', 1)[1]}: {reason}", flush=True)
    rule = RULES[opts.rule]

    def pending(scores: dict[str, Any]) -> list[Setting]:
        summaries = summarise(selection.settings, scores, resamples=1, seed=selection.model.seed)
        return [s for rows in summaries.values() for s in to_check(rows, rule)]

    module = SweepModule(selection.backbone, selection.settings, selection.build, selection.evaluation(),
                         randomisation=opts.randomisation, pending=pending, seed=selection.model.seed,
                         progress=None if opts.quiet else _progress, scorers=scorers)
    trainer.fit(module, datamodule=selection.data)
    if module.pairs == 0:
        raise ConfigError(f"no pairs to select on: the configured data ({_describe_data(cfg)}) gave none "
                          f"(every row skipped, or none there)")
    if not trainer.is_global_zero:
        return None
    return report(selection, module, argv)


def _describe_data(cfg: Any) -> str:
    init = cfg.data.init_args
    parts = [f"{k} {init[k]}" for k in ("path", "data_files", "split") if k in init and init[k] is not None]
    return ", ".join(parts) or str(cfg.data.class_path)


def report(selection: Selection, module: Any, argv: list[str]) -> dict[str, Any]:
    """Rank, print the tables, write the fragment (and the scores)."""
    opts = selection.opts
    rule = RULES[opts.rule]
    summaries = summarise(selection.settings, module.scores, resamples=opts.resamples, seed=selection.model.seed)
    chosen, partners = {}, {}
    for side, rows in summaries.items():
        best, ranked = choose(rows, rule)
        partners[side] = partner(best, ranked, rule)
        summaries[side] = ranked
        print(f"\n{side} side, {rows[0].n} pairs; rule {opts.rule}: {rule.describe()}"
              + ("; randomisation checked where it could change the choice" if opts.randomisation == "needed"
                 and rule.max_rand_spearman is not None else ""))
        print(table(ranked, best, rule, COLUMNS, partners[side]))
        if best is None:
            print(f"select: no {side} setting passes the rule; the fragment leaves the {side} side as configured")
        else:
            chosen[side] = best
            if partners[side] is not None:
                print(f"select: {side} layers {best.setting.layer} and {partners[side].setting.layer} cannot be ranked "
                      f"apart ({rule.score} {partners[side].mean[rule.score]:.3f} inside {best.setting.layer}'s "
                      f"interval): both, maps averaged")
    if any(partners.values()) and set(chosen) != {"vision", "text"}:
        print("select: one side has no choice, so the fragment keeps one layer per side (MultiLayerM2IB needs "
              "both sides' layers)")
        partners = {}
    command = "python -m m2ib_lightning.select " + " ".join(argv)
    header = [f"M2IB settings chosen without labels on {module.pairs} pairs by", f"  {command}",
              f"rule {opts.rule}: {rule.describe()}",
              *(f"{side}: {s.setting.label().strip()}, {rule.score} {s.mean[rule.score]:.3f} "
                f"[{s.low[rule.score]:.3f}, {s.high[rule.score]:.3f}]"
                + (f"; with layer {partners[side].setting.layer} ({rule.score} "
                   f"{partners[side].mean[rule.score]:.3f}), maps averaged" if partners.get(side) else "")
                for side, s in chosen.items()),
              "Use it after the same configs: python train.py fit -c <configs> -c <this file>"]
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(fragment(chosen, header, partners))
    print(f"\nwrote {opts.out}", flush=True)
    if opts.scores is not None:
        opts.scores.write_text(json.dumps({"settings": {s.key: {"side": s.side, "layer": s.layer,
                                                                "variant": s.variant.config()}
                                                        for s in selection.settings},
                                           "seconds": module.seconds, "scores": module.scores}, indent=1))
    return {"chosen": chosen, "partners": {k: v for k, v in partners.items() if v is not None},
            "summaries": summaries, "scores": module.scores, "pairs": module.pairs,
            "seconds": module.seconds, "out": opts.out}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """``python -m m2ib_lightning.select``: like :func:`run`, with a one-paragraph message (exit status 2)
    for a bad option, a config the CLI would refuse, or data that gives no pairs."""
    from jsonargparse import ArgumentError

    try:
        return run(argv)
    except ArgumentError as err:
        print(f"error: {str(err).strip()}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"error: {cause}", file=sys.stderr)
        raise SystemExit(2) from None

