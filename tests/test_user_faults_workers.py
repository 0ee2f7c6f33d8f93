"""Faults inside Ray Train workers, as users meet them: `distft train` as a subprocess, a real fault.

Each case runs the real `distft` command against one shared `distft cluster up` cluster (a Ray start
costs 15-20 s here), injects its fault in a worker process for real (bad settings that only the
worker can see, SIGKILL, SIGSTOP, a file-size limit set on the running worker), and checks what
the user sees (tests/faults.py): exit 1, `error: stage sft failed on rank N: <cause>`, the path of
the log holding every traceback, the resume command, at most 5 stderr lines, no traceback, and
that nothing the user had was changed. The signal cases on the driver (SIGTERM, exit 143) need a
private cluster of their own: the driver owns it.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import psutil
import pytest

from faults import DISTFT, REPO, assert_unchanged, check_failure, snapshot, user_env

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny(tiny_random) -> Path:
    """The session's random tiny Llama (conftest), under a short name."""
    return tiny_random


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """`distft cluster up --workers 1 --cpus-per-worker 2`: one worker raylet for every case here."""
    from test_cluster import one_raylet_cluster

    with one_raylet_cluster(tmp_path_factory.mktemp("faults-cluster")) as info:
        yield info


def train_workers(cluster: dict) -> list[psutil.Process]:
    """The Ray Train worker processes running on the cluster's raylets right now."""
    found = []
    for pid in cluster["pids"]:
        try:
            for p in psutil.Process(pid).children(recursive=True):
                if "RayTrainWorker" in " ".join(p.cmdline()):
                    found.append(p)
        except psutil.NoSuchProcess:
            pass
    return found


def logged_step(run_dir: Path) -> int:
    """The last training step in the run's metrics.jsonl (0 before the first log)."""
    path = run_dir / "sft" / "metrics.jsonl"
    steps = [json.loads(x).get("step", 0) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    return max(steps, default=0)


@dataclass
class Case:
    id: str
    overrides: list[str]
    # Called once training is under way (step 2 logged) with the live worker processes and the run
    # directory: injects the fault, and returns what undoes it after the run (or None).
    inject: Callable[[list[psutil.Process], Path], Callable[[], None] | None] | None = None
    # Called with run.output_dir before the launch (e.g. to mount a small disk there); returns its undo.
    prepare: Callable[[Path], Callable[[], None] | None] | None = None
    phrases: tuple[str, ...] = ()
    rank: str = "on rank 0"
    # Beyond the full tier's time budget: `make test-slow` runs it (CI does not).
    slowest: bool = False


def kill_one(workers, run_dir):
    os.kill(workers[-1].pid, signal.SIGKILL)


def stop_one(workers, run_dir):
    # A rank that hangs (a stuck collective, a frozen node): the other rank's collective times out.
    os.kill(workers[-1].pid, signal.SIGSTOP)

    def resume():  # a frozen worker left behind would hold the cluster's CPUs
        try:
            workers[-1].send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass

    return resume


def limit_file_size(workers, run_dir):
    # A quota / full disk for the training processes: every file they write is capped at 64 KiB, so the
    # next checkpoint cannot be written. Python ignores SIGXFSZ, so the write fails with EFBIG.
    for w in workers:
        w.rlimit(psutil.RLIMIT_FSIZE, (64 << 10, 64 << 10))


def freeze_checkpoints(workers, run_dir):
    # Root ignores permission bits; an immutable directory stops root too. The worker's next checkpoint
    # cannot be moved into checkpoints/.
    ckpts = run_dir / "sft" / "checkpoints"
    subprocess.run(["chattr", "+i", str(ckpts)], check=True)
    try:
        (ckpts / "probe").mkdir()
    except OSError:
        pass
    else:
        raise AssertionError("chattr +i had no effect")
    return lambda: subprocess.run(["chattr", "-i", str(ckpts)], check=False)


def small_disk(runs):
    # A disk of its own for run.output_dir (tmpfs, 16 MiB), filled up once training runs (fill_disk).
    runs.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(runs)], check=True)
    return lambda: subprocess.run(["umount", "-l", str(runs)], check=False)


def fill_disk(workers, run_dir):
    # The disk fills (another job's output): nothing the run writes next fits. Proven: the filler stopped at ENOSPC.
    filler = run_dir.parent / "someone-elses-output.bin"
    try:
        with filler.open("wb") as f:
            while True:
                f.write(b"\0" * (1 << 20))
    except OSError as e:
        assert e.errno == 28, e


def term_one(workers, run_dir):
    # A container runtime or node agent stops one worker process politely (SIGTERM), not the driver.
    os.kill(workers[-1].pid, signal.SIGTERM)


CASES = [
    # Every row is dropped by truncation: only the worker tokenizes (with the model's tokenizer).
    Case("all-rows-truncated", ["model.max_seq_len=8"],
         phrases=("DataError: data.train: every one of its", "Fix: model.max_seq_len=32 or more")),
    # The OOM killer, a preempted VM, `kill -9`: with run.max_failures=0 the run stops and says so.
    Case("worker-sigkilled", ["scaling.num_workers=2", "scaling.cpus_per_worker=1"], inject=kill_one,
         phrases=("the worker process died unexpectedly", "run.max_failures=N"), rank="on rank"),
    # A rank that stops answering: the other fails its collective after run.collective_timeout_s.
    Case("rank-hangs", ["scaling.num_workers=2", "scaling.cpus_per_worker=1", "run.collective_timeout_s=15"],
         inject=stop_one, phrases=("failed on rank",), rank="on rank", slowest=True),
    # A file-size limit (quota, full disk) hit while a checkpoint is written, inside the worker.
    Case("checkpoint-write-efbig", ["train.save_every=10"], inject=limit_file_size,
         phrases=("writing checkpoint checkpoint-", "Fix: free disk space")),
    # The checkpoint directory turned read-only (immutable) mid-run: the fix is its permissions, not space.
    Case("checkpoints-read-only", ["train.save_every=10"], inject=freeze_checkpoints,
         phrases=("writing checkpoint checkpoint-", "Fix: make it writable again")),
    # The disk under the run fills up (ENOSPC) mid-run.
    Case("disk-full", ["train.save_every=10"], prepare=small_disk, inject=fill_disk,
         phrases=("No space left on device", "Fix: free disk space")),
    # One worker process is sent SIGTERM (not the driver): the run stops with that rank named.
    Case("worker-sigterm", ["scaling.num_workers=2", "scaling.cpus_per_worker=1"], inject=term_one,
         phrases=("the worker process died",), rank="on rank", slowest=True),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slowest] if c.slowest else [])
                                  for c in CASES])
def test_a_worker_fault_ends_in_one_clear_line(case, cluster, tiny, tmp_path):
    data = tmp_path / "user-data"  # the user's own files: must be byte-identical afterwards
    data.mkdir()
    train = data / "train.jsonl"
    lines = (REPO / "configs/data/facts_train.jsonl").read_text().splitlines(keepends=True)
    train.write_text("".join(lines[:1500]))
    config = data / "job.yaml"
    config.write_bytes((REPO / "configs/quickstart.yaml").read_bytes())
    runs = tmp_path / "runs"
    unprepare = case.prepare(runs) if case.prepare else None
    before = snapshot(data, tiny)
    args = [DISTFT, "train", str(config), f"model.name_or_path={tiny}", f"data.train={train}",
            "train.max_steps=400", "train.log_every=2", f"evaluate.data={REPO / 'configs/data/facts_test.jsonl'}",
            "evaluate.max_samples=4", "scaling.num_workers=1",
            "scaling.cpus_per_worker=2", f"run.output_dir={runs}", "run.name=faulty", *case.overrides,
            "--address", cluster["address"]]
    proc = subprocess.Popen(args, cwd=tmp_path, env={**cluster["env"], "PYTHONUNBUFFERED": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    undo = None
    try:
        if case.inject:
            deadline = time.time() + 240
            while logged_step(runs / "faulty") < 2:
                assert proc.poll() is None, f"the run ended before the fault: {proc.communicate()}"
                assert time.time() < deadline, "training never started"
                time.sleep(0.5)
            workers = train_workers(cluster)
            assert workers, "no Ray Train worker found to inject the fault into"
            undo = case.inject(workers, runs / "faulty")
        out, err = proc.communicate(timeout=300)
        r = subprocess.CompletedProcess(args, proc.returncode, out, err)
        run_dir = runs / "faulty"
        check_failure(r, 1, (f"error: stage sft failed {case.rank}", *case.phrases, "  details  ",
                             f"resume   distft resume {run_dir}"))
        log = Path(re.search(r"  details  (\S+)", err)[1])
        # On a full disk the log goes to the temp dir instead of the run directory.
        assert log == run_dir / "sft" / "error.log" or case.prepare is small_disk, log
        assert "Traceback" in log.read_text(), "the log holds what the terminal does not"
        if "scaling.num_workers=2" not in case.overrides:
            # Each worker line once, also on a `cluster up` cluster (one log monitor per host).
            assert out.count("[sft] global_batch_size 32 =") == 1, out[-3000:]
        assert_unchanged(before, snapshot(data, tiny))
    finally:
        if undo is not None:
            undo()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        if unprepare is not None:
            unprepare()


@pytest.mark.slowest
def test_verbose_prints_the_tracebacks_too(cluster, tiny, tmp_path):
    r = subprocess.run([DISTFT, "train", str(REPO / "configs/quickstart.yaml"), f"model.name_or_path={tiny}",
                        "model.max_seq_len=8", "scaling.num_workers=1", "scaling.cpus_per_worker=2", "evaluate.data=null",
                        "train.max_steps=5", f"run.output_dir={tmp_path}", "run.name=v", "--verbose",
                        "--address", cluster["address"]], cwd=REPO, env=cluster["env"], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 1, r.stderr[-3000:]
    assert "Traceback" in r.stderr and "every one of its" in r.stderr and "DataError" in r.stderr


def test_sigterm_stops_the_run_keeps_its_checkpoints_and_exits_143(tiny, tmp_path):
    """SIGTERM (a scheduler, `kill`) on `distft train`: exit 143, the resume command, no crash dump, and no
    Ray process left behind; a second SIGTERM while it stops changes nothing."""
    runs = tmp_path / "runs"
    args = [DISTFT, "train", str(REPO / "configs/quickstart.yaml"), f"model.name_or_path={tiny}",
            "scaling.num_workers=1", "scaling.cpus_per_worker=2", "train.max_steps=400", "train.save_every=4",
            "train.log_every=2", "evaluate.data=null", f"run.output_dir={runs}", "run.name=term"]
    proc = subprocess.Popen(args, cwd=REPO, env=user_env(PYTHONUNBUFFERED=1), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        ckpts = runs / "term" / "sft" / "checkpoints"
        while not list(ckpts.glob("checkpoint-*")):
            assert proc.poll() is None, proc.communicate()
            assert time.time() < deadline
            time.sleep(0.5)
        family = psutil.Process(proc.pid).children(recursive=True)
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    r = subprocess.CompletedProcess(args, proc.returncode, out, err)
    check_failure(r, 143, ("terminated (SIGTERM)", f"resume with: distft resume {runs / 'term'}"))
    assert "*** SIGTERM received" not in err and "PC: @" not in err
    def running():
        return [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]

    deadline = time.time() + 20  # the reaper (distft/launch/reaper.py) waits 5 s after its owner has gone
    while running() and time.time() < deadline:
        time.sleep(0.5)
    assert not running(), f"left running: {[(p.name(), p.cmdline()[-3:]) for p in running()]}"
    assert list(ckpts.glob("checkpoint-*")), "the sealed checkpoints must stay"
