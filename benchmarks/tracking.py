"""What tracking costs, and what a tracked search looks like in MLflow.

1. Overhead: the same SFT stage (the shipped tiny base, LoRA, `--steps` steps, a log line every step,
   which is the worst case) with run.report_to = [] (metrics.jsonl only), [tensorboard], [mlflow] (a real
   `mlflow server` on 127.0.0.1) and [wandb] (offline), run in-process, alternating, `--rounds` times.
   Same work: the script checks that every mode logged the same steps with the same losses. Two
   figures: the whole run (the tracking runs' creation, params and files included) and the steady step.
2. The run tree of a real search: `distft tune configs/tune_quickstart.yaml` with 3 trials (shortened)
   and MLFLOW_TRACKING_URI set, printed as MlflowClient reads it back (README, "Tracking").

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/tracking.py
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
MODES = {"none": [], "tensorboard": ["tensorboard"], "mlflow": ["mlflow"], "wandb": ["wandb"]}


def stage_config(steps: int, report_to: list[str], uri: str):
    from distft.config import build_config

    return build_config({
        "model": {"name_or_path": "distft://tiny-base", "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(REPO / "configs/data/facts_train.jsonl"), "max_eval_samples": 8},
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {"lr": 3e-3, "scheduler": "constant", "max_steps": steps, "global_batch_size": 16,
                  "micro_batch_size": 16, "log_every": 1, "save_every": 100_000},
        "evaluate": {"data": None},
        "run": {"report_to": report_to, "mlflow": {"tracking_uri": uri, "experiment": "overhead"},
                "wandb": {"mode": "offline", "project": "distft-overhead"}},
    })


def one_run(mode: str, steps: int, uri: str, root: Path) -> tuple[float, list]:
    from distft.launch.tracking import RunTracking
    from distft.stages import StageContext, stage_runner

    run_dir = Path(tempfile.mkdtemp(prefix=f"{mode}-", dir=root))
    cfg = stage_config(steps, MODES[mode], uri)
    started = time.perf_counter()
    spec = RunTracking(cfg, run_dir, log=lambda _: None).stage(0, resumed=False)
    stage_runner("sft")(cfg, StageContext(run_dir=run_dir, tracking=spec))
    took = time.perf_counter() - started
    rows = [json.loads(ln) for ln in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "loss" in r]
    # The steady step while logging every step: from the first training row to the last, per step.
    step_ms = 1000 * (train[-1]["time"] - train[0]["time"]) / (train[-1]["step"] - train[0]["step"])
    return took, step_ms, [(r["step"], round(r["loss"], 5)) for r in train]


def overhead(uri: str, steps: int, rounds: int, root: Path) -> dict:
    times: dict[str, list[float]] = {m: [] for m in MODES}
    steps_ms: dict[str, list[float]] = {m: [] for m in MODES}
    curves: dict[str, list] = {}
    for r in range(rounds):
        order = list(MODES) if r % 2 == 0 else list(reversed(MODES))
        for mode in order:
            took, step_ms, curve = one_run(mode, steps, uri, root)
            times[mode].append(took)
            steps_ms[mode].append(step_ms)
            reference = curves.setdefault("first", curve)
            if curve != reference or len(curve) != steps:
                raise SystemExit(f"not the same work: report_to={MODES[mode]} logged other steps or losses")
            curves[mode] = curve
            print(f"round {r + 1} {mode:<12} {took:6.1f} s, step {step_ms:.1f} ms", flush=True)
    same = all(c == curves["first"] for c in curves.values())  # checked after every run above
    base, base_step = statistics.median(times["none"]), statistics.median(steps_ms["none"])
    table = {m: {"median_s": round(statistics.median(t), 2), "min_s": round(min(t), 2), "max_s": round(max(t), 2),
                 "ratio": round(statistics.median(t) / base, 3),
                 "step_ms": round(statistics.median(steps_ms[m]), 1),
                 "step_ratio": round(statistics.median(steps_ms[m]) / base_step, 3)} for m, t in times.items()}
    return {"steps": steps, "rounds": rounds, "same_work": same, "table": table}


def search_tree(uri: str, root: Path) -> str:
    from mlflow import MlflowClient

    from distft.launch.tracking import run_tree

    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "distft.cli", "tune", "configs/tune_quickstart.yaml", "tune.num_samples=3",
           "train.max_steps=30", "train.eval_every=5", "train.save_every=30", "tune.asha.grace_period=5",
           "tune.asha.reduction_factor=2", "evaluate.max_samples=40", "run.report_to=[mlflow]",
           "run.mlflow.experiment=tune_quickstart", f"run.output_dir={root}", "run.name=tracked-search"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(done.stdout[-3000:] + done.stderr[-3000:])
    return run_tree(MlflowClient(uri), "tune_quickstart")


def main() -> None:
    from servers import running_mlflow_server

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--skip-search", action="store_true")
    ap.add_argument("--out", default=str(REPO / "benchmarks/results/tracking.json"))
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="distft-tracking-"))
    with running_mlflow_server(root / "mlflow") as uri:
        result = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                  "overhead": overhead(uri, args.steps, args.rounds, root)}
        if not args.skip_search:
            result["search_tree"] = search_tree(uri, root)
    table = result["overhead"]["table"]
    print(f"\nsame work in every mode (steps and losses): {result['overhead']['same_work']}")
    print(f"{'report_to':<14}{'run s':>8}{'min-max':>16}{'vs none':>9}{'step ms':>10}{'vs none':>9}")
    for mode, row in table.items():
        print(f"{mode:<14}{row['median_s']:>8.1f}{row['min_s']:>8.1f}-{row['max_s']:<7.1f}{row['ratio']:>8.2f}x"
              f"{row['step_ms']:>10.1f}{row['step_ratio']:>8.2f}x")
    if "search_tree" in result:
        print("\n" + result["search_tree"])
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
