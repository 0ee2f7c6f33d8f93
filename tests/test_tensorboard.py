"""Every stage's metrics also land as TensorBoard events (rank 0), the same scalars at the same steps as
metrics.jsonl. Stages run in-process without Ray, as in test_sft_stage.py."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from distft.config import build_config
from distft.stages import StageContext, stage_runner
from distft.stages.reporting import tensorboard_tag


def scalars(logdir: Path) -> dict[str, dict[int, list[float]]]:
    """tag -> step -> values in the order written, read back as TensorBoard reads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    out: dict[str, dict[int, list[float]]] = {}
    for tag in acc.Tags()["scalars"]:
        by_step = defaultdict(list)
        for event in acc.Scalars(tag):
            by_step[event.step].append(event.value)
        out[tag] = dict(by_step)
    return out


def jsonl_scalars(path: Path) -> dict[str, dict[int, list[float]]]:
    """The same shape from metrics.jsonl: what TensorBoard should hold."""
    out: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for line in path.read_text().splitlines():
        row = json.loads(line)
        for key, value in row.items():
            if key not in ("time", "step"):
                out[tensorboard_tag(key)][row["step"]].append(value)
    return {tag: dict(steps) for tag, steps in out.items()}


def assert_same(tb: dict, jsonl: dict) -> None:
    assert set(tb) == set(jsonl)
    for tag, steps in jsonl.items():
        assert set(tb[tag]) == set(steps), tag
        for step, values in steps.items():
            assert tb[tag][step] == pytest.approx(values, rel=1e-6), (tag, step)  # events hold float32


def test_tags_follow_the_trainers_tensorboard_grouping():
    assert tensorboard_tag("loss") == "train/loss"
    assert tensorboard_tag("eval_loss") == "eval/loss"
    assert tensorboard_tag("eval_mean_token_accuracy") == "eval/mean_token_accuracy"
    assert tensorboard_tag("kl_coef") == "train/kl_coef"


def test_sft_stage_writes_the_metrics_jsonl_scalars_as_tensorboard_events(tiny_random, alpaca_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    cfg = build_config({
        "model": {"name_or_path": str(tiny_random), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(train), "eval_fraction": 0.1, "max_eval_samples": 8},
        "method": {"name": "full"},
        "train": {"lr": 3e-3, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 6, "log_every": 2,
                  "eval_every": 3, "save_every": 1000},
    })
    ctx = StageContext(run_dir=tmp_path / "run")
    stage_runner("sft")(cfg, ctx)

    stage_dir = tmp_path / "run" / "sft"
    tb, want = scalars(stage_dir / "tensorboard"), jsonl_scalars(stage_dir / "metrics.jsonl")
    # The loss at every logged step (1 first, then every 2), and eval loss at both evals plus the final one.
    assert sorted(tb["train/loss"]) == [1, 2, 4, 6]
    assert tb["train/loss"] == {s: pytest.approx(v, rel=1e-6) for s, v in want["train/loss"].items()}
    assert tb["eval/loss"][3] == pytest.approx(want["eval/loss"][3], rel=1e-6)
    assert len(tb["eval/loss"][6]) == 2  # the last eval during training and the stage's evaluate() after it
    assert_same(tb, want)
    reported = [m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m]
    assert [v for s in sorted(tb["train/loss"]) for v in tb["train/loss"][s]] == pytest.approx(reported, rel=1e-6)


def test_ppo_stage_writes_the_metrics_jsonl_scalars_as_tensorboard_events(tiny_random, tmp_path):
    cfg = build_config({
        "model": {"name_or_path": str(tiny_random), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "ppo",
        "data": {"train": str(REPO / "configs" / "data" / "facts_train.jsonl"), "max_train_samples": 64},
        "method": {"name": "full"},
        "reward": {"functions": {"exact_match": 1.0}},
        "ppo": {"rollout_batch_size": 8, "max_new_tokens": 3},
        "train": {"lr": 1e-4, "scheduler": "constant", "max_steps": 3, "global_batch_size": 8,
                  "micro_batch_size": 8, "log_every": 1, "save_every": 1000},
        "evaluate": {"data": None},
    })
    stage_runner("ppo")(cfg, StageContext(run_dir=tmp_path / "run"))

    stage_dir = tmp_path / "run" / "ppo"
    tb, want = scalars(stage_dir / "tensorboard"), jsonl_scalars(stage_dir / "metrics.jsonl")
    assert sorted(tb["train/kl"]) == [1, 2, 3] and sorted(tb["train/score"]) == [1, 2, 3]
    assert_same(tb, want)


@pytest.mark.slow
def test_only_rank_0_writes_events_on_two_gloo_ranks(tiny_random, alpaca_rows, tmp_path):
    from test_distributed_stage import run_ranks

    _, _, run_dir = run_ranks(
        tmp_path, tiny_random, alpaca_rows, held_rows=8, method={"name": "full"},
        train={"lr": 3e-3, "max_steps": 6, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 2,
               "eval_every": 3, "save_every": 1000},
        evaluate={"max_new_tokens": 2},
    )
    stage_dir = run_dir / "sft"
    events = list((stage_dir / "tensorboard").glob("events.out.tfevents.*"))
    # events.out.tfevents.<time>.<host>.<pid>.<n>: every file from one process
    assert events and len({e.name.rsplit(".", 2)[-2] for e in events}) == 1
    assert_same(scalars(stage_dir / "tensorboard"), jsonl_scalars(stage_dir / "metrics.jsonl"))


def test_a_failing_event_write_surfaces_once_in_the_training_thread(tmp_path):
    """A full disk under `tensorboard/`: TensorBoard's writer thread fails first. Its traceback must not
    reach stderr (Ray forwards a worker's stderr to the user); the same error is raised by the write."""
    script = f"""
import errno, sys
from distft.stages.reporting import MetricsLog
log = MetricsLog({str(tmp_path)!r})
log.write({{"step": 1, "loss": 1.0}})
def full(data):
    raise OSError(errno.ENOSPC, "No space left on device")
log._writer.file_writer.event_writer._async_writer._writer.write = full
try:
    for step in range(2, 50):
        log.write({{"step": step, "loss": 1.0}})
except OSError as e:
    print("raised", e.errno)
    sys.exit(0)
sys.exit("the failed event write was never raised")
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "raised 28"
    assert "Traceback" not in r.stderr and "Exception in thread" not in r.stderr, r.stderr
