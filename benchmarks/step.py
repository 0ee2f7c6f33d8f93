"""The training step and the start: distft against a bare transformers Trainer doing the same work.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/step.py                  # 7 rounds, both shapes (~30 min)
    .venv/bin/python benchmarks/step.py --rounds 2 --shapes 2x1 --modes bare,cold    # a quick look

The same job in every mode: full fine-tuning of the bundled tiny base (fp32), 100 steps of a
global batch of 16 rows of at most 64 tokens, the prompt masked out of the loss, then one
evaluation and a safetensors export; no checkpoint, no held-out generation.

Modes, alternating within each round (this machine is noisy: only side-by-side ratios count):
- `bare`:  benchmarks/step_bare.py, a transformers `Trainer` with the model's own loss (torchrun and
           gloo DDP for 2 processes): what a user writes without a framework;
- `stage`: `python -m distft.stages` (torchrun for 2 processes): distft's stage without Ray;
- `cold`:  `distft train`, which starts its own Ray cluster (a laptop user's run);
- `warm`:  `distft train --address auto` on a `distft cluster up` cluster started once beforehand.
Shapes: `1x2` (one worker, two torch threads) and `2x1` (two workers, one thread each).

The same work, checked: the bare Trainer reads token rows that distft's own encoder wrote from the
rows distft reads (input_ids; labels -100 on the prompt), and the script compares every run's logged
losses with the bare run's of the same round and shape, step for step. Same weights, tokens, mask,
order and optimizer give the same losses; a run that differs stops the script.

Columns: `step` is the steady step time, the median of the log intervals after the first (step 1
pays for warm-up); `process` is the wall time of the whole command, from spawn to exit; `vs bare` the
ratio or difference against the bare run of the same round. distft runs also show their own
account of the start (summary.json's `startup_s`).
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
SHAPES = {"1x2": (1, 2), "2x1": (2, 1)}  # workers x torch threads each
MODES = ("bare", "stage", "cold", "warm")
LOSS_RTOL = 2e-3  # logged losses are 4-digit means over 10 steps; fp32 sums in another order differ in the 6th
TARGETS = {"step": {"stage": 1.05, "cold": 1.10, "warm": 1.10}, "process": {"cold": 20.0, "warm": 8.0}}


def prompt_completion_rows(src: Path, dst: Path) -> None:
    """The quickstart's facts as prompt/completion rows (no chat template: the bare Trainer needs none)."""
    with src.open() as f, dst.open("w") as out:
        for line in f:
            row = json.loads(line)
            prompt = row["instruction"] + (("\n" + row["input"]) if row.get("input") else "") + "\n"
            out.write(json.dumps({"prompt": prompt, "completion": row["output"]}) + "\n")


def write_config(path: Path, work: Path, shape: str, a) -> None:
    import yaml

    from distft.models.bundled import tiny_base_dir

    workers, threads = SHAPES[shape]
    cfg = {
        "model": {"name_or_path": str(tiny_base_dir()), "max_seq_len": a.max_len, "dtype": "float32"},
        "scaling": {"num_workers": workers, "cpus_per_worker": threads, "torch_threads": threads},
        "stage": "sft",
        "data": {"train": str(work / "train.jsonl"), "eval": str(work / "eval.jsonl")},
        "method": {"name": "full"},
        "evaluate": {"data": None},
        "train": {"lr": 1e-4, "max_steps": a.steps, "global_batch_size": a.global_batch,
                  "micro_batch_size": a.global_batch // workers, "log_every": a.log_every,
                  "save_every": 10 * a.steps, "eval_every": 10 * a.steps},
    }
    path.write_text(yaml.safe_dump(cfg))


def write_tokens(config: Path, work: Path) -> dict:
    """distft's own token rows for its config, for the bare Trainer; returns the hyperparameters it must share."""
    from distft.config import load_config
    from distft.data.loading import split_rows, tokenize_dataset
    from distft.models.loading import load_tokenizer

    cfg = load_config(str(config))
    stage = cfg.stages[0]
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, fmt = split_rows(stage.data, stage.train.seed)
    for rows, name in ((train_rows, "train_tokens.jsonl"), (eval_rows, "eval_tokens.jsonl")):
        ds, _ = tokenize_dataset(rows, fmt, tokenizer, cfg.model.max_seq_len, stage.loss_on(), stage.data.text_field)
        with (work / name).open("w") as f:
            for r in ds:
                f.write(json.dumps({"input_ids": r["input_ids"], "labels": r["labels"]}) + "\n")
    t = stage.train
    return {"lr": t.lr, "optimizer": t.optimizer, "scheduler": t.scheduler, "warmup": t.warmup_ratio,
            "weight_decay": t.weight_decay, "max_grad_norm": t.max_grad_norm, "seed": t.seed,
            "loss_on": stage.loss_on(), "rows": len(train_rows)}


def logged(path: Path) -> list[dict]:
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [m for m in rows if "loss" in m and "eval_loss" not in m]


def steady_step(logs: list[dict]) -> float:
    """Median seconds per step over the log intervals after the first (step 1 pays for warm-up)."""
    pts = sorted({m["step"]: m["time"] for m in logs}.items())
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(pts[1:], pts[2:])]
    return statistics.median(gaps)


def spawn(cmd: list[str], env: dict, what: str) -> float:
    started = time.time()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    took = time.time() - started
    if proc.returncode:
        sys.exit(f"{what} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
    return took


def torchrun(workers: int, port: int) -> list[str]:
    if workers == 1:
        return [sys.executable]
    return [str(BIN / "torchrun"), "--nproc-per-node", str(workers), "--master-port", str(port)]


def run_mode(mode: str, shape: str, rnd: int, work: Path, a, hp: dict) -> dict:
    workers, threads = SHAPES[shape]
    config = work / f"step-{shape}.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    out = work / "runs" / f"{mode}-{shape}-{rnd}"
    shutil.rmtree(out, ignore_errors=True)
    if mode == "bare":
        cmd = [*torchrun(workers, 29611), str(REPO / "benchmarks/step_bare.py"), "--model", str(model_dir()),
               "--tokens", str(work / "train_tokens.jsonl"), "--eval-tokens", str(work / "eval_tokens.jsonl"),
               "--out", str(out), "--threads", str(threads), "--max-steps", str(a.steps),
               "--micro-batch", str(a.global_batch // workers), "--accum", "1", "--lr", str(hp["lr"]),
               "--optimizer", hp["optimizer"], "--scheduler", hp["scheduler"], "--warmup", str(hp["warmup"]),
               "--weight-decay", str(hp["weight_decay"]), "--max-grad-norm", str(hp["max_grad_norm"]),
               "--seed", str(hp["seed"]), "--log-every", str(a.log_every)]
        took = spawn(cmd, env, f"bare {shape}")
        return {"process": took, "logs": logged(out / "metrics.jsonl"), "startup": None}
    if mode == "stage":
        cmd = [*torchrun(workers, 29612), "-m", "distft.stages", str(config), str(out)]
        took = spawn(cmd, env, f"stage {shape}")
        return {"process": took, "logs": logged(out / "sft" / "metrics.jsonl"), "startup": None}
    cmd = [str(BIN / "distft"), "train", str(config), f"run.output_dir={out.parent}", f"run.name={out.name}"]
    if mode == "warm":
        cmd += ["--address", "auto"]
    took = spawn(cmd, dict(os.environ), f"distft train ({mode} {shape})")
    (summary,) = json.loads((out / "summary.json").read_text())
    phases = {**summary.get("startup_s", {}),
              **{f"after:{k}": v for k, v in summary.get("after_training_s", {}).items()}}
    return {"process": took, "logs": logged(out / "sft" / "metrics.jsonl"), "startup": phases}


def model_dir() -> Path:
    from distft.models.bundled import tiny_base_dir

    return tiny_base_dir()


def same_work(run: dict, bare: dict, what: str) -> float:
    """The largest relative loss difference against the bare run; stops the script above LOSS_RTOL."""
    mine = {m["step"]: m["loss"] for m in run["logs"]}
    ref = {m["step"]: m["loss"] for m in bare["logs"]}
    if sorted(mine) != sorted(ref):
        sys.exit(f"{what}: logged steps {sorted(mine)} differ from the bare run's {sorted(ref)}")
    worst = max(abs(mine[s] - ref[s]) / max(abs(ref[s]), 1e-12) for s in ref)
    if worst > LOSS_RTOL:
        sys.exit(f"{what}: losses differ from the bare run's by up to {worst:.2%}: not the same work.\n"
                 f"  distft {[mine[s] for s in sorted(mine)]}\n  bare   {[ref[s] for s in sorted(ref)]}")
    return worst


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--shapes", default="1x2,2x1")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--global-batch", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--json", help="also write every run's figures here")
    a = p.parse_args()
    shapes = a.shapes.split(",")
    modes = [m for m in MODES if m in a.modes.split(",")]
    if "bare" not in modes:
        sys.exit("--modes must include bare: every figure is a ratio against it")

    work = Path(tempfile.mkdtemp(prefix="distft-step-"))
    prompt_completion_rows(REPO / "configs/data/facts_train.jsonl", work / "train.jsonl")
    prompt_completion_rows(REPO / "configs/data/facts_test.jsonl", work / "eval.jsonl")
    hp = {}
    for shape in shapes:
        write_config(work / f"step-{shape}.yaml", work, shape, a)
        hp = write_tokens(work / f"step-{shape}.yaml", work)  # the same rows for every shape
    if "warm" in modes:
        # One raylet with 2 CPUs holds either shape's workers.
        print("distft cluster up (for the warm runs) ...", flush=True)
        spawn([str(BIN / "distft"), "cluster", "up", "--workers", "1", "--cpus-per-worker", "2"], dict(os.environ),
              "distft cluster up")
    runs: dict[tuple[str, str], list[dict]] = {(s, m): [] for s in shapes for m in modes}
    worst = 0.0
    try:
        for rnd in range(a.rounds):
            for shape in shapes:
                # Rotate the order so that no mode always runs first (after a quiet spell) or last.
                order = modes[rnd % len(modes):] + modes[:rnd % len(modes)]
                got = {}
                for mode in order:
                    got[mode] = run_mode(mode, shape, rnd, work, a, hp)
                    got[mode]["step"] = steady_step(got[mode]["logs"])
                for mode in modes:
                    if mode != "bare":
                        worst = max(worst, same_work(got[mode], got["bare"], f"round {rnd + 1} {shape} {mode}"))
                    r = got[mode]
                    r["step_ratio"] = r["step"] / got["bare"]["step"]
                    r["process_delta"] = r["process"] - got["bare"]["process"]
                    runs[(shape, mode)].append(r)
                print(f"round {rnd + 1}/{a.rounds} {shape}: " + ", ".join(
                    f"{m} {1000 * got[m]['step']:.0f} ms/step {got[m]['process']:.1f} s" for m in modes), flush=True)
    finally:
        if "warm" in modes:
            subprocess.run([str(BIN / "distft"), "cluster", "down"], stdout=subprocess.DEVNULL)
        shutil.rmtree(work, ignore_errors=True)

    import torch
    import transformers
    import trl

    print("\n## The step and the start: distft against a bare transformers Trainer (`step.py`)\n")
    print(f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, trl {trl.__version__}; {a.rounds} alternating rounds of "
          f"{a.steps} steps, global batch {a.global_batch}, sequence <= {a.max_len}, tiny base full fine-tune, "
          f"fp32, seed {hp['seed']}. Median (min–max) over rounds.\n")
    print(f"Same work: {hp['rows']} train rows, loss on {hp['loss_on']}; every run's logged losses matched the "
          f"bare run's of its round within {worst:.2e} (relative; the check stops at {LOSS_RTOL:g}).\n")
    print("| shape | mode | step ms | step vs bare | process s | process vs bare s | distft's own account, s |")
    print("|---|---|---|---|---|---|---|")
    misses = []
    for shape in shapes:
        for mode in modes:
            rs = runs[(shape, mode)]
            ratios = [r["step_ratio"] for r in rs]
            deltas = [r["process_delta"] for r in rs]
            phases = "-"
            if rs[0]["startup"]:
                keys = list(rs[0]["startup"])
                phases = ", ".join(f"{k} {statistics.median(r['startup'][k] for r in rs):.1f}" for k in keys)
            print(f"| {shape} | {mode} | {spread([1000 * r['step'] for r in rs], '{:.0f}')} | "
                  f"{'1.00' if mode == 'bare' else spread(ratios, '{:.2f}')} | {spread([r['process'] for r in rs], '{:.1f}')} "
                  f"| {'-' if mode == 'bare' else spread(deltas, '{:+.1f}')} | {phases} |")
            if mode in TARGETS["step"] and statistics.median(ratios) > TARGETS["step"][mode]:
                misses.append(f"{shape} {mode}: step {statistics.median(ratios):.2f}x > {TARGETS['step'][mode]}x")
            if mode in TARGETS["process"] and statistics.median(deltas) > TARGETS["process"][mode]:
                misses.append(f"{shape} {mode}: start +{statistics.median(deltas):.1f} s > +{TARGETS['process'][mode]:g} s")
    print(f"\nTargets: step at most {TARGETS['step']['stage']}x without Ray and {TARGETS['step']['cold']}x under Ray; "
          f"the whole process at most +{TARGETS['process']['cold']:g} s cold and +{TARGETS['process']['warm']:g} s warm.")
    print("Missed: " + "; ".join(misses) if misses else f"Every target met ({', '.join(modes)}).")
    if a.json:
        Path(a.json).write_text(json.dumps({f"{s} {m}": v for (s, m), v in runs.items()}, indent=2))


if __name__ == "__main__":
    main()
