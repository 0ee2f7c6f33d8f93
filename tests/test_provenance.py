"""provenance.json: the stack, code and command behind a run, with secrets left out. Ray-free; the end-to-end
check (assert_run_records_itself) runs on the quickstart run in test_ray_launch.py."""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from conftest import REPO
from distft.launch.provenance import (
    PROVENANCE,
    build_provenance,
    finish_provenance,
    git_state,
    package_versions,
    redact_argv,
    start_provenance,
    with_placement,
)


def test_build_provenance_is_the_record_of_its_inputs():
    record = build_provenance(
        argv=["/venv/bin/distft", "train", "c.yaml", "run.hf_token=hf_abc123"], started_at="2026-11-27T10:00:00+00:00",
        hostname="head-1", cwd="/work", python="3.11.9", distft_version="0.1.0",
        versions={"torch": "2.13.0", "deepspeed": None}, git={"sha": "a" * 40, "dirty": True},
    )
    assert record == {
        "distft": "0.1.0",
        "python": "3.11.9",
        "packages": {"torch": "2.13.0", "deepspeed": None},
        "git": {"sha": "a" * 40, "dirty": True},
        "command": ["/venv/bin/distft", "train", "c.yaml", "run.hf_token=<redacted>"],
        "cwd": "/work",
        "hostname": "head-1",
        "started_at": "2026-11-27T10:00:00+00:00",
        "finished_at": None,
        "world_size": None,
        "worker_nodes": [],
    }


@pytest.mark.parametrize("arg, shown", [
    ("hf_token=hf_abc", "hf_token=<redacted>"),
    ("model.HF_TOKEN=hf_abc", "model.HF_TOKEN=<redacted>"),
    ("reward.api_key=sk-1", "reward.api_key=<redacted>"),
    ("db.Password=hunter2", "db.Password=<redacted>"),
    ("client_secret=s3", "client_secret=<redacted>"),
    ("--api-key=sk-1", "--api-key=<redacted>"),
    ("run.storage_path=s3://alice:pw123@minio:9000/runs", "run.storage_path=s3://alice:<redacted>@minio:9000/runs"),
    # Settings stay as typed: token counts are not tokens, and paths and plain values are not secrets.
    ("evaluate.max_new_tokens=8", "evaluate.max_new_tokens=8"),
    ("train.lr=1e-4", "train.lr=1e-4"),
    ("configs/quickstart.yaml", "configs/quickstart.yaml"),
    ("run.forward_env=[HF_TOKEN]", "run.forward_env=[HF_TOKEN]"),
])
def test_secret_looking_values_are_redacted_from_the_command(arg, shown):
    assert redact_argv(["distft", "train", arg]) == ["distft", "train", shown]


def test_an_option_named_like_a_secret_hides_the_next_argument():
    assert redact_argv(["distft", "x", "--hf-token", "hf_abc", "--max-new-tokens", "8"]) == [
        "distft", "x", "--hf-token", "<redacted>", "--max-new-tokens", "8"]


def test_placement_aggregates_the_stages_that_ran_in_this_launch():
    record = {"started_at": "t0", "finished_at": None, "world_size": None, "worker_nodes": []}
    summaries = [
        {"stage": "sft", "world_size": 4, "worker_nodes": ["n-old"], "skipped": True},  # an earlier launch's
        {"stage": "reward", "world_size": 2, "worker_nodes": ["n1", "n2"]},
        {"stage": "ppo", "world_size": 3, "worker_nodes": ["n2", "n3", "n1"]},
    ]
    done = with_placement(record, summaries, finished_at="t1")
    assert done == {"started_at": "t0", "finished_at": "t1", "world_size": 3, "worker_nodes": ["n1", "n2", "n3"]}
    assert record["worker_nodes"] == []  # the input is not modified
    assert with_placement(record, [])["world_size"] is None  # nothing ran (every stage skipped)


def test_package_versions_come_from_installed_metadata():
    import pydantic

    versions = package_versions(("pydantic", "no-such-distribution-xyz"))
    assert versions == {"pydantic": pydantic.VERSION, "no-such-distribution-xyz": None}


def _git(cwd, *args):
    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                          capture_output=True, text=True).stdout.strip()


def test_git_state_names_the_commit_and_whether_the_tree_changed(tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    (repo / "a.py").write_text("x = 1\n")
    _git(repo, "add", "a.py")
    _git(repo, "commit", "-q", "-m", "one")
    sha = _git(repo, "rev-parse", "HEAD")
    assert git_state(repo) == {"sha": sha, "dirty": False}
    (repo / "b.py").write_text("new code\n")  # untracked code counts: the run did not come from `sha` alone
    assert git_state(repo) == {"sha": sha, "dirty": True}
    (repo / "b.py").unlink()
    (repo / "a.py").write_text("x = 2\n")
    assert git_state(repo) == {"sha": sha, "dirty": True}

    plain = tmp_path / "plain"
    plain.mkdir()
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))  # do not find a repo above tmp_path
    assert git_state(plain) is None
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no git at all: still no error
    assert git_state(repo) is None


def test_each_launch_records_itself_and_keeps_the_earlier_ones(tmp_path, monkeypatch):
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    monkeypatch.setenv("DISTFT_PROBE_SECRET", "value-that-must-not-appear")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    run.mkdir()

    first = start_provenance(run, ["distft", "train", "c.yaml", "x.hf_token=hf_abc"])
    assert first["git"] is None and first["finished_at"] is None and first["python"] == platform.python_version()
    assert first["packages"]["torch"] == package_versions(("torch",))["torch"]
    assert set(first["packages"]) == {"torch", "ray", "transformers", "peft", "trl", "datasets", "accelerate",
                                      "deepspeed", "bitsandbytes"}
    summaries = [{"stage": "sft", "world_size": 2, "worker_nodes": ["n1", "n1"]}]
    done = finish_provenance(run, summaries)
    assert json.loads((run / PROVENANCE).read_text()) == done
    assert done["world_size"] == 2 and done["worker_nodes"] == ["n1"] and done["finished_at"]

    second = start_provenance(run, ["distft", "resume", str(run)])
    saved = json.loads((run / PROVENANCE).read_text())
    assert saved == second and saved["command"] == ["distft", "resume", str(run)]
    assert saved["earlier"] == [done]
    text = (run / PROVENANCE).read_text()
    assert "hf_abc" not in text and "value-that-must-not-appear" not in text
    assert finish_provenance(tmp_path / "never-started", summaries) is None
    assert start_provenance(tmp_path / "made-now", ["distft"])["command"] == ["distft"]  # launch() makes no run dir


SECRET_PROBE = {"DISTFT_PROBE_SECRET": "value-that-must-not-appear"}


def assert_run_records_itself(run, cmd: list[str]) -> None:
    """For a finished `distft train` run (the quickstart test, through the real CLI and Ray Train with
    2 workers, started with SECRET_PROBE in its environment): provenance.json at the end of the run,
    TensorBoard events from rank 0 only, and `distft runs show` reading it all back."""
    record = json.loads((run / PROVENANCE).read_text())
    (summary,) = json.loads((run / "summary.json").read_text())
    assert record["command"] == [str(REPO / "distft" / "cli.py"), *cmd[3:]]
    assert record["world_size"] == 2 == summary["world_size"]
    assert record["worker_nodes"] == list(dict.fromkeys(summary["worker_nodes"])) and record["finished_at"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    if head.returncode == 0:
        assert record["git"]["sha"] == head.stdout.strip()
    assert SECRET_PROBE["DISTFT_PROBE_SECRET"] not in (run / PROVENANCE).read_text()

    events = list((run / "sft" / "tensorboard").glob("events.out.tfevents.*"))
    # events.out.tfevents.<time>.<host>.<pid>.<n>: one writer process, rank 0's
    assert events and len({e.name.rsplit(".", 2)[-2] for e in events}) == 1

    show = subprocess.run([sys.executable, "-m", "distft.cli", "runs", "show", str(run)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert show.returncode == 0, show.stderr
    assert f"run         {run}  (finished)" in show.stdout
    assert f"stage sft (sft, lora, ddp): finished, {summary['steps']} steps on world size 2" in show.stdout
    assert f"tensorboard --logdir {run}" in show.stdout
