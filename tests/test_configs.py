"""Every YAML under configs/ parses with the CLI's own parser, in the composition it is meant for (configs/README.md).

Nothing is run; the classes are built where that needs no network (the toy CLIP loads from data/toy/toy-clip,
hub checkpoints are only parsed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from m2ib_lightning.run.cli import parse

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
METHODS = sorted(p.stem for p in (CONFIGS / "method").glob("*.yaml"))


def flags(**settings: object) -> list[str]:
    return [arg for key, value in settings.items() for arg in (f"--{key.replace('__', '.')}", str(value))]


# The toy CLIP's layers, tuned for M2IB (docs/evaluation.md); the methods' defaults are for 12-block towers.
TOY_LAYERS = flags(model__init_args__vision_layer=0, model__init_args__text_layer=-1)
# The complete run files (each the single -c of a command in README.md or docs/): the fragments they are made
# of, and the settings they add to them. Their model and data must equal that composition.
RUNS: dict[str, tuple[list[str], list[str]]] = {
    "demo.yaml": (["method/m2ib.yaml", "backbone/toy_clip.yaml", "data/toy.yaml"],
                  [*TOY_LAYERS, *flags(data__init_args__batch_size=8, data__init_args__limit=32)]),
    "toy_benchmark.yaml": (["method/m2ib.yaml", "backbone/toy_clip.yaml", "data/toy_grounded.yaml"],
                           [*TOY_LAYERS, *flags(data__init_args__batch_size=32)]),
    "world2_benchmark.yaml": (["method/m2ib.yaml", "backbone/world2_clip.yaml", "data/world2_grounded.yaml"],
                              [*TOY_LAYERS, *flags(data__init_args__batch_size=32)]),
    "roco.yaml": (["method/m2ib.yaml", "backbone/pubmedclip.yaml", "data/roco.yaml"],
                  flags(data__init_args__batch_size=32, data__init_args__num_workers=4)),
    "cc3m.yaml": (["method/m2ib.yaml", "backbone/clip_vit_b32.yaml", "data/cc3m.yaml"],
                  flags(data__init_args__batch_size=32, data__init_args__num_workers=4, data__init_args__limit=500)),
    "local_folder.yaml": (["method/m2ib.yaml", "backbone/clip_vit_b32.yaml", "data/local_folder.yaml"],
                          flags(data__init_args__batch_size=16, data__init_args__num_workers=2)),
}
# Fragment compositions, as the docs use them: each method on the benchmark run (scripts/benchmark_quality.py),
# a backbone or a dataset swapped on a run, and fragments only (method, backbone, data, then layers as flags).
COMPOSITIONS: list[tuple[list[str], list[str]]] = [
    *((["toy_benchmark.yaml", f"method/{m}.yaml"], []) for m in METHODS),
    (["roco.yaml", "backbone/clip_vit_b32.yaml"], []),
    (["local_folder.yaml", "backbone/siglip_base.yaml"], []),
    (["local_folder.yaml", "data/roco.yaml"], []),
    (["method/m2ib.yaml", "backbone/toy_clip.yaml", "data/toy.yaml"], TOY_LAYERS),
    (["method/rollout.yaml", "backbone/toy_clip.yaml", "data/toy_grounded.yaml"], []),
    (["backbone/toy_clip.yaml", "method/rise.yaml", "data/toy.yaml"], []),
]
# Not a CLI config: the toy CLIP's training settings, read by m2ib_lightning.assets.toy_clip.
PRETRAIN = ["pretrain/toy_clip.yaml", "pretrain/world2_clip.yaml"]
# What a data fragment names, null where unused, so that one put after a run replaces the run's dataset whole.
DATASET_KEYS = {"path", "data_files", "name", "split", "revision", "image_column", "text_column", "id_column",
                "image_root", "extra_columns", "fetch", "builder_kwargs"}


def composed(files: list[str], extra: list[str] = ()) -> object:
    return parse(["fit", *(arg for f in files for arg in ("-c", str(CONFIGS / f))), *extra])


def instantiate(cfg) -> dict[str, object]:
    """Build the model (when its backbone is a local directory) and the datamodule of a parsed config."""
    from jsonargparse import ArgumentParser
    from lightning.pytorch import LightningDataModule

    from m2ib_lightning.methods import AttributionModule

    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(AttributionModule, "model", required=False)
    parser.add_subclass_arguments(LightningDataModule, "data", required=False)
    built = {}
    if cfg.data is not None:
        built["data"] = parser.instantiate_classes(parser.parse_object({"data": cfg.data}))["data"]
    if (ROOT / cfg.model.init_args.backbone.init_args.model).is_dir():  # hub ids cannot load here
        built["model"] = parser.instantiate_classes(parser.parse_object({"model": cfg.model}))["model"]
    return built


def test_every_yaml_is_covered():
    """A new file under configs/ fails here until a run entry or a composition above parses it."""
    covered = set(RUNS) | {f for files, _ in RUNS.values() for f in files} | set(PRETRAIN)
    covered |= {f for files, _ in COMPOSITIONS for f in files}
    present = {p.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*") if p.suffix in (".yaml", ".yml")}
    assert present == covered, f"not covered: {sorted(present - covered)}; missing: {sorted(covered - present)}"


@pytest.mark.parametrize("run", sorted(RUNS))
def test_run_file_parses_alone_and_equals_its_fragments(run, monkeypatch):
    monkeypatch.chdir(ROOT)  # the configs name their files relative to the repository root
    cfg = composed([run])
    fragments, settings = RUNS[run]
    expected = composed(fragments, settings)
    assert cfg.model.as_dict() == expected.model.as_dict()
    assert cfg.data.as_dict() == expected.data.as_dict()
    built = instantiate(cfg)
    assert built["data"].batch_size >= 1
    if run in ("demo.yaml", "toy_benchmark.yaml", "world2_benchmark.yaml"):
        assert type(built["model"]).__name__ == "M2IBAttribution"


@pytest.mark.parametrize(("files", "settings"), COMPOSITIONS,
                         ids=["+".join(Path(f).stem for f in files) for files, _ in COMPOSITIONS])
def test_composition_parses(files, settings, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = composed(files, settings)
    # Each fragment's values are in the result, whatever came before it (a later fragment may not touch them).
    method = next((f for f in files if f.startswith("method/")), None)
    if method:
        assert cfg.model.class_path == yaml.safe_load((CONFIGS / method).read_text())["model"]["class_path"]
    backbone = next((f for f in files if f.startswith("backbone/")), None)
    if backbone:
        expected = yaml.safe_load((CONFIGS / backbone).read_text())["model"]["init_args"]["backbone"]
        assert cfg.model.init_args.backbone.class_path == expected["class_path"]
        assert cfg.model.init_args.backbone.init_args.model == expected["init_args"]["model"]
    data = next((f for f in files if f.startswith("data/")), None)
    if data:
        expected = yaml.safe_load((CONFIGS / data).read_text())["data"]["init_args"]
        assert {k: v for k, v in cfg.data.init_args.as_dict().items() if k in expected} == expected
    built = instantiate(cfg)
    assert built["data"].batch_size >= 1
    if "model" in built:
        assert type(built["model"]).__name__ == cfg.model.class_path.rsplit(".", 1)[1]


def test_fragments_hold_only_their_part():
    """method/: the model's class and its own settings; backbone/: model.init_args.backbone only; data/: data."""
    for path in sorted((CONFIGS / "method").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        assert set(content) == {"model"} and "class_path" in content["model"], path.name
        assert "backbone" not in (content["model"].get("init_args") or {}), path.name
    for path in sorted((CONFIGS / "backbone").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        assert content == {"model": {"init_args": {"backbone": content["model"]["init_args"]["backbone"]}}}, path.name
    for path in sorted((CONFIGS / "data").glob("*.yaml")):
        content = yaml.safe_load(path.read_text())
        assert set(content) == {"data"} and set(content["data"]["init_args"]) == DATASET_KEYS, path.name


def test_pretrain_config_parses():
    from jsonargparse import ArgumentParser

    from m2ib_lightning.assets.toy_clip import train_toy_clip

    parser = ArgumentParser(exit_on_error=False)
    parser.add_argument("--config", action="config")
    parser.add_function_arguments(train_toy_clip, as_positional=False)
    cfg = parser.parse_args(["--config", str(CONFIGS / "pretrain" / "toy_clip.yaml")])
    assert cfg.out_dir == "data/toy/toy-clip" and cfg.num_layers == 4
    cfg = parser.parse_args(["--config", str(CONFIGS / "pretrain" / "world2_clip.yaml")])
    assert cfg.out_dir == "data/world2/world2-clip" and cfg.num_layers == 6 and cfg.text_layers == 4


def test_method_out_of_order_is_refused():
    """A layer after a class without layers is an error, not silently dropped (configs/README.md)."""
    from jsonargparse import ArgumentError

    with pytest.raises(ArgumentError, match="vision_layer"):
        composed(["method/rollout.yaml", "backbone/toy_clip.yaml"], flags(model__init_args__vision_layer=0))


# configs/methods/<name>.yaml before the fragments replaced them (comments left out): each was a complete model.
OLD_METHOD_FILES = {
    "gradcam": """model:
  class_path: m2ib_lightning.methods.baselines.GradCAM
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    vision_layer: 0
    text_layer: 0""",
    "m2ib": """model:
  class_path: m2ib_lightning.M2IBAttribution
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    vision_layer: 0
    text_layer: -1
    steps: 10
    copies: 10""",
    "m2ib_iba": """model:
  class_path: m2ib_lightning.M2IBAttribution
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    vision_layer: 0
    text_layer: -1
    steps: 10
    copies: 10
    vision_bottleneck:
      class_path: m2ib_lightning.IBAStyleM2IB
      init_args:
        stats_file: outputs/benchmark/iba_stats/toy-clip-layer0-vision.safetensors
    text_bottleneck:
      class_path: m2ib_lightning.IBAStyleM2IB
      init_args:
        stats_file: outputs/benchmark/iba_stats/toy-clip-embeddings-text.safetensors""",
    "m2ib_layer2": """model:
  class_path: m2ib_lightning.M2IBAttribution
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    vision_layer: 2
    text_layer: 2
    steps: 10
    copies: 10""",
    "m2ib_per_token": """model:
  class_path: m2ib_lightning.M2IBAttribution
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    vision_layer: 0
    text_layer: -1
    steps: 10
    copies: 10
    vision_bottleneck: {class_path: m2ib_lightning.PerTokenM2IB}
    text_bottleneck: {class_path: m2ib_lightning.PerTokenM2IB}""",
    "random": """model:
  class_path: m2ib_lightning.methods.baselines.RandomMap
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}""",
    "rise": """model:
  class_path: m2ib_lightning.methods.baselines.RISE
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    masks: 500
    grid: 7
    p: 0.5
    text_masks: 256""",
    "rollout": """model:
  class_path: m2ib_lightning.methods.baselines.AttentionRollout
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    start_layer: 0""",
    "saliency": """model:
  class_path: m2ib_lightning.methods.baselines.GradientSaliency
  init_args:
    backbone: {class_path: m2ib_lightning.CLIPBackbone, init_args: {model: data/toy/toy-clip}}
    text_layer: -1""",
}


def test_every_old_method_file_has_a_fragment():
    assert set(OLD_METHOD_FILES) <= set(METHODS)


@pytest.mark.parametrize("method", sorted(OLD_METHOD_FILES))
def test_method_fragment_gives_the_old_method_file_settings(method, tmp_path):
    """-c toy_benchmark.yaml -c method/<m>.yaml: the model configs/methods/<m>.yaml gave, on the benchmark
    (the benchmark script's runs) and alone (the model the sanity table loaded)."""
    old = tmp_path / f"{method}.yaml"
    old.write_text(OLD_METHOD_FILES[method] + "\n")
    new = composed(["toy_benchmark.yaml", f"method/{method}.yaml"])
    on_benchmark = parse(["fit", "-c", str(CONFIGS / "toy_benchmark.yaml"), "-c", str(old)])
    alone = parse(["fit", "-c", str(old)])
    assert new.model.as_dict() == on_benchmark.model.as_dict() == alone.model.as_dict()
    # The whole run, not only the model (the list of config files aside).
    assert {**new.as_dict(), "config": None} == {**on_benchmark.as_dict(), "config": None}


def test_load_method_composes_configs_in_order(monkeypatch):
    from m2ib_lightning.methods.baselines import GradCAM
    from m2ib_lightning.run.configs import load_method

    monkeypatch.chdir(ROOT)
    module = load_method(CONFIGS / "toy_benchmark.yaml", CONFIGS / "method" / "gradcam.yaml")
    assert isinstance(module, GradCAM) and module.layers == {"vision": 0, "text": 0}
    assert module.backbone.num_layers == {"vision": 4, "text": 4}
