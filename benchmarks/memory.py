"""Per-rank memory of each distributed strategy, measured on the live shards, beside the ZeRO paper's formula.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/memory.py            # ~60M-param Llama, 2 ranks
    .venv/bin/python benchmarks/memory.py --hidden 128 --layers 2 --strategies ddp,zero3   # quick look

For every strategy the real SFT stage runs on 2 spawned gloo processes (Ray-free,
like the tests' `run_ranks`) up to its second optimizer step. Just before that step,
where gradients are reduced and Adam's moments exist, each rank reads its
parameters, gradients, optimizer state and any fp32 master copy from the live
model and optimizer (`distft.distributed.memory.model_state_bytes`), and its RSS
above a baseline taken after imports, before the stage starts. Then the ranks stop
(the stage's evaluation and export are not part of the measurement).

The model is a randomly initialised Llama built from a config, saved once in HF
format under the distft cache and loaded through distft's normal loading path.

DeepSpeed's ZeRO stages are compared with DeepSpeed stage 0 and FSDP2 with DDP:
the ratio column is a strategy's model-state bytes over its reference's, beside
the paper's ideal (1/N for full sharding).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
# glibc raises its mmap threshold adaptively (up to 32 MB), so blocks that are gathered and freed
# (ZeRO-3 and FSDP2 layers, DDP buckets) stay in its heap and RSS would show allocator slack; a fixed
# threshold returns them on free. Read by glibc at start-up in each spawned worker.
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")

# name -> (strategy section, ZeRO-paper stage it corresponds to, the row it is compared with)
STRATEGIES = {
    "ddp": ({"name": "ddp"}, 0, None),
    "fsdp": ({"name": "fsdp"}, 3, "ddp"),
    "zero0": ({"name": "deepspeed", "zero_stage": 0}, 0, None),
    "zero1": ({"name": "deepspeed", "zero_stage": 1}, 1, "zero0"),
    "zero2": ({"name": "deepspeed", "zero_stage": 2}, 2, "zero0"),
    "zero3": ({"name": "deepspeed", "zero_stage": 3}, 3, "zero0"),
}
MEASURE_AT_STEP = 2  # before optimizer step 2: grads reduced, Adam moments allocated by step 1
MB = 2**20


class MeasurementDone(Exception):
    """Raised on every rank at the same point once measured: the rest of the stage (eval, export) is not timed."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_model(hidden: int, layers: int) -> Path:
    """A random-init Llama in HF format, saved once per shape under the distft cache."""
    from distft.models.loading import cache_dir
    from distft.models.tiny import save_random_init

    out = cache_dir() / f"bench-llama-h{hidden}-l{layers}"
    if not (out / "config.json").exists():
        cache_dir().mkdir(parents=True, exist_ok=True)  # a fresh clone (CI) has no cache yet
        tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".bench-"))
        save_random_init(tmp, hidden=hidden, layers=layers)
        tmp.rename(out)  # atomic: a half-written model is never picked up
    return out


def _worker(rank: int, world: int, port: int, raw_json: str, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import gc

    import torch

    torch.set_num_threads(1)
    from distft.config import build_config

    cfg = build_config(json.loads(raw_json))  # the raw dict, validated the way a user's YAML is
    # Everything the stage imports, so the baseline excludes library code and import-time allocations.
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    if cfg.stages[0].strategy.name == "deepspeed":
        import deepspeed  # noqa: F401
    import distft.stages.sft as sft
    from distft.distributed.memory import (full_param_count, model_state_bytes, optimizer_chain, peak_rss_bytes,
                                           reset_peak_rss, rss_bytes, trim_allocator)
    from distft.distributed.process_group import leave_process_group
    from distft.stages.context import context_from_env

    gc.collect()
    trim_allocator()
    baseline = rss_bytes()
    reset_peak_rss()
    seen: dict = {}

    import distft.stages.trainer_setup as setup

    class MemoryProbe(setup.ReportCallback):
        """The stage's own callback plus a measurement just before optimizer step MEASURE_AT_STEP.

        The innermost optimizer's `step` is wrapped (DeepSpeed's ZeRO optimizer, which the engine
        calls inside backward, or the torch optimizer under accelerate), because the Trainer's
        `on_pre_optimizer_step` comes after DeepSpeed has already stepped and freed its gradients.
        """

        def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
            if "wrapped" not in seen:
                seen["wrapped"] = True
                chain = optimizer_chain(optimizer)
                target = chain[1] if len(chain) > 1 else chain[0]
                original, calls = target.step, [0]

                def step(*a, **kw):
                    calls[0] += 1
                    if calls[0] == MEASURE_AT_STEP:
                        peak = peak_rss_bytes()
                        gc.collect()
                        trim_allocator()
                        seen.update(
                            states=model_state_bytes(model, optimizer),
                            psi=full_param_count(model),
                            rss_delta=rss_bytes() - baseline,
                            peak_delta=(peak - baseline) if peak is not None else None,
                            optimizer_types=[type(o).__name__ for o in chain],
                        )
                        raise MeasurementDone
                    return original(*a, **kw)

                target.step = step
            return super().on_step_begin(args, state, control, model=model, optimizer=optimizer, **kwargs)

    # The stage's callbacks are built by trainer_setup.stage_callbacks, which looks this name up at call time.
    setup.ReportCallback = MemoryProbe
    ctx = context_from_env(run_dir)
    try:
        sft.run(cfg, ctx)
    except MeasurementDone:
        pass
    if "states" not in seen:
        raise RuntimeError(f"the stage ended before optimizer step {MEASURE_AT_STEP}; nothing was measured")
    seen.pop("wrapped", None)
    seen.update(rank=rank, strategy=cfg.stages[0].strategy.label(), baseline=baseline)
    Path(run_dir, f"memory-rank{rank}.json").write_text(json.dumps(seen))
    leave_process_group()


def run_strategy(name: str, model_dir: Path, data: Path, world: int, work: Path,
                 deepspeed_config: Path | None = None) -> list[dict]:
    import torch.multiprocessing as mp

    from distft.config import build_config

    strategy, _, _ = STRATEGIES[name]
    if deepspeed_config and strategy["name"] == "deepspeed":
        strategy = {**strategy, "deepspeed_config": str(deepspeed_config)}
    raw = {
        "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
        "scaling": {"num_workers": world, "torch_threads": 1},
        "stage": "sft",
        "method": {"name": "full"},
        "data": {"train": str(data), "max_eval_samples": 2},
        "strategy": strategy,
        # No checkpoint or periodic eval within the 2 steps: only the final save and a 2-row eval.
        "train": {"max_steps": MEASURE_AT_STEP, "global_batch_size": 2 * world, "micro_batch_size": 2,
                  "log_every": 1, "save_every": 1000, "eval_every": 1000},
    }
    build_config(raw)  # fail here, not in two workers
    run_dir = work / name
    run_dir.mkdir(parents=True)
    mp.start_processes(_worker, args=(world, free_port(), json.dumps(raw), str(run_dir)), nprocs=world,
                       start_method="spawn")
    return [json.loads((run_dir / f"memory-rank{r}.json").read_text()) for r in range(world)]


def machine_lines() -> list[str]:
    import accelerate
    import torch
    import transformers
    import trl

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        import deepspeed

        ds = deepspeed.__version__
    except ImportError:
        ds = "not installed"
    return [
        f"date: {datetime.date.today().isoformat()}   machine: {cpu}, {os.cpu_count()} cores (CPU only, gloo)",
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
        f"trl {trl.__version__}, accelerate {accelerate.__version__}, deepspeed {ds}",
    ]


def _mb(n: float) -> str:
    return "0" if n == 0 else f"{n / MB:.0f}" if n >= 100 * MB else f"{n / MB:.1f}"


def table(results: dict[str, list[dict]], world: int) -> str:
    """A Markdown table (readable in a terminal, pasteable into the README) and the target checks."""
    from distft.distributed.memory import expected_model_state_bytes

    def busiest(ranks):  # the rank that limits memory
        return max(ranks, key=lambda r: r["states"]["total"])

    psi = next(iter(results.values()))[0]["psi"]
    lines = [
        f"Per rank, MiB, measured / ZeRO paper's formula (fp32 Adam: 4Ψ params, 4Ψ grads, 8Ψ moments); "
        f"Ψ = {psi / 1e6:.1f}M parameters, N = {world} ranks, busiest rank shown",
        "",
        "| strategy | params | grads | Adam | master | model states | ratio (ideal) | RSS Δ | RSS ratio | peak Δ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    checks = []
    for name, ranks in results.items():
        _, stage, ref = STRATEGIES[name]
        r = busiest(ranks)
        got, want = r["states"], expected_model_state_bytes(psi, world, stage)
        cells = [f"{_mb(got[k])} / {_mb(want[k])}" for k in ("params", "grads", "optimizer", "total")]
        ratio = rss_ratio = ""
        if ref in results:
            base = busiest(results[ref])
            ratio_v = got["total"] / base["states"]["total"]
            ideal_v = want["total"] / expected_model_state_bytes(psi, world, STRATEGIES[ref][1])["total"]
            ratio, rss_ratio = f"{ratio_v:.3f} ({ideal_v:.3f})", f"{r['rss_delta'] / base['rss_delta']:.2f}"
            if stage == 3:
                off = abs(ratio_v - ideal_v) / ideal_v
                checks.append(f"{r['strategy']} / {base['strategy']}: {ratio_v:.3f} vs 1/N = {ideal_v:.3f} "
                              f"({off:.1%} off; target within 5%: {'met' if off <= 0.05 else 'MISSED'})")
        peak = _mb(r["peak_delta"]) if r["peak_delta"] is not None else "n/a"
        lines.append(f"| {r['strategy']} | {' | '.join(cells[:3])} | {_mb(got['master'])} | {cells[3]} | {ratio} "
                     f"| {_mb(r['rss_delta'])} | {rss_ratio} | {peak} |")
    lines += [
        "",
        "ratio: model states / the reference's (ZeRO stages / DeepSpeed stage 0, FSDP2 / DDP); ideal: the formula's.",
        "master: an fp32 weight copy the optimizer holds besides the parameters (DeepSpeed ZeRO-1/2 keep one even in "
        "fp32 training; ZeRO-3 reuses its fp32 partition).",
        "RSS Δ: process RSS above the post-import baseline just before step 2 (after malloc_trim); RSS ratio: over "
        "the reference's. peak Δ: peak RSS (VmHWM) above the baseline over load and both steps. RSS also holds "
        "what the formula leaves out: DDP's gradient buckets, DeepSpeed's reduce bucket (reduce_bucket_size: distft sizes it "
        "hidden^2, DeepSpeed's default is 5e8 elements), ZeRO-3's gathered layers, activations, the data.",
        *checks,
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--strategies", default="ddp,fsdp,zero0,zero1,zero2,zero3",
                   help=f"comma-separated subset of {','.join(STRATEGIES)}")
    p.add_argument("--deepspeed-config", type=Path,
                   help="a DeepSpeed JSON merged over distft's defaults for the ZeRO rows (strategy.deepspeed_config), "
                        "e.g. smaller reduce/prefetch buckets")
    p.add_argument("--json", type=Path, help="also write the raw per-rank measurements here")
    args = p.parse_args()
    names = [n.strip() for n in args.strategies.split(",") if n.strip()]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        p.error(f"unknown strategies {unknown}; choose from {list(STRATEGIES)}")

    started = time.time()
    from distft.data.task import make_splits, write_jsonl

    model_dir = build_model(args.hidden, args.layers)
    print(f"model: {model_dir} ({time.time() - started:.0f}s)", flush=True)
    results: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="distft-memory-") as tmp:
        work = Path(tmp)
        rows, _ = make_splits(n_train=40, n_test=1, seed=3)
        data = work / "train.jsonl"
        write_jsonl(rows, data)
        for i, name in enumerate(names, 1):
            t0 = time.time()
            print(f"[{i}/{len(names)}] {name}: 2 steps on {args.world} ranks ...", flush=True)
            results[name] = run_strategy(name, model_dir, data, args.world, work, args.deepspeed_config)
            total = max(r["states"]["total"] for r in results[name])
            print(f"[{i}/{len(names)}] {name}: model states {total / MB:.0f} MiB on the busiest rank "
                  f"({time.time() - t0:.0f}s)", flush=True)
    print()
    print("\n".join(machine_lines()))
    if args.deepspeed_config:
        print(f"ZeRO rows with {args.deepspeed_config}: {args.deepspeed_config.read_text().strip()}")
    print(table(results, args.world))
    print(f"benchmark wall time: {time.time() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
