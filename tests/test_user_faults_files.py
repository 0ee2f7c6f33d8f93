"""Files and directories as users meet them (issue 18, items 1, 6 and 9, and "distft deletes only what it created").

Each case spawns the real `distft` command (tests/faults.py) on a fault injected for real: a
directory of the user's where distft would build (tiny-model, an export's `.partial`), a run
directory path that is a file or immutable (`chattr +i`: as root, chmod injects nothing), a
`DISTFT_CACHE` that is a file, a file-size limit (RLIMIT_FSIZE), a private Ray cluster that
cannot start (its temp dir immutable), default run names already taken. Each proves first that
its fault is in effect, then asserts the exit code, at most 5 lines on stderr naming the path or
field and the fix, no traceback, and every file present before byte-identical after; where a
launch failed early, that no run directory is left to block the name. No case trains: each is
refused, or fails, before the first stage starts.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import resource
import time
from pathlib import Path

import pytest

from faults import assert_unchanged, check_failure, fsize_limit, immutable, run_distft, snapshot, user_env


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_random) -> Path:
    from distft.data.task import make_splits

    root = tmp_path_factory.mktemp("files")
    rows, _ = make_splits(n_train=24, n_test=2, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "good.yaml").write_text(
        f"model:\n  name_or_path: {tiny_random}\n  max_seq_len: 64\nscaling:\n  num_workers: 1\nstage: sft\n"
        f"data:\n  train: {root / 'train.jsonl'}\ntrain:\n  max_steps: 1\n  global_batch_size: 8\n"
        "  micro_batch_size: 8\n")
    return root


def _user_files(d: Path) -> Path:
    """A directory of the user's, with content worth keeping."""
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("my notes\n")
    (d / "sub").mkdir()
    (d / "sub" / "data.bin").write_bytes(os.urandom(256))
    return d


def _ray_cannot_start(tmp: Path) -> tuple[dict, Path]:
    """An env whose private Ray cluster fails at start: its temp dir lies under an immutable directory."""
    locked = tmp / "locked"
    locked.mkdir()
    return user_env(RAY_TMPDIR=locked / "ray"), locked


def _output_line(stdout: str) -> Path:
    lines = [ln for ln in stdout.splitlines() if ln.startswith("output ")]
    assert lines, stdout[-2000:]
    return Path(lines[-1].split(None, 1)[1].strip())


# --- distft deletes only what it created --------------------------------------------------------

def test_tiny_model_refuses_a_foreign_non_empty_directory(tmp_path):
    mine = _user_files(tmp_path / "mine")
    before = snapshot(tmp_path)
    r = run_distft("tiny-model", mine)
    check_failure(r, 2, (f"tiny-model DIR: {mine} is not empty and was not made by distft; nothing was changed",
                         "Fix: pass a new or empty directory"))
    assert_unchanged(before, snapshot(tmp_path))


def test_tiny_model_force_replaces_only_its_own_build(tmp_path, tiny_random):
    # A model directory of the user's (config.json and weights): --force would have deleted it.
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    for f in tiny_random.iterdir():
        (theirs / f.name).write_bytes(f.read_bytes())
    before = snapshot(tmp_path)
    r = run_distft("tiny-model", theirs, "--force")
    check_failure(r, 2, (f"{theirs} was not built by distft, so --force does not replace it", "Fix: "))
    assert_unchanged(before, snapshot(tmp_path))


def test_export_keeps_a_foreign_partial_directory(tmp_path, tiny_random):
    out = tmp_path / "exported"
    partial = _user_files(tmp_path / "exported.partial")  # the name the old export deleted without asking
    before = snapshot(tmp_path)
    r = run_distft("export", tiny_random, "--out", out, "--dtype", "float32")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / ".distft-owned").exists()
    assert_unchanged(before, snapshot(tmp_path), allow_new=(str(out),))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "exported.partial"]  # no build left behind
    assert partial.is_dir()


# --- path kinds, checked before Ray (validate too) -------------------------------------------------

CMDS = ("validate", "train")


@pytest.mark.parametrize("cmd", ("validate",))
def test_output_dir_that_is_a_file(cmd, world, tmp_path):
    target = tmp_path / "runs"
    target.write_text("not a directory\n")
    before = snapshot(tmp_path)
    r = run_distft(cmd, world / "good.yaml", f"run.output_dir={target}")
    check_failure(r, 2, (f"run.output_dir: {target} is a file, not a directory", "Fix: point run.output_dir at a "
                                                                                   "directory"))
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("cmd", CMDS)
def test_output_dir_that_cannot_be_written(cmd, world, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "kept.txt").write_text("kept\n")
    before = snapshot(tmp_path)
    with immutable(ro):  # proves the fault: root itself cannot create a file there
        r = run_distft(cmd, world / "good.yaml", f"run.output_dir={ro}")
    check_failure(r, 2, (f"run.output_dir: cannot write {ro}: Operation not permitted (EPERM)",
                         "Fix: point run.output_dir at a directory you can write to"))
    assert_unchanged(before, snapshot(tmp_path))


def test_distft_cache_that_is_a_file(tmp_path):
    """`distft tiny-model` rebuilds into the cache by default (training uses the shipped base: no cache)."""
    cache = tmp_path / "cache"
    cache.write_text("not a directory\n")
    before = snapshot(tmp_path)
    r = run_distft("tiny-model", env=user_env(DISTFT_CACHE=cache))
    check_failure(r, 2, (f"DISTFT_CACHE: {cache}/tiny-base-", f"is under {cache}, which is a file",
                         "Fix: point DISTFT_CACHE at a directory"))
    assert_unchanged(before, snapshot(tmp_path))


def test_file_size_limit_is_refused_before_ray_starts(world, tmp_path):
    limit = 1 << 20
    probe = tmp_path / "probe"
    import subprocess
    import sys

    # The fault in effect: a child under this limit cannot write a file past it (EFBIG).
    proof = subprocess.run([sys.executable, "-c", f"open({str(probe)!r}, 'wb').write(b'x' * {2 * limit})"],
                           preexec_fn=fsize_limit(limit), capture_output=True, text=True)
    assert proof.returncode != 0 and "File too large" in proof.stderr
    probe.unlink(missing_ok=True)
    runs = tmp_path / "runs"
    before = snapshot(tmp_path)
    started = time.time()
    r = run_distft("train", world / "good.yaml", f"run.output_dir={runs}", preexec_fn=fsize_limit(limit))
    # Before: Ray's raylet died mapping its object store, and 30 s later 63 lines ended in
    # "Module MetricsHead failed to start", leaving runs/<name> behind.
    check_failure(r, 2, ("the file-size limit (ulimit -f) is 1.0 MiB", "Ray cannot start",
                         "Fix: raise the limit (ulimit -f unlimited)"))
    assert time.time() - started < 25
    assert_unchanged(before, snapshot(tmp_path))


# --- run directories: names, the claim, and what a failed launch leaves ----------------------------

def test_run_name_that_is_an_existing_empty_directory_is_used_and_left_as_found(world, tmp_path):
    runs = tmp_path / "runs"
    mine = runs / "mine"
    mine.mkdir(parents=True)  # made by the user for this run: it was a traceback (FileExistsError)
    env, locked = _ray_cannot_start(tmp_path)
    before = snapshot(tmp_path)
    with immutable(locked):
        r = run_distft("train", world / "good.yaml", f"run.output_dir={runs}", "run.name=mine", env=env)
    check_failure(r, 2, "could not start a private Ray cluster")
    assert _output_line(r.stdout) == mine  # the run took the directory
    assert mine.is_dir() and not list(mine.iterdir())  # ours (config.yaml) went; the user's directory stayed
    assert_unchanged(before, snapshot(tmp_path))


def test_write_failure_on_the_run_config_is_one_line(world, tmp_path):
    runs = tmp_path / "runs"
    mine = runs / "mine"
    mine.mkdir(parents=True)
    before = snapshot(tmp_path)
    with immutable(mine):  # config.yaml cannot be written into it (EPERM, even for root)
        r = run_distft("train", world / "good.yaml", f"run.output_dir={runs}", "run.name=mine")
    check_failure(r, 2, (f"run.output_dir: cannot write {mine}/config.yaml: Operation not permitted",
                         "Fix: "))
    assert mine.is_dir() and not list(mine.iterdir())
    assert_unchanged(before, snapshot(tmp_path))


@pytest.mark.parametrize("cmd", ("train", "pipeline"))
def test_a_launch_that_fails_before_training_leaves_no_run_directory(cmd, world, tmp_path):
    runs = tmp_path / "runs"
    env, locked = _ray_cannot_start(tmp_path)
    # Default names are `<stem>-<second>`: take the next half minute's, holding the user's files.
    now = time.time()
    for s in range(30):
        _user_files(runs / f"good-{time.strftime('%Y%m%d-%H%M%S', time.localtime(now + s))}")
    before = snapshot(tmp_path)
    with immutable(locked):  # proves the fault too: nothing can be created under it
        r = run_distft(cmd, world / "good.yaml", f"run.output_dir={runs}", env=env)
    check_failure(r, 2, ("could not start a private Ray cluster", "Fix: "))
    claimed = _output_line(r.stdout)
    if cmd == "train":  # the default name of that second was taken: the next free suffix, never theirs
        assert claimed.name.startswith("good-") and claimed.name.rsplit("-", 1)[-1] == "2", claimed
    else:
        assert claimed == runs / "good"
    assert not claimed.exists(), f"{claimed} left behind: the name is blocked"
    assert_unchanged(before, snapshot(tmp_path))


def _claim_at(args):
    output_dir, start_at = args
    from distft.launch.rundir import claim_run_dir

    while time.time() < start_at:
        pass
    return str(claim_run_dir(output_dir, None, "same").path)


def test_concurrent_default_names_never_share_a_directory(tmp_path):
    """Four processes claim the default name in the same instant (the check-then-mkdir of before let
    two `distft train` in one second share a run directory)."""
    start_at = time.time() + 2
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        got = pool.map(_claim_at, [(tmp_path, start_at)] * 4)
    assert len(set(got)) == 4, got


def test_release_deletes_only_this_invocations_files(tmp_path):
    from distft.launch.rundir import claim_run_dir

    started = claim_run_dir(tmp_path, None, "x")
    started.write_text("config.yaml", "stage: sft\n")
    (started.path / "sft").mkdir()  # a stage began: everything stays
    assert not started.release() and (started.path / "config.yaml").is_file()

    theirs = tmp_path / "theirs"
    theirs.mkdir()
    claim = claim_run_dir(tmp_path, "theirs", "x")
    assert not claim.created
    claim.write_text("config.yaml", "stage: sft\n")
    assert not claim.release() and theirs.is_dir() and not list(theirs.iterdir())

    (theirs / "keep.txt").write_text("x")
    with pytest.raises(Exception, match="already exists and is not empty"):
        claim_run_dir(tmp_path, "theirs", "x")

    deep = tmp_path / "a" / "b"  # run.output_dir made by the claim: it goes too, once empty
    fresh = claim_run_dir(deep, None, "x")
    fresh.write_text("config.yaml", "stage: sft\n")
    assert fresh.release() and not (tmp_path / "a").exists()


# --- the owned-directory rules, function level ------------------------------------------------------

def test_building_sweeps_only_marked_leftovers_of_dead_processes(tmp_path):
    from distft.owned import MARKER, building, is_owned, mark, publish

    final = tmp_path / "out"
    foreign = _user_files(tmp_path / ".out.partial-user")  # the pattern, but not ours: no marker
    dead = tmp_path / ".out.partial-dead"
    dead.mkdir()
    mark(dead, "export")
    record = json.loads((dead / MARKER).read_text())
    record["pid"] = 2 ** 22 + 12345  # no such process
    (dead / MARKER).write_text(json.dumps(record))
    alive = tmp_path / ".out.partial-alive"
    alive.mkdir()
    mark(alive, "export")  # this very process: still running
    with building(final, "export") as tmp:
        assert is_owned(tmp)
        (tmp / "f").write_text("x")
        publish(tmp, final)
    assert (final / "f").is_file() and not (final / MARKER).exists()
    assert foreign.is_dir() and (foreign / "notes.txt").is_file()
    assert not dead.exists() and alive.is_dir()
    with pytest.raises(RuntimeError), building(tmp_path / "other", "export") as tmp:
        raise RuntimeError("failed mid-build")
    assert not tmp.exists()


def test_tiny_model_force_rebuilds_its_own_build_in_place(tmp_path, monkeypatch):
    """The build itself stubbed (the real one takes 2 minutes): what is replaced, kept and left behind."""
    import distft.stages.pretrain as pretrain
    import distft.stages.tiny_base as recipe
    from distft.models.bundled import HELDOUT, MANIFEST, SHIPPED_FILES
    from distft.owned import is_owned

    def fake_run(cfg, ctx):
        final = ctx.run_dir / "pretrain" / "final"
        final.mkdir(parents=True)
        for name in SHIPPED_FILES:
            (final / name).write_text("{}")
        (final / "config.json").write_text(json.dumps({"build": time.time_ns()}))
        return {"eval_loss": 1.0}

    def fake_manifest(directory, *_):
        assert (directory / HELDOUT).is_file()
        (directory / MANIFEST).write_text(json.dumps({"heldout": {"loss": 1.0, "docs": 1}}))

    monkeypatch.setattr(pretrain, "run", fake_run)
    monkeypatch.setattr(recipe, "write_manifest", fake_manifest)
    build_tiny_base = recipe.build_tiny_base
    out = tmp_path / "base"
    build_tiny_base(out, log=lambda *_: None)
    first = (out / "config.json").read_text()
    assert is_owned(out, "tiny-base")
    assert build_tiny_base(out, log=lambda *_: None) == out and (out / "config.json").read_text() == first
    build_tiny_base(out, force=True, log=lambda *_: None)
    assert (out / "config.json").read_text() != first and is_owned(out, "tiny-base")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base"]  # no scratch, no replaced copy


def test_checkpoint_staging_cleanup_leaves_what_it_did_not_stage(tmp_path):
    from distft.distributed.checkpoint import CheckpointPublisher, staging_dir

    ckpts = tmp_path / "checkpoints"
    staging = staging_dir(ckpts)
    (staging / "checkpoint-7").mkdir(parents=True)  # half-written by an interrupted save: ours
    (staging / "checkpoint-7" / "model.safetensors").write_bytes(b"half")
    theirs = _user_files(staging / "my-analysis")
    logs = []
    CheckpointPublisher(ckpts, keep=2, world_size=1, strategy="ddp", log=logs.append).recover()
    assert not (staging / "checkpoint-7").exists()
    assert (theirs / "notes.txt").read_text() == "my notes\n"
    assert any("left" in ln and "my-analysis" in ln for ln in logs), logs


def test_file_size_limit_check_reads_the_real_limit(monkeypatch):
    from distft.launch import rundir
    from distft.owned import PathError

    monkeypatch.setattr(rundir.resource, "getrlimit", lambda what: (4096, resource.RLIM_INFINITY))
    with pytest.raises(PathError, match=r"ulimit -f\) is 4.0 KiB"):
        rundir.check_file_size_limit()
    monkeypatch.setattr(rundir.resource, "getrlimit", lambda what: (resource.RLIM_INFINITY,) * 2)
    assert rundir.check_file_size_limit() == []
