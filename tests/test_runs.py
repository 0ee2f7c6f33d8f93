"""`distft runs show|list` on run directories made here: finished, interrupted, and paths that are not runs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO
from distft.cli import main
from distft.config import dump_config, load_config
from distft.distributed.checkpoint import build_manifest, write_manifest
from distft.launch.provenance import PROVENANCE, build_provenance, with_placement
from distft.launch.runs import list_runs, read_run, render_run, render_run_list

NODE_A, NODE_B = "bb63bdb2b137" + "0" * 44, "c0ffee123456" + "1" * 44
VERSIONS = {"torch": "2.13.0+cpu", "ray": "2.60.0", "transformers": "5.23.0", "peft": "0.21.2", "trl": "1.16.0",
            "datasets": "5.2.0", "accelerate": "1.15.0", "deepspeed": "0.19.8", "bitsandbytes": None}

# Stage summaries with the keys the stages write (from a real rlhf_quickstart pipeline run).
SFT = {"stage": "sft", "kind": "sft", "method": "full", "steps": 20, "train_loss": 2.3207,
       "first_logged_loss": 9.6287, "last_logged_loss": 1.3294, "eval_loss": 0.95902, "world_size": 2,
       "strategy": "ddp", "wall_seconds": 12.8, "exact_match_before": 0.0, "exact_match_after": 0.32833,
       "eval_items": 600, "stopped_early_at": None}
REWARD = {"stage": "reward", "kind": "reward", "method": "full", "steps": 1800, "first_logged_loss": 0.69575,
          "last_logged_loss": 0.0035005, "eval_loss": 0.016685, "world_size": 2, "strategy": "ddp",
          "wall_seconds": 168.4, "eval_accuracy": 0.9875, "eval_margin": 13.645, "pairwise_accuracy_before": 0.34833,
          "pairwise_accuracy_after": 0.98667, "mean_margin_before": -0.0136, "mean_margin_after": 13.997,
          "eval_pairs": 600}
PPO = {"stage": "ppo", "kind": "ppo", "method": "full", "strategy": "ddp", "world_size": 2, "steps": 100,
       "reward_first": -4.077, "reward_last": 0.80329, "kl_last": 1.6253, "kl_target": 1.0,
       "exact_match_before": 0.32833, "exact_match_after": 0.55833, "heldout_reward_before": -1.2267,
       "heldout_reward_after": 1.9506, "eval_items": 600, "wall_seconds": 203.5}


def make_run(path: Path, stages: list[dict], *, finished: bool, launches: int = 1) -> Path:
    """A run directory of configs/rlhf_quickstart.yaml as `distft pipeline` leaves it: the stages in `stages`
    finished (their summary.json and export), provenance of `launches` launches."""
    path.mkdir(parents=True)
    dump_config(load_config(REPO / "configs" / "rlhf_quickstart.yaml"), path / "config.yaml")
    for s in stages:
        stage_dir = path / s["stage"]
        (stage_dir / "final").mkdir(parents=True)
        (stage_dir / "tensorboard").mkdir()
        s = {**s, "model_dir": str(stage_dir / "final")}
        (stage_dir / "summary.json").write_text(json.dumps(s))
    records = []
    for i in range(launches):
        record = build_provenance(
            argv=["distft", "pipeline", "configs/rlhf_quickstart.yaml"], started_at=f"2026-11-2{6 + i}T16:11:00+00:00",
            hostname="head-1", cwd="/work/main", python="3.11.9", distft_version="0.1.0", versions=VERSIONS,
            git={"sha": "006db13abcdef0123456789abcdef0123456789a", "dirty": True})
        records.append(record)
    current = records[-1]
    if finished:
        top = [{**s, "model_dir": str(path / s["stage"] / "final"), "worker_nodes": [NODE_A, NODE_B]} for s in stages]
        (path / "summary.json").write_text(json.dumps(top))
        (path / "final").symlink_to(Path(stages[-1]["stage"]) / "final")
        current = with_placement(current, top, finished_at="2026-11-26T16:18:44+00:00")
    if records[:-1]:
        current["earlier"] = records[:-1]
    (path / PROVENANCE).write_text(json.dumps(current))
    return path


def seal_checkpoint(stage_dir: Path, step: int) -> Path:
    ckpt = stage_dir / "checkpoints" / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"weights")
    write_manifest(ckpt, build_manifest(ckpt, step=step, world_size=2, strategy="ddp"))
    return ckpt


@pytest.fixture()
def finished_run(tmp_path) -> Path:
    return make_run(tmp_path / "runs" / "rlhf_quickstart", [SFT, REWARD, PPO], finished=True)


@pytest.fixture()
def unfinished_run(tmp_path) -> Path:
    """Interrupted in the reward stage after its step-20 checkpoint; the resume was interrupted too."""
    run = make_run(tmp_path / "runs" / "rlhf_interrupted", [SFT], finished=False, launches=2)
    reward = run / "reward"
    seal_checkpoint(reward, 10)
    seal_checkpoint(reward, 20)
    (reward / "checkpoints" / ".partial" / "checkpoint-30").mkdir(parents=True)  # never sealed: not a checkpoint
    (reward / "metrics.jsonl").write_text("".join(json.dumps({"time": 1.0, "step": s, "loss": 0.5}) + "\n"
                                                  for s in range(1, 28)) + '{"time": 2.0, "st')  # cut mid-write
    return run


def test_show_a_finished_run(finished_run):
    run = str(finished_run)
    assert render_run(read_run(finished_run)) == "\n".join([
        f"run         {run}  (finished)",
        "started     2026-11-26T16:11:00+00:00 on head-1, finished 2026-11-26T16:18:44+00:00",
        "command     distft pipeline configs/rlhf_quickstart.yaml",
        "code        distft 0.1.0, git 006db13abcde with uncommitted changes",
        ("stack       python 3.11.9, torch 2.13.0+cpu, ray 2.60.0, transformers 5.23.0, peft 0.21.2, trl 1.16.0, "
         "datasets 5.2.0, accelerate 1.15.0, deepspeed 0.19.8, bitsandbytes -"),
        "workers     world size 2 on 2 Ray node(s): bb63bdb2b137, c0ffee123456",
        "",
        "stage sft (sft, full, ddp): finished, 20 steps on world size 2, 13s",
        "  train loss 9.629 -> 1.329, eval loss 0.959",
        "  held-out exact match 0.0% -> 32.8% (600 items)",
        f"  model     {run}/sft/final",
        "stage reward (reward, full, ddp): finished, 1800 steps on world size 2, 168s",
        "  train loss 0.6957 -> 0.003501, eval loss 0.01668",
        "  held-out pairwise accuracy 34.8% -> 98.7% (margin 14.00, 600 pairs)",
        "  reward accuracy 98.8% on the eval split",
        f"  model     {run}/reward/final",
        "stage ppo (ppo, full, ddp): finished, 100 rollouts on world size 2, 204s",
        "  held-out exact match 32.8% -> 55.8% (600 items)",
        "  rollout reward -4.077 -> 0.803, KL 1.625 (target 1)",
        "  held-out mean reward -1.227 -> 1.951",
        f"  model     {run}/ppo/final",
        "",
        f"model       {run}/final -> ppo/final",
        f"metrics     <stage>/metrics.jsonl; tensorboard --logdir {run}",
    ])


def test_show_an_unfinished_run_names_its_latest_checkpoint_and_the_resume_command(unfinished_run):
    run = str(unfinished_run)
    out = render_run(read_run(unfinished_run))
    lines = out.splitlines()
    assert lines[0] == f"run         {run}  (unfinished)"
    assert "started     2026-11-27T16:11:00+00:00 on head-1, not finished" in lines
    assert (f"earlier     1 earlier launch(es) in this directory (first 2026-11-26T16:11:00+00:00); "
            f"see {run}/provenance.json") in lines
    reward_at = lines.index("stage reward (reward, full, ddp): unfinished, last logged step 27")
    assert lines[reward_at + 1] == f"  latest checkpoint {run}/reward/checkpoints/checkpoint-20 (step 20)"
    assert lines[reward_at + 2] == "stage ppo (ppo, full, ddp): not started"
    assert lines[-1] == f"resume      distft resume {run}   (unless it is still running)"
    assert "model       " not in out  # no export yet


def test_an_unfinished_stage_without_a_checkpoint_says_a_resume_starts_it_afresh(unfinished_run):
    for ckpt in (unfinished_run / "reward" / "checkpoints").glob("checkpoint-*"):
        (ckpt / "distft_manifest.json").unlink()  # never sealed: resume would not use them
    lines = render_run(read_run(unfinished_run)).splitlines()
    at = lines.index("stage reward (reward, full, ddp): unfinished, last logged step 27")
    assert lines[at + 1] == "  no checkpoint yet (a resume starts this stage afresh)"


def test_a_run_from_before_provenance_still_shows(finished_run):
    (finished_run / PROVENANCE).unlink()
    lines = render_run(read_run(finished_run)).splitlines()
    assert lines[1] == "provenance  not recorded (no provenance.json: a run from before distft wrote one)"
    assert "stage sft (sft, full, ddp): finished, 20 steps on world size 2, 13s" in lines


def test_list_shows_every_run_oldest_first(finished_run, unfinished_run, tmp_path):
    (tmp_path / "runs" / "notes").mkdir()  # not a run: no config.yaml
    old = make_run(tmp_path / "runs" / "old", [SFT], finished=False)
    (old / PROVENANCE).unlink()
    os.utime(old / "config.yaml", (1e9, 1e9))  # no provenance: started when its config was written (2001)
    started = __import__("datetime").datetime.fromtimestamp(1e9).strftime("%Y-%m-%d %H:%M")
    assert render_run_list(tmp_path / "runs", list_runs(tmp_path / "runs")) == "\n".join([
        "run               stages          status      last step  started",
        f"old               sft,reward,ppo  unfinished  sft 20     {started}",
        "rlhf_interrupted  sft,reward,ppo  unfinished  reward 27  2026-11-26 16:11",
        "rlhf_quickstart   sft,reward,ppo  finished    ppo 100    2026-11-26 16:11",
    ])


def test_the_runs_command_prints_what_the_formatter_renders(finished_run, tmp_path, capsys):
    assert main(["runs", "show", str(finished_run)]) == 0
    assert capsys.readouterr().out == render_run(read_run(finished_run)) + "\n"
    assert main(["runs", "list", str(tmp_path / "runs")]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["rlhf_quickstart", "sft,reward,ppo", "finished", "ppo", "100", "2026-11-26", "16:11"]


@pytest.mark.parametrize("args, message", [
    (["runs", "show", "{tmp}/nope"], "error: no run directory at {tmp}/nope. Fix: pass runs/<run>"),
    (["runs", "show", "{tmp}"], "error: {tmp} is not a distft run directory (no config.yaml). Fix: pass runs/<run>"),
    (["runs", "show"], "error: distft runs show needs a run directory. Fix: distft runs show runs/<run>."),
    (["runs", "list", "{tmp}/nope"], "error: no runs directory at {tmp}/nope. Fix: pass the directory that holds"),
    (["runs", "list", "{tmp}/runs/rlhf_quickstart"],
     "error: {tmp}/runs/rlhf_quickstart is a run directory, not a directory of runs. Fix: distft runs show"),
])
def test_a_path_that_is_not_a_run_is_one_clear_error(finished_run, tmp_path, capsys, args, message):
    tmp = str(tmp_path.resolve())
    assert main([a.format(tmp=tmp) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(tmp=tmp)) and err.count("\n") == 1 and "Traceback" not in err


def test_a_search_directory_points_at_its_trials(tmp_path, capsys):
    (tmp_path / "search.json").write_text("{}")
    assert main(["runs", "show", str(tmp_path)]) == 2
    assert f"is a `distft tune` search, not a run. Fix: its trials are runs: distft runs list {tmp_path}/trials" in (
        capsys.readouterr().err)


def test_a_stage_summary_is_typed_when_written_and_a_bad_one_reads_as_none(tmp_path):
    """`<stage>/summary.json` goes through one writer and one reader (distft/stages/summary.py)."""
    import pytest
    from pydantic import ValidationError

    from distft.stages.summary import read_stage_summary, write_stage_summary

    good = {"stage": "sft", "kind": "sft", "steps": 12, "world_size": 2, "exact_match_after": 0.5}
    write_stage_summary(tmp_path, good)
    assert read_stage_summary(tmp_path) == good  # the stage's own keys kept, in its order
    with pytest.raises(ValidationError, match="steps"):
        write_stage_summary(tmp_path, {**good, "steps": "twelve"})
    assert read_stage_summary(tmp_path) == good  # the refused write left the file as it was
    for damaged in ('{"steps": 12}', '{"stage": "sft", "world_size": "two"}', '{"stage": "sf', ""):
        (tmp_path / "summary.json").write_text(damaged)
        assert read_stage_summary(tmp_path) is None
    assert read_stage_summary(tmp_path / "missing") is None
