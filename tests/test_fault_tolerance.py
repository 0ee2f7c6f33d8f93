"""Failures mid-run, for real: a training worker killed (Ray Train restarts the group from the latest
registered checkpoint), and the driver killed (`distft train --resume` continues the run).

Each test runs `distft train` as users do, on its own private Ray cluster, and kills processes
with SIGKILL: nothing gets a chance to clean up.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import REPO
from distft.distributed.checkpoint import complete_checkpoints

pytestmark = pytest.mark.slow

SAVE_EVERY = 10


def start_run(tmp_path, tiny_base, name: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "distft.cli", "train", "configs/quickstart.yaml", f"model.name_or_path={tiny_base}",
           "train.max_steps=60", f"train.save_every={SAVE_EVERY}", "train.log_every=5", "evaluate.max_samples=16",
           "data.max_train_samples=1500", f"run.output_dir={tmp_path / 'runs'}", f"run.name={name}", *extra]
    return subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1"), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def wait_for_checkpoint(proc: subprocess.Popen, ckpts, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    # At least `step`: checkpoints are rotated (keep_checkpoints), so that one may be gone already.
    while not any(int(c.name.split("-")[1]) >= step for c in complete_checkpoints(ckpts)):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.time() < deadline, f"no checkpoint-{step} after {timeout:.0f}s"
        time.sleep(0.5)


def logged_steps(run_dir) -> list[int]:
    lines = (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
    return [row["step"] for row in map(json.loads, lines) if "loss" in row]


def train_workers(root: int) -> list[psutil.Process]:
    """Ray Train's worker processes of the run whose driver is `root` (Ray runs them under its raylet,
    which the driver started)."""
    found = []
    for p in psutil.Process(root).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(p.cmdline()) or "RayTrainWorker" in p.name():
                found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def test_a_killed_worker_restarts_from_the_latest_registered_checkpoint(tiny_base, tmp_path):
    """With Ray Train's checkpoint copies in a run.storage_path of their own (local here; NFS or s3:// the same)."""
    run_dir, store = tmp_path / "runs" / "worker", tmp_path / "store"
    # 100 steps, not 60, for the reason the killed-driver test gives: the kill must land mid-run.
    steps_total = 100
    proc = start_run(tmp_path, tiny_base, "worker", "run.max_failures=1", f"run.storage_path={store}",
                     f"train.max_steps={steps_total}")
    wait_for_checkpoint(proc, run_dir / "sft" / "checkpoints", 20)
    workers = train_workers(proc.pid)
    assert len(workers) == 2, [w.cmdline() for w in workers]
    killed_at = max(logged_steps(run_dir))
    workers[1].send_signal(signal.SIGKILL)
    assert proc.poll() is None and killed_at < steps_total - SAVE_EVERY, killed_at  # else there is no restart to see

    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-4000:]
    (summary,) = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps_total and summary["world_size"] == 2
    steps = logged_steps(run_dir)
    # The restart is marked in metrics.jsonl. The log need not go back: a kill right after checkpoint-N,
    # before the next log line, loses no step at all (seen on a slow CI machine).
    rows = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    (event,) = [r for r in rows if r.get("event") == "resume"]
    assert event["source"] == "worker group restart", event
    resumed_from = event["from_step"]
    assert resumed_from % SAVE_EVERY == 0 and resumed_from >= SAVE_EVERY, (event, steps)  # from a checkpoint, not 0
    after = [r["step"] for r in rows[rows.index(event) + 1:] if "loss" in r]
    assert after and after[0] == resumed_from + 5, (event, steps)  # one log interval past its checkpoint
    # Ray may not have registered the newest checkpoint when the worker died: at most two intervals redone.
    assert killed_at - resumed_from <= 2 * SAVE_EVERY, (killed_at, resumed_from, steps)
    assert "resuming from" in out and "(step " in out
    assert steps[-1] == steps_total and set(range(5, steps_total + 1, 5)) <= set(steps)
    registered = sorted(int(json.loads(m.read_text())["step"]) for m in (store / "worker").rglob("distft_manifest.json"))
    assert registered and max(registered) >= steps_total - SAVE_EVERY  # the copies went to the store ...
    assert not (run_dir / "ray").exists()  # ... and not under the run


def test_a_killed_driver_leaves_a_run_that_train_resume_finishes(tiny_base, tmp_path):
    run_dir = tmp_path / "runs" / "driver"
    # Long enough that the kill lands mid-run: at 60 steps the run could reach its last checkpoint between
    # the poll that saw checkpoint-20 and the kill (seen on a fast machine), leaving nothing to resume.
    proc = start_run(tmp_path, tiny_base, "driver", "train.max_steps=200")
    ckpts = run_dir / "sft" / "checkpoints"
    wait_for_checkpoint(proc, ckpts, 20)
    family = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, signal.SIGKILL)  # the driver alone, as an OOM killer or a lost SSH session would
    proc.communicate(timeout=60)
    # The private cluster it started dies with it (Ray ties its processes' fate to their parent's).
    deadline = time.time() + 60
    while [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE] and time.time() < deadline:
        time.sleep(1)
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    for p in left:
        p.kill()
    assert not left, [(p.pid, p.name()) for p in left]
    last = max(int(c.name.split("-")[1]) for c in complete_checkpoints(ckpts))
    assert not (run_dir / "summary.json").exists()

    r = subprocess.run([sys.executable, "-m", "distft.cli", "train", "--resume", str(run_dir)], cwd=REPO,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from checkpoint-{last}" in r.stdout
    (summary,) = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 200 and last < 200
    after = [s for s in logged_steps(run_dir) if s > last]
    assert after and min(after) == last + 5


@pytest.fixture()
def two_raylets(tmp_path):
    """`distft cluster up --workers 2 --cpus-per-worker 1` on free ports, its own token and state; always down."""
    from test_cluster import clean_env, distft, free_port

    home = tmp_path / "cluster-home"
    token = home / "token"
    port, dash = free_port(), free_port()
    env = clean_env(DISTFT_CACHE=home, RAY_AUTH_TOKEN_PATH=token)
    extra: list[subprocess.Popen] = []
    try:
        r = distft("cluster", "up", "--workers", 2, "--cpus-per-worker", 1, "--port", port, "--dashboard-port", dash,
                   env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        state = json.loads((home / "cluster" / "cluster.json").read_text())
        yield {"env": env, "state": state, "address": f"127.0.0.1:{port}", "extra": extra, "home": home}
    finally:
        for p in extra:
            os.killpg(p.pid, signal.SIGKILL)
        distft("cluster", "down", env=env, timeout=300)


def test_an_elastic_run_shrinks_when_a_node_goes_and_grows_back_when_one_joins(two_raylets, tiny_base, tmp_path):
    """scaling.num_workers=[1, 2]: a worker raylet killed mid-run, training goes on with 1 worker from the
    latest checkpoint; a new raylet joins, and the run grows back to 2, with the same global batch."""
    run_dir = tmp_path / "runs" / "elastic"
    cmd = [sys.executable, "-m", "distft.cli", "train", "configs/quickstart.yaml", f"model.name_or_path={tiny_base}",
           "scaling.num_workers=[1,2]", "scaling.elastic_resize_interval_s=5", "run.max_failures=5",
           "run.worker_start_timeout_s=15",
           "train.max_steps=300", f"train.save_every={SAVE_EVERY}", "train.log_every=10", "evaluate.data=null",
           "data.max_train_samples=1500", f"run.output_dir={tmp_path / 'runs'}", "run.name=elastic",
           "--address", two_raylets["address"]]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**two_raylets["env"], "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    groups = run_dir / "sft" / "placement" / "groups.jsonl"

    def sizes() -> list[int]:
        return [json.loads(x)["world_size"] for x in groups.read_text().splitlines()] if groups.is_file() else []

    def wait(what, ok, timeout=300):
        deadline = time.time() + timeout
        while not ok():
            assert proc.poll() is None, f"{what}: the run ended: " + proc.stdout.read()[-4000:]
            assert time.time() < deadline, f"{what}: not within {timeout}s; worker groups so far {sizes()}"
            time.sleep(1)

    try:
        wait("first checkpoint", lambda: any(int(c.name.split("-")[1]) >= 20
                                             for c in complete_checkpoints(run_dir / "sft" / "checkpoints")))
        assert sizes() == [2]
        worker = next(p for p in two_raylets["state"]["processes"] if p["role"] == "worker-2")
        os.killpg(worker["pid"], signal.SIGKILL)  # the node is gone: its raylet and the Ray Train worker on it
        wait("shrink to 1 worker", lambda: sizes()[-1:] == [1])
        shrunk_at = max(logged_steps(run_dir))
        joined = subprocess.Popen(
            [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--address", two_raylets["address"],
             "--num-cpus", "1", "--num-gpus", "0", "--disable-usage-stats"],
            env={**two_raylets["env"], "RAY_AUTH_MODE": "token"}, stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, start_new_session=True)
        two_raylets["extra"].append(joined)
        wait("grow back to 2 workers", lambda: sizes()[-1:] == [2] and len(sizes()) >= 3)
        out, _ = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, out[-4000:]
    (summary,) = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 300 and summary["worker_groups"][:2] == [2, 1] and summary["worker_groups"][-1] == 2
    assert summary["world_size"] == 2
    steps = logged_steps(run_dir)
    assert steps[-1] == 300 and shrunk_at < 300
    # Every restart went back at most two checkpoint intervals: nothing trained twice beyond that, and
    # nothing from the start. (None at all when a node went just after a checkpoint and a log.)
    backs = [steps[i - 1] - steps[i] for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert all(b < 2 * SAVE_EVERY + 10 for b in backs), steps
