"""Building the components a config describes, outside the CLI (benchmarks, selection, notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["load_method"]


def load_method(config: str | Path) -> Any:
    """Instantiate the ``model:`` of a YAML config (e.g. ``configs/methods/gradcam.yaml``)."""
    from jsonargparse import ArgumentParser

    from m2ib_lightning.methods import AttributionModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AttributionModule, "model")
    parser.add_argument("--config", action="config")
    cfg = parser.parse_args(["--config", str(config)], defaults=True)
    return parser.instantiate_classes(cfg).model

