"""A run's life in its directory, from the claim to summary.json: what `distft train`, `resume`,
`pipeline` and `tune` do before, around and after a launch.

- `start_run` (`distft train`): preflight, claim a fresh directory (rundir.py), write config.yaml,
  launch. A launch that fails before its first stage starts releases the claim.
- `resume_run` (`distft resume`): in place; finished stages are skipped, the current one resumes.
  Overrides keep the config the run started with beside the new one.
- `start_pipeline` (`distft pipeline`): a stable directory named after the config; a rerun skips
  finished stages and keeps the config earlier attempts ran with.
- `start_search` (`distft tune`): the search directory, search.yaml and search.json, or the
  directory of a search to continue.
- `finish_run`: the `final` link and the run's summary.json, once every stage has finished.

The command line parses and prints; this module decides what is written where, and keeps the
`ResumeHint` it is handed current, so that an interrupt names the command that continues the run
only once there is a run to continue.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from distft.config import DistftConfig, dump_config, load_config
from distft.errors import UserError
from distft.launch.preflight import absolutize_paths, describe_plan, preflight
from distft.launch.rundir import Claim, ResumeHint, check_run_paths, claim_run_dir
from distft.launch.session import cluster_address


class RunCommandError(UserError):
    """A run directory or option that cannot be used for this command; the message says which and the fix."""


@dataclass
class Finished:
    run_dir: Path
    summaries: list[dict] = field(default_factory=list)
    seconds: float = 0.0


def check_paths(cfg: DistftConfig, address: str | None) -> list[str]:
    """Where the run writes, checked before any cluster is taken (`validate` prints the notes)."""
    return check_run_paths(cfg.run.output_dir, private_cluster=address is None)


def claim_for(cfg: DistftConfig, config_path: str, address: str | None, reuse: bool = False) -> Claim:
    """Check the paths, then claim the run directory (mkdir is the claim: concurrent runs never share one).
    `reuse`: the stable directory of `pipeline`, which may hold earlier attempts."""
    check_paths(cfg, address)
    stem = Path(config_path).stem
    return claim_run_dir(cfg.run.output_dir, cfg.run.name or (stem if reuse else None), stem, reuse=reuse)


def _in_claim(claim: Claim, hint: ResumeHint, body) -> Finished:
    """`body()` with the claim released if it fails before the first stage started: no half-made run may
    block the name. Only what this invocation made goes; a run that became resumable stays."""
    try:
        return body()
    except BaseException as e:
        if claim.release_after(e, resumable=hint.command is not None):
            hint.command = None
        raise


def start_run(cfg: DistftConfig, config_path: str, address: str | None, hint: ResumeHint) -> Finished:
    """`distft train CONFIG`: a fresh run directory, the resolved config in it, then the launch."""
    resolved = cluster_address(cfg, address)
    preflight(cfg, resolved)
    claim = claim_for(cfg, config_path, resolved)

    def body() -> Finished:
        cfg.run.name = claim.path.name
        print(describe_plan(cfg, claim.path), flush=True)
        claim.write("config.yaml", lambda path: dump_config(cfg, path))
        hint.command = f"distft resume {claim.path}"
        return launch_and_finish(cfg, claim.path, address, resume=False)

    return _in_claim(claim, hint, body)


def resume_run(run_dir: str | Path, overrides: list[str], address: str | None, start_from: str | None,
               hint: ResumeHint) -> Finished:
    """`distft resume RUN_DIR`: continue an interrupted run in place."""
    from distft.launch.resume import start_point

    run_dir = Path(run_dir).resolve()
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        raise RunCommandError(f"{run_dir} is not a distft run directory (no config.yaml). Fix: pass runs/<run>.")
    if (run_dir / "summary.json").is_file():
        raise RunCommandError(f"{run_dir} already finished (summary.json exists); nothing to resume.")
    cfg = load_config(saved, overrides)
    preflight(cfg, cluster_address(cfg, address))
    # `--from checkpoint-N`: found and verified before anything is written or any cluster is taken.
    start = start_point(cfg, run_dir, start_from) if start_from else None
    print(describe_plan(cfg, run_dir), flush=True)
    hint.command = f"distft resume {run_dir}"
    if overrides:  # keep what the run started with; the new resolved config is the current one
        saved.rename(run_dir / f"config.before-resume-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        dump_config(cfg, saved)
    return launch_and_finish(cfg, run_dir, address, resume=True, start_from=start)


def start_pipeline(cfg: DistftConfig, config_path: str, address: str | None, force: str | None,
                   hint: ResumeHint) -> Finished:
    """`distft pipeline CONFIG`: every stage as one job in a stable directory; a rerun skips finished stages."""
    force_from = None
    if force:
        force_from = 0 if force == "all" else cfg.stage_named(force)
        if force_from is None:
            names = ", ".join(st.label() for st in cfg.stages)
            raise RunCommandError(f"--force {force}: no such stage; this config has {names} (or --force all).")
    resolved = cluster_address(cfg, address)
    preflight(cfg, resolved)
    claim = claim_for(cfg, config_path, resolved, reuse=True)

    def body() -> Finished:  # a first attempt that never started leaves nothing (earlier attempts stay)
        run_dir = claim.path
        cfg.run.name = run_dir.name
        print(describe_plan(cfg, run_dir), flush=True)
        saved = run_dir / "config.yaml"
        if saved.is_file() and load_config(saved) != cfg:  # keep what earlier attempts ran with
            saved.rename(run_dir / f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
        claim.write("config.yaml", lambda path: dump_config(cfg, path))
        (run_dir / "summary.json").unlink(missing_ok=True)  # rewritten when every stage has finished
        hint.command = f"distft resume {run_dir}"
        return launch_and_finish(cfg, run_dir, address, resume=True, force_from=force_from)

    return _in_claim(claim, hint, body)


def launch_and_finish(cfg: DistftConfig, run_dir: Path, address: str | None, resume: bool,
                      force_from: int | None = None, start_from: tuple[int, str] | None = None) -> Finished:
    from distft.launch.tracking import RunTracking
    from distft.launch.train import launch  # imports Ray: only once a run really starts

    started = time.time()
    tracking = RunTracking(cfg, run_dir)  # the MLflow / W&B runs, opened when the first stage starts
    status = "FAILED"
    try:
        summaries = launch(cfg, run_dir, address, resume=resume, force_from=force_from, start_from=start_from,
                           tracking=tracking)
        finish_run(cfg, run_dir, summaries)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracking.finish(status, [run_dir / name for name in ("config.yaml", "provenance.json", "summary.json")])
    if cfg.run.push_to_hub:
        push_finished_run(cfg, run_dir)
    return Finished(run_dir, summaries, time.time() - started)


def finish_run(cfg: DistftConfig, run_dir: Path, summaries: list[dict]) -> None:
    """The run's `final` link (to the last stage's export) and its summary.json: the mark of a finished run."""
    link = run_dir / "final"
    target = (run_dir / cfg.stages[-1].label() / "final").relative_to(run_dir)
    if link.is_symlink() and Path(os.readlink(link)) != target:  # ours, from a config with another last stage
        link.unlink()
    if not link.is_symlink():
        link.symlink_to(target)
    (run_dir / "summary.json").write_text(json.dumps(summaries, indent=2))


def push_finished_run(cfg: DistftConfig, run_dir: Path) -> str:
    """run.push_to_hub: the finished run's model exported to <run>/export (or that export, if one is there),
    then pushed with its model card. A failed push fails the command, with the run and its export intact."""
    from distft.models.export import export_model
    from distft.models.publish import PushError, push_model

    out = run_dir / "export"
    try:
        if not out.exists():
            export_model(run_dir, out)
        return push_model(out, cfg.run.push_to_hub, cfg.run.hub_private, run_dir)
    except PushError as e:
        raise PushError(f"the run finished ({run_dir}), but {e} Retry with: distft export {run_dir} "
                        f"--push-to-hub {cfg.run.push_to_hub}") from None


@dataclass
class SearchStart:
    """Where a search runs and what it searches: a new directory (claimed) or one to continue."""

    run_dir: Path
    raw: dict  # the YAML as loaded, `tune:` included
    tune_cfg: object  # config.search.TuneConfig
    cfg: DistftConfig  # the base config, `tune:` left out
    cwd: str  # where the search's relative paths resolve (the directory it was started from)
    claim: Claim | None  # None when continuing


def start_search(config_path: str | None, overrides: list[str], resume_dir: str | None,
                 address: str | None) -> SearchStart:
    """`distft tune CONFIG` or `distft tune --resume RUN_DIR`: checked, then (for a new search) claimed and
    described in search.yaml and search.json, which `--resume` reads back."""
    import yaml

    from distft.config.search import load_search

    if bool(resume_dir) == bool(config_path):
        raise RunCommandError("give a config (distft tune CONFIG) or --resume RUN_DIR, not both or neither.")
    if resume_dir and overrides:
        raise RunCommandError("--resume continues the search as it was started; overrides cannot change it. "
                              "Fix: drop the overrides, or start a new search with them.")
    if resume_dir:
        run_dir = Path(resume_dir).resolve()
        meta_path = run_dir / "search.json"
        if not meta_path.is_file():
            raise RunCommandError(f"{run_dir} is not a search directory (no search.json). Fix: pass the directory "
                                  "`distft tune` printed, e.g. runs/<name>.")
        cwd = json.loads(meta_path.read_text())["cwd"]
        if not (run_dir / "tune").is_dir():
            raise RunCommandError(f"{run_dir} has no Tune state (tune/); the search never started. "
                                  "Fix: start it again.")
        raw, tune_cfg, cfg = load_search(str(run_dir / "search.yaml"), [])
        preflight(absolutize_paths(cfg, Path(cwd)), cluster_address(cfg, address))
        return SearchStart(run_dir, raw, tune_cfg, cfg, cwd, None)
    cwd = str(Path.cwd())
    raw, tune_cfg, cfg = load_search(config_path, overrides)
    resolved = cluster_address(cfg, address)
    preflight(absolutize_paths(cfg, Path(cwd)), resolved)
    claim = claim_for(cfg, config_path, resolved)
    try:
        claim.write_text("search.yaml", Path(config_path).read_text() if not overrides
                         else yaml.safe_dump(raw, sort_keys=False))
        claim.write_text("search.json", json.dumps({"cwd": cwd, "config": str(Path(config_path).resolve()),
                                                    "overrides": overrides}, indent=1))
    except BaseException:
        claim.release()
        raise
    return SearchStart(claim.path, raw, tune_cfg, cfg, cwd, claim)


def run_search(start: SearchStart, address: str | None, hint: ResumeHint) -> dict:
    """The search itself (launch/tune.py); a new search that fails before Tune wrote its state leaves nothing."""
    from distft.launch.tune import search  # imports Ray

    hint.command = f"distft tune --resume {start.run_dir}"
    base = {k: v for k, v in start.raw.items() if k != "tune"}
    try:
        return search(base, start.tune_cfg, start.cfg, start.run_dir, start.cwd, address,
                      restore=start.claim is None)
    except BaseException:
        if start.claim is not None and start.claim.release():  # tune/ exists once Tune started: kept
            hint.command = None
        raise
