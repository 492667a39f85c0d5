"""The end of a run: one summary for the whole run, and an exit status that says whether it did its job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m2ib_lightning import load_attributions
from m2ib_lightning.run.cli import main

ROOT = Path(__file__).resolve().parents[1]


def fit_args(out, model_dir, data_file, *extra):
    return [
        "fit", "-c", str(ROOT / "configs" / "demo.yaml"),
        "--model.init_args.backbone.init_args.model", str(model_dir),
        "--model.init_args.vision_layer", "1", "--model.init_args.text_layer", "1",
        "--model.init_args.steps", "2", "--model.init_args.copies", "2",
        "--data.init_args.data_files", str(data_file), "--data.init_args.batch_size", "4",
        "--trainer.default_root_dir", str(out), "--writer.overlays", "0",
        *extra,
    ]


def data_with(pairs_dir, tmp_path, bad: int, name: str = "pairs.jsonl", duplicate: bool = False) -> Path:
    """The six pairs, the first ``bad`` of them with a missing image (absolute paths: any folder works)."""
    rows = [json.loads(line) for line in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows):
        row["image"] = str(pairs_dir / (f"images/missing-{i}.png" if i < bad else row["image"]))
    if duplicate:
        rows.insert(1, dict(rows[-1]))  # the last id again, second in the file
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_cli(capsys, args) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exit_info:
        code = exit_info.code
    out, err = capsys.readouterr()
    return code, out, err


def test_a_run_that_writes_nothing_fails_and_names_the_reasons(tmp_path, tiny_clip_dir, pairs_dir, capsys):
    data = data_with(pairs_dir, tmp_path, bad=6)
    code, out, err = run_cli(capsys, fit_args(tmp_path, tiny_clip_dir, data, "--data.init_args.max_skip_fraction",
                                              "1.0"))
    assert code == 3 and "Traceback" not in err
    assert "error: the run wrote no attribution record: all 6 rows it had were skipped" in err
    assert "6 x unreadable image: No such file or directory" in err
    assert out.count("M2IB summary (1 rank)") == 1 and "records written:   0" in out
    assert len(load_attributions(tmp_path / "attributions").skipped) == 6


def test_too_many_skips_fail_unless_allowed_and_a_rerun_of_a_finished_run_exits_0(tmp_path, tiny_clip_dir, pairs_dir,
                                                                                 capsys):
    data = data_with(pairs_dir, tmp_path, bad=4)
    code, out, err = run_cli(capsys, fit_args(tmp_path / "strict", tiny_clip_dir, data))
    assert code == 3
    assert ("error: the run skipped 4 of its 6 rows (66.7%), more than data.init_args.max_skip_fraction = 0.5 allows "
            "(top reasons: 4 x unreadable image") in err
    assert "the 2 records written are kept" in err
    assert "  skipped:           4 of 6 rows (66.7%)" in out
    assert len(load_attributions(tmp_path / "strict" / "attributions")) == 2
    # The same data with the limit raised (1.0: no limit) passes.
    assert run_cli(capsys, fit_args(tmp_path / "lenient", tiny_clip_dir, data,
                                    "--data.init_args.max_skip_fraction", "0.7"))[0] == 0
    # Rerunning a finished run (everything passed over) exits 0, whatever the first run's outcome was.
    code, out, err = run_cli(capsys, fit_args(tmp_path / "strict", tiny_clip_dir, data))
    assert code == 0, err
    assert "finished earlier:  6 passed over (2 records, 4 skipped)" in out and "records written:   0" in out


def test_max_skip_fraction_is_validated(tmp_path, tiny_clip_dir, pairs_dir, capsys):
    code, _, err = run_cli(capsys, fit_args(tmp_path, tiny_clip_dir, pairs_dir / "pairs.jsonl",
                                            "--data.init_args.max_skip_fraction", "1.5"))
    assert code == 2 and "max_skip_fraction must be a number in [0, 1], got 1.5" in err


@pytest.mark.slow
def test_two_ranks_print_one_summary_find_duplicates_across_ranks_and_fail_together(tmp_path, tiny_clip_dir,
                                                                                    pairs_dir):
    """2 gloo processes through the CLI (m2ib_ddp): the counts of both ranks in one summary, printed
    once; an id that both ranks read (rows 1 and 2 of one file go to ranks 1 and 0) is reported."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    two = ["--trainer.devices", "2", "--trainer.strategy", "m2ib_ddp", "--trainer.accelerator", "cpu",
           "--data.init_args.batch_size", "1", "--trainer.enable_progress_bar", "false"]

    def run(out, data):
        cmd = [sys.executable, str(ROOT / "train.py"), *fit_args(out, tiny_clip_dir, data, *two)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)

    data = data_with(pairs_dir, tmp_path, bad=1, duplicate=True)  # 7 rows: 1 bad, the last id twice
    proc = run(tmp_path / "dup", data)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("M2IB summary") == 1 and "M2IB summary (2 ranks)" in proc.stdout
    assert "  records written:   6" in proc.stdout  # 5 ids + the extra copy (both ranks wrote it)
    assert "  skipped:           1 of 7 rows (14.3%)" in proc.stdout
    assert "  duplicate ids:     1 (0 not written again; 1 written by two ranks" in proc.stdout
    records = load_attributions(tmp_path / "dup" / "attributions")
    twice = json.loads(data.read_text().splitlines()[1])["id"]
    assert len(records) == 5 and records.duplicates == [twice] and len(records.skipped) == 1
    (reason,) = records.duplicate_entries[twice]
    assert reason.startswith("duplicate id: written by more than one rank") and "rank00001-" in reason

    proc = run(tmp_path / "bad", data_with(pairs_dir, tmp_path, bad=6, name="bad.jsonl"))
    assert proc.returncode == 3, proc.stderr[-4000:]
    assert proc.stderr.count("error: the run wrote no attribution record: all 6 rows") == 1  # printed by rank 0
    assert proc.stdout.count("M2IB summary (2 ranks)") == 1


def test_results_count_a_repeated_id_once(tmp_path, tiny_clip_dir, pairs_dir, capsys):
    # The data holds one id twice (one reader sees both): the evaluation's totals must weigh each written
    # record once, as the records do, not the dropped second copy too.
    data = data_with(pairs_dir, tmp_path, bad=0, duplicate=True)
    code, _, _ = run_cli(capsys, fit_args(tmp_path, tiny_clip_dir, data, "--evaluation.enabled", "true",
                                          "--evaluation.metrics", "[image/confidence_drop]"))
    assert code == 0
    records = load_attributions(tmp_path / "attributions")
    results = json.loads((tmp_path / "attributions" / "results.json").read_text())
    assert len(records) == 6 and results["samples"]["image/confidence_drop"] == 6
    values = [records[i].metrics["image/confidence_drop"] for i in records]
    assert results["metrics"]["image/confidence_drop"] == pytest.approx(sum(values) / 6)


def test_will_write_follows_what_add_writes(tmp_path):
    import torch

    from m2ib_lightning.outputs.rundir import RunDirectory
    from m2ib_lightning.records import Explanation

    run = RunDirectory(tmp_path, {"method": "m"})
    run.add(Explanation(ids=["a"], similarity=torch.zeros(1)))
    assert run.will_write(["a", "b", "b", "c"]) == [False, True, False, True]
    run.close()
