"""The package's layout: imports point one way, no private names cross modules, modules stay small,
runtime code never depends on the asset builders, and nothing refers outside the repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "m2ib_lightning"

#: layer of each top-level part of the package: a module may import its own part, or a LOWER layer
LAYERS = {
    "errors": 0, "records": 0, "files": 0,
    "backbones": 1,
    "data": 2, "methods": 2,
    "outputs": 3, "evaluation": 3,
    "report": 4, "run": 4, "api": 4,
    "select": 5,
    "assets": 6,
}
ROOT_MODULES = {"__init__", "errors", "records", "files", "api"}


def modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out.append((".".join(parts), path))
    return out


def part_of(module: str) -> str:
    """``m2ib_lightning.methods.m2ib`` -> ``methods``; the package root's ``__init__`` -> ``__init__``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """``(module, names, line)`` of every import of the package in ``path`` (function-level ones too)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("m2ib_lightning"):
            found.append((node.module, [a.name for a in node.names], node.lineno))
        elif isinstance(node, ast.Import):
            found.extend((a.name, [], node.lineno) for a in node.names if a.name.startswith("m2ib_lightning"))
    return found


def test_every_part_has_a_layer():
    parts = {part_of(m) for m, _ in modules()} - {"__init__"}
    assert parts <= set(LAYERS), f"parts without a layer in this test: {sorted(parts - set(LAYERS))}"


def test_imports_point_down_only():
    upward = []
    for module, path in modules():
        mine = part_of(module)
        if mine == "__init__":
            continue  # the package root re-exports the public names of every part
        for target, names, line in imports(path):
            theirs = part_of(target)
            if theirs == "__init__":  # `from m2ib_lightning import X`: the root imports everything
                upward.append(f"{path.relative_to(ROOT)}:{line} imports the package root ({names})")
            elif theirs != mine and LAYERS[theirs] >= LAYERS[mine]:
                upward.append(f"{path.relative_to(ROOT)}:{line}: {mine} (layer {LAYERS[mine]}) imports {target} "
                              f"(layer {LAYERS[theirs]})")
    assert not upward, "imports that do not point down:\n" + "\n".join(upward)


def test_the_check_would_see_an_upward_import(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from m2ib_lightning.run.cli import main\n")
    assert imports(probe) == [("m2ib_lightning.run.cli", ["main"], 2)]


def test_no_private_name_is_imported_across_modules():
    found = [f"{path.relative_to(ROOT)}:{line}: {target} {name}"
             for module, path in modules() for target, names, line in imports(path)
             for name in names if name.startswith("_") and target != module]
    tests = [f"{path.relative_to(ROOT)}:{line}: {target} {name}"
             for path in sorted((ROOT / "tests").glob("*.py")) for target, names, line in imports(path)
             for name in names if name.startswith("_")]
    assert not found and not tests, found + tests


def test_runtime_code_never_imports_the_asset_builders():
    bad = [f"{path.relative_to(ROOT)}:{line}" for module, path in modules() if part_of(module) != "assets"
           for target, _, line in imports(path) if part_of(target) == "assets"]
    assert not bad, bad


def test_modules_are_small_and_the_root_holds_a_handful():
    long = {str(p.relative_to(ROOT)): n for _, p in modules() if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"modules over 400 lines: {long}"
    root = {p.stem for p in PACKAGE.glob("*.py")}
    assert root <= ROOT_MODULES, f"modules at the package root beyond {sorted(ROOT_MODULES)}: {root - ROOT_MODULES}"


def test_every_subpackage_says_what_it_owns_and_may_import():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        doc = ast.get_docstring(ast.parse(init.read_text())) or ""
        assert doc, f"{init.relative_to(ROOT)} has no docstring"
        if init.parent.name != "assets":
            assert "may import" in doc.lower(), f"{init.relative_to(ROOT)} does not say what it may import"


#: the folder beside the repository that development notes live in; written in pieces so that this
#: file, which looks for references to it, holds none itself
NOTES = "sha" + "red"


@pytest.mark.parametrize("pattern", [rf"\.\./{NOTES}", rf"{NOTES}/M2IB_SPEC", rf"{NOTES}/DESIGN"])
def test_nothing_refers_outside_the_repository(pattern):
    checked = [p for p in ROOT.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".yml", ".toml", ".sh",
                                                                           ".sbatch", ".j2", ".cfg", ".txt"}
               and not any(part.startswith(".") or part in {"outputs", "build"} for part in p.relative_to(ROOT).parts)]
    hits = [f"{p.relative_to(ROOT)}" for p in checked if re.search(pattern, p.read_text(errors="replace"))]
    assert not hits, f"files referring to {pattern}: {hits}"


def test_the_baseline_docs_architecture_shows_is_one_file_and_one_fragment(tmp_path, backbone, pairs_dir):
    """The example of docs/architecture.md, as written there, runs through the CLI like a shipped baseline."""
    import json
    import sys

    import yaml

    from m2ib_lightning import load_attributions
    from m2ib_lightning.run.cli import main

    doc = (ROOT / "docs" / "architecture.md").read_text()
    code = re.search(r"```python\n# m2ib_lightning/methods/baselines/gradient_norm.py\n(.*?)```", doc, re.S).group(1)
    fragment = yaml.safe_load(re.search(r"```yaml\n# configs/method/gradient_norm.yaml\n(.*?)```", doc, re.S).group(1))
    package = tmp_path / "docs_example"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "gradient_norm.py").write_text(code)
    fragment["model"]["class_path"] = "docs_example.gradient_norm.GradientNorm"
    (tmp_path / "fragment.yaml").write_text(yaml.safe_dump(fragment))
    sys.path.insert(0, str(tmp_path))
    try:
        main(["fit", "--trainer.accelerator", "cpu", "--trainer.default_root_dir", str(tmp_path / "run"),
              "--trainer.enable_progress_bar", "false",
              "--model.class_path", "docs_example.gradient_norm.GradientNorm",
              "--model.init_args.backbone", json.dumps({"class_path": "m2ib_lightning.CLIPBackbone",
                                                         "init_args": {"model": str(backbone.source)}}),
              "-c", str(tmp_path / "fragment.yaml"),
              "--data.class_path", "m2ib_lightning.ImageTextDataModule",
              "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "3"])
    finally:
        sys.path.remove(str(tmp_path))
    records = load_attributions(tmp_path / "run" / "attributions")
    assert len(records) == 6 and all(records[i].image_map is not None for i in records)
