"""Where a stage starts again: its finished summary, its checkpoints (local and uploaded copies),
`--from` points, and the Ray Train run names of its earlier launch attempts."""

from __future__ import annotations

import re
import time
import uuid
from pathlib import Path

from distft.config import DistftConfig
from distft.launch.placement import ray_storage_path
from distft.distributed.checkpoint import (
    CheckpointError,
    checkpoint_step,
    copy_label,
    first_verified,
    read_manifest,
    sealed_copies,
    summarize_problems,
    verify_checkpoint,
)
from distft.launch.cluster import is_remote_uri
from distft.stages.summary import read_stage_summary



RAY_RUN_NAMES = "ray_run_name"  # in the stage directory: one Ray Train run name per launch attempt, oldest first


def ray_run_name(stage_dir: Path) -> str:
    """A new Ray Train run name for this launch attempt of the stage, recorded in the stage directory.

    Train restores a run of the same name and storage from its own latest registered copy, whatever
    distft passes and without verifying it. So every attempt gets a name of its own: within one
    attempt, a worker group restarted after a failure continues from this attempt's copy
    (`ray.train.get_checkpoint()`); across `distft` invocations the driver chooses the checkpoint
    (`resume_point`: local ones and the earlier attempts' copies, the newest that verifies) and
    passes it to the workers explicitly.
    """
    name = f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    with (stage_dir / RAY_RUN_NAMES).open("a") as f:
        f.write(name + "\n")
    return name


def earlier_ray_runs(stage_dir: Path) -> list[str]:
    """The Ray Train run names of the stage's launch attempts so far, oldest first."""
    try:
        names = (stage_dir / RAY_RUN_NAMES).read_text(errors="replace").split()
    except OSError:
        return []
    return [n for n in names if re.fullmatch(r"[\w.-]+", n) and n not in (".", "..")]  # a name, never a path


def _logged_before(stage_dir: Path) -> bool:
    # stages.reporting imports transformers' trainer utilities (peft, bitsandbytes: 3.9 s): in the function,
    # the driver imports them only when a run resumes, not for every `distft train`.
    from distft.stages.reporting import last_step

    return last_step(stage_dir / "metrics.jsonl") is not None


def _mark_resume(stage_dir: Path, checkpoint: str, source: str, rank: int) -> None:
    """On rank 0, the restart marker in metrics.jsonl: the steps logged after it from the checkpoint's on redo
    earlier ones, and a reader can tell them apart."""
    from distft.stages.reporting import MetricsLog  # (see _logged_before)

    if rank != 0:
        return
    step = (read_manifest(checkpoint) or {}).get("step", checkpoint_step(checkpoint))
    MetricsLog(stage_dir).mark_resume(checkpoint, step if isinstance(step, int) else None, source)


def stage_done(cfg: DistftConfig, run_dir: Path, stage_index: int) -> dict | None:
    """The summary of a stage that finished in `run_dir` with this config and an intact export, else None.

    Finished means: summary.json, and a `final/` whose manifest verifies (it is written last) for the
    same stage fingerprint (model, this stage's and every earlier stage's settings).
    """
    stage_dir = run_dir / cfg.stages[stage_index].label()
    summary = read_stage_summary(stage_dir)
    if summary is None or verify_checkpoint(stage_dir / "final"):
        return None
    return summary if summary.get("fingerprint") == cfg.stage_fingerprint(stage_index) else None


def checkpoint_copies(cfg: DistftConfig, run_dir: Path, stage_index: int, log=print) -> list[tuple[int, str, Path]]:
    """Every sealed copy of the stage's checkpoints, newest step first (local before Ray's at one step):
    `<stage>/checkpoints/checkpoint-N`, and the copies Ray Train registered for the stage's earlier
    launch attempts in their storage (`<run>/ray/<run name>/checkpoint_*`, or run.storage_path).
    Copies in remote storage (s3://, ...) are not read from here: local checkpoints only, said once."""
    stage_dir = run_dir / cfg.stages[stage_index].label()
    names = earlier_ray_runs(stage_dir)
    storage = ray_storage_path(cfg, run_dir)
    if names and is_remote_uri(storage):
        log(f"stage {stage_dir.name}: Ray's checkpoint copies in {storage} are not checked (remote storage); "
            "choosing among the local checkpoints only")
        names = []
    return sealed_copies(stage_dir / "checkpoints", [Path(storage) / n for n in names])


def checkpoint_label(path: str | Path, run_dir: Path) -> str:
    """`checkpoint-20` for a local checkpoint, `checkpoint-20 (Ray's copy ray/...)` for one of Ray's copies."""
    path = Path(path)
    if path.parent.name == "checkpoints":
        return path.name
    return copy_label((read_manifest(path) or {}).get("step", "?"), "Ray's copy", path, run_dir)


def resume_point(cfg: DistftConfig, run_dir: Path, stage_index: int, log=print) -> tuple[dict | None, str | None]:
    """(summary if the stage finished, else the newest checkpoint copy that verifies, or None for a fresh start).

    Local checkpoints and Ray's copies from earlier attempts are candidates alike; each damaged one
    newer than the choice is reported (`log`) on one line and skipped, never deleted."""
    done = stage_done(cfg, run_dir, stage_index)
    if done is not None:
        return done, None
    label = cfg.stages[stage_index].label()
    if (run_dir / label / "summary.json").is_file():
        # It finished, but with other settings (or its export is damaged): its checkpoints belong to
        # that run, and continuing from them would mix two configs. It reruns from the start.
        return None, None
    copies = checkpoint_copies(cfg, run_dir, stage_index, log)
    chosen = first_verified(copies, log, run_dir)
    if chosen is None:
        if copies:
            log(f"stage {label}: no checkpoint verifies; it starts again from step 0")
        return None, None
    return None, str(chosen[2])


def start_point(cfg: DistftConfig, run_dir: Path, start_from: str, log=print) -> tuple[int, str]:
    """`--from checkpoint-N`: (the first unfinished stage, its copy of step N that verifies), or CheckpointError
    (exit 2, before any cluster is taken) naming what is wrong and the checkpoints that verify."""
    m = re.fullmatch(r"(?:checkpoint-)?(\d+)", start_from.strip())
    if not m:
        raise CheckpointError(f"--from {start_from}: not a checkpoint name. Fix: --from checkpoint-N, N a step "
                              f"that has a checkpoint (`distft runs show {run_dir}` shows the latest).")
    step = int(m[1])
    index = next((i for i in range(len(cfg.stages)) if stage_done(cfg, run_dir, i) is None), None)
    if index is None:
        raise CheckpointError(f"--from checkpoint-{step}: every stage of {run_dir} finished; nothing to resume.")
    label = cfg.stages[index].label()
    if (run_dir / label / "summary.json").is_file():
        raise CheckpointError(
            f"--from checkpoint-{step}: stage {label} finished with other settings, so its checkpoints belong to "
            f"those. Fix: drop --from (the stage then starts again), or resume with the settings it ran with.")
    copies = checkpoint_copies(cfg, run_dir, index, log)
    damaged = []
    for s, where, path in copies:
        if s == step:
            problems = verify_checkpoint(path)
            if not problems:
                for line in damaged:
                    log(f"{line}; skipped")
                return index, str(path)
            damaged.append(f"{copy_label(s, where, path, run_dir)} is damaged: {summarize_problems(problems, 1)}")
    good = []
    for s, _, path in copies:
        if s != step and (not good or good[-1] != s) and not verify_checkpoint(path):
            good.append(s)
    what = "; ".join(damaged) if damaged else f"stage {label} has no checkpoint-{step}"
    listed = ", ".join(f"checkpoint-{s}" for s in good)
    fix = (f"the checkpoints of stage {label} that verify: {listed}. Fix: distft resume {run_dir} "
           f"--from checkpoint-{good[0]}." if good else
           f"no checkpoint of stage {label} verifies. Fix: distft resume {run_dir} without --from starts it again.")
    raise CheckpointError(f"--from checkpoint-{step}: {what}; {fix}")


def set_aside_newer(cfg: DistftConfig, run_dir: Path, stage_index: int, chosen: str, log=print) -> None:
    """`--from checkpoint-N` abandons what came after step N. Its checkpoints, local and Ray's copies, are
    moved (never deleted) to `<their dir>.after-<N>-<time>` beside them: left in place, the rotation (which
    keeps the highest steps) would delete the new line's checkpoints first, and a later plain `distft
    resume` would silently pick the abandoned line's newest."""
    step = (read_manifest(chosen) or {}).get("step")
    if step is None:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for s, _, path in checkpoint_copies(cfg, run_dir, stage_index, log=lambda *_: None):
        if s > step and Path(path).resolve() != Path(chosen).resolve():
            target = path.parent.with_name(f"{path.parent.name}.after-{step}-{stamp}") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved.append(target.parent)
    if moved:
        where = ", ".join(sorted({str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else str(d) for d in moved}))
        log(f"--from checkpoint-{step}: {len(moved)} newer checkpoint copies set aside in {where}")


def set_aside(stage_dir: Path) -> Path | None:
    """Move an earlier attempt's stage directory out of the way (never deleted): `<stage>.superseded-<time>`."""
    if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return None
    target = stage_dir.with_name(f"{stage_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    stage_dir.rename(target)
    return target
