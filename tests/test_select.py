"""``python -m m2ib_lightning.select``: the layer cache is exact, variants are found, the command ranks,
reports errors in one message, writes a fragment that train.py fit takes, and runs under m2ib_ddp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from m2ib_lightning import load_attributions
from m2ib_lightning.data import Preprocessor
from m2ib_lightning.run.cli import main as fit_main
from m2ib_lightning.run.cli import parse
from m2ib_lightning.select import LayerCache, discover_variants
from m2ib_lightning.select.candidates import describe, unusable
from m2ib_lightning.select.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def config(tmp_path, tiny_clip_dir, pairs_dir) -> Path:
    """A complete fit config on the tiny CLIP and the six test pairs, M2IB cut to 2 steps x 2 copies."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "default_root_dir": str(tmp_path / "run")},
        "model": {"class_path": "m2ib_lightning.M2IBAttribution",
                  "init_args": {"backbone": {"class_path": "m2ib_lightning.CLIPBackbone",
                                             "init_args": {"model": str(tiny_clip_dir)}},
                                "vision_layer": 1, "text_layer": 1, "steps": 2, "copies": 2}},
        "data": {"class_path": "m2ib_lightning.ImageTextDataModule",
                 "init_args": {"path": "json", "data_files": str(pairs_dir / "pairs.jsonl"), "batch_size": 3}},
        "writer": {"overlays": 0},
    }))
    return path


def batch_of(backbone, pairs_dir, n=3):
    from PIL import Image

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    images = [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows]
    return Preprocessor.from_backbone(backbone)(images, [r["caption"] for r in rows])


def test_the_cache_serves_every_layer_bit_for_bit(backbone, pairs_dir):
    inputs = batch_of(backbone, pairs_dir)
    cache = LayerCache(backbone)
    assert cache.num_layers == backbone.num_layers and cache.tokenizer is backbone.tokenizer
    with cache.serving([inputs]):
        for side in ("vision", "text"):
            for layer in reversed(range(-1, backbone.num_layers[side])):
                got, want = cache.lower(side, inputs, layer), backbone.lower(side, inputs, layer)
                assert torch.equal(got.hidden, want.hidden) and torch.equal(got.valid, want.valid)
                assert got.extras.keys() == want.extras.keys()
                assert all(torch.equal(got.extras[k], want.extras[k]) for k in want.extras)
        # other inputs (a copy) are passed through, not served from another batch's states
        other = {k: v.clone() for k, v in inputs.items()}
        assert torch.equal(cache.lower("vision", other, 0).hidden, backbone.lower("vision", other, 0).hidden)
    assert cache.hits == 8 and cache.misses == 1
    # each side's lower blocks ran once: the embeddings, then one block at a time (plus one check)
    assert not cache._states  # noqa: SLF001 - dropped on exit


def test_variants_are_found_and_those_needing_input_left_out():
    found, left_out = discover_variants()
    names = [v.name for v in found]
    assert names[0] == "M2IB" and "PerTokenM2IB" in names
    assert "IBAStyleM2IB" not in names
    assert "fit_statistics" in left_out["m2ib_lightning.methods.bottlenecks.IBAStyleM2IB"]
    assert found[0].config() == {"class_path": "m2ib_lightning.methods.bottlenecks.M2IB",
                                 "init_args": {"beta": 0.1, "init_alpha": 5.0}}
    assert describe({"class_path": "m2ib_lightning.M2IB", "init_args": {"beta": 1.0}}).name == "M2IB(beta=1.0)"

    from m2ib_lightning.methods.bottlenecks import M2IB

    class OptedOut(M2IB):
        selectable = False

    assert "opted out" in unusable(OptedOut) and unusable(M2IB) is None


def test_select_ranks_prints_progress_and_its_fragment_makes_fit_use_the_choice(config, tmp_path, capsys):
    out = tmp_path / "selected.yaml"
    scores = tmp_path / "scores.json"
    result = main(["-c", str(config), "--limit", "4", "--layers", "0", "2", "--text-layers", "-1", "1",
                   "--variants", "M2IB", "PerTokenM2IB", "--out", str(out), "--scores", str(scores),
                   "--resamples", "50", "--rule", "gap"])
    printed = capsys.readouterr().out
    assert printed.count("] vision layer") == 4 and printed.count("] text layer") == 4  # one line per setting
    assert "| rank | setting |" in printed and "**chosen**" in printed
    assert result["pairs"] == 4 and set(result["chosen"]) == {"vision", "text"}
    stored = json.loads(scores.read_text())
    assert len(stored["settings"]) == 8 and all(len(v["deletion"]) == 4 for v in stored["scores"].values())
    chosen = {side: s.setting for side, s in result["chosen"].items()}

    # the fragment, as one more -c after the same configs, is the choice
    cfg = parse(["fit", "-c", str(config), "-c", str(out)])
    for side, setting in chosen.items():
        assert cfg.model.init_args[f"{side}_layer"] == setting.layer
        bottleneck = cfg.model.init_args[f"{side}_bottleneck"]
        assert bottleneck.class_path == setting.variant.class_path
        assert bottleneck.init_args.as_dict() == setting.variant.args
    assert cfg.model.init_args.steps == 2  # everything else as configured
    # ... and a fit with it records those settings with its maps
    fit_main(["fit", "-c", str(config), "-c", str(out), "--trainer.enable_progress_bar", "false",
              "--data.init_args.limit", "2"])
    metadata = load_attributions(tmp_path / "run" / "attributions").metadata
    for side, setting in chosen.items():
        assert metadata[f"{side}_layer"] == setting.layer
        assert metadata["bottlenecks"][side]["class"].rsplit(".", 1)[1] == setting.variant.name


@pytest.mark.parametrize("args, message", [
    (["--limit", "0"], "--limit must be >= 1"),
    (["--layers", "7"], "--layers: vision bottleneck layer must be an int in [-1, 2]"),
    (["--variants", "IBAStyleM2IB"], "cannot be swept: it asks for a pass over the dataset"),
    (["--variants", "Nope"], "unknown bottleneck 'Nope'"),
    (["--model.init_args.no_such_option", "1"], "no_such_option"),
    (["--trainer.precision", "16-mixed"], "select runs in 32-true or bf16-mixed"),
    (["-c", str(ROOT / "configs" / "method" / "rollout.yaml")], "select chooses M2IB's layers"),
    (["--data.init_args.data_files", "/nowhere/pairs.jsonl"], "/nowhere/pairs.jsonl does not exist"),
])
def test_bad_input_ends_with_one_message(config, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", str(config), "--out", str(tmp_path / "x.yaml"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.parametrize("rows", [[], [{"id": "a", "image": "missing.png", "caption": "a red circle"}]],
                         ids=["empty-file", "every-row-skipped"])
def test_data_without_pairs_ends_with_one_message(config, tmp_path, capsys, rows):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(SystemExit) as exit_info:
        main(["-c", str(config), "--data.init_args.data_files", str(data), "--layers", "0", "--text-layers", "0",
              "--variants", "M2IB", "--out", str(tmp_path / "x.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert ("no pairs to select on" if rows else "data.jsonl") in err and "Traceback" not in err
    assert not (tmp_path / "x.yaml").exists()


@pytest.mark.slow
def test_two_gloo_processes_give_the_scores_of_one(config, tmp_path):
    """Under m2ib_ddp each rank explains its own pairs for every setting; rank 0 gathers every pair's
    scores, which equal those of a single process (one pair per batch: the same batches)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    common = ["-c", str(config), "--limit", "6", "--layers", "1", "--text-layers", "0", "--variants", "M2IB",
              "--data.init_args.batch_size", "1", "--resamples", "20",
              # 5 steps: after 2 (one Adam update, +-1 per element) the tiny model's vision maps barely
              # depend on the blocks above, the randomisation check rejects them and only one side is chosen
              "--model.init_args.steps", "5"]

    def run(name, *extra):
        out = tmp_path / name
        cmd = [sys.executable, "-m", "m2ib_lightning.select", *common, "--out", str(out / "selected.yaml"),
               "--scores", str(out / "scores.json"), *extra]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads((out / "scores.json").read_text())["scores"], proc.stdout

    single, _ = run("single")
    double, printed = run("double", "--trainer.strategy", "m2ib_ddp", "--trainer.devices", "2")
    assert "each rank on its own pairs" in printed and printed.count("**chosen**") == 2
    assert single.keys() == double.keys()
    for key in single:
        for name in single[key]:
            assert single[key][name].keys() == double[key][name].keys() and len(single[key][name]) == 6
            for i, v in single[key][name].items():
                w = double[key][name][i]
                assert (v != v and w != w) or v == pytest.approx(w, abs=1e-6), (key, name, i)


def test_pair_ranks_share_ties_and_leave_missing_scores_out():
    import numpy as np

    from m2ib_lightning.select.ranking import pair_ranks

    scores = np.array([[0.3, 1.0, np.nan], [0.1, 1.0, 2.0], [0.2, 0.5, 1.0]])
    ranks = pair_ranks(scores, higher=True)
    assert ranks[:, 0].tolist() == [1.0, 3.0, 2.0]
    assert ranks[:, 1].tolist() == [1.5, 1.5, 3.0]
    assert np.isnan(ranks[0, 2]) and ranks[1:, 2].tolist() == [1.0, 2.0]


def synthetic(gaps: dict[int, list[float]], rho: dict[int, float]):
    """Scores of vision settings at the given layers: per-pair gaps, and rand_spearman where checked."""
    from m2ib_lightning.select.candidates import Setting, describe

    variant = describe(None)
    settings = [Setting("vision", layer, variant) for layer in gaps]
    scores = {}
    for s in settings:
        g = gaps[s.layer]
        values = {"deletion": {f"p{i}": 0.5 - v / 2 for i, v in enumerate(g)},
                  "insertion": {f"p{i}": 0.5 + v / 2 for i, v in enumerate(g)},
                  "clean": dict.fromkeys((f"p{i}" for i in range(len(g))), 1.0),
                  "deleted": dict.fromkeys((f"p{i}" for i in range(len(g))), 0.0),
                  "inserted_from": dict.fromkeys((f"p{i}" for i in range(len(g))), 0.0)}
        if s.layer in rho:
            values["rand_spearman"] = dict.fromkeys((f"p{i}" for i in range(len(g))), rho[s.layer])
        scores[s.key] = values
    return settings, scores


def test_the_rule_ranks_by_gap_rejects_maps_that_survive_randomisation_and_checks_only_what_matters():
    from m2ib_lightning.select.ranking import RULES, choose, summarise, to_check

    rule = RULES["gap_rank+sanity"]
    gaps = {0: [0.9, 0.8, 0.9, 0.7], 1: [0.5, 0.6, 0.5, 0.6], 2: [0.1, 0.2, 0.1, 0.3]}
    # nothing checked yet: the best by gap_rank (layer 0) is the one to check
    settings, scores = synthetic(gaps, {})
    rows = summarise(settings, scores, resamples=20)["vision"]
    assert rows[0].mean["gap_rank"] == 1.0 and rows[2].mean["gap_rank"] == 3.0
    assert [s.layer for s in to_check(rows, rule)] == [0]
    # layer 0 survives randomisation: rejected, and layer 1 is next to check
    settings, scores = synthetic(gaps, {0: 0.95})
    rows = summarise(settings, scores, resamples=20)["vision"]
    assert [s.layer for s in to_check(rows, rule)] == [1]
    settings, scores = synthetic(gaps, {0: 0.95, 1: 0.3})
    rows = summarise(settings, scores, resamples=20)["vision"]
    best, ranked = choose(rows, rule)
    assert best.setting.layer == 1 and not to_check(rows, rule)
    assert [r.setting.layer for r in ranked] == [1, 2, 0] and "survives randomisation" in ranked[-1].rejected
    # the same choice as if every setting had been checked
    settings, scores = synthetic(gaps, {0: 0.95, 1: 0.3, 2: 0.1})
    assert choose(summarise(settings, scores, resamples=20)["vision"], rule)[0].setting.layer == 1


def test_the_default_rule_combines_two_layers_the_pairs_cannot_rank_apart_and_only_those():
    from m2ib_lightning.select.ranking import DEFAULT_RULE, RULES, choose, partner, summarise, to_check

    rule = RULES[DEFAULT_RULE]
    assert rule.combine and rule.score == "gap_rank"
    # layers 0 and 1 take turns in being better (0 once more): 1's mean rank lies inside 0's interval
    close = {0: [0.9, 0.5, 0.9, 0.5, 0.9, 0.9], 1: [0.5, 0.9, 0.5, 0.9, 0.5, 0.4], 2: [0.1] * 6}
    settings, scores = synthetic(close, {0: 0.1})
    rows = summarise(settings, scores, resamples=200)["vision"]
    best, ranked = choose(rows, rule)
    assert best.setting.layer == 0 and partner(best, ranked, rule).setting.layer == 1
    assert [s.layer for s in to_check(rows, rule)] == [1]  # the partner's randomisation is checked too
    # ... and a partner whose maps survive randomisation is no partner
    settings, scores = synthetic(close, {0: 0.1, 1: 0.95})
    best, ranked = choose(summarise(settings, scores, resamples=200)["vision"], rule)
    assert best.setting.layer == 0 and partner(best, ranked, rule) is None
    # layer 0 first on every pair: nothing to hedge, one layer
    apart = {0: [0.9] * 6, 1: [0.5] * 6, 2: [0.1] * 6}
    settings, scores = synthetic(apart, {0: 0.1, 1: 0.1})
    best, ranked = choose(summarise(settings, scores, resamples=200)["vision"], rule)
    assert best.setting.layer == 0 and partner(best, ranked, rule) is None
    # the rule without combining never gives a partner
    assert partner(best, ranked, RULES["gap_rank+sanity"]) is None


def test_a_combined_choice_is_a_multilayer_fragment_that_fit_runs(config, tmp_path):
    from m2ib_lightning.select.candidates import Setting
    from m2ib_lightning.select.ranking import Summary, fragment

    variant = describe({"class_path": "m2ib_lightning.ScaledPerTokenM2IB"})
    chosen = {"vision": Summary(Setting("vision", 1, variant), 4), "text": Summary(Setting("text", -1, variant), 4)}
    partners = {"vision": Summary(Setting("vision", 0, variant), 4), "text": None}
    out = tmp_path / "combined.yaml"
    out.write_text(fragment(chosen, ["a header"], partners))
    cfg = parse(["fit", "-c", str(config), "-c", str(out)])
    assert cfg.model.class_path == "m2ib_lightning.MultiLayerM2IB"
    assert cfg.model.init_args.vision_layers == [1, 0] and cfg.model.init_args.text_layers == [-1]
    assert cfg.model.init_args.steps == 2  # the rest as configured
    fit_main(["fit", "-c", str(config), "-c", str(out), "--trainer.enable_progress_bar", "false",
              "--data.init_args.limit", "2"])
    records = load_attributions(tmp_path / "run" / "attributions")
    assert len(records) == 2 and records.metadata["bottlenecks"]["vision"]["class"].endswith("ScaledPerTokenM2IB")
    # without a partner the fragment keeps M2IBAttribution's one layer per side
    plain = yaml.safe_load(fragment(chosen, ["h"], {"vision": None, "text": None}))
    assert "class_path" not in plain["model"] and plain["model"]["init_args"]["vision_layer"] == 1
