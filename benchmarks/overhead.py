"""What distft costs around the training step: `distft train` against a bare TRL Trainer under torchrun.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/overhead.py            # 5 alternating reps (~8 min)
    .venv/bin/python benchmarks/overhead.py --reps 2 --steps 40                   # a quick look

The same job three ways, alternating within each repetition (the machine is noisy, so
only medians and spreads of side-by-side runs are reported, never one absolute time):

- `bare`: `torchrun --nproc-per-node 2 benchmarks/bare_trainer.py` (TRL SFTTrainer, gloo, no distft);
- `cold`: `distft train` starting its own private Ray cluster (what a laptop user gets);
- `warm`: `distft train --address auto` on a `distft cluster up` cluster started once beforehand.

Same model (the bundled tiny base, full fine-tuning), same prompt/completion rows, the same
steps, global batch and sequence length, 2 CPU workers with 1 torch thread each, no
checkpoint or eval during the steps, one eval and a safetensors export after them.

Columns, from timestamps every run writes (metrics.jsonl's log lines, the time its worker
group started, the process's start and end):

- `step`: the steady-state step time, median over the log intervals after the first;
- `to first step`: process start until step 1 is logged;
- `after last step`: the last logged step until the process has exited (eval, export, teardown);
- `overhead`: to-first-step plus after-last-step, minus bare's in the same repetition.
For distft, `to first step` is split at the moment the Train worker group entered the training
function: before it is Ray (imports, cluster start, controller, worker actors); after it is
the same work the bare script does (imports, process group, data, model) plus distft's own.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

BIN = Path(sys.executable).parent


def prompt_completion_rows(dst: Path) -> None:
    """The quickstart's facts as prompt/completion rows: both paths tokenize them the same way."""
    with (REPO / "configs/data/facts_train.jsonl").open() as f, dst.open("w") as out:
        for line in f:
            row = json.loads(line)
            prompt = row["instruction"] + (("\n" + row["input"]) if row.get("input") else "") + "\n"
            out.write(json.dumps({"prompt": prompt, "completion": row["output"]}) + "\n")


def write_config(path: Path, data: Path, a) -> None:
    import yaml

    from distft.models.bundled import tiny_base_dir

    cfg = {
        "model": {"name_or_path": str(tiny_base_dir()), "max_seq_len": a.max_len},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
        "stage": "sft",
        "data": {"train": str(data), "eval_fraction": 0.05},
        "method": {"name": "full"},
        "train": {"lr": 1e-4, "max_steps": a.steps, "global_batch_size": a.global_batch,
                  "micro_batch_size": a.micro_batch, "log_every": a.log_every,
                  "save_every": 10 * a.steps, "eval_every": 10 * a.steps},
    }
    path.write_text(yaml.safe_dump(cfg))


def metrics(stage_dir: Path) -> list[dict]:
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    return [m for m in lines if "loss" in m and "eval_loss" not in m]


def steady_step(logs: list[dict]) -> float:
    """Median seconds per step over the log intervals after the first (step 1 pays for warm-up)."""
    pts = sorted({m["step"]: m["time"] for m in logs}.items())
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts[1:], pts[2:])]
    return statistics.median(gaps)


def run_bare(a, model: Path, data: Path, work: Path) -> dict:
    out = work / "bare"
    shutil.rmtree(out, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    started = time.time()
    subprocess.run([str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", "29611",
                    str(REPO / "benchmarks/bare_trainer.py"), "--model", str(model), "--data", str(data),
                    "--out", str(out), "--max-steps", str(a.steps), "--micro-batch", str(a.micro_batch),
                    "--global-batch", str(a.global_batch), "--max-len", str(a.max_len), "--lr", "1e-4",
                    "--log-every", str(a.log_every), "--eval-fraction", "0.05"],
                   check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ended = time.time()
    logs = metrics(out)
    return {"start": started, "end": ended, "first": logs[0]["time"], "last": logs[-1]["time"],
            "entered": None, "step": steady_step(logs)}


def run_distft(a, config: Path, work: Path, name: str, address: str | None) -> dict:
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [str(BIN / "distft"), "train", str(config), f"run.output_dir={work / 'runs'}", f"run.name={name}"]
    if address:
        cmd += ["--address", address]
    started = time.time()
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ended = time.time()
    if proc.returncode:
        sys.exit(f"distft train failed ({name}):\n{proc.stdout[-3000:]}")
    stage = run_dir / "sft"
    logs = metrics(stage)
    entered = json.loads((stage / "placement/groups.jsonl").read_text().splitlines()[0])["time"]
    return {"start": started, "end": ended, "first": logs[0]["time"], "last": logs[-1]["time"],
            "entered": entered, "step": steady_step(logs)}


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--global-batch", type=int, default=32)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", help="also write the raw per-run figures here")
    a = p.parse_args()

    from distft.models.bundled import tiny_base_dir

    model = tiny_base_dir()
    work = Path(tempfile.mkdtemp(prefix="distft-overhead-"))
    data, config = work / "facts_pc.jsonl", work / "overhead.yaml"
    prompt_completion_rows(data)
    write_config(config, data, a)

    print("cluster up (for the warm runs) ...", flush=True)
    subprocess.run([str(BIN / "distft"), "cluster", "up", "--workers", "2", "--cpus-per-worker", "1"],
                   check=True, stdout=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {"bare": [], "cold": [], "warm": []}
    try:
        for rep in range(a.reps):
            # Rotate the order so no mode always runs first (after a quiet spell) or last.
            order = ["bare", "cold", "warm"][rep % 3:] + ["bare", "cold", "warm"][:rep % 3]
            for mode in order:
                if mode == "bare":
                    r = run_bare(a, model, data, work)
                else:
                    r = run_distft(a, config, work, f"{mode}-{rep}", "auto" if mode == "warm" else None)
                runs[mode].append(r)
                print(f"rep {rep + 1}/{a.reps} {mode:4s}: {r['end'] - r['start']:.1f}s total, "
                      f"step {1000 * r['step']:.0f} ms", flush=True)
    finally:
        subprocess.run([str(BIN / "distft"), "cluster", "down"], stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    def before(r):
        return r["first"] - r["start"]

    def after(r):
        return r["end"] - r["last"]

    print("\n## Overhead around the step: distft train vs a bare TRL Trainer under torchrun\n")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {datetime.date.today()}; {a.reps} alternating reps, "
          f"{a.steps} steps, global batch {a.global_batch}, seq {a.max_len}, 2 CPU workers x 1 thread. "
          "Median (min-max).\n")
    print("| mode | step ms | step ratio vs bare | to first step s | of which Ray (to worker start) s "
          "| after last step s | overhead vs bare s |")
    print("|---|---|---|---|---|---|---|")
    for mode, rs in runs.items():
        ratio = [r["step"] / b["step"] for r, b in zip(rs, runs["bare"])]
        extra = [before(r) + after(r) - before(b) - after(b) for r, b in zip(rs, runs["bare"])]
        ray_part = spread([r["entered"] - r["start"] for r in rs]) if rs[0]["entered"] else "-"
        print(f"| {mode} | {spread([1000 * r['step'] for r in rs], '{:.0f}')} | {spread(ratio, '{:.2f}')} "
              f"| {spread([before(r) for r in rs])} | {ray_part} | {spread([after(r) for r in rs])} "
              f"| {spread(extra) if mode != 'bare' else '-'} |")
    print("\nTargets: step ratio <= 1.05; overhead <= 20 s cold, <= 8 s warm.")
    if a.json:
        Path(a.json).write_text(json.dumps(runs, indent=2))


if __name__ == "__main__":
    main()
