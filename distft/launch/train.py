"""Run stages on Ray Train: one stage's worker group (`train_stage`) and a run's stages in order
(`launch`). The launch package is the only one that imports Ray; its parts: errors, session (the
Ray cluster), placement, worker_env, worker (the training function), resume.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distft.config import DistftConfig
from distft.errors import DistftError
from distft.launch.errors import stage_failed
from distft.launch.placement import check_cluster_resources, check_storage, ray_storage_path
from distft.launch.resume import checkpoint_label, ray_run_name, resume_point, set_aside, set_aside_newer
from distft.launch.session import caller_signal_handlers, cluster_address, init_ray
from distft.launch.worker import _worker_entry
from distft.launch.worker_env import _worker_env, forwarded_secrets
from distft.stages.summary import read_stage_summary



def train_stage(cfg: DistftConfig, stage_index: int, run_dir: Path, resume_from: str | None = None,
                callbacks: list | None = None, stop_hook=None,
                forwarded: dict[str, str] | None = None, secrets: dict[str, str] | None = None,
                tracking: dict | None = None) -> dict:
    """One stage on a Ray Train worker group. `callbacks` are Train run callbacks (Tune's reporter);
    `stop_hook` has a `stop_fn()` for rank 0: a Tune trial's early-stop decisions (launch/tune.py's
    SchedulerDecisions);
    `forwarded` is the submitter's environment for workers when this runs elsewhere (a Tune trial
    actor on a cluster node), default this process's; so are `secrets` (run.forward_env's values).
    `tracking`: the stage's MLflow / W&B runs (launch/tracking.py), which rank 0 logs to.

    Secrets reach the workers through the object store, not the runtime env: Ray shows runtime
    envs (env_vars included) in the dashboard, the state API and job listings.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = cfg.stages[stage_index]
    s = cfg.scaling
    # Ray Train reads it from the driver's environment and hands it to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.run.worker_start_timeout_s)
    # The controller takes each worker's report (one at a time: a second one blocks training) and
    # notices the end of the run only when it polls, every 2 s by default; 0.5 s costs little.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    secrets_ref = ray.put(forwarded_secrets(cfg) if secrets is None else secrets)
    streamed = {}
    if stage.data.streaming:  # Ray Data reads and tokenizes; Train splits it into one shard per worker
        from distft.launch.streaming import token_rows

        streamed["train"] = token_rows(cfg, stage_index, run_dir, env=_worker_env(cfg, forwarded), secrets=secrets_ref)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_entry,
        # Ray Train forms the process group: the same bound on its rendezvous and every collective.
        torch_config=TorchConfig(timeout_s=max(1, round(cfg.run.collective_timeout_s))),
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "stage_index": stage_index,
            "run_dir": str(run_dir),
            "resume_from": resume_from,
            "stop_hook": stop_hook,
            "secrets": secrets_ref,
            "tracking": tracking,
        },
        datasets=streamed or None,
        scaling_config=ScalingConfig(
            # Elastic: Ray Train starts with what fits (at least the minimum), restarts the group
            # smaller from the latest checkpoint when a worker is lost, and larger when room appears.
            num_workers=(s.min_workers, s.num_workers) if s.elastic() else s.num_workers,
            elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
            use_gpu=s.use_gpu,
            resources_per_worker=s.resources_per_worker(),
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=ray_run_name(run_dir / stage.label()),
            storage_path=ray_storage_path(cfg, run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg, forwarded)},
            # Keeps the `ray.train` logger's INFO chatter off the console; the per-report
            # INFO lines come from another logger, quieted in the worker (_quiet_report_logger).
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    error_log = run_dir / stage.label() / "error.log"
    fit_started = time.time()
    try:
        result = _fit_interruptibly(trainer)
    except (KeyboardInterrupt, DistftError):
        raise
    except Exception as e:  # Ray 2.60 raises the workers' error from fit(); its tracebacks go to error_log
        raise stage_failed(stage.label(), e, error_log) from None
    if result.error:  # the Ray versions that return it instead
        raise stage_failed(stage.label(), result.error, error_log) from None
    fit_ended = time.time()
    summary = read_stage_summary(run_dir / stage.label())
    if summary is None:  # every stage writes one before it reports done
        raise RuntimeError(f"stage {stage.label()} ended without a readable summary.json")
    placement = run_dir / stage.label() / "placement"
    # Files of an earlier, larger worker group (an elastic run that shrank) are not this one's.
    placed = [p for p in map(json.loads, (f.read_text() for f in placement.glob("rank-*.json")))
              if p.get("world_size", summary.get("world_size")) == summary.get("world_size")]
    summary["worker_nodes"] = [p["node_id"] for p in sorted(placed, key=lambda p: p["rank"])]
    groups_file = placement / "groups.jsonl"
    # Every worker group this stage ran with, in order (restarts, elastic resizes; earlier launches too).
    groups = [json.loads(line) for line in groups_file.read_text().splitlines()] if groups_file.is_file() else []
    if groups_file.is_file():
        summary["worker_groups"] = [g["world_size"] for g in groups]
    entered = [g["time"] for g in groups if g["time"] >= fit_started]  # this launch's first group
    summary.update(stage_timeline(fit_started, fit_ended, entered[0] if entered else None,
                                  summary.pop("trained_between", None)))
    if cfg.run.forward_env and placed:  # which forwarded variables every worker received (names only)
        summary["forwarded_env"] = sorted(set.intersection(*(set(p.get("forwarded_env", [])) for p in placed)))
    return summary


def stage_timeline(fit_started: float, fit_ended: float, entered: float | None,
                   trained_between: list[float | None] | None) -> dict:
    """Where a stage's wall time went around its training steps, in seconds by phase (the run summary).

    startup_s: `workers`, from `fit()` to the training function's start on rank 0 (Ray Train's
    controller, the worker processes, the process group); `setup`, from there to the first step
    (imports, data, model, Trainer). after_training_s: `finish`, from the last step until `fit()`
    returned (final evaluation, export, the worker group's exit). The launcher adds the phases before
    the first stage (`cli`, `ray`) and after the last (`teardown`)."""
    began, ended = trained_between or (None, None)
    startup, after = {}, {}
    if entered is not None:
        startup["workers"] = round(entered - fit_started, 2)
        if began is not None:
            startup["setup"] = round(began - entered, 2)
    if ended is not None:
        after["finish"] = round(fit_ended - ended, 2)
    return {"startup_s": startup, "after_training_s": after}


def _fit_interruptibly(trainer):
    """`trainer.fit()` on a helper thread, so Ctrl-C and SIGTERM reach distft.

    On the main thread Ray Train installs its own SIGINT handler: it aborts the run, then the
    process exits with status 1 and no message. Off the main thread Ray installs none, the
    KeyboardInterrupt lands here, and `launch` shuts down the Ray it started, which stops the
    workers; sealed checkpoints stay as they are for `distft resume`.
    """
    import threading

    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="distft-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def process_started() -> float:
    """When this process started (the kernel's record), so the start-up count includes the imports."""
    import psutil

    return psutil.Process().create_time()


def launch(cfg: DistftConfig, run_dir: Path, address: str | None = None, log=print, resume: bool = False,
           force_from: int | None = None, start_from: tuple[int, str] | None = None, tracking=None) -> list[dict]:
    """Run every stage in order on one Ray cluster; returns each stage's summary.

    With `resume` (`distft resume`, `distft pipeline`), a stage that finished in `run_dir` with the same
    settings is skipped and an unfinished one continues from its latest verified checkpoint (a damaged
    newer one is passed over, never deleted). Once a stage runs, every later stage runs afresh (its
    inputs changed); `force_from` reruns from that stage on. Earlier attempts are set aside, not deleted.
    `start_from` (`--from`): (stage index, checkpoint) from `start_point`, used as it is for that stage.
    `tracking`: the run's `RunTracking` (launch/tracking.py): each stage that runs gets its tracking runs.
    """
    import ray

    from distft.launch.provenance import finish_provenance, start_provenance

    started = time.time()
    address = cluster_address(cfg, address)
    owns_ray = not ray.is_initialized()  # a caller's (or a test fixture's) cluster stays up
    last_ran = None  # (the summary of the last stage that ran, when its train_stage returned)
    cluster_taken = False  # the cluster is started (or reached) for the first stage that runs, never for none
    try:
        summaries = []
        rerun_rest = False
        for i, stage in enumerate(cfg.stages):
            done, resume_from = None, None
            if start_from is not None and i == start_from[0]:  # `--from`: chosen and verified by start_point
                resume_from = start_from[1]
            elif resume and not rerun_rest and (force_from is None or i < force_from):
                done, resume_from = resume_point(cfg, run_dir, i, log=log)
            if done is not None:
                log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()} finished earlier with these settings; skipped")
                summaries.append({**done, "skipped": True})
                continue
            first_run = not cluster_taken
            if not cluster_taken:
                reached = time.time()
                with caller_signal_handlers():
                    init_ray(cfg, address)
                # Before the first stage: this process's start up to Ray (imports, config, preflight, run
                # directory), then Ray itself (a private cluster's start, or connecting to one).
                before = {"cli": round(reached - process_started(), 2), "ray": round(time.time() - reached, 2)}
                cluster_taken = True
                if address or not owns_ray:
                    check_cluster_resources(cfg)
                    check_storage(cfg, run_dir)
                # Only once the cluster took the run: a run refused before this leaves nothing to clean up.
                start_provenance(run_dir)
            if start_from is not None and i == start_from[0]:
                set_aside_newer(cfg, run_dir, i, resume_from, log=log)
            if resume_from is None:
                moved = set_aside(run_dir / stage.label())
                if moved:
                    log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()}: the earlier attempt moved to {moved.name}")
            rerun_rest = True
            where = f", resuming from {checkpoint_label(resume_from, run_dir)}" if resume_from else ""
            s = cfg.scaling
            workers = f"{s.min_workers}-{s.num_workers} (elastic)" if s.elastic() else s.num_workers
            log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()} on {workers} Ray Train worker(s){where}")
            spec = tracking.stage(i, resumed=resume_from is not None) if tracking is not None else None
            summary = train_stage(cfg, i, run_dir, resume_from, tracking=spec)
            if first_run:
                summary["startup_s"] = {**before, **summary.get("startup_s", {})}
            summaries.append(summary)
            last_ran = (summary, time.time())
        if not cluster_taken:
            log("every stage finished earlier with these settings: nothing to run")
            return summaries
        finish_provenance(run_dir, summaries)
        log(f"all stages done in {time.time() - started:.0f}s")
        return summaries
    finally:
        if owns_ray and cluster_taken:
            ray.shutdown()
        if last_ran is not None:  # after the last stage: provenance, and the Ray this process started going down
            summary, returned = last_ran
            summary.setdefault("after_training_s", {})["teardown"] = round(time.time() - returned, 2)
