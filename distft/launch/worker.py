"""The training function each Ray Train worker runs (`_worker_entry`), and what guards it:
the checkpoint-upload watchdog, the placement record, the quiet report logger."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distft.launch.resume import _logged_before, _mark_resume
from distft.launch.worker_env import SYNC_UPLOAD_ENV




def _record_placement(stage_dir: Path, rank: int, world_size: int, forward_env: list[str]) -> None:
    """Which Ray node this rank runs on; the driver adds them to the summary as `worker_nodes`."""
    import ray

    out = stage_dir / "placement"
    out.mkdir(parents=True, exist_ok=True)
    node = ray.get_runtime_context().get_node_id()
    received = sorted(k for k in forward_env if os.environ.get(k))  # names only: what arrived, never values
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world_size, "node_id": node,
                                                        "forwarded_env": received}))
    if rank == 0:
        with (out / "groups.jsonl").open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "world_size": world_size}) + "\n")


def _quiet_report_logger() -> None:
    """Train V2 logs every report (with its whole metrics dict) at INFO, twice per log step.

    That logger is named after its file, so `LoggingConfig(log_level=...)`, which sets
    the `ray.train` logger, does not reach it; quiet it by name.
    """
    import logging

    # Train V2 also logs a failing training function's whole traceback from the worker, which Ray streams
    # to the driver's console; the driver writes it to <stage>/error.log and prints one line instead.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class CheckpointUploadTimeout(RuntimeError):
    """A checkpoint handed to Ray's background upload was not uploaded in time; the message says what to check."""


class UploadWatch:
    """The snapshots handed to Ray's asynchronous upload, which deletes each once it is uploaded.

    Ray 2.60 has no timeout for that upload; a storage path that stops answering would let
    training go on for hours with nothing registered. Checked at every report (each log step),
    so a stuck upload fails the run within about `timeout_s` plus one log interval."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.pending: list[tuple[Path, float]] = []

    def add(self, snapshot: Path, now: float | None = None) -> None:
        self.pending.append((Path(snapshot), time.monotonic() if now is None else now))

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.pending = [(p, t) for p, t in self.pending if p.exists()]
        late = [(p, t) for p, t in self.pending if now - t > self.timeout_s]
        if late:
            snapshot, started = late[0]
            name = snapshot.name.rsplit("-", 1)[0]  # checkpoint-N-<8 hex>
            raise CheckpointUploadTimeout(
                f"the upload of {name} to run.storage_path has not finished after {now - started:.0f} s "
                f"(run.checkpoint_upload_timeout_s={self.timeout_s:g}). Fix: check that the storage is reachable "
                "from every node and fast enough for checkpoints this size, or raise run.checkpoint_upload_timeout_s; "
                f"the checkpoint itself is complete in {snapshot.parent.parent / name}."
            )

    def drain(self, poll_s: float = 0.5, clock=time.monotonic, sleep=time.sleep) -> None:
        """Wait for the pending uploads, within the same timeout: after the training function returns,
        Ray would wait for them with none, and a stuck upload would hang the finished run."""
        while True:
            self.check(clock())
            if not self.pending:
                return
            sleep(poll_s)


def linkable_storage(checkpoint_dir: str):
    """Ray Train's storage context when its checkpoint copies can be hard links to `checkpoint_dir`, else None.

    That takes storage on a local (or mounted) filesystem, the one `checkpoint_dir` is on, which this
    node sees as Ray does: the marker file Ray's controller writes into the run's storage at start
    must be here (a local storage_path on another node's disk is not). Remote URIs (s3://, gs://) and
    other filesystems keep Ray's upload.
    """
    import pyarrow.fs
    import ray.train

    from distft.distributed.checkpoint import same_filesystem

    try:
        storage = ray.train.get_context().get_storage()  # a DeveloperAPI in 2.60
        from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME as marker
    except (AttributeError, ImportError, NotImplementedError):
        return None
    if not isinstance(getattr(storage, "storage_filesystem", None), pyarrow.fs.LocalFileSystem):
        return None
    experiment = Path(storage.experiment_fs_path)
    if not (experiment / marker).is_file() or not same_filesystem(checkpoint_dir, experiment):
        return None
    return storage


def link_upload(storage):
    """Ray's `checkpoint_upload_fn`: its copy of the checkpoint, at the path Ray chose, as hard links.

    Ray's rotation (CheckpointConfig.num_to_keep) later deletes that directory, which unlinks its names
    only: the sealed checkpoint under <stage>/checkpoints keeps its data (and the other way round). If
    linking fails after all, Ray's own copy is made instead."""
    import ray.train

    from distft.distributed.checkpoint import link_copy

    def upload(checkpoint, checkpoint_dir_name: str):
        target = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        if link_copy(checkpoint.path, target):
            return ray.train.Checkpoint(target, filesystem=storage.storage_filesystem)
        return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)

    return upload


def _worker_entry(config: dict) -> None:
    """Runs in every Ray Train worker: everything comes from `config`, nothing from driver globals."""
    from distft.stages.quiet import quiet_notices

    quiet_notices()  # first: the imports below reach bitsandbytes, which logs a harmless notice at import
    import ray.train

    from distft.config import DistftConfig
    from distft.distributed.checkpoint import read_manifest, upload_snapshot
    from distft.stages import StageContext, stage_runner

    _quiet_report_logger()
    # Before anything reads them (hub downloads read HF_TOKEN); never logged, never written.
    os.environ.update(ray.get(config["secrets"]) if config.get("secrets") is not None else {})
    from distft.launch.job_package import scrub_unpacked_secrets

    # A submitted job's package is unpacked on every node it uses, with the secrets file the
    # entrypoint already took; the environment has the values now, so no copy stays on disk.
    scrub_unpacked_secrets()
    cfg = DistftConfig.model_validate(config["config"])
    stage_index = config["stage_index"]
    tctx = ray.train.get_context()
    stop_fn = None
    if config.get("stop_hook"):  # a Tune trial: evals wait for the scheduler's continue/stop decision
        stop_fn = config["stop_hook"].stop_fn()

    uploads = UploadWatch(cfg.run.checkpoint_upload_timeout_s)
    # Training waits for each upload: for storage that cannot take a second writer, and the
    # baseline benchmarks/checkpoint_cost.py measures the background upload against.
    sync_upload = os.environ.get(SYNC_UPLOAD_ENV) == "1"

    def report(metrics: dict, checkpoint_dir: str | None, progress: bool) -> None:
        uploads.check()
        if progress and stop_fn is None:
            # A training-progress line is in metrics.jsonl and TensorBoard already, and outside a search
            # nothing on the Ray side reads it. Reporting it would cost a stall per log: Ray Train queues
            # one report per worker, and a second report waits until the controller's next poll.
            return
        storage = linkable_storage(checkpoint_dir) if checkpoint_dir else None
        if storage is not None:
            # Storage on this filesystem (the default <run>/ray, a local run.storage_path): Ray's registered
            # copy is made of hard links to the sealed checkpoint, so it is stored once, and "uploading" it
            # takes milliseconds on the training thread.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_upload_fn=link_upload(storage))
            return
        snapshot = upload_snapshot(checkpoint_dir) if checkpoint_dir and not sync_upload else None
        if snapshot is None:  # no checkpoint, or no hard links possible: Ray copies it while training waits
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
            return
        # Training goes on while Ray copies the checkpoint to run.storage_path (possibly s3://); it
        # registers it once copied, then deletes the hard-linked snapshot.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(snapshot)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        uploads.add(snapshot)

    def run(resume_from: str | None) -> None:
        ctx = StageContext(
            run_dir=Path(config["run_dir"]),
            stage_index=stage_index,
            rank=tctx.get_world_rank(),
            world_size=tctx.get_world_size(),
            local_rank=tctx.get_local_rank(),
            resume_from=resume_from,
            report_fn=report,
            stop_fn=stop_fn,
            shard_fn=ray.train.get_dataset_shard,
            tracking=config.get("tracking"),
        )
        if resume_from:
            step = (read_manifest(resume_from) or {}).get("step", "?")
            ctx.log(f"[{cfg.stages[stage_index].label()}] resuming from {resume_from} (step {step})")
        stage_runner(cfg.stages[stage_index].stage)(cfg, ctx)

    _record_placement(Path(config["run_dir"]) / cfg.stages[stage_index].label(), tctx.get_world_rank(),
                      tctx.get_world_size(), cfg.run.forward_env)
    # Ray only ever registers sealed checkpoints (ReportCallback attaches one after its manifest is
    # written). The stage verifies it against that manifest before building anything, as for every
    # other launcher, and refuses a damaged one (CheckpointError) naming the file and the latest
    # earlier checkpoint that verifies.
    # Each launch attempt has its own Ray run name (ray_run_name), so Ray holds a checkpoint only when
    # this attempt's worker group restarted: that one is newer than the driver's choice and wins.
    # Else the one the driver chose and verified (`distft resume`, `--from`), passed explicitly.
    checkpoint = ray.train.get_checkpoint()
    stage_dir = Path(config["run_dir"]) / cfg.stages[stage_index].label()
    if checkpoint is None:
        if config.get("resume_from"):
            _mark_resume(stage_dir, config["resume_from"], "distft resume", tctx.get_world_rank())
        elif tctx.get_world_rank() == 0 and _logged_before(stage_dir):
            # A worker group restarted before its first checkpoint: it starts again from step 0, and the
            # steps it logs again must be told apart from the first attempt's.
            from distft.stages.reporting import MetricsLog

            MetricsLog(stage_dir).mark_resume("", 0, "worker group restart (no checkpoint yet)")
        run(config.get("resume_from"))
    else:
        with checkpoint.as_directory() as path:
            _mark_resume(stage_dir, path, "worker group restart", tctx.get_world_rank())
            run(path)
    uploads.drain()
