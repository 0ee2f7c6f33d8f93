"""What Ray's own processes cost a training step: `distft train` with Ray's daemons paused and running.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/ray_daemons.py            # 3 runs (~3 min)

step.py finds distft's step under its own Ray cluster slower than the same stage without Ray. This
script tests the explanation that Ray's other processes (GCS, raylet, dashboard and its agents, log
monitor, Train controller and helper actors) take CPU from the training worker's threads. It runs
step.py's job (1 worker x 2 threads, cold), longer, and during training alternately pauses
(SIGSTOP) every process of the private cluster except the training worker for a few seconds and lets
them run (SIGCONT) for as long. Each log interval that fell wholly inside a paused or a running window
is counted on that side; the same process, the same data and the same steps on both sides, so the
ratio is the step's cost of Ray's daemons alone. It also samples each process's CPU share while
running. Pausing Ray for seconds is harmless here (its health checks wait far longer); it is a
measurement, never something distft does.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step  # noqa: E402  (the same job, data and config as step.py)


def ray_processes(driver: psutil.Process) -> tuple[list[psutil.Process], psutil.Process | None]:
    """The private cluster's processes (all descendants of the distft process) and the training worker."""
    procs, worker = [], None
    for p in driver.children(recursive=True):
        try:
            name = " ".join(p.cmdline())[:60]
        except psutil.Error:
            continue
        if "RayTrainWorker" in name:
            worker = p
        elif "distft.launch.reaper" not in name:
            procs.append(p)
    return procs, worker


def threads(procs: list[psutil.Process]) -> list[int]:
    tids = []
    for p in procs:
        try:
            tids += [t.id for t in p.threads()]
        except psutil.Error:
            pass
    return tids


def set_idle(procs: list[psutil.Process], idle: bool) -> None:
    """SCHED_IDLE (runs only on a core no normal thread wants) or back to SCHED_OTHER, every thread."""
    policy = os.SCHED_IDLE if idle else os.SCHED_OTHER
    for tid in threads(procs):
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
        except OSError:
            pass


def signal_all(procs: list[psutil.Process], sig: int) -> None:
    for p in procs:
        try:
            p.send_signal(sig)
        except psutil.Error:
            pass


def label(p: psutil.Process) -> str:
    """`ray::Name` for Ray's workers, the program or Python script's file name otherwise."""
    try:
        cmd = p.cmdline()
    except psutil.Error:
        return "?"
    if not cmd:
        return p.name()
    if cmd[0].startswith("ray::") or cmd[0].startswith("ray-dashboard"):
        return cmd[0].split(" ")[0]
    script = next((c for c in cmd[1:] if c.endswith(".py")), None)
    return Path(script or cmd[0]).name


def cpu_shares(procs: list[psutil.Process], seconds: float) -> dict[str, float]:
    def times(p):
        try:
            t = p.cpu_times()
            return t.user + t.system
        except psutil.Error:
            return None

    before = {p.pid: times(p) for p in procs}
    time.sleep(seconds)
    out = {}
    for p in procs:
        t0, t1 = before[p.pid], times(p)
        if t0 is not None and t1 is not None:
            out[f"{p.pid} {label(p)}"] = (t1 - t0) / seconds
    return out


def one_run(work: Path, config: Path, window: float, windows: int, env: dict, action: str = "pause") -> dict:
    out = work / "runs" / "p"
    driver = subprocess.Popen([str(step.BIN / "distft"), "train", str(config), f"run.output_dir={out.parent}",
                               f"run.name={out.name}"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = out / "sft" / "metrics.jsonl"
    while not (metrics.exists() and metrics.stat().st_size) and driver.poll() is None:
        time.sleep(0.2)
    time.sleep(1.0)  # past step 1's warm-up
    parent = psutil.Process(driver.pid)
    daemons, worker = ray_processes(parent)
    if worker is None:
        driver.kill()
        sys.exit("no RayTrainWorker process found under distft train")
    shares = cpu_shares([*daemons, worker], window)
    spans = {"paused": [], "running": []}
    for _ in range(windows):
        t0 = time.time()
        if action == "pause":
            signal_all(daemons, signal.SIGSTOP)
        else:
            set_idle(daemons, True)
        try:
            time.sleep(window)
        finally:
            if action == "pause":
                signal_all(daemons, signal.SIGCONT)
            else:
                set_idle(daemons, False)
        spans["paused"].append((t0, time.time()))
        t0 = time.time()
        time.sleep(window)
        spans["running"].append((t0, time.time()))
    log, _ = driver.communicate(timeout=600)
    if driver.returncode:
        sys.exit(f"distft train failed (exit {driver.returncode}):\n{log[-3000:]}")
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    pts = sorted({m["step"]: m["time"] for m in rows if "loss" in m and "eval_loss" not in m}.items())
    steps = {"paused": [], "running": []}
    for (s0, t0), (s1, t1) in zip(pts, pts[1:]):
        for side, ws in spans.items():
            if any(a <= t0 and t1 <= b for a, b in ws):
                steps[side].append((t1 - t0) / (s1 - s0))
    worker_key = next(k for k in shares if k.startswith(f"{worker.pid} "))
    return {"paused": statistics.median(steps["paused"]), "running": statistics.median(steps["running"]),
            "intervals": {k: len(v) for k, v in steps.items()}, "worker_cpu": shares.pop(worker_key),
            "daemons_cpu": sum(shares.values()), "top": sorted(shares.items(), key=lambda kv: -kv[1])[:6]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--window", type=float, default=4.0, help="seconds per paused (and per running) window")
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="set for the distft process (and so for Ray's processes), e.g. RAY_TRAIN_METRICS_ENABLED=0")
    p.add_argument("--action", choices=["pause", "idle"], default="pause",
                   help="pause: SIGSTOP Ray's other processes in alternate windows; idle: put their threads "
                        "under SCHED_IDLE instead (they run only on a core the worker leaves free)")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="distft-raydaemons-"))
    step.prompt_completion_rows(step.REPO / "configs/data/facts_train.jsonl", work / "train.jsonl")
    step.prompt_completion_rows(step.REPO / "configs/data/facts_test.jsonl", work / "eval.jsonl")
    # Long enough to outlast the windows at ~20 ms a step, with steps to spare at each end.
    steps = int(2 * a.window * a.windows / 0.02) + 300
    config = work / "step-1x2.yaml"
    step.write_config(config, work, "1x2", types.SimpleNamespace(max_len=64, steps=steps, global_batch=16, log_every=10))
    env = {**os.environ, **dict(kv.split("=", 1) for kv in a.env)}
    results = []
    for i in range(a.runs):
        r = one_run(work, config, a.window, a.windows, env, a.action)
        results.append(r)
        print(f"run {i + 1}/{a.runs}: running {1000 * r['running']:.1f} ms/step, paused {1000 * r['paused']:.1f} "
              f"ms/step ({r['intervals']}), daemons {100 * r['daemons_cpu']:.0f}% of a core", flush=True)
        subprocess.run(["rm", "-rf", str(work / "runs")])
    import platform

    print(f"\n{time.strftime('%Y-%m-%d')}, {platform.node()}, {os.cpu_count()} CPUs; `distft train` 1x2 cold "
          f"(step.py's job, {steps} steps), {a.runs} runs, {a.windows} x {a.window:g} s windows each"
          f"{'; ' + ', '.join(a.env) if a.env else ''}.\n")
    print("| run | step ms, Ray running | step ms, Ray paused | running / paused | worker CPU | Ray's other processes CPU |")
    print("|---|---|---|---|---|---|")
    for i, r in enumerate(results):
        print(f"| {i + 1} | {1000 * r['running']:.1f} | {1000 * r['paused']:.1f} | {r['running'] / r['paused']:.2f} | "
              f"{100 * r['worker_cpu']:.0f}% | {100 * r['daemons_cpu']:.0f}% |")
    print(f"\nMedian running / paused: {statistics.median(r['running'] / r['paused'] for r in results):.2f}")
    print("Busiest of Ray's other processes (last run, share of one core): " + ", ".join(
        f"{k.split(' ', 1)[1].strip()} {100 * v:.1f}%" for k, v in results[-1]["top"]))


if __name__ == "__main__":
    main()
