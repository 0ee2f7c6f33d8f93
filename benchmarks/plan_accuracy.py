"""How close `distft plan` comes to each worker's real peak memory: the kernel's high-water mark per rank.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/plan_accuracy.py                 # the default set
    .venv/bin/python benchmarks/plan_accuracy.py --cases 0.1b:full:zero3,0.1b:lora:ddp --steps 3

Each case runs the real SFT stage (distft's loading, method, strategy and Trainer) on 2 spawned gloo
processes, Ray-free like benchmarks/memory.py, for `--steps` optimizer steps at sequence length 64,
micro-batch 1, fp32, on a randomly initialised Llama of the named size (built once, saved in HF format
under the distft cache). After the last step each rank reads its own peak resident memory from the kernel
(`VmHWM`, over the whole process: imports, loading and every step), and the parent also samples each
rank's RSS every 0.2 s as a cross-check. Nothing samples inside the ranks. The ranks get the allocator
setting distft's CPU workers get (MALLOC_MMAP_THRESHOLD_, see launch/worker_env.py).

The plan is `distft.distributed.plan.host_peak` for the same config: what `distft plan` prints for a CPU
config (and `validate` checks against the node's memory). The ratio column is measured / plan; the target
is 0.85-1.15. `--calibrate` marks cases used to fit the plan's constants; the others are held out.

On a GPU (`--gpu`), the same cases measure `torch.cuda.max_memory_allocated` per rank against the plan's
device total instead (nccl; DeepSpeed must be installed).

A guard kills a case whose rank exceeds `--cap-gib` (default: an even share of 85% of this machine's RAM),
so a plan that is far too low ends as "killed at N GiB", not as the OOM killer picking a victim.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# The allocator setting distft gives its CPU workers (launch/worker_env.py, _worker_env), read by glibc at
# start-up in each spawned rank, so the ranks hold what a `distft train` worker holds. Set before
# memory.py is imported: its own default (64 KB, for reading model states) would win otherwise.
from distft.launch.worker_env import MALLOC_MMAP_THRESHOLD  # noqa: E402  (after sys.path; imports no Ray)

os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(MALLOC_MMAP_THRESHOLD))
# benchmarks/memory.py: the same harness, its environment for the ranks (DS_ACCELERATOR=cpu, the hub
# offline, one thread each) and its helpers.
from memory import free_port, machine_lines  # noqa: E402

GiB = 2**30
# name -> LlamaConfig fields. 0.45b is the M1 (hidden 1024, 24 layers); 1.1b is TinyLlama's shape.
SHAPES = {
    "0.1b": dict(hidden_size=768, num_hidden_layers=12, intermediate_size=2048, num_attention_heads=12,
                 num_key_value_heads=12, tie_word_embeddings=True),
    "0.2b": dict(hidden_size=1024, num_hidden_layers=12, intermediate_size=2816, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=False),
    "0.45b": dict(hidden_size=1024, num_hidden_layers=24, intermediate_size=4096, num_attention_heads=16,
                  num_key_value_heads=16, tie_word_embeddings=True),
    "1.1b": dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, tie_word_embeddings=False),
}
VOCAB = 32_000
STRATEGIES = {
    "ddp": {"name": "ddp"},
    "zero1": {"name": "deepspeed", "zero_stage": 1},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "zero3-offload": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu"},
    "fsdp2": {"name": "fsdp"},
}
METHODS = {"full": {"name": "full"}, "lora": {"name": "lora"}}
# Fitting set (--calibrate) and held-out set: the constants are fitted on the first and checked on the second.
# The constants the plan fits (distft/distributed/plan.py: WORKER_BASELINE, LOAD_BASELINE, LOAD_COPIES,
# ZeRO-3's copy of the trainable weights) come from the calibration cases; the held-out cases only check them.
CALIBRATE = ["0.1b:full:ddp", "0.1b:full:zero3", "1.1b:lora:ddp", "1.1b:lora:zero3"]
HELD_OUT = ["0.1b:full:zero1", "0.1b:full:fsdp2", "0.1b:lora:ddp", "0.1b:lora:zero3", "0.1b:lora:fsdp2",
            "0.2b:full:zero2", "0.2b:full:fsdp2", "0.2b:lora:ddp", "0.2b:lora:zero3",
            "0.45b:full:ddp", "0.45b:full:zero3", "0.45b:full:fsdp2", "1.1b:full:fsdp2"]
SEQ = 64


def build_model(size: str) -> Path:
    """A random-init Llama of `size` with a 32k vocabulary, saved once under the distft cache (safetensors)."""
    from distft.models.loading import cache_dir

    out = cache_dir() / f"plan-llama-{size}"
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig

    from distft.models.tiny import generic_corpus, train_tokenizer

    cache_dir().mkdir(parents=True, exist_ok=True)  # a fresh clone has no cache yet
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=f".plan-llama-{size}-"))
    tokenizer = train_tokenizer(generic_corpus())
    config = LlamaConfig(vocab_size=VOCAB, max_position_embeddings=2048, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         torch_dtype="float32", **SHAPES[size])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    del model
    tmp.rename(out)  # atomic: a half-written model is never picked up
    return out


def case_config(case: str, model_dir: Path, data: Path, world: int, steps: int, gpu: bool) -> dict:
    size, method, strategy = case.split(":")
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_len": SEQ, "dtype": "float32"},
        "scaling": {"num_workers": world, "torch_threads": 1, "use_gpu": gpu},
        "stage": "sft",
        "method": METHODS[method],
        "data": {"train": str(data), "max_eval_samples": 1},
        "strategy": STRATEGIES[strategy],
        "train": {"max_steps": steps, "global_batch_size": world, "micro_batch_size": 1, "log_every": 1,
                  "save_every": 10_000, "eval_every": 10_000},
    }


class Done(Exception):
    """Raised on every rank after the last measured step: the final eval and export are not measured."""


def _worker(rank: int, world: int, port: int, raw_json: str, run_dir: str, steps: int) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    import torch

    torch.set_num_threads(1)
    from distft.config import build_config

    cfg = build_config(json.loads(raw_json))
    import distft.stages.sft as sft
    import distft.stages.trainer_setup as setup
    from distft.distributed.memory import peak_rss_bytes
    from distft.distributed.process_group import leave_process_group
    from distft.stages.context import context_from_env

    seen: dict = {"rank": rank}
    gpu = cfg.scaling.use_gpu

    class Probe(setup.ReportCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen["loaded_hwm"] = peak_rss_bytes()
            return super().on_train_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            out = super().on_step_end(args, state, control, **kwargs)
            seen.setdefault("step_hwm", []).append(peak_rss_bytes())
            seen.setdefault("step_end", []).append(time.time())
            if state.global_step >= steps:
                seen["hwm"] = peak_rss_bytes()
                if gpu:
                    seen["cuda_peak"] = torch.cuda.max_memory_allocated()
                raise Done
            return out

    setup.ReportCallback = Probe  # stage_callbacks looks the name up at call time
    try:
        sft.run(cfg, context_from_env(run_dir))
    except Done:
        pass
    if "hwm" not in seen:
        raise RuntimeError(f"the stage ended before step {steps}; nothing was measured")
    Path(run_dir, f"peak-rank{rank}.json").write_text(json.dumps(seen))
    leave_process_group()


def _rss(pid: int) -> dict:
    """VmRSS and its parts (RssAnon: the process's own; RssFile: mapped files such as safetensors weights,
    shared with every process mapping the same file) in bytes."""
    out = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key = line.split(":", 1)[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def run_case(case: str, raw: dict, world: int, work: Path, steps: int, cap: float) -> dict:
    import torch.multiprocessing as mp

    run_dir = work / case.replace(":", "-")
    run_dir.mkdir(parents=True)
    ctx = mp.start_processes(_worker, args=(world, free_port(), json.dumps(raw), str(run_dir), steps),
                             nprocs=world, start_method="spawn", join=False)
    sampled = {pid: 0 for pid in ctx.pids()}
    parts = {pid: {} for pid in ctx.pids()}  # the largest RssAnon, RssFile seen
    timeline = {pid: [] for pid in ctx.pids()}
    killed: list[float] = []
    stop = threading.Event()
    t0 = time.time()

    def guard():
        while not stop.is_set():
            for pid in sampled:
                now = _rss(pid)
                rss = now.get("VmRSS", 0)
                sampled[pid] = max(sampled[pid], rss)
                for k, v in now.items():
                    parts[pid][k] = max(parts[pid].get(k, 0), v)
                timeline[pid].append((round(time.time() - t0, 1), now.get("RssAnon", 0) >> 20, now.get("RssFile", 0) >> 20))
                if rss > cap and not killed:
                    killed.append(rss)
                    for p in sampled:
                        try:
                            os.kill(p, signal.SIGKILL)
                        except ProcessLookupError:
                            pass
            stop.wait(0.2)

    thread = threading.Thread(target=guard, daemon=True)
    thread.start()
    started = time.time()
    try:
        while not ctx.join():
            pass
        error = None
    except Exception as e:  # a rank died (the guard, or a real failure): reported in the table
        error = str(e).strip().splitlines()[-1][:200]
    stop.set()
    thread.join()
    out = {"case": case, "seconds": round(time.time() - started, 1),
           "sampled_max": [sampled[p] for p in ctx.pids()], "sampled_parts": [parts[p] for p in ctx.pids()],
           "timeline_mib": [timeline[p] for p in ctx.pids()]}
    if killed:
        out["error"] = f"killed by the guard at {killed[0] / GiB:.1f} GiB (cap {cap / GiB:.1f})"
    elif error:
        out["error"] = error
    else:
        out["ranks"] = [json.loads((run_dir / f"peak-rank{r}.json").read_text()) for r in range(world)]
    return out


def planned(raw: dict, world: int, gpu: bool) -> dict:
    from distft.config import build_config
    from distft.distributed import plan
    from distft.models.shapes import model_shape

    cfg = build_config(raw)
    shape = model_shape(cfg.model.name_or_path)
    mem = plan.stage_memory(cfg, 0, shape, world)
    host = plan.host_peak(cfg, 0, shape, world)
    return {"device": mem.total, "host": host.total, "parts": host.parts(), "params": shape.params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", help="comma-separated size:method:strategy (default: the calibration set, then the "
                                   f"held-out set); sizes {list(SHAPES)}, methods {list(METHODS)}, "
                                   f"strategies {list(STRATEGIES)}")
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--gpu", action="store_true", help="measure torch.cuda.max_memory_allocated on GPUs (nccl)")
    p.add_argument("--cap-gib", type=float, help="kill a case whose rank's RSS passes this")
    p.add_argument("--json", type=Path, help="append every case's raw measurements (JSON lines) here")
    p.add_argument("--allocator", choices=("distft", "glibc"), default="distft",
                   help="distft: the fixed mmap threshold distft's CPU workers get; glibc: glibc's adaptive default "
                        "(what the workers had before; a 0.44B ZeRO-3 worker then peaked 2.5 GiB higher)")
    p.add_argument("--replan", type=Path, help="measure nothing: the table of the measurements in this --json file "
                                               "against the plan of the current code (after a change to the plan only)")
    args = p.parse_args()
    import psutil

    if args.allocator == "glibc":
        os.environ.pop("MALLOC_MMAP_THRESHOLD_", None)  # read by glibc in each rank as it starts
    if args.replan:
        rows = replan(args.replan, args.world, args.gpu)
        machines = {" / ".join(r["machine"]) for r in rows if r.get("machine")}
        print(f"measurements from {args.replan}, planned by the current code; measured on: "
              + ("; ".join(sorted(machines)) or "(not recorded)"))
        print_table(rows, args)
        return

    cases = args.cases.split(",") if args.cases else CALIBRATE + HELD_OUT
    for case in cases:
        size, method, strategy = (case.split(":") + ["", "", ""])[:3]
        if size not in SHAPES or method not in METHODS or strategy not in STRATEGIES:
            p.error(f"bad case {case!r}: size:method:strategy from {list(SHAPES)}, {list(METHODS)}, "
                    f"{list(STRATEGIES)}")
    cap = (args.cap_gib * GiB) if args.cap_gib else 0.85 * psutil.virtual_memory().total / args.world
    started = time.time()
    from distft.data.task import make_splits, write_jsonl

    rows = []
    with tempfile.TemporaryDirectory(prefix="distft-plan-accuracy-") as tmp:
        work = Path(tmp)
        train, _ = make_splits(n_train=64, n_test=1, seed=3)
        data = work / "train.jsonl"
        write_jsonl(train, data)
        for i, case in enumerate(cases, 1):
            model_dir = build_model(case.split(":")[0])
            raw = case_config(case, model_dir, data, args.world, args.steps, args.gpu)
            plan = planned(raw, args.world, args.gpu)
            print(f"[{i}/{len(cases)}] {case}: plan {plan['host'] / GiB:.2f} GiB per rank ...", flush=True)
            result = {**run_case(case, raw, args.world, work, args.steps, cap), "plan": plan,
                      "held_out": case not in CALIBRATE, "machine": machine_lines(),
                      "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_")}
            if "ranks" in result:
                key = "cuda_peak" if args.gpu else "hwm"
                result["measured"] = max(r[key] for r in result["ranks"])
                result["ratio"] = result["measured"] / (plan["device"] if args.gpu else plan["host"])
                print(f"[{i}/{len(cases)}] {case}: measured {result['measured'] / GiB:.2f} GiB, "
                      f"ratio {result['ratio']:.2f} ({result['seconds']:.0f}s)", flush=True)
            else:
                print(f"[{i}/{len(cases)}] {case}: {result['error']}", flush=True)
            rows.append(result)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps(result) + "\n")
    print()
    print("\n".join(machine_lines()))
    print_table(rows, args)
    print(f"\nbenchmark wall time: {time.time() - started:.0f}s")


def replan(path: Path, world: int, gpu: bool) -> list[dict]:
    """The rows of an earlier run's --json file, planned again by the current code (the last row per case)."""
    rows: dict[str, dict] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if "ranks" in row:
            raw = case_config(row["case"], build_model(row["case"].split(":")[0]), path, world, 3, gpu)
            row["plan"] = planned(raw, world, gpu)
            row["ratio"] = row["measured"] / (row["plan"]["device"] if gpu else row["plan"]["host"])
            row["held_out"] = row["case"] not in CALIBRATE
        rows[row["case"]] = row
    return list(rows.values())


def print_table(rows: list[dict], args) -> None:
    what = "torch.cuda.max_memory_allocated" if args.gpu else "peak RSS (VmHWM)"
    print(f"{args.world} ranks, fp32, sequence {SEQ}, micro-batch 1, {args.steps} steps; measured = the busiest "
          f"rank's {what}; plan = distft plan's per-rank {'device' if args.gpu else 'host'} total")
    print()
    print("| case | params | plan GiB | measured GiB | measured / plan | within 15% | set |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        plan_gib = (r["plan"]["device"] if args.gpu else r["plan"]["host"]) / GiB
        if "ratio" in r:
            cells = f"{r['measured'] / GiB:.2f} | {r['ratio']:.2f} | {'yes' if abs(r['ratio'] - 1) <= 0.15 else 'NO'}"
        else:
            cells = f"- | - | {r['error']}"
        print(f"| {r['case']} | {r['plan']['params'] / 1e9:.2f}B | {plan_gib:.2f} | {cells} | "
              f"{'held out' if r['held_out'] else 'calibration'} |")
    held = [r for r in rows if r.get("held_out") and "ratio" in r]
    if held:
        within = sum(abs(r["ratio"] - 1) <= 0.15 for r in held)
        print(f"\nheld out: {within} of {len(held)} within 15%; measured / plan from {min(r['ratio'] for r in held):.2f} "
              f"to {max(r['ratio'] for r in held):.2f}")


if __name__ == "__main__":
    main()
