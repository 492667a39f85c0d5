"""Bottleneck variants: every one end to end through the CLI, and what each one promises."""

from __future__ import annotations

import copy
import json
import re
import sys
from pathlib import Path

import pytest
import torch

from m2ib_lightning import M2IB, ConfigError, IBAStyleM2IB, M2IBAttribution, PerTokenM2IB, load_attributions
from m2ib_lightning.methods.bottlenecks import Welford
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "variants.md"
LAYER = 1


def docs_example() -> str:
    """The first python block of docs/variants.md: the 'write your own variant' example."""
    return re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.S)[0]


@pytest.fixture(scope="module")
def my_variants(tmp_path_factory):
    """The docs example saved as an importable module, as the docs tell users to do."""
    folder = tmp_path_factory.mktemp("my_variants")
    (folder / "my_variants.py").write_text(docs_example())
    sys.path.insert(0, str(folder))
    yield __import__("my_variants")
    sys.path.remove(str(folder))
    sys.modules.pop("my_variants", None)


def load_pairs(pairs_dir, n):
    from PIL import Image

    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()][:n]
    return [r["id"] for r in rows], [Image.open(pairs_dir / r["image"]).convert("RGB") for r in rows], \
        [r["caption"] for r in rows]


def make_batch(backbone, pairs_dir, n=3):
    from m2ib_lightning import Preprocessor

    ids, images, captions = load_pairs(pairs_dir, n)
    captions[0] += " with a longer caption"  # padding in the text batch
    return {"ids": ids, **Preprocessor.from_backbone(backbone)(images, captions)}


def module(backbone, **kwargs):
    return M2IBAttribution(backbone, **{"vision_layer": LAYER, "text_layer": LAYER, "steps": 3, "copies": 2,
                                        "seed": 1, **kwargs})


# name -> (model.init_args overrides, sides explained)
VARIANTS = {
    "reference": ({}, ("vision", "text")),
    "per_token": ({"vision_bottleneck": {"class_path": "m2ib_lightning.PerTokenM2IB"},
                   "text_bottleneck": {"class_path": "m2ib_lightning.PerTokenM2IB", "init_args": {"beta": 0.05}}},
                  ("vision", "text")),
    "iba_style": ({"vision_bottleneck": {"class_path": "m2ib_lightning.IBAStyleM2IB",
                                         "init_args": {"stats_file": "STATS/vision.safetensors",
                                                       "estimate_batches": 1}},
                   "text_bottleneck": {"class_path": "m2ib_lightning.IBAStyleM2IB",
                                       "init_args": {"stats_file": "STATS/text.safetensors"}}},
                  ("vision", "text")),
    "smooth": ({"vision_bottleneck": {"class_path": "m2ib_lightning.SmoothM2IB"},
                "text_bottleneck": {"class_path": "m2ib_lightning.SmoothM2IB", "init_args": {"sigma": 2.0}}},
               ("vision", "text")),
    "scaled": ({"vision_bottleneck": {"class_path": "m2ib_lightning.ScaledM2IB"},
                "text_bottleneck": {"class_path": "m2ib_lightning.ScaledM2IB", "init_args": {"beta": 0.3}}},
               ("vision", "text")),
    "docs_example": ({"vision_bottleneck": {"class_path": "my_variants.ScaledNoiseM2IB",
                                            "init_args": {"noise_std": 0.5}}}, ("vision", "text")),
    "vision_only": ({"sides": ["vision"]}, ("vision",)),
    "text_only": ({"sides": ["text"]}, ("text",)),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_variant_runs_end_to_end(name, tmp_path, tiny_clip_dir, pairs_dir, my_variants):
    overrides, sides = VARIANTS[name]
    text = json.dumps({"model": {"init_args": overrides}}).replace("STATS", str(tmp_path / "stats"))
    config = tmp_path / "variant.yaml"
    config.write_text(text)  # JSON is YAML
    main([
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"), "-c", str(config),
        "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path), "--writer.overlays", "0",
    ])
    records = load_attributions(tmp_path / "attributions")
    assert len(records) == 6 and not records.skipped
    for rec in records.values():
        assert (rec.image_map is not None) == ("vision" in sides)
        assert (rec.text_scores is not None) == ("text" in sides)
        if rec.image_map is not None:
            assert rec.image_map.min() == 0 and rec.image_map.max() == 1
        if rec.text_scores is not None:
            assert len(rec.text_scores) == len(rec.tokens) and rec.text_scores.max() == 1
    if name == "iba_style":
        assert sorted(p.name for p in (tmp_path / "stats").iterdir()) == ["text.safetensors", "vision.safetensors"]


def test_cli_flag_syntax_from_the_docs(tmp_path, tiny_clip_dir, pairs_dir, my_variants, capsys):
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(ROOT / "configs" / "demo.yaml"),
              "--model.init_args.vision_bottleneck", "my_variants.ScaledNoiseM2IB",
              "--model.init_args.vision_bottleneck.init_args.noise_std", "0.5", "--print_config"])
    printed = capsys.readouterr().out
    assert "class_path: my_variants.ScaledNoiseM2IB" in printed and "noise_std: 0.5" in printed
    assert "beta: 0.1" in printed  # the base options stay settable


def test_docs_example_is_short():
    lines = [line for line in docs_example().splitlines() if line.strip()]
    assert len(lines) < 50, f"the docs example has {len(lines)} non-blank lines; the page promises fewer than 50"


def test_docs_variant_reduces_to_reference(backbone, pairs_dir, my_variants):
    batch = make_batch(backbone, pairs_dir)
    reference = module(backbone).explain_batch(batch)
    same = module(backbone, vision_bottleneck=my_variants.ScaledNoiseM2IB(noise_std=1.0),
                  text_bottleneck=my_variants.ScaledNoiseM2IB(noise_std=1.0)).explain_batch(batch)
    other = module(backbone, vision_bottleneck=my_variants.ScaledNoiseM2IB(noise_std=0.3)).explain_batch(batch)
    torch.testing.assert_close(same.image_maps, reference.image_maps, atol=1e-6, rtol=0)
    for a, b in zip(same.text_scores, reference.text_scores):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    assert not torch.allclose(other.image_maps, reference.image_maps, atol=1e-3)
    with pytest.raises(ConfigError, match="noise_std must be > 0, got 0"):
        my_variants.ScaledNoiseM2IB(noise_std=0)


def test_per_token_mask_has_one_value_per_token(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir)
    # text_bucket=1: the captions are not padded beyond the batch's longest (their masks have its length)
    m = module(backbone, vision_bottleneck=PerTokenM2IB(), text_bottleneck=PerTokenM2IB(), text_bucket=1)
    out = m.explain_batch(batch)
    assert m.alpha["vision"].shape == (3, 17, 1)
    assert m.alpha["text"].shape == (3, batch["input_ids"].shape[1], 1)
    assert out.image_maps.shape == (3, 64, 64) and torch.isfinite(out.image_maps).all()


def test_welford_matches_direct_statistics_whatever_the_batching():
    gen = torch.Generator().manual_seed(0)
    batches = []
    for length in (5, 8, 3, 8):
        hidden = torch.randn(4, length, 6, generator=gen) * 3 + 1
        valid = torch.ones(4, length, dtype=torch.bool)
        valid[:2, length // 2 :] = False  # padded captions
        batches.append((hidden, valid))
    one, split = Welford(), [Welford(), Welford()]
    for i, (h, v) in enumerate(batches):
        one.update(h, v)
        split[i % 2].update(h, v)
    split[1].merge(split[0])  # the DDP path merges per-rank accumulators in another order
    tokens = [torch.cat([h[:, p][v[:, p]] for h, v in batches if p < h.shape[1]]) for p in range(8)]
    for acc in (one, split[1]):
        for p, values in enumerate(tokens):
            assert acc.count[p] == len(values)
            torch.testing.assert_close(acc.mean[p].float(), values.mean(0), atol=1e-5, rtol=0)
            torch.testing.assert_close((acc.m2[p] / (acc.count[p] - 1)).sqrt().float(), values.std(0),
                                       atol=1e-5, rtol=0)
        everything = torch.cat(tokens)
        mean, std = acc.channel_stats()
        torch.testing.assert_close(mean.float(), everything.mean(0), atol=1e-5, rtol=0)
        torch.testing.assert_close(std.float(), everything.std(0), atol=1e-5, rtol=0)


def _identity_stats(length: int, dim: int) -> Welford:
    """Mean 0 and std 1 at every position (3 tokens each, squared deviations summing to 2)."""
    zeros = torch.zeros(length, dim, dtype=torch.float64)
    return Welford(torch.full((length,), 3.0, dtype=torch.float64), zeros, zeros + 2)


def test_iba_style_with_unit_statistics_is_the_reference(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir)
    variants = {side: IBAStyleM2IB() for side in ("vision", "text")}
    variants["vision"].set_statistics(_identity_stats(17, 32))  # mean 0, std 1
    # One position: the others fall back to the channel statistics (mean 0, std 1 here too).
    variants["text"].set_statistics(_identity_stats(1, 32))
    reference = module(backbone).explain_batch(batch)
    normalised = module(backbone, vision_bottleneck=variants["vision"],
                        text_bottleneck=variants["text"]).explain_batch(batch)
    torch.testing.assert_close(normalised.image_maps, reference.image_maps, atol=1e-5, rtol=0)
    for a, b in zip(normalised.text_scores, reference.text_scores):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


class NoDataPass:
    def __iter__(self):
        raise AssertionError("the cached statistics must be loaded (or refused), not re-estimated")


def test_iba_style_statistics_are_estimated_once_then_loaded(backbone, pairs_dir, tmp_path):
    batch = make_batch(backbone, pairs_dir)
    stats = tmp_path / "vision.safetensors"
    first = module(backbone, sides=["vision"], vision_bottleneck=IBAStyleM2IB(stats_file=str(stats)))
    first.fit_bottleneck_statistics([batch])
    assert stats.is_file()
    hidden = backbone.lower("vision", {"pixel_values": batch["pixel_values"]}, LAYER).hidden
    torch.testing.assert_close(first.bottlenecks["vision"].mu, hidden.mean(0), atol=1e-5, rtol=0)
    torch.testing.assert_close(first.bottlenecks["vision"].sigma, hidden.std(0), atol=1e-5, rtol=0)

    def no_data_pass():
        raise AssertionError("the cached statistics must be loaded, not re-estimated")

    again = IBAStyleM2IB(stats_file=str(stats))
    again.fit_statistics(no_data_pass, context={"side": "vision", "layer": LAYER})
    torch.testing.assert_close(again.mu, first.bottlenecks["vision"].mu)
    out = module(backbone, sides=["vision"], vision_bottleneck=again).explain_batch(batch)
    assert torch.isfinite(out.image_maps).all()
    with pytest.raises(ConfigError, match=r"estimated for another bottleneck \(layer: file 1, this run 2\)"):
        IBAStyleM2IB(stats_file=str(stats)).fit_statistics(no_data_pass, context={"side": "vision", "layer": 2})

    # The same model under another name loads (a warning); other weights under the same name do not.
    same = copy.deepcopy(backbone)
    same.source = "elsewhere/same-weights"
    renamed = module(same, sides=["vision"], vision_bottleneck=IBAStyleM2IB(stats_file=str(stats)))
    renamed.fit_bottleneck_statistics(NoDataPass())
    torch.testing.assert_close(renamed.bottlenecks["vision"].mu, first.bottlenecks["vision"].mu)
    other = copy.deepcopy(backbone)
    with torch.no_grad():
        next(other.parameters()).add_(1e-3)
    changed = module(other, sides=["vision"], vision_bottleneck=IBAStyleM2IB(stats_file=str(stats)))
    with pytest.raises(ConfigError, match="estimated with other backbone weights"):
        changed.fit_bottleneck_statistics(NoDataPass())


def test_iba_style_pre_pass_counts_empty_batches_and_runs_once(backbone, pairs_dir, tmp_path):
    batch = make_batch(backbone, pairs_dir)
    hidden = backbone.lower("vision", {"pixel_values": batch["pixel_values"]}, LAYER)
    h, v = hidden.hidden, hidden.valid
    bottleneck = IBAStyleM2IB(estimate_batches=2)
    # An empty batch (None) counts towards estimate_batches, as on every other rank: only the
    # first real batch is used, the third item is never read.
    bottleneck.fit_statistics(lambda: iter([None, (h[:2], v[:2]), (h[2:] + 100, v[2:])]),
                              context={"side": "vision", "layer": LAYER})
    torch.testing.assert_close(bottleneck.mu, h[:2].mean(0), atol=1e-5, rtol=0)

    def no_data_pass():
        raise AssertionError("fitted statistics must not be estimated again")

    bottleneck.fit_statistics(no_data_pass, context={"side": "vision", "layer": LAYER})  # already fitted

    # Under DDP every process must take the same branch: a stats file seen by one rank only is an error.
    stats = tmp_path / "here-only.safetensors"
    IBAStyleM2IB(stats_file=str(stats)).fit_statistics(lambda: iter([(h, v)]), context={"side": "vision"})
    other_rank_sees_no_file = torch.tensor([0])
    with pytest.raises(ConfigError, match="exists for 1 of 2 processes"):
        IBAStyleM2IB(stats_file=str(stats)).fit_statistics(
            no_data_pass, context={"side": "vision"}, all_gather=lambda t: torch.stack([t, other_rank_sees_no_file]))


def test_iba_style_errors_are_clear(backbone, pairs_dir):
    batch = make_batch(backbone, pairs_dir)
    with pytest.raises(RuntimeError, match="IBAStyleM2IB has no dataset statistics yet"):
        module(backbone, vision_bottleneck=IBAStyleM2IB()).explain_batch(batch)
    wrong = IBAStyleM2IB()
    wrong.set_statistics(_identity_stats(17, 8))
    with pytest.raises(ConfigError, match="statistics have 8 channels, the hidden states at the bottleneck have 32"):
        module(backbone, vision_bottleneck=wrong).explain_batch(batch)
    with pytest.raises(ConfigError, match="estimate_batches must be an int >= 1, got 0"):
        IBAStyleM2IB(estimate_batches=0)


def test_reference_is_the_base_of_every_variant(my_variants):
    for cls in (PerTokenM2IB, IBAStyleM2IB, my_variants.ScaledNoiseM2IB):
        assert issubclass(cls, M2IB)
        assert cls(beta=0.3).beta == 0.3  # base options pass through **kwargs


@pytest.mark.slow
def test_iba_style_statistics_merge_across_ranks(tmp_path, tiny_clip_dir, pairs_dir):
    """Two gloo processes estimate on their own shards; the merged file equals a one-process estimate."""
    import os
    import subprocess

    def fit(name: str, devices: int) -> dict[str, torch.Tensor]:
        out = tmp_path / name
        args = [
            sys.executable, str(ROOT / "train.py"), "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
            "--model.init_args.backbone.init_args.model", str(tiny_clip_dir),
            "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
            "--model.init_args.steps", "1", "--model.init_args.copies", "1",
            "--model.init_args.text_bottleneck", "m2ib_lightning.IBAStyleM2IB",
            "--model.init_args.text_bottleneck.init_args.stats_file", str(out / "text.safetensors"),
            "--data.init_args.data_files", str(pairs_dir / "pairs.jsonl"), "--data.init_args.batch_size", "2",
            "--trainer.default_root_dir", str(out), "--writer.overlays", "0", "--trainer.devices", str(devices),
        ]
        if devices > 1:
            args += ["--trainer.strategy", "m2ib_ddp"]  # gloo on CPU
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        from safetensors.torch import load_file

        return load_file(str(out / "text.safetensors"))

    one, two = fit("one", 1), fit("two", 2)
    assert one["count"].sum() == two["count"].sum() > 0
    length = min(len(one["count"]), len(two["count"]))
    torch.testing.assert_close(two["count"][:length], one["count"][:length])
    torch.testing.assert_close(two["mean"][:length], one["mean"][:length], atol=1e-6, rtol=0)
    torch.testing.assert_close(two["m2"][:length], one["m2"][:length], atol=1e-5, rtol=1e-6)
