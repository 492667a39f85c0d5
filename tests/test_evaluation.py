"""The evaluation callback and its model-side perturbations, alone and through the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from m2ib_lightning import Preprocessor, load_attributions
from m2ib_lightning.assets.scenes import make_benchmark
from m2ib_lightning.evaluation import ALL_METRICS, AttributionEvaluator, keep_above_median, perturbation_curves
from m2ib_lightning.evaluation.metrics import confidence_drop, confidence_increase
from m2ib_lightning.evaluation.perturb import baseline_image
from m2ib_lightning.methods.baselines import RandomMap
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bench_dir(tmp_path_factory) -> Path:
    """Six benchmark scenes at the tiny model's 64 px, with masks."""
    out = tmp_path_factory.mktemp("bench")
    make_benchmark(out, n=6, image_size=64, seed="test")
    return out


def batch_of(backbone, bench_dir, n=3):
    rows = [json.loads(line) for line in (bench_dir / "pairs.jsonl").read_text().splitlines()][:n]
    images = [Image.open(bench_dir / r["image"]).convert("RGB") for r in rows]
    captions = [r["caption"] for r in rows]
    batch = {"ids": [r["id"] for r in rows], **Preprocessor.from_backbone(backbone)(images, captions)}
    batch["extra"] = {"mask": [r["mask"] for r in rows], "bbox": [r["bbox"] for r in rows]}
    return batch


def test_curves_start_clean_and_end_at_the_baseline(backbone, bench_dir):
    batch = batch_of(backbone, bench_dir)
    pixels = batch["pixel_values"]
    maps = torch.rand(pixels.shape[0], *pixels.shape[-2:], generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        text = backbone.embed("text", batch)
        clean = F.cosine_similarity(backbone.embed("vision", batch), text)
        blurred = F.cosine_similarity(backbone.embed("vision", {"pixel_values": baseline_image(pixels, "blur")}), text)
        mean = F.cosine_similarity(backbone.embed("vision", {"pixel_values": torch.zeros_like(pixels)}), text)
        deletion = perturbation_curves(backbone, pixels, maps, text, steps=4, mode="deletion", baseline="mean")
        insertion = perturbation_curves(backbone, pixels, maps, text, steps=4, mode="insertion", baseline="blur")
        # Half deleted = exactly the top half of the map replaced by the mean.
        top = maps.flatten(1).argsort(1, descending=True)[:, : maps[0].numel() // 2]
        half = pixels.flatten(2).clone()
        for i in range(len(top)):
            half[i, :, top[i]] = 0
        halfway = F.cosine_similarity(backbone.embed("vision", {"pixel_values": half.view_as(pixels)}), text)
    assert deletion.shape == insertion.shape == (3, 5)
    torch.testing.assert_close(deletion[:, 0], clean, atol=1e-5, rtol=0)
    torch.testing.assert_close(deletion[:, -1], mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(deletion[:, 2], halfway, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion[:, 0], blurred, atol=1e-5, rtol=0)
    torch.testing.assert_close(insertion[:, -1], clean, atol=1e-5, rtol=0)


def test_keep_above_median():
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]])
    scores = [torch.tensor([0.9, 0.1, 0.8, 0.5, 0.3, 1.0]), torch.tensor([0.0, 1.0, 0.2])]
    keep = keep_above_median(scores, mask)
    # words 0.1 0.8 0.5 0.3: median 0.4, kept 0.8 and 0.5; BOS/EOS/padding kept
    assert keep.tolist() == [[True, False, True, True, False, True], [True, False, True, True, True, True]]
    # Special tokens given (no end token here): the last valid token is a word too.
    special = torch.tensor([[True, False, False, False, False, False], [True, False, False, True, True, True]])
    # words 0.1 0.8 0.5 0.3 1.0: median 0.5, kept 0.8 and 1.0; second caption 1.0 0.2: median 0.6
    assert keep_above_median(scores, mask, special).tolist() == [[True, False, True, False, False, True],
                                                                  [True, True, False, True, True, True]]
    with pytest.raises(ValueError, match="caption 1: expected 3 token scores"):
        keep_above_median([scores[0], torch.zeros(4)], mask)


def test_update_matches_the_definitions(backbone, bench_dir):
    batch = batch_of(backbone, bench_dir)
    out = RandomMap(backbone).explain_batch(batch)
    evaluator = AttributionEvaluator(enabled=True, mask_column="mask", steps=2)
    totals = evaluator.totals()
    with torch.no_grad():
        totals.add(evaluator.evaluate(backbone, out, batch))
        image, text = backbone.embed("vision", batch), backbone.embed("text", batch)
        s = F.cosine_similarity(image, text)
        masked = F.cosine_similarity(
            backbone.embed("vision", {"pixel_values": batch["pixel_values"] * out.image_maps.unsqueeze(1)}), text)
    assert totals.metric("image/confidence_drop").compute().item() == pytest.approx(
        confidence_drop(s, masked).item(), abs=1e-4)
    assert totals.metric("image/confidence_increase").compute().item() == pytest.approx(
        confidence_increase(s, masked).item())
    for name in ALL_METRICS:
        assert totals.metric(name).count == 3, name


def test_every_metric_value_matches_a_direct_computation(backbone, bench_dir):
    """Each metric the callback computes, and each per-sample value it hands to the records, against
    the definitions written out here (a plain loop for the text perturbation)."""
    import numpy as np

    from m2ib_lightning.evaluation import metrics as fm
    from m2ib_lightning.evaluation import perturbation_curves
    from m2ib_lightning.evaluation.ground_truth import ground_truth

    batch = batch_of(backbone, bench_dir)
    out = RandomMap(backbone, seed=3).explain_batch(batch)
    evaluator = AttributionEvaluator(enabled=True, mask_column="mask", steps=4)
    totals = evaluator.totals()
    with torch.no_grad():
        per_sample = evaluator.evaluate(backbone, out, batch)
        totals.add(per_sample)
        image, text = backbone.embed("vision", batch).float(), backbone.embed("text", batch).float()
        s = F.cosine_similarity(image, text)
        # Text: per caption, words (between BOS and EOS) at or below the median of their scores -> id 0.
        ids = batch["input_ids"].clone()
        for i, scores in enumerate(out.text_scores):
            words = scores[1:-1].numpy()
            for j, value in enumerate(words, start=1):
                if not value > np.percentile(words, 50):
                    ids[i, j] = 0
        text_masked = F.cosine_similarity(
            backbone.embed("text", {"input_ids": ids, "attention_mask": batch["attention_mask"]}).float(), image)
        maps = out.image_maps.float()
        image_masked = F.cosine_similarity(
            backbone.embed("vision", {"pixel_values": batch["pixel_values"] * maps.unsqueeze(1)}).float(), text)
        truth = torch.stack([ground_truth(m, tuple(maps.shape[-2:])) for m in batch["extra"]["mask"]])
        deletion = perturbation_curves(backbone, batch["pixel_values"], maps, text, 4, "deletion", "mean")
        insertion = perturbation_curves(backbone, batch["pixel_values"], maps, text, 4, "insertion", "blur")
    expected = {
        "text/confidence_drop": fm.confidence_drop(s, text_masked),
        "text/confidence_increase": fm.confidence_increase(s, text_masked),
        "image/deletion_auc": fm.curve_auc(deletion),
        "image/insertion_auc": fm.curve_auc(insertion),
        # 15 px at 224 px, scaled to these 64-px maps (evaluation.tolerance_units: relative, the default)
        "image/pointing_game": fm.pointing_game(maps, truth, tolerance=15.0 * maps.shape[-1] / 224),
        "image/energy_pointing_game": fm.energy_pointing_game(maps, truth),
        "image/mask_auroc": fm.mask_auroc(maps, truth),
    }
    assert (ids == 0).any() and (ids[:, 1:-1] != 0).any()  # the text perturbation dropped and kept words
    for name, value in expected.items():
        got = totals.metric(name).compute().item()
        assert got == pytest.approx(value.item(), abs=1e-5), name
    # The per-sample values the records get, sample by sample, in the results' units.
    direct = {
        "image/confidence_drop": 100 * (s - image_masked).clamp_min(0),
        "image/confidence_increase": 100 * (image_masked > s).double(),
        "text/confidence_drop": 100 * (s - text_masked).clamp_min(0),
        "text/confidence_increase": 100 * (text_masked > s).double(),
        "image/deletion_auc": (0.5 * (deletion[:, 1:] + deletion[:, :-1])).mean(1),
        "image/insertion_auc": (0.5 * (insertion[:, 1:] + insertion[:, :-1])).mean(1),
        "image/pointing_game": torch.stack([fm.pointing_game(m[None], t[None], 15.0 * 64 / 224)
                                            for m, t in zip(maps, truth)]),
        "image/energy_pointing_game": (maps * truth).flatten(1).sum(1) / maps.flatten(1).sum(1),
        "image/mask_auroc": torch.stack([fm.mask_auroc(m[None], t[None]) for m, t in zip(maps, truth)]),
    }
    assert set(direct) == set(ALL_METRICS)
    for name, values in direct.items():
        torch.testing.assert_close(per_sample[name], values.double().cpu(), atol=1e-5, rtol=0, msg=name)


def test_pointing_tolerance_follows_the_map_size_unless_given_in_pixels():
    """15 px at 224 px: a 96-px map gets 15 * 96 / 224 = 6.43 px; ``tolerance_units: pixels`` keeps 15."""
    from m2ib_lightning.backbones import BackboneAdapter
    from m2ib_lightning.evaluation.functional import tolerance_pixels
    from m2ib_lightning.records import Explanation

    class Embeds(BackboneAdapter):  # the pointing game reads only the maps; evaluate() embeds first
        def embed(self, side, inputs):
            return torch.ones(len(inputs["pixel_values"]), 4)

    def hits(size, distances, **settings):
        """Pointing hits of maps whose maximum lies ``distances`` pixels right of a region's edge."""
        maps = torch.zeros(len(distances), size, size)
        truth = np.zeros((len(distances), size, size), dtype=bool)
        truth[:, :, :10] = True  # columns 0..9
        for i, d in enumerate(distances):
            maps[i, size // 2, 9 + d] = 1
        batch = {"pixel_values": torch.zeros(len(distances), 3, size, size), "extra": {"mask": list(truth)}}
        evaluator = AttributionEvaluator(enabled=True, mask_column="mask", metrics=["image/pointing_game"], **settings)
        explanation = Explanation(ids=[str(i) for i in range(len(distances))], similarity=torch.ones(len(distances)),
                                  image_maps=maps)
        return evaluator.evaluate(Embeds(), explanation, batch)["image/pointing_game"].tolist()

    assert tolerance_pixels(15, (96, 96)) == pytest.approx(15 * 96 / 224) and tolerance_pixels(15, (224, 224)) == 15
    assert hits(96, [6, 7, 15, 16]) == [1, 0, 0, 0]  # 6.43 px
    assert hits(96, [6, 7, 15, 16], tolerance_units="pixels") == [1, 1, 1, 0]  # 15 px of the map
    assert hits(224, [15, 16]) == [1, 0]  # at 224 px the two rules agree
    assert hits(224, [15, 16], tolerance_units="pixels") == [1, 0]
    assert hits(96, [3, 4], tolerance=7, tolerance_units="relative") == [1, 0]  # 3 px
    with pytest.raises(ValueError, match="tolerance_units must be one of \\['relative', 'pixels'\\]"):
        AttributionEvaluator(tolerance_units="px")
    assert AttributionEvaluator(tolerance_units="pixels").protocol()["tolerance_units"] == "pixels"
    assert AttributionEvaluator().protocol()["tolerance_units"] == "relative"


def test_bad_settings():
    with pytest.raises(ValueError, match=r"unknown \['image/nope'\]"):
        AttributionEvaluator(metrics=["image/nope"])
    with pytest.raises(ValueError, match="localisation metrics need mask_column or bbox_column"):
        AttributionEvaluator(metrics=["image/pointing_game"])
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        AttributionEvaluator(steps=0)
    assert not any("pointing" in n for n in AttributionEvaluator().names)  # no ground truth: left out


def fit_args(tmp_path, tiny_clip_dir, bench_dir, *extra):
    return [
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "3", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(bench_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--evaluation.enabled", "true", "--evaluation.steps", "2",
        *extra,
    ]


def test_cli_writes_results_and_logs_metrics(tmp_path, tiny_clip_dir, bench_dir):
    cli = main(fit_args(tmp_path, tiny_clip_dir, bench_dir, "--data.init_args.extra_columns", "[mask]",
                        "--evaluation.mask_column", "mask"))
    results = json.loads((tmp_path / "attributions" / "results.json").read_text())
    assert set(results["metrics"]) == set(ALL_METRICS)
    assert all(results["samples"][name] == 6 for name in ALL_METRICS)
    assert results["method"] == "m2ib_lightning.methods.m2ib.M2IBAttribution" and results["hparams"]["steps"] == 3
    assert results["higher_is_better"]["image/deletion_auc"] is False
    for name, value in results["metrics"].items():
        assert cli.trainer.callback_metrics[f"eval/{name}"].item() == pytest.approx(value, rel=1e-5)
    assert 0 <= results["metrics"]["image/pointing_game"] <= 1 and results["explain_s"] > 0


def test_a_resumed_run_evaluates_every_record(tmp_path, tiny_clip_dir, bench_dir):
    """The per-sample values are stored with the records; a run that stopped after half the
    scenes and was rerun reports the one-shot run's results over all of them."""
    truth = ("--data.init_args.extra_columns", "[mask]", "--evaluation.mask_column", "mask")
    main(fit_args(tmp_path / "once", tiny_clip_dir, bench_dir, *truth))
    main(fit_args(tmp_path / "twice", tiny_clip_dir, bench_dir, *truth, "--data.init_args.limit", "3"))
    main(fit_args(tmp_path / "twice", tiny_clip_dir, bench_dir, *truth))
    once, twice = (json.loads((tmp_path / name / "attributions" / "results.json").read_text())
                   for name in ("once", "twice"))
    assert twice["earlier_records"] == 3 and all(count == 6 for count in twice["samples"].values())
    records = load_attributions(tmp_path / "twice" / "attributions")
    for name, value in once["metrics"].items():
        assert twice["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
        stored = [rec.metrics[name] for rec in records.values()]
        assert len(stored) == 6 and np.mean(stored) == pytest.approx(value, rel=1e-5, abs=1e-7), name
    # Values measured another way are not mixed in: another tolerance, or the other tolerance rule, is refused ...
    for other in (("--evaluation.tolerance", "3"), ("--evaluation.tolerance_units", "pixels")):
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(tmp_path / "twice", tiny_clip_dir, bench_dir, *truth, *other))
        assert exit_info.value.code == 2
    # ... and a protocol stored before the rule was recorded meant pixels: only that rule may add to it.
    stored = tmp_path / "twice" / "attributions" / "evaluation.json"
    protocol = json.loads(stored.read_text())
    assert protocol["tolerance_units"] == "relative"
    del protocol["tolerance_units"]
    stored.write_text(json.dumps(protocol))
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path / "twice", tiny_clip_dir, bench_dir, *truth))
    assert exit_info.value.code == 2
    main(fit_args(tmp_path / "twice", tiny_clip_dir, bench_dir, *truth, "--evaluation.tolerance_units", "pixels"))
    # ... unless no record holds values yet (a first attempt that died before its first shard).
    (tmp_path / "fresh" / "attributions").mkdir(parents=True)
    (tmp_path / "fresh" / "attributions" / "evaluation.json").write_text(json.dumps({"tolerance": 99}))
    main(fit_args(tmp_path / "fresh", tiny_clip_dir, bench_dir, *truth, "--data.init_args.limit", "1"))
    assert json.loads((tmp_path / "fresh" / "attributions" / "evaluation.json").read_text())["tolerance"] == 15
    # The report shows them and picks samples by them.
    from m2ib_lightning.report import build_report

    page = build_report(tmp_path / "twice" / "attributions", select="-image/deletion_auc", limit=2).read_text()
    worst = sorted(records, key=lambda i: -records[i].metrics["image/deletion_auc"])[:2]
    assert [line.split('data-search="')[1].split()[0] for line in page.split('<div class="card"')[1:]] == worst
    assert 'data-image-confidence-drop="' in page


def test_cli_names_a_missing_ground_truth_column(tmp_path, tiny_clip_dir, bench_dir, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, tiny_clip_dir, bench_dir, "--evaluation.mask_column", "mask"))
    assert exit_info.value.code == 2
    assert "'mask' is not in the batch" in capsys.readouterr().err


def test_evaluation_is_off_by_default(tmp_path, tiny_clip_dir, bench_dir):
    args = fit_args(tmp_path, tiny_clip_dir, bench_dir)
    args = args[: args.index("--evaluation.enabled")]
    main(args)
    assert not (tmp_path / "attributions" / "results.json").exists()


METHOD_CONFIGS = sorted((ROOT / "configs" / "method").glob("*.yaml"))


@pytest.mark.parametrize("config", METHOD_CONFIGS, ids=[c.stem for c in METHOD_CONFIGS])
def test_every_method_config_parses_on_top_of_the_benchmark(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / "toy_benchmark.yaml"), "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    class_path = next(line for line in config.read_text().splitlines() if "class_path" in line).split()[-1]
    assert f"class_path: {class_path}" in printed and "mask_column: mask" in printed


def test_benchmark_script_runs_and_tabulates(tmp_path, tiny_clip_dir, bench_dir):
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "scripts" / "benchmark_quality.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    report = script.main([
        "--methods", "random", "saliency", "--seeds", "0", "1", "--out", str(tmp_path), "--no-sanity", "--no-sweep",
        "--no-docs", "--no-selection", "--", "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--data.init_args.data_files", str(bench_dir / "pairs.jsonl"), "--evaluation.steps", "2",
    ])
    assert len(report["runs"]["random"]) == 2 and report["runs"]["saliency"][0]["samples"]["image/pointing_game"] == 6
    lines = report["table"].splitlines()
    assert lines[0].startswith("| Method | Pointing game ↑") and lines[2].startswith("| Random |")
    assert " ± " in lines[2] and "seeds [0, 1]" in report["footer"]
    assert "2 steps" in report["footer"] and "15 px" in report["footer"]  # the protocol the runs applied
    assert "15 px tolerance at 224 px, scaled to the map's size" in report["footer"]
    assert (tmp_path / "results.md").read_text().startswith(lines[0])

    # The docs' blocks are replaced whether empty (as shipped) or filled by an earlier run.
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- results:begin -->\n<!-- results:end -->\nafter\n")
    assert script.replace_block(doc, "results", "| a |\n")
    assert doc.read_text() == "before\n<!-- results:begin -->\n| a |\n<!-- results:end -->\nafter\n"
    assert script.replace_block(doc, "results", "| b |")
    assert doc.read_text() == "before\n<!-- results:begin -->\n| b |\n<!-- results:end -->\nafter\n"
    assert not script.replace_block(doc, "sweep", "x")


def test_benchmark_compares_the_label_free_pick_with_the_labelled_best():
    """The closing lines of a world's table: the pick, the best IB row by pointing game (with its
    standard error over seeds) and the best baseline, and whether the pick is within one SE."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "scripts" / "benchmark_quality.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)

    def runs_of(*values):  # 100 scenes: the standard error of a pointing game p is sqrt(p (1 - p) / 100)
        return [{"metrics": {"image/pointing_game": v}, "samples": {"image/pointing_game": 100}} for v in values]

    runs = {"select": runs_of(0.78, 0.79, 0.80), "m2ib": runs_of(0.89, 0.90, 0.91),
            "rollout": runs_of(0.84, 0.84, 0.84), "random": runs_of(0.99, 0.99, 0.99)}
    text = script.comparison(runs, "vision layer 0 M2IB", 12.0)
    assert "| best IB row with labels | M2IB (layers 0 / -1) | 0.900 ± 0.030 |" in text
    assert "| best baseline | Chefer et al. rollout | 0.840 ± 0.037 |" in text  # random is not a baseline here
    assert "0.790 ± 0.041" in text and "NOT within" in text and "(PG >= 0.870)" in text
    runs["select"] = runs_of(0.87, 0.88, 0.89)
    assert "is within one standard error" in script.comparison(runs, "x", 1.0)
    # the footer's wall time is not passed off as the table's when runs were reused (--reuse)
    assert script.wall_text(runs, 12.3) == "12 s"
    runs["m2ib"][0]["reused"] = True
    assert script.wall_text(runs, 12.3).startswith("not measured (1 of 12 runs reused")


def test_benchmark_sweeps_and_word_rules(tmp_path, monkeypatch):
    """The layer sweeps and the keep-one-word rules run on the shipped toy CLIP and tabulate what they measured."""
    import importlib.util

    from m2ib_lightning import load_attributions

    spec = importlib.util.spec_from_file_location("benchmark_quality", ROOT / "scripts" / "benchmark_quality.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    monkeypatch.chdir(ROOT)  # the method configs name the toy CLIP relative to the repository root
    text = script.sweep(tmp_path, "text", [-1, 0], [0.1], scenes=6).splitlines()
    assert text[0].startswith("| text layer | beta | Txt drop ↓ | Txt incr. ↑ | mean word score | top word: article")
    assert [row.split(" | ")[:2] for row in text[2:]] == [["| -1", "0.1"], ["| 0", "0.1"]]
    # The word columns are what the stored scores say: fractions summing to 1, the mean word score.
    run = tmp_path / "sweep-text" / "embeddings-beta0.1" / "attributions"
    cells = [float(c) for c in text[2].strip("| ").split(" | ")[2:]]
    assert sum(cells[3:]) == pytest.approx(1.0, abs=0.02)
    records = load_attributions(run)
    mean_word = sum(float(records[k].text_scores[1:-1].mean()) for k in records) / len(records)
    assert cells[2] == pytest.approx(mean_word, abs=0.006)
    results = json.loads((run / "results.json").read_text())["metrics"]
    assert cells[0] == pytest.approx(results["text/confidence_drop"], abs=0.006)

    vision = script.sweep(tmp_path, "vision", [0], [1.0], scenes=6).splitlines()
    assert vision[0].startswith("| vision layer | beta | Pointing game ↑") and vision[2].startswith("| 0 | 1 |")

    rules = script.word_rules(tmp_path, scenes=6).splitlines()
    assert [r.split(" | ")[0] for r in rules[2:]] == ["| keep only the article", "| keep only the colour",
                                                      "| keep only the shape"]
    drops = {}
    for row in rules[2:]:
        name, drop, increase = row.strip("| ").split(" | ")
        drops[name.split()[-1]] = float(drop)
        assert float(drop) >= 0 and 0 <= float(increase) <= 100
    # The toy CLIP matches scenes by colour and shape: the article alone keeps the least of the caption.
    assert drops["article"] > max(drops["colour"], drops["shape"])


@pytest.mark.slow
def test_two_ranks_sync_to_the_one_rank_results(tmp_path, tiny_clip_dir, bench_dir):
    """Each rank sees half the scenes; the synced sums and counts give the one-rank results."""
    import os
    import subprocess
    import sys

    def run(name: str, devices: int) -> dict:
        args = [sys.executable, str(ROOT / "train.py"), *fit_args(tmp_path / name, tiny_clip_dir, bench_dir,
                                                                   "--data.init_args.extra_columns", "[mask]",
                                                                   "--evaluation.mask_column", "mask",
                                                                   "--trainer.devices", str(devices))]
        if devices > 1:
            args += ["--trainer.strategy", "m2ib_ddp"]  # gloo processes on CPU
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return json.loads((tmp_path / name / "attributions" / "results.json").read_text())

    one, two = run("one", 1), run("two", 2)
    assert two["world_size"] == 2 and all(count == 6 for count in two["samples"].values())
    for name, value in one["metrics"].items():
        assert two["metrics"][name] == pytest.approx(value, rel=1e-4, abs=1e-6), name


def test_boxes_are_read_in_pixels_of_the_stored_image(backbone, tmp_path):
    """Scenes stored at 128 px for a 64 px model: a box in stored pixels lands on the object."""
    from m2ib_lightning import ImageTextDataModule
    from m2ib_lightning.evaluation.ground_truth import ground_truth

    make_benchmark(tmp_path, n=4, image_size=128, seed="boxes")
    data = ImageTextDataModule(path="json", data_files=str(tmp_path / "pairs.jsonl"), batch_size=4,
                               extra_columns=["mask", "bbox"])
    data.preprocessor = Preprocessor.from_backbone(backbone)
    batch = next(iter(data.train_dataloader()))
    assert batch["image_sizes"] == [(128, 128)] * 4
    missed = total = 0
    for i, (mask, box) in enumerate(zip(batch["extra"]["mask"], batch["extra"]["bbox"])):
        from_mask = ground_truth(mask, (64, 64))
        from_box = ground_truth(box, (64, 64), batch["image_sizes"][i])
        # The box holds the object (up to the one-pixel rim that PIL draws past a box's far edges);
        # read in model pixels, as if the image had not been resized, it misses most of it.
        rim = F.max_pool2d(from_box[None, None].float(), 3, stride=1, padding=1)[0, 0].bool()
        assert not (from_mask & ~rim).any()
        assert from_box.sum() < 4 * from_mask.sum()
        missed += int((from_mask & ~ground_truth(box, (64, 64))).sum())
        total += int(from_mask.sum())
    assert missed > 0.5 * total
