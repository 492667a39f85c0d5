"""The LightningCLI end to end: configs parse, fit writes complete outputs, bad input is reported clearly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from m2ib_lightning import load_attributions
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def fit_args(tmp_path, model_dir, data_file, *extra):
    return [
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(model_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "3", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(data_file), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(tmp_path),
        *extra,
    ]


def input_ids(data_file):
    return [json.loads(line)["id"] for line in Path(data_file).read_text().splitlines()]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_parses(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    for section in ("model:", "data:", "trainer:", "writer:"):
        assert section in printed


def test_relative_interpolation_follows_command_line_overrides(tmp_path, capsys):
    config = tmp_path / "interp.yaml"
    config.write_text((ROOT / "configs" / "demo.yaml").read_text()
                      + "  output_dir: ${..trainer.default_root_dir}/maps\n")
    with pytest.raises(SystemExit):
        main(["fit", "-c", str(config), "--trainer.default_root_dir", "/somewhere/else", "--print_config"])
    assert "output_dir: /somewhere/else/maps" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_fit_writes_every_id(tmp_path, tiny_clip_dir, pairs_dir, precision):
    data_file = pairs_dir / "pairs.jsonl"
    cli = main(fit_args(tmp_path, tiny_clip_dir, data_file, "--trainer.precision", precision))
    assert "pairs_per_s" in cli.trainer.callback_metrics
    records = load_attributions(tmp_path / "attributions")
    assert sorted(records) == sorted(input_ids(data_file)) and not records.skipped and not records.duplicates
    for rec in records.values():
        assert rec.image_map.shape == (64, 64) and rec.patch_scores.shape == (4, 4)
        assert rec.image_map.min() == 0 and rec.image_map.max() == 1
        assert rec.tokens[0] == "<|startoftext|>" and rec.tokens[-1] == "<|endoftext|>"
        assert len(rec.text_scores) == len(rec.tokens) and torch.isfinite(torch.tensor(rec.text_scores)).all()
        assert -1 <= rec.similarity <= 1
    assert records.metadata["vision_layer"] == 1 and records.metadata["steps"] == 3
    assert len(list((tmp_path / "attributions" / "overlays").glob("*.png"))) == 4


def test_rerun_passes_over_finished_samples_unless_told_not_to(tmp_path, tiny_clip_dir, pairs_dir):
    data_file = pairs_dir / "pairs.jsonl"
    main(fit_args(tmp_path, tiny_clip_dir, data_file))
    main(fit_args(tmp_path, tiny_clip_dir, data_file))  # resume: nothing left to do
    shards = sorted((tmp_path / "attributions" / "shards").iterdir())
    assert [s.name for s in shards] == ["rank00000-000000.parquet"]
    main(fit_args(tmp_path, tiny_clip_dir, data_file, "--writer.resume", "false"))  # recompute, append
    shards = sorted((tmp_path / "attributions" / "shards").iterdir())
    assert [s.name for s in shards] == ["rank00000-000000.parquet", "rank00000-000001.parquet"]
    records = load_attributions(tmp_path / "attributions")
    assert len(records) == len(input_ids(data_file)) and sorted(records.duplicates) == sorted(records)


def test_rerun_with_other_settings_into_the_same_directory_is_refused(tmp_path, tiny_clip_dir, pairs_dir, capsys):
    data_file = pairs_dir / "pairs.jsonl"
    main(fit_args(tmp_path, tiny_clip_dir, data_file, "--data.init_args.limit", "2"))
    stored = load_attributions(tmp_path / "attributions").metadata
    assert stored["steps"] == 3 and stored["bottlenecks"]["vision"]["beta"] == 0.1 and len(stored["weights"]) == 16
    for override in (["--model.init_args.steps", "4"],
                     ["--model.init_args.vision_bottleneck", "m2ib_lightning.M2IB",
                      "--model.init_args.vision_bottleneck.init_args.beta", "0.5"],
                     ["--trainer.precision", "bf16-mixed"]):
        with pytest.raises(SystemExit) as exit_info:
            main(fit_args(tmp_path, tiny_clip_dir, data_file, *override))
        assert exit_info.value.code == 2
        message = capsys.readouterr().err
        assert "already holds maps made with other settings" in message and "another writer.output_dir" in message
    # What does not change the maps may change: e.g. a smaller chunk size after running out of memory,
    # or the same weights at another path.
    moved = tmp_path / "moved-checkpoint"
    shutil.copytree(tiny_clip_dir, moved)
    main(fit_args(tmp_path, moved, data_file, "--model.init_args.chunk_size", "2", "--data.init_args.limit", "4"))
    assert len(load_attributions(tmp_path / "attributions")) == 4
    # The same weights with another tokenizer give other token ids, so other maps: refused.
    from transformers import AutoTokenizer

    retokenized = tmp_path / "retokenized-checkpoint"
    shutil.copytree(tiny_clip_dir, retokenized)
    tokenizer = AutoTokenizer.from_pretrained(retokenized)
    tokenizer.add_tokens(["zzqq"])
    tokenizer.save_pretrained(retokenized)
    with pytest.raises(SystemExit):
        main(fit_args(tmp_path, retokenized, data_file))
    assert "tokenizer: stored" in capsys.readouterr().err
    # An optimiser given on the command line is recorded with its arguments, and compared: the same
    # command again (a requeued job) is accepted, another learning rate is not.
    sgd = tmp_path / "sgd"
    for lr, limit in (("0.1", "2"), ("0.1", "4")):
        main(fit_args(sgd, tiny_clip_dir, data_file, "--model.init_args.optimizer", "torch.optim.SGD",
                      "--model.init_args.optimizer.lr", lr, "--data.init_args.limit", limit))
    assert len(load_attributions(sgd / "attributions")) == 4
    assert load_attributions(sgd / "attributions").metadata["optimizer"]["kwargs"]["lr"] == 0.1
    with pytest.raises(SystemExit):
        main(fit_args(sgd, tiny_clip_dir, data_file, "--model.init_args.optimizer", "torch.optim.SGD",
                      "--model.init_args.optimizer.lr", "0.2"))
    assert "optimizer" in capsys.readouterr().err


def test_settings_missing_from_older_outputs_are_not_compared(tmp_path):
    # A directory written before a setting was recorded (e.g. the tokenizer's fingerprint) stays resumable.
    import torch

    from m2ib_lightning.outputs.rundir import RunDirectory
    from m2ib_lightning.records import Explanation

    def written(path, metadata):
        run = RunDirectory(path, metadata)
        run.add(Explanation(ids=["x"], similarity=torch.zeros(1)))
        run.close()

    ours = {"method": "m", "steps": 10, "weights": "abc", "tokenizer": {"vocab": "v1", "max_length": 77}}
    written(tmp_path / "old", {"method": "m", "steps": 10, "weights": "abc"})
    RunDirectory(tmp_path / "old", ours)
    written(tmp_path / "other", {"method": "m", "steps": 10, "weights": "abc",
                                 "tokenizer": {"vocab": "v0", "max_length": 77}})
    with pytest.raises(ValueError, match=r"tokenizer: stored .*'v0'.*this run .*'v1'"):
        RunDirectory(tmp_path / "other", ours)


def test_maps_made_with_the_old_noise_are_not_mixed_with_new_ones(tmp_path):
    """Outputs of before the counter-based noise record no ``noise`` setting: they count as made with
    per-sample generators, so a rerun into their directory is refused instead of mixing maps."""
    from m2ib_lightning.methods.noise import LEGACY_NOISE, NOISE_FUNCTION
    from m2ib_lightning.outputs.rundir import RunDirectory
    from m2ib_lightning.records import Explanation

    old = {"method": "m2ib_lightning.methods.m2ib.M2IBAttribution", "steps": 10, "weights": "abc"}
    run = RunDirectory(tmp_path, old)
    run.add(Explanation(ids=["x"], similarity=torch.zeros(1)))
    run.close()
    with pytest.raises(ValueError, match=rf"noise: stored '{LEGACY_NOISE}', this run '{NOISE_FUNCTION}'"):
        RunDirectory(tmp_path, {**old, "noise": NOISE_FUNCTION})
    RunDirectory(tmp_path, old)  # a method without the setting (a baseline) compares as before


def test_strategy_auto_resolves_to_m2ib_ddp_on_several_devices_or_nodes():
    from m2ib_lightning.methods.strategy import auto_strategy, device_count

    assert device_count("cpu", 2) == 2 and device_count("cpu", "3") == 3 and device_count("cpu", "auto") == 1
    assert auto_strategy("auto", "cpu", 2) == "m2ib_ddp"
    assert auto_strategy("auto", "cpu", 1, num_nodes=2) == "m2ib_ddp"
    assert auto_strategy("auto", "cpu", 1) is None  # one device: Lightning's single-device strategy
    assert auto_strategy("ddp", "cpu", 2) is None  # asked for explicitly: left as given (and refused)
    assert auto_strategy("m2ib_ddp_spawn", "cpu", 2) is None


def test_rerun_recomputes_the_samples_of_a_damaged_shard(tmp_path, tiny_clip_dir, pairs_dir):
    data_file = pairs_dir / "pairs.jsonl"
    main(fit_args(tmp_path, tiny_clip_dir, data_file, "--writer.shard_size", "2"))
    shards = tmp_path / "attributions" / "shards"
    damaged = sorted(shards.glob("rank*.parquet"))[1]
    lost = set(pq.read_table(damaged, columns=["id"]).column("id").to_pylist())
    damaged.write_bytes(b"PAR1 not a parquet file")
    assert lost and not lost & set(load_attributions(tmp_path / "attributions"))
    main(fit_args(tmp_path, tiny_clip_dir, data_file, "--writer.shard_size", "2"))
    records = load_attributions(tmp_path / "attributions")
    assert sorted(records) == sorted(input_ids(data_file)) and not records.duplicates and not records.unreadable
    assert (shards / f"unreadable-{damaged.name}").is_file()  # kept aside for inspection


def test_checkpoint_holds_no_backbone_weights(tmp_path, tiny_clip_dir, pairs_dir, backbone):
    cli = main(fit_args(tmp_path, tiny_clip_dir, pairs_dir / "pairs.jsonl", "--trainer.enable_checkpointing", "true"))
    # The functional loop never calls the wrapped optimiser's step; it counts its updates itself (2 per
    # batch of the 6 pairs in 2 batches), else the step stays 0 and ModelCheckpoint saves nothing.
    assert cli.trainer.global_step == 2 * 2
    (ckpt_path,) = (tmp_path / "checkpoints").glob("*.ckpt")
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
    state = ckpt["state_dict"]
    assert not any("backbone" in k or "model." in k for k in state)
    assert sum(v.numel() for v in state.values() if torch.is_tensor(v)) == 0
    backbone_numel = sum(p.numel() for p in backbone.parameters())
    assert ckpt_path.stat().st_size < backbone_numel  # bytes < parameter count: no weights inside
    cli.model.load_state_dict(state)  # and it loads back


def test_bad_samples_are_listed_not_fatal(tmp_path, tiny_clip_dir, pairs_dir):
    data = tmp_path / "data"
    shutil.copytree(pairs_dir, data)
    (data / "images" / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rows = [json.loads(line) for line in (data / "pairs.jsonl").read_text().splitlines()]
    rows[1]["caption"] = "   "
    rows.append({"id": "corrupt", "image": "images/corrupt.png", "caption": "a red circle"})
    rows.append({"id": "missing", "image": "images/nope.png", "caption": "a red circle"})
    (data / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    cli = main(fit_args(tmp_path, tiny_clip_dir, data / "pairs.jsonl"))
    records = load_attributions(tmp_path / "attributions")
    bad = {rows[1]["id"], "corrupt", "missing"}
    assert set(records.skipped) == bad
    assert set(records) | set(records.skipped) == {r["id"] for r in rows} and not set(records) & bad
    assert "caption" in records.skipped[rows[1]["id"]]
    assert "image" in records.skipped["corrupt"] and "image" in records.skipped["missing"]
    assert cli.trainer.callback_metrics["skipped"] == 3


@pytest.mark.parametrize(
    "override, message",
    [
        (["--model.init_args.vision_layer", "7"], "vision bottleneck layer must be an int in [-1, 2]"),
        (["--model.init_args.backbone.init_args.model", "/no/such/checkpoint"], "/no/such/checkpoint"),
        (["--data.init_args.data_files", "/no/such/pairs.jsonl"], "/no/such/pairs.jsonl does not exist"),
        (["--data.init_args.batch_size", "0"], "batch_size must be an int >= 1, got 0"),
    ],
)
def test_bad_settings_end_with_a_clear_message(tmp_path, tiny_clip_dir, pairs_dir, capsys, override, message):
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, tiny_clip_dir, pairs_dir / "pairs.jsonl", *override))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_roco_config_offline_names_what_could_not_be_fetched(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", str(ROOT / "configs" / "roco.yaml")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "flaviagiammarino/pubmed-clip-vit-base-patch32" in err and "ffline" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("strategy", ["ddp", "ddp_spawn", "fsdp"])
def test_gradient_averaging_strategies_are_refused(strategy):
    """DDP, FSDP and the like reduce or shard the mask gradients across ranks: never for attribution."""
    from types import SimpleNamespace

    from lightning.pytorch.strategies import SingleDeviceStrategy, StrategyRegistry

    from m2ib_lightning import ConfigError, IndependentDDPStrategy
    from m2ib_lightning.methods.strategy import check_strategy

    chosen = StrategyRegistry.get(strategy)
    with pytest.raises(ConfigError, match="use `--trainer.strategy m2ib_ddp`"):
        check_strategy(SimpleNamespace(strategy=chosen))
    check_strategy(SimpleNamespace(strategy=IndependentDDPStrategy()))  # ours passes
    check_strategy(SimpleNamespace(strategy=SingleDeviceStrategy(device="cpu")))


def test_plain_ddp_from_the_cli_ends_with_a_message(tmp_path, tiny_clip_dir, pairs_dir, capsys, monkeypatch):
    import os

    import torch.distributed as dist

    monkeypatch.delenv("MASTER_PORT", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(fit_args(tmp_path, tiny_clip_dir, pairs_dir / "pairs.jsonl", "--trainer.strategy", "ddp"))
    assert exit_info.value.code == 2 and "m2ib_ddp" in capsys.readouterr().err
    # Refused before any process group or port was set up (which would outlive the run here).
    assert not dist.is_initialized() and "MASTER_PORT" not in os.environ
