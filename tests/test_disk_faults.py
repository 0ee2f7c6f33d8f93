"""A real write fault mid-checkpoint: RLIMIT_FSIZE on the training process makes the kernel refuse
writes past the limit (EFBIG; Python ignores the SIGXFSZ that comes with it). Ray-free: the stage
runs in a child process whose limit is set before it starts, as `ulimit -f` would."""

from __future__ import annotations

import json
import resource
import subprocess
import sys

import pytest

from conftest import write_jsonl
from distft.distributed.checkpoint import complete_checkpoints, staging_dir, verify_checkpoint

CHILD = """
import json, sys
from distft.config import build_config
from distft.stages import StageContext, StageWriteError, stage_runner
raw, run_dir, resume = json.loads(sys.argv[1]), sys.argv[2], sys.argv[3]
try:
    stage_runner("sft")(build_config(raw), StageContext(run_dir=__import__("pathlib").Path(run_dir), resume_from=resume or None))
except StageWriteError as e:
    print(f"StageWriteError: {e}", file=sys.stderr)
    sys.exit(3)
"""


def raw_config(model_dir, data, max_steps: int) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(data), "max_eval_samples": 8},
        "method": {"name": "full"},
        "run": {"keep_checkpoints": 3},
        "train": {"lr": 1e-3, "max_steps": max_steps, "global_batch_size": 8, "micro_batch_size": 4,
                  "log_every": 1, "save_every": 2, "eval_every": 100},
        "evaluate": {"before": False},
    }


def run_child(raw: dict, run_dir, resume, file_limit: int | None) -> subprocess.CompletedProcess:
    def limit():
        if file_limit:
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    return subprocess.run([sys.executable, "-c", CHILD, json.dumps(raw), str(run_dir), str(resume)],
                          capture_output=True, text=True, timeout=600, preexec_fn=limit)


@pytest.mark.slow
def test_a_write_that_fails_mid_checkpoint_stops_the_run_and_keeps_the_previous_checkpoint(tiny_random, alpaca_rows,
                                                                                        tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    run_dir = tmp_path / "run"
    ckpts = run_dir / "sft" / "checkpoints"
    first = run_child(raw_config(tiny_random, data, 4), run_dir, "", None)
    assert first.returncode == 0, first.stderr[-3000:]
    good = ckpts / "checkpoint-4"
    assert complete_checkpoints(ckpts)[-1] == good and not verify_checkpoint(good)
    before = {p.name: p.read_bytes() for p in good.iterdir()}
    metrics_before = (run_dir / "sft" / "metrics.jsonl").read_text()

    # The limit lets small files through (metrics, logs) but not the checkpoint's big ones.
    limit = max(p.stat().st_size for p in good.iterdir()) // 2
    assert limit > 64 * 1024
    cut = run_child(raw_config(tiny_random, data, 8), run_dir, good, limit)
    assert cut.returncode == 3, cut.stderr[-3000:]
    message = cut.stderr.strip().splitlines()[-1]
    assert message.startswith("StageWriteError: stage sft: writing checkpoint checkpoint-6 failed ("), message
    assert f"the previous checkpoint, {good}, is intact (verified)" in message
    assert "Fix: free disk space, or raise the quota or file-size limit (ulimit -f)" in message
    assert f"then `distft resume {run_dir}`" in message
    assert "Traceback" not in message

    # Nothing already written was lost; the half-written checkpoint never became checkpoint-6.
    assert {p.name: p.read_bytes() for p in good.iterdir()} == before and not verify_checkpoint(good)
    assert complete_checkpoints(ckpts)[-1] == good and not (ckpts / "checkpoint-6").exists()
    assert (run_dir / "sft" / "metrics.jsonl").read_text().startswith(metrics_before)

    # With the fault gone, the run resumes from that checkpoint and finishes; the leftover is cleared.
    done = run_child(raw_config(tiny_random, data, 8), run_dir, good, None)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [c.name for c in complete_checkpoints(ckpts)][-1] == "checkpoint-8"
    assert not verify_checkpoint(ckpts / "checkpoint-8") and not list(staging_dir(ckpts).glob("checkpoint-*"))
    steps = [json.loads(x)["step"] for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()
             if "loss" in json.loads(x)]
    assert steps[-1] == 8 and 5 in steps


@pytest.mark.parametrize("error, disk", [
    (OSError(28, "No space left on device"), True),
    (OSError(122, "Disk quota exceeded"), True),
    (RuntimeError("Error while serializing: I/O error: File too large (os error 27)"), True),  # safetensors
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"), True),  # torch.save
    (OSError(2, "No such file or directory"), False),
    (ValueError("boom"), False),
])
def test_disk_errors_are_told_apart_from_other_failures(error, disk, tmp_path):
    from distft.distributed.checkpoint import is_disk_error, write_failure

    assert is_disk_error(error) is disk
    wrapped = RuntimeError("while saving")
    wrapped.__cause__ = error
    assert is_disk_error(wrapped) is disk
    told = write_failure(tmp_path / "run" / "sft" / "checkpoints", error, "`distft resume run`")
    assert (told is not None) is disk
    if disk:
        assert "writing to disk failed" in told and "no checkpoint had been completed yet" in told


def test_a_failure_while_a_checkpoint_is_staged_names_it(tmp_path):
    from distft.distributed.checkpoint import write_failure

    import os
    import time

    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    (staging_dir(ckpts) / "checkpoint-12").mkdir(parents=True)
    told = write_failure(ckpts, ValueError("a bug in a callback"), "`distft resume run`")
    assert told.startswith("writing checkpoint checkpoint-12 failed (ValueError: a bug in a callback)")
    assert "Fix: fix the cause above for" in told
    # A leftover of an earlier crash (staged before this attempt started) is not this failure's cause.
    old = time.time() - 3600
    os.utime(staging_dir(ckpts) / "checkpoint-12", (old, old))
    assert write_failure(ckpts, ValueError("a bug"), "`distft resume run`", since=time.time() - 60) is None


def test_ray_train_errors_are_reduced_to_the_failing_rank_and_its_message():
    from ray.train import WorkerGroupError

    from distft.launch.errors import stage_failed

    cause = RuntimeError("Traceback (most recent call last):\n  File x\nValueError: the real reason")
    e = stage_failed("sft", WorkerGroupError("rank 1 failed", {1: cause}))
    assert str(e) == "stage sft failed on rank 1: ValueError: the real reason"
    e = stage_failed("ppo", WorkerGroupError("both", {0: ValueError("a"), 1: ValueError("b")}))
    assert str(e) == "stage ppo failed on rank 0 (and 1 more): ValueError: a"
    # The rank whose process died is the cause; its peer only saw the connection drop.
    reset = RuntimeError("RuntimeError: [gloo/transport/tcp/pair.cc:537] Read error: Connection reset by peer")
    died = RuntimeError("ActorDiedError: The actor died unexpectedly before finishing this task.")
    e = stage_failed("sft", WorkerGroupError("both", {0: reset, 1: died}))
    assert str(e).startswith("stage sft failed on rank 1 (and 1 more): the worker process died unexpectedly")


def test_a_checkpoint_upload_that_never_finishes_fails_the_run_with_a_hint(tmp_path):
    from distft.launch.worker import CheckpointUploadTimeout, UploadWatch

    uploading = tmp_path / "checkpoints" / ".uploading"
    done, stuck = uploading / "checkpoint-10-0a1b2c3d", uploading / "checkpoint-20-4e5f6a7b"
    for d in (done, stuck):
        d.mkdir(parents=True)
    watch = UploadWatch(timeout_s=60)
    watch.add(done, now=0.0)
    watch.add(stuck, now=100.0)
    done.rmdir()  # Ray deletes a snapshot once it is uploaded
    watch.check(now=150.0)  # the stuck one is 50 s old: still within its time
    assert [p for p, _ in watch.pending] == [stuck]
    with pytest.raises(CheckpointUploadTimeout) as e:
        watch.check(now=161.0)
    assert str(e.value).startswith("the upload of checkpoint-20 to run.storage_path has not finished after 61 s "
                                   "(run.checkpoint_upload_timeout_s=60)")
    assert f"complete in {tmp_path / 'checkpoints' / 'checkpoint-20'}" in str(e.value)


def test_uploads_still_pending_when_training_ends_are_awaited_within_the_same_timeout(tmp_path):
    """Ray waits for them after the training function returns, with no timeout; distft waits first, bounded."""
    from distft.launch.worker import CheckpointUploadTimeout, UploadWatch

    slow, stuck = tmp_path / "checkpoint-30-00aa11bb", tmp_path / "checkpoint-40-22cc33dd"
    clock = {"t": 0.0}

    def sleep(s):  # Ray finishes the slow upload 3 s into the wait; the stuck one never
        clock["t"] += s
        if clock["t"] >= 3 and slow.exists():
            slow.rmdir()

    slow.mkdir()
    watch = UploadWatch(timeout_s=60)
    watch.add(slow, now=0.0)
    watch.drain(clock=lambda: clock["t"], sleep=sleep)
    assert watch.pending == [] and clock["t"] == 3.0
    stuck.mkdir()
    watch.add(stuck, now=clock["t"])
    with pytest.raises(CheckpointUploadTimeout, match="the upload of checkpoint-40 .* after 61 s"):
        watch.drain(poll_s=1.0, clock=lambda: clock["t"], sleep=sleep)


def test_a_worker_group_that_cannot_start_in_time_says_what_to_check():
    from ray.train.v2._internal.exceptions import WorkerGroupStartupTimeoutError

    from distft.launch.errors import stage_failed

    e = stage_failed("sft", WorkerGroupStartupTimeoutError(num_workers=4))
    assert str(e).startswith("stage sft failed: WorkerGroupStartupTimeoutError")
    assert "raise run.worker_start_timeout_s" in str(e) and "distft cluster status" in str(e)


@pytest.mark.parametrize("text", [
    # Ray 2.60's raylet
    "OutOfMemoryError: Task was killed due to the node running low on memory.\nMemory on the node (IP: 127.0.0.1, "
    "ID: ab12) was 22.31GB used / 23.47GB limit (0.950612), which exceeds the memory usage threshold of 0.95.",
    # earlier Ray versions
    "Task was killed due to the node running low on memory.\nMemory on the node (IP: 10.0.0.2, ID: ab12) where the "
    "task (actor ID: 9f, name=RayTrainWorker.__init__, pid=4331, memory used=2.22GB) was running was 22.31GB / "
    "23.47GB (0.950612), which exceeds the memory usage threshold of 0.95.",
])
def test_a_worker_killed_by_the_memory_monitor_is_named_with_the_nodes_figures(text):
    from ray.train import WorkerGroupError

    from distft.launch.errors import stage_failed

    e = stage_failed("sft", WorkerGroupError("rank 1 failed", {1: RuntimeError(text)}))
    assert str(e).startswith("stage sft failed on rank 1: the worker was killed by Ray's memory monitor")
    assert "(the node used 22.31 of 23.47 GB, 95%)" in str(e) and "distft plan CONFIG" in str(e)


def test_a_worker_process_that_died_says_how_and_what_to_do():
    from ray.train import WorkerGroupError

    from distft.launch.errors import stage_failed

    died = RuntimeError("ActorDiedError: The actor died unexpectedly before finishing this task.\n\tclass_name: "
                        "RayTrainWorker\nThe actor is dead because its worker process has died. Worker exit type: "
                        "UNEXPECTED_SYSTEM_EXIT Worker exit detail: Worker unexpectedly exits with a connection error "
                        "code 2. End of file. There are some potential root causes.")
    e = stage_failed("sft", WorkerGroupError("rank 0 died", {0: died}))
    assert str(e).startswith("stage sft failed on rank 0: the worker process died unexpectedly (Worker unexpectedly "
                             "exits with a connection error code 2.)")
    assert "run.max_failures=N" in str(e)


def test_stage_failed_writes_every_traceback_to_the_log_and_appends(tmp_path):
    from ray.train import WorkerGroupError

    from distft.launch.errors import stage_failed

    log = tmp_path / "sft" / "error.log"
    cause = RuntimeError("Traceback (most recent call last):\n  File \"w.py\", line 3\nValueError: deep reason")
    e = stage_failed("sft", WorkerGroupError("rank 0 failed", {0: cause}), log)
    assert e.log_path == str(log) and e.exit_code == 1
    stage_failed("sft", WorkerGroupError("again", {0: cause}), log)
    text = log.read_text()
    assert text.count("stage sft failed") == 2 and 'File "w.py", line 3' in text


def test_streamed_ray_lines_users_cannot_act_on_are_dropped_and_the_rest_kept(monkeypatch):
    """The driver's console filter: the controller's cleanup traceback, PreemptionWatcher's error line and the
    raylet's dead-worker notice go (error.log has the tracebacks); the run's own lines stay."""
    from ray._private.ray_logging import WorkerStandardStreamDispatcher

    import distft.launch.session as session

    dispatcher = WorkerStandardStreamDispatcher()
    printed: list[str] = []
    dispatcher.add_handler("ray_print_logs", lambda data: printed.extend(data["lines"]))
    monkeypatch.setattr("ray._private.ray_logging.global_worker_stdstream_dispatcher", dispatcher)
    monkeypatch.delenv("DISTFT_VERBOSE", raising=False)
    session.filter_streamed_logs()
    session.filter_streamed_logs()  # twice: still one filter
    controller = {"actor_name": "TrainController", "pid": 7, "is_err": True}
    dispatcher.emit({**controller, "lines": [
        "Graceful shutdown of backend failed. This is expected if one of the workers has crashed.",
        "Traceback (most recent call last):", '  File "config.py", line 333, in on_shutdown',
        "ray.exceptions.ActorDiedError: The actor died unexpectedly before finishing this task.",
        "\tclass_name: RayTrainWorker", "The actor is dead because its worker process has died.",
        "Detected ready resources for 1 workers; restart training with this worker group size"]})
    dispatcher.emit({"actor_name": "TrainController", "pid": 7, "is_err": True, "lines": [
        "[2026 E 1 2] core_worker.cc:2465: Actor with class name: 'PreemptionWatcher' and ID: 'ce58' has ..."]})
    dispatcher.emit({"pid": "raylet", "is_err": False, "lines": [
        "A worker died or was killed while executing a task by an unexpected system error. To troubleshoot ..."]})
    dispatcher.emit({"actor_name": "RayTrainWorker", "pid": 8, "is_err": False,
                     "lines": ["[sft] step 2/400 (0%) loss 6.5", "  indented worker output stays"]})
    assert printed == ["Detected ready resources for 1 workers; restart training with this worker group size",
                       "[sft] step 2/400 (0%) loss 6.5", "  indented worker output stays"]


def test_a_sigterm_while_ray_starts_reaches_the_callers_handler():
    """ray.init first installs sys.exit(15) for SIGTERM and starts the node after: a SIGTERM then must still end
    as the CLI's own stop (exit 143, the resume hint), not as SystemExit(15)."""
    import signal

    from distft.launch.session import caller_signal_handlers

    class Stopped(Exception):
        pass

    def handler(signum, frame):
        raise Stopped(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        with pytest.raises(Stopped):
            with caller_signal_handlers():
                signal.signal(signal.SIGTERM, lambda *a: None)  # what ray.init does
                raise SystemExit(signal.SIGTERM)  # its handler, run by a SIGTERM during the start
        assert signal.getsignal(signal.SIGTERM) is handler
        with pytest.raises(SystemExit):  # any other exit goes on as it was
            with caller_signal_handlers():
                raise SystemExit(3)
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_resume_from_an_earlier_checkpoint_sets_the_newer_ones_aside(tmp_path):
    """--from checkpoint-20 after checkpoints 30 and 40 (local and Ray's copies): those move aside, never deleted,
    so rotation keeps the new line's checkpoints and a later plain resume cannot pick the abandoned line."""
    from distft.config import build_config
    from distft.distributed.checkpoint import build_manifest, complete_checkpoints, write_manifest
    from distft.launch.resume import resume_point, set_aside_newer

    cfg = build_config({"stage": "sft", "data": {"train": "x.jsonl"}})
    run = tmp_path / "run"
    stage = run / cfg.stages[0].label()
    (stage / "ray_run_name").parent.mkdir(parents=True)
    (stage / "ray_run_name").write_text("sft-attempt-1\n")

    def sealed(d, step):
        d.mkdir(parents=True)
        (d / "weights.bin").write_bytes(bytes(step))
        write_manifest(d, build_manifest(d, step=step, world_size=1, strategy="ddp"))

    for step in (20, 30, 40):
        sealed(stage / "checkpoints" / f"checkpoint-{step}", step)
        sealed(run / "ray" / "sft-attempt-1" / f"checkpoint_{step:04d}", step)
    chosen = stage / "checkpoints" / "checkpoint-20"
    said = []
    set_aside_newer(cfg, run, 0, str(chosen), log=said.append)
    assert [c.name for c in complete_checkpoints(stage / "checkpoints")] == ["checkpoint-20"]
    assert [c.name for c in complete_checkpoints(run / "ray" / "sft-attempt-1")] == ["checkpoint_0020"]
    aside = sorted(p.relative_to(run) for p in run.rglob("*.after-20-*/*") if p.is_dir())
    assert len(aside) == 4 and said and "4 newer checkpoint copies set aside" in said[0]
    assert resume_point(cfg, run, 0, log=said.append)[1] == str(chosen)
