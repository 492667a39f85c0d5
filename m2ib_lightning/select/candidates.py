"""What a selection sweeps: bottleneck variants found in the package, layers, and their settings.

A **variant** is a bottleneck class with its constructor arguments (:class:`Variant`). The sweep
takes, per side,

* the bottleneck the configs give that side (the reference ``M2IB()`` when they give none), with its
  configured arguments, and
* every other subclass of :class:`~m2ib_lightning.methods.bottlenecks.M2IB` found in
  :mod:`m2ib_lightning.methods.bottlenecks` (its exported names and every module under it) that
  needs no extra input, built with its defaults (:func:`discover_variants`).

"Needs no extra input" is decided from the class alone, so that a variant added under
``methods/bottlenecks/`` joins the sweep without any change here. A class is left out, with the
reason shown by the command, when

1. it sets the class attribute ``selectable = False`` (its own way to say "do not sweep me"),
2. it is abstract,
3. it defines ``fit_statistics``: it asks for a pass over the dataset before the first batch
   (the IBA-style variant's per-feature statistics, cached in a ``stats_file``), or
4. it cannot be built without arguments (a required argument such as a file), i.e. its
   constructor, as the CLI's own parser reads it, fails with its defaults.

Every variant is described by the CLI's parser (jsonargparse), so its ``init_args`` hold every
argument with its value, exactly what a YAML fragment needs to build the same object.
"""

from __future__ import annotations

import importlib
import inspect
import json
import pkgutil
from dataclasses import dataclass
from typing import Any

from m2ib_lightning.backbones import EMBEDDINGS, SIDES, BackboneAdapter, Side
from m2ib_lightning.errors import ConfigError
from m2ib_lightning.methods.bottlenecks import M2IB

__all__ = ["REFERENCE", "Setting", "Variant", "describe", "discover_variants", "layers_of", "settings_for",
           "variants_for"]

PACKAGE = "m2ib_lightning.methods.bottlenecks"
#: the reference bottleneck's class path, as configs name it
REFERENCE = f"{PACKAGE}.M2IB"


@dataclass(frozen=True)
class Variant:
    """A bottleneck class and its arguments.

    Attributes:
        class_path: importable path of the class (the package's own name when it exports it).
        init_args: every constructor argument and its value, as JSON text (hashable, ordered).
        name: a short label: the class name, with the arguments that differ from the class's
            defaults (``M2IB(beta=1.0)``).
    """

    class_path: str
    init_args: str
    name: str

    @property
    def args(self) -> dict[str, Any]:
        return json.loads(self.init_args)

    def config(self) -> dict[str, Any]:
        """``{"class_path", "init_args"}``: the value of ``model.init_args.<side>_bottleneck``."""
        return {"class_path": self.class_path, "init_args": self.args}


@dataclass(frozen=True)
class Setting:
    """One setting of one side: where the bottleneck goes and which variant it is."""

    side: Side
    layer: int
    variant: Variant

    @property
    def key(self) -> str:
        return f"{self.side}/layer{self.layer}/{self.variant.name}"

    def label(self) -> str:
        return f"{self.side} layer {self.layer:>2} {self.variant.name}"


def _parser() -> Any:
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(M2IB, "bottleneck", required=False)
    return parser


def _plain(value: Any) -> Any:
    """A namespace's values as JSON-ready Python values (nested namespaces as dicts)."""
    if hasattr(value, "as_dict"):
        return {k: _plain(v) for k, v in value.as_dict().items()}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def describe(config: Any | None) -> Variant:
    """The :class:`Variant` of a bottleneck config (``None``: the reference ``M2IB()``), every argument
    filled in as the CLI's parser fills it."""
    if config is None:
        config = {"class_path": REFERENCE}
    config = _plain(config)
    if isinstance(config, str):
        config = {"class_path": config}
    parser = _parser()
    try:
        ns = parser.parse_object({"bottleneck": config})
    except Exception as err:  # jsonargparse's ArgumentError: not a bottleneck, or arguments missing
        raise ConfigError(f"bottleneck {config.get('class_path')!r} cannot be built from {config}: "
                          f"{str(err).splitlines()[0]}") from err
    bottleneck = ns.bottleneck
    class_path = _public_path(bottleneck.class_path)
    args = _plain(bottleneck.init_args) if bottleneck.init_args is not None else {}
    defaults = {}
    try:
        defaults = _plain(parser.parse_object({"bottleneck": {"class_path": class_path}}).bottleneck.init_args) or {}
    except Exception:  # noqa: BLE001 - a class with required arguments has no default set to compare with
        pass
    changed = {k: v for k, v in args.items() if defaults.get(k, object()) != v}
    short = class_path.rsplit(".", 1)[1]
    name = short + ("(" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + ")" if changed else "")
    return Variant(class_path=class_path, init_args=json.dumps(args, sort_keys=True), name=name)


def _public_path(class_path: str) -> str:
    """``m2ib_lightning.methods.bottlenecks.M2IB`` for the reference however it was named, and likewise
    for every class the package exports; other classes keep their module path."""
    module, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), name)
        package = importlib.import_module(PACKAGE)
    except (ImportError, AttributeError):
        return class_path
    return f"{PACKAGE}.{name}" if getattr(package, name, None) is cls else class_path


def _classes() -> list[type[M2IB]]:
    """Every public subclass of M2IB (M2IB included) exported by, or defined under, the bottlenecks package."""
    package = importlib.import_module(PACKAGE)
    found: dict[str, type[M2IB]] = {}

    def collect(namespace: Any) -> None:
        for name, obj in vars(namespace).items():
            if (not name.startswith("_") and isinstance(obj, type) and issubclass(obj, M2IB)
                    and obj.__module__.startswith(PACKAGE)):
                found.setdefault(f"{obj.__module__}.{obj.__qualname__}", obj)

    collect(package)
    for info in pkgutil.walk_packages(package.__path__, PACKAGE + "."):
        if not info.name.rsplit(".", 1)[-1].startswith("_"):
            collect(importlib.import_module(info.name))
    return sorted(found.values(), key=lambda c: (c is not M2IB, c.__name__))


def discover_variants() -> tuple[list[Variant], dict[str, str]]:
    """The variants a sweep takes by default (the reference first) and, by class path, those left out
    with the reason (module docstring)."""
    usable: list[Variant] = []
    left_out: dict[str, str] = {}
    for cls in _classes():
        path = _public_path(f"{cls.__module__}.{cls.__qualname__}")
        reason = unusable(cls)
        if reason is None:
            try:
                variant = describe({"class_path": path})
                _build(variant)
            except Exception as err:  # noqa: BLE001 - any failure to build means "needs input we do not have"
                reason = f"cannot be built without arguments ({str(err).splitlines()[0]})"
            else:
                usable.append(variant)
                continue
        left_out[path] = reason
    return usable, left_out


def unusable(cls: type) -> str | None:
    """Why a bottleneck class cannot be swept without extra input (``None``: it can)."""
    if not getattr(cls, "selectable", True):
        return "opted out (selectable = False)"
    if inspect.isabstract(cls):
        return "abstract"
    if callable(getattr(cls, "fit_statistics", None)):
        return "asks for a pass over the dataset first (fit_statistics; a stats_file)"
    return None


def _build(variant: Variant) -> M2IB:
    module, _, name = variant.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)(**variant.args)


def variants_for(configured: Variant, names: list[str] | None) -> tuple[list[Variant], dict[str, str]]:
    """A side's variants: its configured bottleneck, then every discovered variant of another class
    (``names``: only those, matched by class name or class path; the configured bottleneck keeps its
    arguments when its class is named). Returns them and the classes left out, with reasons."""
    discovered, left_out = discover_variants()
    configured_reason = unusable(_class_of(configured))
    pool = ([] if configured_reason else [configured]) + [v for v in discovered
                                                          if v.class_path != configured.class_path]
    if configured_reason:
        left_out[configured.class_path] = configured_reason
    if names is None:
        return pool, left_out
    chosen: list[Variant] = []
    for name in names:
        match = [v for v in pool if name in (v.class_path, v.class_path.rsplit(".", 1)[1], v.name)]
        if not match:
            why = next((r for p, r in left_out.items() if name in (p, p.rsplit(".", 1)[1])), None)
            if why is not None:
                raise ConfigError(f"--variants: {name} cannot be swept: it {why}")
            raise ConfigError(f"--variants: unknown bottleneck {name!r}; the sweep can take "
                              f"{sorted({v.class_path.rsplit('.', 1)[1] for v in pool})}")
        chosen.extend(v for v in match if v not in chosen)
    return chosen, left_out


def _class_of(variant: Variant) -> type:
    module, _, name = variant.class_path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def layers_of(backbone: BackboneAdapter, side: Side, layers: list[int] | None) -> list[int]:
    """The layers to sweep on ``side``: ``layers`` (checked), or every block, and ``-1`` (the token
    embeddings) where the adapter can split there."""
    if layers is None:
        low = EMBEDDINGS if backbone.embeddings_layer else 0
        return list(range(low, backbone.num_layers[side]))
    flag = "--layers" if side == "vision" else "--text-layers"
    out = []
    for layer in layers:
        try:
            backbone.check_layer(side, layer)
        except ConfigError as err:
            raise ConfigError(f"{flag}: {err}") from None
        if layer not in out:
            out.append(layer)
    return out


def settings_for(backbone: BackboneAdapter, sides: tuple[Side, ...], layers: dict[Side, list[int] | None],
                 variants: dict[Side, list[Variant]]) -> list[Setting]:
    """Every (side, layer, variant) of the sweep, side by side, layer by layer."""
    return [Setting(side, layer, variant) for side in SIDES if side in sides
            for layer in layers_of(backbone, side, layers.get(side)) for variant in variants[side]]
