"""The SFT stage on 2 processes with gloo, no Ray: the path torchrun users and our equivalence tests take."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from servers import free_port

pytestmark = pytest.mark.slow


def _worker(rank: int, world: int, port: int, cfg_json: str, run_dir: str, resume_from: str | None = None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import DistftConfig
    from distft.distributed.process_group import leave_process_group
    from distft.stages import stage_runner
    from distft.stages.context import context_from_env

    cfg = DistftConfig.model_validate_json(cfg_json)
    ctx = context_from_env(run_dir, resume_from=resume_from)
    summary = stage_runner(cfg.stages[0].kind)(cfg, ctx)
    # One loss per step (a checkpoint report repeats the latest metrics; keep the step's value).
    losses = {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"summary": summary, "steps": sorted(losses), "losses": [losses[k] for k in sorted(losses)]}, f)
    leave_process_group()


def run_ranks(tmp_path, tiny_base, rows, held_rows: int, world: int = 2, resume_from: str | None = None,
              **sections) -> tuple[dict, dict, Path]:
    """Write the data, run the SFT stage on `world` spawned gloo ranks; return what ranks 0 and 1 saw."""
    from distft.config import build_config

    train = write_jsonl(tmp_path / "train.jsonl", rows)
    held = write_jsonl(tmp_path / "held.jsonl", rows[:held_rows] or rows[:1])
    cfg = build_config({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": world, "torch_threads": 1},
        "stage": "sft",
        "data": {"train": str(train), "max_eval_samples": 16},
        **sections,
        "evaluate": {"data": str(held), **sections.get("evaluate", {})},
    })
    run_dir = tmp_path / "run"
    r0, r1 = spawn_ranks(cfg, run_dir, world, resume_from)
    return r0, r1, run_dir


def spawn_ranks(cfg, run_dir: Path, world: int = 2, resume_from: str | None = None) -> tuple[dict, dict]:
    """Run `cfg`'s (first) stage on `world` spawned gloo ranks; what ranks 0 and 1 saw (summary, losses)."""
    import torch.multiprocessing as mp

    run_dir.mkdir(parents=True, exist_ok=True)
    mp.start_processes(_worker, args=(world, free_port(), cfg.model_dump_json(), str(run_dir), resume_from),
                       nprocs=world, start_method="spawn")
    r0, r1 = (json.loads((run_dir / f"rank{i}.json").read_text()) for i in (0, 1))
    return r0, r1


# The base's held-out documents as a retain set (the runs here name the base by its path, so no default
# applies): each rank scores its share, and the sums must be the one-process score.
RETAIN = {"retain": [{"data": "distft://tiny-base/heldout", "max_samples": 48}]}


def check_retain(r0: dict, r1: dict, tiny_base) -> None:
    """Both ranks report the same retain scores, and the score before is the base's, scored in one process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.models.bundled import heldout_rows
    from distft.models.perplexity import document_nll, encode_documents

    (row,) = r0["summary"]["retain"]
    assert r1["summary"]["retain"] == [row] and row["items"] == 48 and row["after"] is not None
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    nll, count = document_nll(model, encode_documents(tok, heldout_rows()[:48], 64), tok.pad_token_id)
    assert row["before"] == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_two_process_gloo_run_splits_the_batch_and_agrees(tiny_base, alpaca_rows, tmp_path):
    r0, r1, run_dir = run_ranks(
        tmp_path, tiny_base, alpaca_rows, held_rows=24,
        method={"name": "lora", "lora": {"r": 8, "alpha": 16}},
        train={"lr": 3e-3, "max_steps": 20, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 5},
        evaluate={"max_new_tokens": 6, **RETAIN},
    )
    assert r0["summary"]["world_size"] == 2 and r0["summary"]["steps"] == 20
    check_retain(r0, r1, tiny_base)
    # Each rank scored half the held-out items; the all-reduced accuracy is the same on both.
    assert r0["summary"]["eval_items"] == 24
    assert r0["summary"]["exact_match_after"] == r1["summary"]["exact_match_after"]
    assert r0["losses"] == pytest.approx(r1["losses"])  # DDP: every rank logs the same averaged loss
    assert r0["losses"][-1] < 0.6 * r0["losses"][0]
    assert (run_dir / "sft" / "final" / "adapter_model.safetensors").exists()


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_deepspeed_zero_really_shards_on_two_cpu_ranks(zero_stage, tiny_base, alpaca_rows, tmp_path):
    """Measured on the live engine: ZeRO-3 holds ~1/2 of the parameters per rank, ZeRO-2 ~1/2 of the optimizer."""
    pytest.importorskip("deepspeed")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    r0, r1, run_dir = run_ranks(
        tmp_path, tiny_base, alpaca_rows, held_rows=8,
        method={"name": "full"},
        strategy={"name": "deepspeed", "zero_stage": zero_stage, "param_persistence_threshold": 0},
        train={"lr": 1e-3, "max_steps": 12, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 4},
        evaluate={"max_new_tokens": 4, **RETAIN},  # generation and retain scoring on sharded weights
    )
    s0 = r0["summary"]
    check_retain(r0, r1, tiny_base)
    full = s0["param_elements_full"]
    assert s0["strategy"] == f"deepspeed-zero{zero_stage}"
    assert s0["total_params"] == full  # counted logically, not from the local shard
    opt_local = s0["optimizer_fp32_elements_local"] + r1["summary"]["optimizer_fp32_elements_local"]
    assert abs(s0["optimizer_fp32_elements_local"] - full / 2) / full < 0.02
    assert abs(opt_local - full) / full < 0.02  # the two partitions cover the model once
    if zero_stage == 3:
        assert abs(s0["param_elements_local"] - full / 2) / full < 0.02
    else:
        assert s0["param_elements_local"] == full
    assert r0["losses"][-1] < r0["losses"][0]
    assert s0["exact_match_after"] == r1["summary"]["exact_match_after"]
    assert (run_dir / "sft" / "final" / "model.safetensors").exists()  # consolidated, loadable export
    from distft.models.loading import load_for_inference

    model, _ = load_for_inference(run_dir / "sft")
    assert sum(p.numel() for p in model.parameters()) == full


@pytest.mark.parametrize("method", ["full", "lora"])
def test_fsdp2_really_shards_on_two_cpu_ranks(method, tiny_base, alpaca_rows, tmp_path):
    """FSDP2 on CPU: parameters are DTensors holding half the model per rank, Adam moments too; export is whole."""
    lora = {"lora": {"r": 8, "alpha": 16}} if method == "lora" else {}
    r0, r1, run_dir = run_ranks(
        tmp_path, tiny_base, alpaca_rows, held_rows=8,
        method={"name": method, **lora},
        strategy={"name": "fsdp"},
        train={"lr": 3e-3, "max_steps": 12, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 4},
        evaluate={"max_new_tokens": 4, **RETAIN},  # sharded weights; answers of different lengths per rank
    )
    s0, s1 = r0["summary"], r1["summary"]
    check_retain(r0, r1, tiny_base)  # before: rank 0 alone holds the weights until fully_shard
    full = s0["param_elements_full"]
    assert s0["strategy"] == "fsdp" and s0["world_size"] == 2
    # Tied embeddings are counted once; every other tensor is split across the two ranks.
    assert abs(s0["param_elements_local"] - full / 2) / full < 0.02
    assert s0["param_elements_local"] + s1["param_elements_local"] == full
    trainable = s0["trainable_params"]
    assert s0["optimizer_fp32_elements_local"] + s1["optimizer_fp32_elements_local"] == trainable
    assert abs(s0["optimizer_fp32_elements_local"] - trainable / 2) / trainable < 0.1
    assert r0["losses"][-1] < r0["losses"][0]
    assert r0["losses"] == pytest.approx(r1["losses"])
    assert s0["exact_match_before"] == s1["exact_match_before"]
    assert s0["exact_match_after"] == s1["exact_match_after"]
    from distft.models.loading import load_for_inference

    final = run_dir / "sft" / "final"
    assert (final / ("adapter_model.safetensors" if method == "lora" else "model.safetensors")).exists()
    model, _ = load_for_inference(run_dir / "sft")  # plain HF/peft load, no distft or FSDP needed
    assert sum(p.numel() for p in model.parameters()) == s0["total_params"]


def test_fsdp2_sharded_checkpoint_resumes_on_another_worker_count(tiny_base, alpaca_rows, tmp_path):
    """Saved by 2 FSDP2 ranks (torch distributed checkpoint), resumed by 4: steps 5-8 match the uninterrupted run."""
    sections = dict(method={"name": "full"}, strategy={"name": "fsdp"}, evaluate={"before": False},
                    train={"lr": 1e-3, "max_steps": 8, "save_every": 4, "global_batch_size": 16, "micro_batch_size": 4,
                           "log_every": 1})
    first, _, run_dir = run_ranks(tmp_path / "two", tiny_base, alpaca_rows, held_rows=4, **sections)
    (ckpt,) = [p for p in (run_dir / "sft" / "checkpoints").rglob("checkpoint-4") if p.is_dir()]
    assert list(ckpt.glob("pytorch_model_fsdp_0/*.distcp"))  # sharded, one file per saving rank
    sections["train"]["micro_batch_size"] = 2  # 4 ranks x 2 x 2 accumulation: the same global batch of 16
    resumed, _, _ = run_ranks(tmp_path / "four", tiny_base, alpaca_rows, held_rows=4, world=4,
                              resume_from=str(ckpt), **sections)
    assert resumed["summary"]["world_size"] == 4 and resumed["summary"]["steps"] == 8
    assert resumed["steps"] == [5, 6, 7, 8]
    assert resumed["losses"] == pytest.approx(first["losses"][4:], rel=1e-4)


EQUIVALENCE = dict(
    method={"name": "full"},
    train={"lr": 1e-3, "max_steps": 10, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 1},
    evaluate={"before": False},
)


@pytest.fixture(scope="module")
def single_process_losses(tiny_base, tmp_path_factory) -> dict[int, float]:
    """The reference: one process, 4 accumulation steps, no sharding."""
    from distft.config import build_config
    from distft.data.task import make_splits
    from distft.stages import StageContext, stage_runner

    rows, _ = make_splits(n_train=200, n_test=10, seed=3)  # the alpaca_rows fixture's data
    tmp = tmp_path_factory.mktemp("single")
    train = write_jsonl(tmp / "train.jsonl", rows)
    cfg = build_config({"model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
                        "scaling": {"num_workers": 1, "torch_threads": 2}, "stage": "sft",
                        "data": {"train": str(train), "max_eval_samples": 16}, **EQUIVALENCE})
    ctx = StageContext(run_dir=tmp / "run")
    stage_runner("sft")(cfg, ctx)
    return {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}


@pytest.mark.parametrize("world, strategy, rel", [
    (2, {"name": "ddp"}, 1e-5),
    (4, {"name": "ddp"}, 1e-5),
    (2, {"name": "deepspeed", "zero_stage": 1}, 1e-4),
    (2, {"name": "deepspeed", "zero_stage": 2}, 1e-4),
    (2, {"name": "deepspeed", "zero_stage": 3, "param_persistence_threshold": 0}, 1e-4),
    (2, {"name": "fsdp"}, 1e-4),
    (4, {"name": "fsdp"}, 1e-4),
], ids=["ddp-2x2", "ddp-4x1", "zero1", "zero2", "zero3", "fsdp2-2x2", "fsdp2-4x1"])
def test_ranks_match_one_process_step_for_step(world, strategy, rel, single_process_losses, tiny_base, alpaca_rows,
                                               tmp_path):
    """Same seed and global batch 16: 1 process x 4 accumulation == 2 ranks x 2 == 4 ranks x 1, fp32."""
    if strategy["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    r0, _, _ = run_ranks(tmp_path, tiny_base, alpaca_rows, held_rows=4, world=world, strategy=strategy,
                             **EQUIVALENCE)
    assert r0["summary"]["world_size"] == world
    assert sorted(single_process_losses) == r0["steps"] == list(range(1, 11))
    assert r0["losses"] == pytest.approx([single_process_losses[s] for s in r0["steps"]], rel=rel)


def test_a_rank_that_never_arrives_fails_the_group_within_its_timeout():
    """Rank 0 of 2 alone: instead of waiting forever for rank 1, a clear error once run.collective_timeout_s passes."""
    port = free_port()
    code = ("from distft.distributed.process_group import ensure_process_group\n"
            "ensure_process_group(2, use_gpu=False, timeout_s=3)\n")
    env = {**os.environ, "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    started = time.time()
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and time.time() - started < 60
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("distft.distributed.process_group.ProcessGroupError: rank 0 of 2 could not form the gloo "
                           f"process group at 127.0.0.1:{port} within 3 s"), last
    assert "larger run.collective_timeout_s" in last


def _torchrun(nproc: int, *args: str, timeout: int) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).with_name("torchrun")
    return subprocess.run([str(torchrun), "--nproc-per-node", str(nproc), "--master-port", str(free_port()), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)


def test_ranks_that_leave_the_group_exit_cleanly(tmp_path):
    """Four gloo ranks left to exit with their group alive abort now and then (SIGABRT, "terminate called without
    an active exception"; 2 runs in 5 here, once in CI after a full FSDP2 run); leave_process_group prevents it."""
    script = tmp_path / "ranks.py"
    script.write_text("import torch, torch.distributed as dist\n"
                      "from distft.distributed.process_group import ensure_process_group, leave_process_group\n"
                      "ensure_process_group(4, use_gpu=False, timeout_s=60)\n"
                      "t = torch.ones(1)\n"
                      "dist.all_reduce(t)\n"
                      "assert t.item() == 4\n"
                      "leave_process_group()\n"
                      "assert not dist.is_initialized()\n")
    for _ in range(6):  # ~4 s each; without the call, some run of six aborted in each of 3 tries here
        r = _torchrun(4, str(script), timeout=120)
        assert r.returncode == 0, r.stderr[-2000:]


def test_the_torchrun_entry_point_runs_a_config_and_exits_cleanly(tiny_base, alpaca_rows, tmp_path):
    """`torchrun -m distft.stages CONFIG RUN_DIR overrides`: the stages without Ray, 2 ranks, FSDP2."""
    import yaml

    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    held = write_jsonl(tmp_path / "held.jsonl", alpaca_rows[:8])
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 2, "torch_threads": 1},
        "stage": "sft", "method": {"name": "full"}, "strategy": {"name": "fsdp"},
        "data": {"train": str(train), "max_eval_samples": 8},
        "train": {"lr": 1e-3, "max_steps": 50, "global_batch_size": 16, "micro_batch_size": 8, "log_every": 2},
        "evaluate": {"data": str(held), "max_new_tokens": 4},
    }))
    r = _torchrun(2, "-m", "distft.stages", str(config), str(tmp_path / "run"), "train.max_steps=6", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "[sft] step 6/6" in r.stdout  # the command-line override reached the stage (the YAML says 50)
    assert "FSDP2 on CPU" in r.stdout
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()


@pytest.mark.slow
@pytest.mark.parametrize("method, strategy", [
    ({"name": "freeze", "freeze": {"trainable_layers": 1}}, {"name": "deepspeed", "zero_stage": 2}),
    ({"name": "freeze", "freeze": {"trainable_layers": 0, "unfreeze_every": 2}}, {"name": "ddp"}),
    ({"name": "dora", "lora": {"r": 8, "alpha": 16}}, {"name": "ddp"}),
    ({"name": "rslora", "lora": {"r": 8, "alpha": 16}}, {"name": "deepspeed", "zero_stage": 3}),
    ({"name": "rslora", "lora": {"r": 8, "alpha": 16}}, {"name": "fsdp"}),
    ({"name": "ia3"}, {"name": "deepspeed", "zero_stage": 2}),
    ({"name": "prompt_tuning", "prompt": {"num_virtual_tokens": 8}}, {"name": "ddp"}),
    ({"name": "prefix_tuning", "prompt": {"num_virtual_tokens": 8}}, {"name": "deepspeed", "zero_stage": 1}),
], ids=lambda v: v["name"] + ("-gradual" if v.get("freeze", {}).get("unfreeze_every") else "")
                 + (str(v.get("zero_stage", "")) if v["name"] == "deepspeed" else ""))
def test_methods_train_on_two_ranks_under_their_strategies(method, strategy, tiny_base, alpaca_rows, tmp_path):
    """The method x strategy matrix, Ray-free: 2 gloo ranks agree step for step, the loss falls, and the
    export reloads (combinations outside METHOD_STRATEGIES are refused by the config, see test_bad_inputs)."""
    if strategy["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
        strategy = {**strategy, "param_persistence_threshold": 0}
    lr = 3e-2 if method["name"] in ("ia3", "prompt_tuning", "prefix_tuning") else 2e-3
    r0, r1, run_dir = run_ranks(
        tmp_path, tiny_base, alpaca_rows, held_rows=8, method=method, strategy=strategy,
        train={"lr": lr, "max_steps": 8, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 1},
        evaluate={"max_new_tokens": 4, "before": False},
    )
    assert r0["summary"]["world_size"] == 2 and r0["summary"]["method"] == method["name"]
    assert r0["losses"] == pytest.approx(r1["losses"])  # one model, seen from both ranks
    assert min(r0["losses"][-3:]) < r0["losses"][0], r0["losses"]
    from distft.models.loading import load_for_inference

    model, tok = load_for_inference(run_dir / "sft")
    ids = tok("Which animal?", return_tensors="pt")
    assert model(**ids).logits.isfinite().all()
