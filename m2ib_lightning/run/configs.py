"""Building the components a config describes, outside the CLI (benchmarks, selection, notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_method"]


def load_method(*configs: str | Path) -> Any:
    """Instantiate the ``model:`` that ``python train.py fit -c <config> -c ...`` would use.

    The configs are composed in order, by the CLI's own parser (``configs/README.md``), e.g.
    ``load_method("configs/toy_benchmark.yaml", "configs/method/gradcam.yaml")``; only the model (with
    its backbone) is built, not the data, trainer or callbacks the configs may also describe.
    """
    from jsonargparse import ArgumentParser

    from m2ib_lightning.methods import AttributionModule
    from m2ib_lightning.run.cli import parse

    if not configs:
        raise TypeError("load_method needs at least one config file")
    cfg = parse(["fit", *(arg for config in configs for arg in ("-c", str(config)))])
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AttributionModule, "model")
    return parser.instantiate_classes(parser.parse_object({"model": cfg.model})).model
