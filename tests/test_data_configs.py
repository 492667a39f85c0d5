"""The shipped data configs: each parses into the datamodule it describes; the local-folder one runs end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m2ib_lightning import ImageTextDataModule, load_attributions
from m2ib_lightning.data.fetch import FetchConfig
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2", "--trainer.accelerator", "cpu"]


def data_section(config: str) -> dict:
    import yaml

    return yaml.safe_load((ROOT / "configs" / config).read_text())["data"]["init_args"]


@pytest.mark.parametrize("config", ["roco.yaml", "cc3m.yaml", "local_folder.yaml"])
def test_data_sections_build_the_datamodule(config):
    kwargs = data_section(config)
    if "fetch" in kwargs:
        kwargs["fetch"] = FetchConfig(**kwargs["fetch"])
    dm = ImageTextDataModule(**kwargs)
    assert dm.batch_size >= 1 and isinstance(dm.fetch, FetchConfig)


def test_cc3m_reads_urls_without_ids():
    kwargs = data_section("cc3m.yaml")
    assert kwargs["image_column"] == "image_url" and kwargs["id_column"] is None
    assert kwargs["fetch"]["timeout"] > 0 and kwargs["fetch"]["max_bytes"] > 0


def test_local_folder_config_runs_end_to_end(tmp_path, tiny_clip_dir, monkeypatch):
    sample = ROOT / "data" / "local_folder"
    expected = [json.loads(line)["id"] for line in (sample / "captions.jsonl").read_text().splitlines()]
    monkeypatch.chdir(ROOT)  # the config's data path is relative to the repository root, as in the README
    main(["fit", "-c", "configs/local_folder.yaml", "--model.init_args.backbone.init_args.model",
          str(tiny_clip_dir), "--trainer.default_root_dir", str(tmp_path), *TINY])
    records = load_attributions(tmp_path / "attributions")
    assert sorted(records) == sorted(expected) and not records.skipped and not records.repaired
    assert all(rec.image_map.shape == (64, 64) for rec in records.values())


def test_data_pipeline_benchmark_runs_in_quick_mode(capsys):
    """The benchmark's numbers are printed, never asserted: this only checks that it runs."""
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "data_pipeline.py"), run_name="benchmark")
    result = bench["main"](["--quick"])
    out = capsys.readouterr().out
    assert "pairs/s" in out and "x attribution" in out and "target" in out
    assert set(result["pipeline"]) == {"parquet/0", "folder/0"} and result["attribution"] > 0


def test_data_pipeline_benchmark_times_the_row_stream(capsys):
    """``--rows``: the row stream on clean files, with and without recovery, and with one bad row."""
    import runpy

    bench = runpy.run_path(str(ROOT / "benchmarks" / "data_pipeline.py"), run_name="benchmark")
    result = bench["main"](["--rows", "300", "--rounds", "1"])
    out = capsys.readouterr().out
    assert "+recovery" in out and "one bad row" in out
    assert set(result) == {"jsonl", "csv", "parquet"}
    assert all(v["recovered"] > 0 and v["stream"] > 0 for v in result.values())
