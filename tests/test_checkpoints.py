"""Checkpoints: complete or absent, verified before resume, rotated safely, resumable on another world size."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import threading
from pathlib import Path

import pytest

from conftest import REPO, write_jsonl
from distft.distributed import checkpoint as ck
from distft.distributed.checkpoint import (
    MANIFEST,
    CheckpointError,
    CheckpointPublisher,
    check_resume,
    complete_checkpoints,
    seal,
    staging_dir,
    verify_checkpoint,
)

FILES = {"model.safetensors": b"w" * 4096, "optimizer.pt": b"o" * 1000,
         "global_step5/zero_pp_rank_1_optim.pt": b"z" * 300}


def stage(checkpoints: Path, step: int, files: dict[str, bytes] = FILES) -> Path:
    d = staging_dir(checkpoints) / f"checkpoint-{step}"
    for rel, data in files.items():
        (d / rel).parent.mkdir(parents=True, exist_ok=True)
        (d / rel).write_bytes(data)
    return d


def sealed(checkpoints: Path, step: int, world_size: int = 1, strategy: str = "ddp") -> Path:
    return seal(stage(checkpoints, step), checkpoints / f"checkpoint-{step}", step=step, world_size=world_size,
                strategy=strategy)


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


# ---- pure: manifest, verification, rotation, registration ----

def test_seal_writes_a_manifest_of_every_file_then_renames_into_place(tmp_path):
    import distft

    staged = stage(tmp_path, 5)
    final = seal(staged, tmp_path / "checkpoint-5", step=5, world_size=2, strategy="deepspeed-zero2")
    assert not staged.exists() and final.is_dir()
    m = json.loads((final / MANIFEST).read_text())
    assert (m["step"], m["world_size"], m["strategy"], m["distft_version"]) == (5, 2, "deepspeed-zero2",
                                                                                 distft.__version__)
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()} - {MANIFEST}
    assert {f["path"] for f in m["files"]} == on_disk == set(FILES)
    for f in m["files"]:
        data = (final / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert m["total_bytes"] == sum(len(v) for v in FILES.values())
    assert not list(tmp_path.rglob("*.tmp"))
    assert verify_checkpoint(final) == []


@pytest.mark.parametrize("damage, says", [
    (truncate, r"optimizer\.pt: 500 bytes, the manifest says 1000 \(truncated"),
    (lambda p: p.write_bytes(b"x" * 1000), r"optimizer\.pt: contents differ from the manifest"),
    (lambda p: p.unlink(), r"optimizer\.pt: missing"),
    (lambda p: (p.parent / "rng_state_3.pth").write_bytes(b"new"), r"rng_state_3\.pth: not in the manifest"),
], ids=["truncated", "tampered", "missing", "added"])
def test_verify_names_the_damaged_file(damage, says, tmp_path):
    final = sealed(tmp_path, 5)
    damage(final / "optimizer.pt")
    (problem,) = verify_checkpoint(final)
    assert re.search(says, problem), problem


def test_resume_refuses_a_truncated_shard_and_offers_the_previous_good_checkpoint(tmp_path):
    for step in (5, 10, 15):
        sealed(tmp_path, step)
    truncate(tmp_path / "checkpoint-15" / "global_step5" / "zero_pp_rank_1_optim.pt")
    with pytest.raises(CheckpointError) as e:
        check_resume(tmp_path / "checkpoint-15", world_size=1, strategy="ddp")
    msg = str(e.value)
    assert "global_step5/zero_pp_rank_1_optim.pt: 150 bytes, the manifest says 300 (truncated" in msg
    assert f"resume from {tmp_path / 'checkpoint-10'} instead" in msg

    (tmp_path / "checkpoint-10" / "model.safetensors").write_bytes(b"?" * 4096)  # 10 is damaged too: offer 5
    with pytest.raises(CheckpointError, match=re.escape(f"resume from {tmp_path / 'checkpoint-5'} instead")):
        check_resume(tmp_path / "checkpoint-15", world_size=1, strategy="ddp")
    assert check_resume(tmp_path / "checkpoint-5", world_size=1, strategy="ddp")["step"] == 5


def test_a_checkpoint_without_manifest_is_never_used(tmp_path):
    sealed(tmp_path, 5)
    half = tmp_path / "checkpoint-10"
    shutil.copytree(tmp_path / "checkpoint-5", half)
    (half / MANIFEST).unlink()  # what a crash before the manifest would leave, had it not been staged
    assert complete_checkpoints(tmp_path) == [tmp_path / "checkpoint-5"]
    with pytest.raises(CheckpointError, match=f"{MANIFEST} is missing") as e:
        check_resume(half, world_size=1, strategy="ddp")
    assert f"resume from {tmp_path / 'checkpoint-5'} instead" in str(e.value)
    assert not verify_checkpoint(tmp_path / "checkpoint-5")


@pytest.mark.parametrize("saved, now, ok", [
    (("ddp", 2), ("ddp", 1), True),
    (("fsdp", 4), ("fsdp", 2), True),
    (("deepspeed-zero2", 2), ("deepspeed-zero2", 2), True),
    (("deepspeed-zero2", 2), ("deepspeed-zero2", 1), False),
    (("deepspeed-zero3", 2), ("deepspeed-zero3", 4), False),
    (("ddp", 1), ("deepspeed-zero2", 1), False),
])
def test_world_size_change_only_for_reshardable_strategies(saved, now, ok, tmp_path):
    final = sealed(tmp_path, 5, world_size=saved[1], strategy=saved[0])
    if ok:
        assert check_resume(final, world_size=now[1], strategy=now[0])["world_size"] == saved[1]
        return
    with pytest.raises(CheckpointError) as e:
        check_resume(final, world_size=now[1], strategy=now[0])
    fix = f"scaling.num_workers={saved[1]}" if saved[0] == now[0] else "written under strategy 'ddp'"
    assert fix in str(e.value), str(e.value)


def test_rotation_never_deletes_the_last_complete_checkpoint(tmp_path):
    for step in (10, 20, 30):
        sealed(tmp_path, step)
    unsealed = tmp_path / "checkpoint-40"  # newer, but not known complete: neither counted nor deleted
    unsealed.mkdir()
    pub = CheckpointPublisher(tmp_path, keep=2, world_size=1, strategy="ddp", log=lambda m: None)
    assert pub.rotate() == [tmp_path / "checkpoint-10"]
    pub.keep = 1
    assert pub.rotate() == [tmp_path / "checkpoint-20"]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == ["checkpoint-30",
                                                                                        "checkpoint-40"]


def test_background_seal_registers_only_complete_checkpoints(tmp_path, monkeypatch):
    """Above the size threshold the hash runs off the training thread; nothing is offered before its manifest."""
    gate = threading.Event()
    real = ck._sha256
    monkeypatch.setattr(ck, "_sha256", lambda p, fsync=False: gate.wait(30) and real(p, fsync))
    pub = CheckpointPublisher(tmp_path, keep=2, world_size=1, strategy="ddp", sync_max_bytes=0, log=lambda m: None)
    stage(tmp_path, 5)
    assert pub.publish(5) is None  # hashing: nothing to register yet
    assert not (tmp_path / "checkpoint-5").exists()  # complete or absent
    stage(tmp_path, 10)
    assert pub.publish(10) is None
    gate.set()
    assert pub.finish() == tmp_path / "checkpoint-10"  # the run waits for its seals; the newest is registered
    assert [verify_checkpoint(tmp_path / f"checkpoint-{s}") for s in (5, 10)] == [[], []]
    assert pub.finish() is None  # registered once


def test_small_checkpoints_are_sealed_and_registered_at_their_own_save(tmp_path):
    pub = CheckpointPublisher(tmp_path, keep=2, world_size=1, strategy="ddp", log=lambda m: None)
    stage(tmp_path, 5)
    assert pub.publish(5) == tmp_path / "checkpoint-5" and not verify_checkpoint(tmp_path / "checkpoint-5")


def test_recover_publishes_sealed_leftovers_and_removes_half_written_ones(tmp_path):
    done = stage(tmp_path, 5)
    ck.write_manifest(done, ck.build_manifest(done, step=5, world_size=1, strategy="ddp"))  # crash before rename
    stage(tmp_path, 10)  # crash mid-write: no manifest
    CheckpointPublisher(tmp_path, keep=2, world_size=1, strategy="ddp", log=lambda m: None).recover()
    assert verify_checkpoint(tmp_path / "checkpoint-5") == []
    assert not (tmp_path / "checkpoint-10").exists() and not any(staging_dir(tmp_path).iterdir())


def test_our_code_loads_pickles_only_with_weights_only():
    calls = [(p, line) for p in (REPO / "distft").rglob("*.py") for line in p.read_text().splitlines()
             if "torch.load(" in line]
    assert all("weights_only=True" in line for _, line in calls), calls


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):  # unpickling it would create the marker file
        return open, (str(self.marker), "w")


def test_torch_load_default_refuses_a_pickled_object(tmp_path):
    import torch

    torch.save({"state": _Payload(tmp_path / "pwned")}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):
        torch.load(tmp_path / "evil.pt")  # torch's default since 2.6: weights_only=True
    assert not (tmp_path / "pwned").exists()


# ---- a real run in one process (fast tier) ----

def make_cfg(model_dir, train_file, **train):
    from distft.config import build_config

    return build_config({
        "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "run": {"keep_checkpoints": 3},
        "stage": "sft",
        "data": {"train": str(train_file), "eval_fraction": 0.1, "max_eval_samples": 16},
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {"lr": 3e-3, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 1, "max_steps": 20,
                  "save_every": 5, **train},
    })


@pytest.fixture(scope="module")
def sealed_run(tiny_random, tmp_path_factory):
    """20 steps, a checkpoint every 5, sealed in the background (threshold 0); every registration recorded."""
    from distft.data.task import make_splits
    from distft.stages import StageContext, stage_runner

    tmp = tmp_path_factory.mktemp("sealed")
    rows, _ = make_splits(n_train=200, n_test=10, seed=3)
    cfg = make_cfg(tiny_random, write_jsonl(tmp / "train.jsonl", rows))
    registered = []

    def report(metrics, checkpoint_dir, progress):
        if checkpoint_dir:  # checked at the moment it is registered, as Ray would copy it
            registered.append((metrics, checkpoint_dir, verify_checkpoint(checkpoint_dir)))

    mp = pytest.MonkeyPatch()
    mp.setenv(ck.SYNC_HASH_ENV, "0")
    try:
        ctx = StageContext(run_dir=tmp / "full", report_fn=report)
        stage_runner("sft")(cfg, ctx)
    finally:
        mp.undo()
    return cfg, ctx, registered, tmp / "full" / "sft" / "checkpoints"


def test_real_checkpoints_are_sealed_registered_when_complete_and_rotated(sealed_run):
    _, _, registered, ckpts = sealed_run
    assert [problems for _, _, problems in registered] == [[]] * len(registered)
    steps = [m["checkpoint_step"] for m, _, _ in registered]
    assert steps == sorted(set(steps)) and steps[-1] == 20
    assert [p.name for p in complete_checkpoints(ckpts)] == ["checkpoint-10", "checkpoint-15", "checkpoint-20"]
    assert not any(staging_dir(ckpts).glob("checkpoint-*"))
    for d in complete_checkpoints(ckpts):
        m = json.loads((d / MANIFEST).read_text())
        names = {f["path"] for f in m["files"]}
        assert names == {p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()} - {MANIFEST}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json",
                "distft_config.yaml"} <= names
        assert (m["step"], m["world_size"], m["strategy"]) == (int(d.name.split("-")[1]), 1, "ddp")


def test_resume_continues_at_k_plus_1_with_weights_only_loads(sealed_run, tmp_path, monkeypatch):
    """Every torch.load on the resume path is forced to weights_only=True, and the run matches step for step."""
    from distft.stages import StageContext, stage_runner

    cfg, full, _, ckpts = sealed_run
    monkeypatch.setenv("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "1")
    resumed = StageContext(run_dir=tmp_path / "resumed", resume_from=str(ckpts / "checkpoint-10"))
    stage_runner("sft")(cfg, resumed)
    got = {m["step"]: m for m in resumed.reported if "loss" in m and "stage_done" not in m}
    want = {m["step"]: m for m in full.reported if "loss" in m and "stage_done" not in m}
    assert sorted(got) == list(range(11, 21))
    for s in got:
        assert got[s]["loss"] == pytest.approx(want[s]["loss"], rel=1e-4)
        assert got[s]["learning_rate"] == pytest.approx(want[s]["learning_rate"])


def test_resume_refuses_a_truncated_real_shard(sealed_run, tmp_path):
    from distft.stages import StageContext, stage_runner

    cfg, _, _, ckpts = sealed_run
    copy = shutil.copytree(ckpts, tmp_path / "checkpoints")
    truncate(copy / "checkpoint-20" / "adapter_model.safetensors")
    ctx = StageContext(run_dir=tmp_path / "resumed", resume_from=str(copy / "checkpoint-20"))
    with pytest.raises(CheckpointError) as e:
        stage_runner("sft")(cfg, ctx)
    assert "adapter_model.safetensors" in str(e.value) and "truncated" in str(e.value)
    assert f"resume from {copy / 'checkpoint-15'} instead" in str(e.value)
    assert not (tmp_path / "resumed" / "sft").exists()  # refused before anything was built or written


def test_a_pickled_object_in_a_checkpoint_is_refused(sealed_run, tmp_path):
    import torch

    from distft.stages import StageContext, stage_runner

    cfg, _, _, ckpts = sealed_run
    bad = shutil.copytree(ckpts / "checkpoint-10", tmp_path / "checkpoints" / "checkpoint-10")
    marker = tmp_path / "pwned"
    torch.save({"state": _Payload(marker), "param_groups": []}, bad / "optimizer.pt")
    ctx = StageContext(run_dir=tmp_path / "resumed", resume_from=str(bad))
    with pytest.raises(CheckpointError, match=r"optimizer\.pt: "):
        stage_runner("sft")(cfg, ctx)  # the manifest catches the swap
    # Someone who can write the directory can rewrite the manifest too; then the loader's weights_only stops it.
    ck.write_manifest(bad, ck.build_manifest(bad, step=10, world_size=1, strategy="ddp"))
    with pytest.raises(pickle.UnpicklingError):
        stage_runner("sft")(cfg, StageContext(run_dir=tmp_path / "resumed2", resume_from=str(bad)))
    assert not marker.exists()


# ---- several processes (full tier) ----

def _resume_worker(rank: int, world: int, port: int, raw_json: str, run_dir: str, resume_from: str | None) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import build_config
    from distft.distributed.process_group import leave_process_group
    from distft.stages import stage_runner
    from distft.stages.context import context_from_env

    ctx = context_from_env(run_dir, resume_from=resume_from)
    stage_runner("sft")(build_config(json.loads(raw_json)), ctx)
    losses = {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps({str(k): v for k, v in losses.items()}))
    leave_process_group()


def run_stage(raw: dict, run_dir: Path, world: int, resume_from: Path | None = None) -> dict[int, float]:
    """The SFT stage on `world` gloo ranks (spawned) or in this process; rank 0's loss per step."""
    from distft.config import build_config

    run_dir.mkdir(parents=True, exist_ok=True)
    raw = dict(raw, scaling={"num_workers": world, "torch_threads": 1 if world > 1 else 2})
    resume = str(resume_from) if resume_from else None
    if world == 1:
        from distft.stages import StageContext, stage_runner

        ctx = StageContext(run_dir=run_dir, resume_from=resume)
        stage_runner("sft")(build_config(raw), ctx)
        return {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}
    import torch.multiprocessing as mp

    from test_distributed_stage import free_port

    mp.start_processes(_resume_worker, nprocs=world, start_method="spawn",
                       args=(world, free_port(), json.dumps(raw), str(run_dir), resume))
    return {int(k): v for k, v in json.loads((run_dir / "rank0.json").read_text()).items()}


def multi_cfg(model_dir, rows, tmp_path, max_steps=10, **sections) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
        "stage": "sft",
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", rows)), "max_eval_samples": 16},
        "method": {"name": "full"},
        "run": {"keep_checkpoints": 5},
        "train": {"lr": 1e-3, "max_steps": max_steps, "global_batch_size": 16, "micro_batch_size": 4, "log_every": 1,
                  "save_every": 3},
        "evaluate": {"before": False},
        **sections,
    }


@pytest.mark.slow
def test_ddp_resumes_on_another_world_size(tiny_random, alpaca_rows, tmp_path):
    """2 ranks x 2 accumulation -> 1 process x 4 -> 2 ranks again: the same global batch, the same losses."""
    cfg = multi_cfg(tiny_random, alpaca_rows, tmp_path)
    two = run_stage(cfg, tmp_path / "two", world=2)
    ckpt = tmp_path / "two" / "sft" / "checkpoints" / "checkpoint-3"
    assert json.loads((ckpt / MANIFEST).read_text())["world_size"] == 2

    one = run_stage(cfg, tmp_path / "one", world=1, resume_from=ckpt)
    assert sorted(one) == list(range(4, 11))
    assert [one[s] for s in one] == pytest.approx([two[s] for s in one], rel=1e-4)

    ckpt = tmp_path / "one" / "sft" / "checkpoints" / "checkpoint-6"
    assert json.loads((ckpt / MANIFEST).read_text())["world_size"] == 1
    again = run_stage(cfg, tmp_path / "again", world=2, resume_from=ckpt)
    assert sorted(again) == list(range(7, 11))
    assert [again[s] for s in again] == pytest.approx([two[s] for s in again], rel=1e-4)


@pytest.mark.slow
def test_zero_resumes_on_the_same_world_size_and_refuses_another(tiny_random, alpaca_rows, tmp_path):
    pytest.importorskip("deepspeed")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cfg = multi_cfg(tiny_random, alpaca_rows, tmp_path, max_steps=6, strategy={"name": "deepspeed", "zero_stage": 2})
    full = run_stage(cfg, tmp_path / "full", world=2)
    ckpt = tmp_path / "full" / "sft" / "checkpoints" / "checkpoint-3"
    m = json.loads((ckpt / MANIFEST).read_text())
    assert (m["world_size"], m["strategy"]) == (2, "deepspeed-zero2")
    assert any("optim_states" in f["path"] for f in m["files"])  # the per-rank ZeRO shards are in the manifest

    with pytest.raises(CheckpointError, match="scaling.num_workers=2"):
        run_stage(cfg, tmp_path / "one", world=1, resume_from=ckpt)
    assert not (tmp_path / "one" / "sft").exists()

    resumed = run_stage(cfg, tmp_path / "resumed", world=2, resume_from=ckpt)  # staging + rename kept it loadable
    assert sorted(resumed) == [4, 5, 6]
    assert [resumed[s] for s in resumed] == pytest.approx([full[s] for s in resumed], rel=1e-4)


@pytest.mark.slow
def test_ray_registers_sealed_checkpoints_only(ray_cluster, tiny_base, tmp_path, monkeypatch):
    from distft.config import load_config
    from distft.launch.preflight import absolutize_paths
    from distft.launch.train import launch

    monkeypatch.setenv(ck.SYNC_HASH_ENV, "0")  # background seals, registered at the next save or at the end
    cfg = absolutize_paths(load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name_or_path={tiny_base}", "train.max_steps=12", "train.save_every=4", "train.log_every=4",
        "evaluate.max_samples=16", "data.max_train_samples=400", "run.keep_checkpoints=2",
    ]), REPO)
    (summary,) = launch(cfg, tmp_path / "run", log=lambda m: None)
    copies = [d.parent for d in (tmp_path / "run" / "ray").rglob(MANIFEST)]
    assert copies and all(verify_checkpoint(d) == [] for d in copies)
    assert max(json.loads((d / MANIFEST).read_text())["step"] for d in copies) == 12
    local = complete_checkpoints(tmp_path / "run" / "sft" / "checkpoints")
    assert [d.name for d in local] == ["checkpoint-8", "checkpoint-12"]

    # Stored once (issue 20): Ray's storage (<run>/ray) is on the run's filesystem, so each registered copy
    # is hard links to the sealed checkpoint of its step, file for file, rather than a second copy.
    ray_by_step = {json.loads((d / MANIFEST).read_text())["step"]: d for d in copies}
    assert sorted(ray_by_step) == [8, 12]  # Ray's num_to_keep dropped its copy of 4, distft's rotation its own
    for step, ray_copy in ray_by_step.items():
        ours = tmp_path / "run" / "sft" / "checkpoints" / f"checkpoint-{step}"
        theirs = sorted(p.relative_to(ray_copy) for p in ray_copy.rglob("*") if p.is_file())
        assert theirs == sorted(p.relative_to(ours) for p in ours.rglob("*") if p.is_file())
        for rel in theirs:
            a, b = (ray_copy / rel).stat(), (ours / rel).stat()
            assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino) and a.st_nlink >= 2, (step, rel)
    # Peak memory (issue 20): every rank's kernel high-water mark, gathered at the end of training.
    assert len(summary["peak_rss_mib_per_rank"]) == 2 and summary["peak_rss_mib"] == max(summary["peak_rss_mib_per_rank"])
    assert summary["peak_rss_mib"] > 100  # a worker with torch and a model loaded: hundreds of MiB


def test_an_upload_snapshot_survives_rotation_of_the_original(tmp_path):
    """Ray uploads the snapshot in the background while training (and rotation) go on."""
    from distft.distributed.checkpoint import (build_manifest, complete_checkpoints, upload_snapshot,
                                               verify_checkpoint, write_manifest)

    ckpt = tmp_path / "checkpoints" / "checkpoint-10"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w" * 1000)
    write_manifest(ckpt, build_manifest(ckpt, step=10, world_size=1, strategy="ddp"))
    snap = upload_snapshot(ckpt)
    assert snap.parent.name == ".uploading" and snap.parent.parent == ckpt.parent
    assert (snap / "model.safetensors").stat().st_ino == (ckpt / "model.safetensors").stat().st_ino  # no copy
    shutil.rmtree(ckpt)  # rotated away mid-upload
    assert verify_checkpoint(snap) == []
    assert complete_checkpoints(tmp_path / "checkpoints") == []  # a snapshot is never a resumable checkpoint
