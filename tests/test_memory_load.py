"""Memory-efficient loading on 2 gloo ranks (Ray-free): each worker's RSS grows by about half a full load.

A ~54M-parameter Llama (207 MiB in fp32) is loaded by the real SFT stage in
spawned workers; each worker measures its own RSS (psutil) and peak RSS (VmHWM):

- baseline: after imports and a warm-up load of a tiny model of the same
  architecture through the same call. A process's first load costs a fixed
  ~100 MB whatever the model size (lazy imports, DeepSpeed's first
  collectives); the warm-up pays it, so growth is the model-proportional part;
- before each reading every rank writes its own parameter storage in place
  (x *= 1, as the first optimizer step does: transformers maps safetensors
  lazily, so unwritten weights are not resident yet) and hands glibc's free
  heap pages back (malloc_trim);
- reference: one process, `load_model` as every stage calls it;
- DeepSpeed ZeRO-3: right after `load_model`. The stage builds the Trainer's
  DeepSpeed config before `from_pretrained`, so transformers creates the model
  under `zero.Init` and each rank keeps only its partition;
- FSDP2: once the Trainer has sharded the model (`on_train_begin`). With
  cpu_ram_efficient_loading only local rank 0 reads the weights; accelerate
  broadcasts them into each rank's shard.

Tolerance: the ideal growth per rank is 0.5x the reference; we assert < 0.7x,
room for what a sharded worker holds besides its shard (partition bookkeeping,
FSDP state), while a worker that keeps a full copy (>= 1.0x) fails clearly.
Seen here (2026-11-26, 2 CPU cores): ZeRO-3 0.51x / 0.50x, FSDP2 0.60x / 0.60x.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from servers import free_port

pytestmark = pytest.mark.slow

GROWTH_TOLERANCE = 0.7  # per-rank RSS growth / full-load growth; ideal 0.5 for 2 ranks
# glibc otherwise raises its mmap threshold adaptively up to 32 MB, so the layer-sized blocks a
# sharded load gathers and frees stay in its heap and RSS (then peak RSS) tracks allocator slack,
# not live memory: seen here, ZeRO-3 rank 1's peak was 0.98x a full load with the default, 0.57x with this.
MMAP_THRESHOLD = "65536"


class _Done(Exception):
    """Raised on every rank at the same point once measured: nothing after loading is needed."""


def _worker(rank: int, world: int, port: int, raw_json: str, out_dir: str, warmup_dir: str) -> None:
    """Run the stage until the model is loaded (and, under FSDP2, sharded); write what this rank measured."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import gc

    import torch

    torch.set_num_threads(1)
    from distft.config import build_config

    cfg = build_config(json.loads(raw_json))
    strategy = cfg.stages[0].strategy
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401
    from distft.stages import stage_runner

    stage_runner("sft")  # what every launcher does first (quiets libraries, keeps MLflow out of DeepSpeed)
    # trl's lazy SFTTrainer (with its trainer modules, and W&B's client whenever wandb is installed: trl and
    # transformers import it on sight) is import cost, not the model's: before the baseline.
    from trl import SFTTrainer  # noqa: F401

    if strategy.name == "deepspeed":
        import deepspeed  # noqa: F401
    import distft.stages.sft as sft
    import distft.stages.trainer_stage as skeleton
    from distft.distributed.memory import (live_tensor_bytes, model_state_bytes, peak_rss_bytes, reset_peak_rss,
                                           rss_bytes, touch_local_parameters, trim_allocator)
    from distft.distributed.process_group import leave_process_group
    from distft.stages.context import context_from_env

    seen: dict = {"rank": rank}
    load_model = skeleton.load_model

    def measuring_load_model(model_cfg, *args, **kwargs):
        # Warm-up: the first load in a process costs a fixed ~100 MB whatever the model size (lazy
        # imports, DeepSpeed's first collectives and comm op); pay it on a tiny model of the same
        # architecture through the same call, so the baseline leaves only the model-proportional part.
        warm = load_model(model_cfg.model_copy(update={"name_or_path": warmup_dir}), *args, **kwargs)
        touch_local_parameters(warm)
        del warm
        gc.collect()
        trim_allocator()
        seen["baseline"] = rss_bytes()
        reset_peak_rss()
        model = load_model(model_cfg, *args, **kwargs)
        seen["load_peak"] = peak_rss_bytes() - seen["baseline"]
        if strategy.name == "fsdp":
            # Ranks > 0 hold placeholders that accelerate moves to the meta device before sharding;
            # writing them here would materialise memory the stage never touches. Measured once sharded.
            seen["load_growth"] = rss_bytes() - seen["baseline"]
            return model
        touch_local_parameters(model)
        gc.collect()
        trim_allocator()
        seen.update(load_growth=rss_bytes() - seen["baseline"], load_live=live_tensor_bytes(),
                    load_param_bytes=model_state_bytes(model, None)["params"])
        raise _Done

    import distft.stages.trainer_setup as setup

    class Probe(setup.ReportCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            touch_local_parameters(model)
            gc.collect()
            trim_allocator()
            seen.update(sharded_growth=rss_bytes() - seen["baseline"], peak=peak_rss_bytes() - seen["baseline"],
                        sharded_param_bytes=model_state_bytes(model, None)["params"], sharded_live=live_tensor_bytes())
            raise _Done

    # The skeleton looks both names up at call time (the recipe's default load_model is trainer_stage's,
    # its callbacks come from trainer_setup.stage_callbacks);
    # patched in this worker process only.
    skeleton.load_model, setup.ReportCallback = measuring_load_model, Probe
    try:
        sft.run(cfg, context_from_env(Path(out_dir) / "run"))
    except _Done:
        pass
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(seen))
    leave_process_group()


def _run(model_dir: Path, warmup_dir: Path, data: Path, out: Path, world: int, strategy: dict) -> list[dict]:
    import torch.multiprocessing as mp

    raw = {
        "model": {"name_or_path": str(model_dir), "max_seq_len": 32},
        "scaling": {"num_workers": world, "torch_threads": 1},
        "stage": "sft",
        "method": {"name": "full"},
        "data": {"train": str(data), "max_eval_samples": 2},
        "strategy": strategy,
        "train": {"max_steps": 1, "global_batch_size": world, "micro_batch_size": 1},
    }
    out.mkdir(parents=True)
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD  # read by glibc in each spawned worker
    try:
        mp.start_processes(_worker, args=(world, free_port(), json.dumps(raw), str(out), str(warmup_dir)),
                           nprocs=world, start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("MALLOC_MMAP_THRESHOLD_")
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A ~54M-parameter Llama saved in HF format, a few training rows, and one full load measured alone."""
    from distft.data.task import make_splits
    from distft.models.tiny import save_random_init

    tmp = tmp_path_factory.mktemp("memory-load")
    model_dir, warmup_dir = tmp / "llama", tmp / "warmup"
    save_random_init(model_dir, hidden=768, layers=7)
    save_random_init(warmup_dir, hidden=64, layers=2)
    rows, _ = make_splits(n_train=20, n_test=1, seed=3)
    data = write_jsonl(tmp / "train.jsonl", rows)
    (full,) = _run(model_dir, warmup_dir, data, tmp / "full", 1, {"name": "ddp"})
    return model_dir, warmup_dir, data, tmp, full


@pytest.mark.parametrize("strategy", [
    {"name": "deepspeed", "zero_stage": 3},
    {"name": "fsdp"},
], ids=["zero3", "fsdp2"])
def test_each_rank_loads_about_half_of_a_full_load(strategy, setup):
    model_dir, warmup_dir, data, tmp, full = setup
    if strategy["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    full_bytes = full["load_param_bytes"]
    # The signal: the reference holds the whole fp32 model, far above import noise.
    assert full["load_growth"] > 0.9 * full_bytes > 150 * 2**20

    ranks = _run(model_dir, warmup_dir, data, tmp / strategy["name"], 2, strategy)
    key = "sharded" if strategy["name"] == "fsdp" else "load"
    ratios = [r[f"{key}_growth"] / full["load_growth"] for r in ranks]
    report = (f"RSS growth / full load ({full['load_growth'] / 2**20:.0f} MB) per rank: "
              + ", ".join(f"{x:.2f}" for x in ratios)
              + f"; peaks: {[round(r.get('peak', r['load_peak']) / 2**20) for r in ranks]} MB"
              + f"; load growth: {[round(r['load_growth'] / 2**20) for r in ranks]} MB")
    print(report, "| live tensors MB:", [round(r[f"{key}_live"] / 2**20) for r in ranks],
          "baselines MB:", [round(r["baseline"] / 2**20) for r in ranks])
    for r in ranks:  # the shards are real: each rank's parameter storage is half the model
        assert abs(r[f"{key}_param_bytes"] / full_bytes - 0.5) < 0.02, report
    assert all(x < GROWTH_TOLERANCE for x in ratios), report
    if strategy["name"] == "deepspeed":
        # Under zero.Init rank 1 never holds the whole model, not even for a moment; rank 0 reads the
        # checkpoint for everyone, so its peak is about a full load (not asserted).
        assert ranks[1]["load_peak"] < GROWTH_TOLERANCE * full["load_growth"], report
    else:
        # from_pretrained leaves rank 0's weights lazily mapped; they become resident only as shards. The
        # other ranks receive theirs from rank 0, but transformers 5.19 (distft's pin since vLLM 0.32) gives
        # them zero-filled placeholders of the whole model first: one full load each, until fully_shard
        # (transformers 5.23 kept them on the meta device: about 4 MB here). Not asserted: while accelerate
        # shards on CPU, each rank's peak reached about 2x a full load here (see the report line).
        assert ranks[0]["load_growth"] < 0.1 * full["load_growth"], report
        assert all(r["load_growth"] < 1.1 * full["load_growth"] for r in ranks[1:]), report


def test_zero1_and_zero2_partition_optimizer_state_and_gradients(tmp_path):
    """Measured from the live ZeRO optimizer between backward and step (benchmarks/memory.py's probe).

    Against DeepSpeed stage 0 on the same 2 ranks: ZeRO-1 and -2 hold half the Adam state per rank,
    and ZeRO-2 half the gradients (one gradient that straddles the partition boundary is kept whole).
    """
    import subprocess
    import sys

    pytest.importorskip("deepspeed")
    env = dict(os.environ)
    env.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "benchmarks/memory.py", "--hidden", "256", "--layers", "4",
                        "--strategies", "zero0,zero1,zero2", "--json", str(out)],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    states = {name: [rank["states"] for rank in ranks] for name, ranks in json.loads(out.read_text()).items()}
    ref = states["zero0"][0]
    for name in ("zero1", "zero2"):
        for rank_states in states[name]:
            assert rank_states["optimizer"] == pytest.approx(ref["optimizer"] / 2, rel=0.05), (name, rank_states)
    for rank_states in states["zero2"]:
        assert rank_states["grads"] < 0.6 * ref["grads"], rank_states
    assert sum(r["grads"] for r in states["zero2"]) == pytest.approx(ref["grads"], rel=0.1)
