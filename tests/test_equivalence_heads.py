"""Workers do not change what a classifier or reward model learns: 1 process x accumulation == 2 gloo ranks,
step for step, fp32, no dropout (the tiny Llama base has none), same global batch; no Ray.

The classifier scores its held-out rows before training, as the stage does by default: a Trainer that
predicted before `train()` used to leave each rank training a replica of its own (see trainer_setup.train).
"""

from __future__ import annotations

import json
import os
import random

import pytest
from conftest import REPO, write_jsonl
from test_distributed_stage import free_port

pytestmark = pytest.mark.slow

STEPS = 4


def _worker(rank: int, world: int, port: int, stage: str, cfg_json: str, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import DistftConfig
    from distft.distributed.process_group import leave_process_group
    from distft.stages import stage_runner
    from distft.stages.context import context_from_env

    ctx = context_from_env(run_dir)
    summary = stage_runner(stage)(DistftConfig.model_validate_json(cfg_json), ctx)
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"summary": summary, "losses": _losses(ctx)}, f)
    leave_process_group()


def _losses(ctx) -> dict:
    # One loss per step (a checkpoint report repeats the latest metrics; keep the step's value).
    return {str(m["step"]): m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}


def run_stage(stage: str, raw: dict, world: int, run_dir) -> list[dict]:
    """The stage in this process (world 1) or on `world` spawned gloo ranks; each rank's summary and losses."""
    import torch.multiprocessing as mp

    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    cfg = build_config({**raw, "scaling": {"num_workers": world, "torch_threads": 1 if world > 1 else 2}})
    run_dir.mkdir(parents=True)
    if world == 1:
        ctx = StageContext(run_dir=run_dir)
        return [{"summary": stage_runner(stage)(cfg, ctx), "losses": _losses(ctx)}]
    mp.start_processes(_worker, args=(world, free_port(), stage, cfg.model_dump_json(), str(run_dir)), nprocs=world,
                       start_method="spawn")
    return [json.loads((run_dir / f"rank{r}.json").read_text()) for r in range(world)]


def assert_same_steps(one: dict, ranks: list[dict]) -> None:
    steps = [str(s) for s in range(1, STEPS + 1)]
    assert sorted(one["losses"], key=int) == steps
    for r in ranks:
        assert sorted(r["losses"], key=int) == steps
        assert [r["losses"][s] for s in steps] == pytest.approx([one["losses"][s] for s in steps], rel=1e-5)
    # Learning happened, so equal losses are not equal because nothing moved.
    assert one["losses"][steps[-1]] != pytest.approx(one["losses"][steps[0]], rel=1e-3)


def sentiment_rows(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    good, bad = ["good", "great", "lovely", "pleasant"], ["bad", "awful", "poor", "nasty"]
    things = ["film", "meal", "hotel", "book", "trip", "show"]
    rows = []
    for i in range(n):
        label = ("positive", "negative")[i % 2]
        word = rng.choice(good if label == "positive" else bad)
        rows.append({"text": f"The {rng.choice(things)} was {word}.", "label": label})
    return rows


def test_a_classifier_learns_the_same_on_two_ranks(tiny_base, tmp_path):
    """Held-out scoring before training included: the ranks stay one model (DDP), and match 1 process."""
    train = write_jsonl(tmp_path / "train.jsonl", sentiment_rows(120, seed=0))
    held = write_jsonl(tmp_path / "held.jsonl", sentiment_rows(24, seed=1))
    raw = {"model": {"name_or_path": str(tiny_base), "max_seq_len": 32}, "stage": "classify",
           # Eval rows a multiple of 2 ranks x micro-batch 4: a short last batch is padded with repeated rows
           # under DDP, and the Trainer's eval_loss then weighs them in (an upstream quirk, not learning).
           "data": {"train": str(train), "eval_fraction": 0.1, "max_eval_samples": 8},
           "method": {"name": "full"},
           "train": {"lr": 1e-3, "max_steps": STEPS, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 1,
                     "early_stopping": None},
           "evaluate": {"data": str(held), "before": True}}
    (one,) = run_stage("classify", raw, 1, tmp_path / "one")
    ranks = run_stage("classify", raw, 2, tmp_path / "two")
    assert one["summary"]["world_size"] == 1 and ranks[0]["summary"]["world_size"] == 2
    assert_same_steps(one, ranks)
    # The trained model (rank 0's, the exported one) scores as the single process's does.
    assert [r["summary"]["eval_loss"] for r in ranks] == pytest.approx([one["summary"]["eval_loss"]] * 2, rel=1e-4)
    assert ranks[0]["summary"]["accuracy_after"] == pytest.approx(one["summary"]["accuracy_after"])


def test_a_reward_model_learns_the_same_on_two_ranks(tiny_base, tmp_path):
    raw = {"model": {"name_or_path": str(tiny_base), "max_seq_len": 64}, "stage": "reward",
           "data": {"train": str(REPO / "configs" / "data" / "facts_prefs_train.jsonl"), "max_train_samples": 96,
                    "eval_fraction": 0.1, "max_eval_samples": 8},
           "method": {"name": "full"},
           "train": {"lr": 1e-3, "max_steps": STEPS, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 1},
           "evaluate": {"before": False}}
    (one,) = run_stage("reward", raw, 1, tmp_path / "one")
    ranks = run_stage("reward", raw, 2, tmp_path / "two")
    assert_same_steps(one, ranks)
    assert ranks[0]["summary"]["eval_loss"] == pytest.approx(one["summary"]["eval_loss"], rel=1e-4)
