"""The command line as users run it (a subprocess): plans, refusals, eval and generate.

The table of bad inputs, command by command, is tests/test_bad_inputs.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_jsonl


def distft(*args, cwd=REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture()
def config(tmp_path, alpaca_rows) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"scaling": {"num_workers": 1}, "stage": "sft", "data": {"train": str(data)}}))
    return path


def test_validate_prints_the_plan(config):
    r = distft("validate", config, "train.global_batch_size=16", "train.micro_batch_size=4")
    assert r.returncode == 0, r.stderr
    assert "global_batch_size 16 = micro_batch_size 4 x 1 workers x 4 accumulation steps" in r.stdout
    assert "200 rows, format alpaca" in r.stdout and "config OK" in r.stdout


def test_data_of_the_wrong_kind_for_its_stage_is_refused_before_launch():
    prefs, facts = REPO / "configs" / "data" / "facts_prefs_train.jsonl", REPO / "configs" / "data" / "facts_train.jsonl"
    r = distft("validate", REPO / "configs" / "quickstart.yaml", f"data.train={prefs}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"data.train: {prefs} holds preference pairs (chosen/rejected), which stage sft cannot train on" in r.stderr
    r = distft("validate", REPO / "configs" / "reward.yaml", f"data.train={facts}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"data.train: {facts} has format alpaca, but stage reward trains on preference pairs" in r.stderr


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\n data: x\n")
    r = distft("validate", bad)
    assert r.returncode == 2 and "malformed YAML at line 2" in r.stderr and "Traceback" not in r.stderr


def test_train_refuses_to_overwrite_an_existing_run(config, tmp_path):
    run = tmp_path / "runs" / "keep"
    run.mkdir(parents=True)
    (run / "precious.txt").write_text("results")
    r = distft("train", config, f"run.output_dir={tmp_path / 'runs'}", "run.name=keep")
    assert r.returncode == 2 and "already exists" in r.stderr
    assert (run / "precious.txt").read_text() == "results"


def test_help_lists_every_command():
    r = distft("--help")
    for cmd in ("train", "validate", "tiny-model", "generate", "eval"):
        assert cmd in r.stdout


def test_eval_and_generate_commands_on_a_model_directory(tiny_random, tmp_path, capsys):
    from distft.cli import main

    rows = [{"prompt": "The red fox", "completion": " ran"}, {"prompt": "A blue owl", "completion": " sat"}]
    data = write_jsonl(tmp_path / "held.jsonl", rows)
    assert main(["eval", str(tiny_random), "--data", str(data), "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "exact match:" in out and "/2) on" in out

    assert main(["generate", str(tiny_random), "--prompt", "Which animal?", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("> Which animal?")


def test_eval_on_a_missing_model_is_a_clear_error(tmp_path, capsys):
    from distft.cli import main

    data = write_jsonl(tmp_path / "held.jsonl", [{"prompt": "a", "completion": "b"}])
    assert main(["eval", str(tmp_path / "no-model"), "--data", str(data)]) == 2
    assert "no model at" in capsys.readouterr().err


def test_unreachable_cluster_fails_fast_and_overrides_may_follow_options(config, tmp_path):
    r = distft("train", config, "--address", "127.0.0.1:1", f"run.output_dir={tmp_path / 'runs'}")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run.address: nothing answers at 127.0.0.1:1" in r.stderr
    assert not (tmp_path / "runs").exists()  # nothing was created for a run that cannot start
