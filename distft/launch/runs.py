"""`distft runs show|list`, and the summary `distft train` prints: what a run directory holds, read from its files alone.

A run directory is what `distft train`, `resume` and `pipeline` write (README, "Run directory"):
`config.yaml` from the start, `<stage>/summary.json` once a stage finished, `summary.json` once
every stage has, `<stage>/metrics.jsonl` and sealed checkpoints along the way, and
`provenance.json` (provenance.py). `read_run` gathers those into plain dicts; `render_run` and
`render_run_list` only format them, so both are tested on directories made in a test.

No Ray and no torch: this answers in a fraction of a second, on any machine that sees the files.
"""

from __future__ import annotations

import json
import os
from datetime import datetime
from pathlib import Path

from distft.config import ConfigError, build_config, read_yaml
from distft.errors import UserError
from distft.distributed.checkpoint import complete_checkpoints, read_manifest
from distft.launch.provenance import PACKAGES, read_provenance
from distft.launch.tracking import read_tracking
from distft.stages.summary import describe_retain, read_stage_summary

# Directories inside a run that are not stages: Ray Train's copies and the export link.
NOT_STAGES = {"ray", "final"}


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def last_logged_step(metrics_jsonl: Path) -> int | None:
    """The step of the last complete line of a metrics.jsonl, reading only its tail."""
    try:
        with metrics_jsonl.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    for line in reversed(tail.splitlines()):
        try:
            step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            continue  # a line cut by the tail window, or one being written
        if isinstance(step, int):
            return step
    return None


def _stages_of(run_dir: Path) -> list[dict]:
    """The stages the run's config names, in order; from the stage directories when the config no
    longer validates (written by another distft version). A config that is not readable YAML (a bad
    byte, an edit gone wrong) raises ConfigError: that is damage, not age, and the user should see it."""
    raw = read_yaml(run_dir / "config.yaml")
    try:
        cfg = build_config(raw, source=str(run_dir / "config.yaml"))
    except ConfigError:
        dirs = [d for d in run_dir.iterdir() if d.is_dir() and d.name not in NOT_STAGES and "." not in d.name
                and any((d / f).exists() for f in ("summary.json", "metrics.jsonl", "checkpoints"))]
        return [{"label": d.name, "kind": None, "method": None, "strategy": None}
                for d in sorted(dirs, key=lambda d: d.stat().st_mtime)]
    return [{"label": st.label(), "kind": st.kind, "method": st.method.name, "strategy": st.strategy.label()}
            for st in cfg.stages]


def read_run(run_dir: str | Path) -> dict:
    """Everything `distft runs show` prints, from the run directory's files. Raises FileNotFoundError
    (one line, with the fix) for a path that is not a run directory."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"no run directory at {run_dir}. Fix: pass runs/<run> "
                                "(`distft runs list` shows the runs under runs/).")
    if not (run_dir / "config.yaml").is_file():
        if (run_dir / "search.json").is_file():
            raise FileNotFoundError(f"{run_dir} is a `distft tune` search, not a run. Fix: its trials are runs: "
                                    f"distft runs list {run_dir / 'trials'}")
        raise FileNotFoundError(f"{run_dir} is not a distft run directory (no config.yaml). Fix: pass runs/<run> "
                                "(`distft runs list` shows the runs under runs/).")
    top = _read_json(run_dir / "summary.json")
    by_label = {s.get("stage"): s for s in top} if isinstance(top, list) else {}
    stages = []
    for st in _stages_of(run_dir):
        stage_dir = run_dir / st["label"]
        summary = by_label.get(st["label"]) or read_stage_summary(stage_dir)
        checkpoint = None
        sealed = complete_checkpoints(stage_dir / "checkpoints")
        if sealed:
            checkpoint = {"path": str(sealed[-1]), "step": (read_manifest(sealed[-1]) or {}).get("step")}
        if isinstance(summary, dict):
            status = "finished"
            st = {**st, **{k: st[k] or summary.get(k) for k in ("kind", "method", "strategy")}}
        elif stage_dir.is_dir() and any(stage_dir.iterdir()):
            status = "unfinished"
        else:
            status = "not started"
        stages.append({**st, "status": status, "summary": summary if isinstance(summary, dict) else None,
                       "last_step": last_logged_step(stage_dir / "metrics.jsonl"), "checkpoint": checkpoint,
                       "tensorboard": (stage_dir / "tensorboard").is_dir()})
    final = run_dir / "final"
    return {
        "run_dir": str(run_dir),
        "finished": isinstance(top, list),
        "stages": stages,
        "final": str(final) if final.exists() else None,
        "final_target": os.readlink(final) if final.is_symlink() else None,
        "tracking": read_tracking(run_dir),
        "provenance": read_provenance(run_dir),
        "config_mtime": (run_dir / "config.yaml").stat().st_mtime,
    }


# ---------------------------------------------------------------- formatting (pure)


def before_after(s: dict, key: str, fmt: str) -> str | None:
    after = s.get(f"{key}_after")
    if after is None:
        return None
    before = s.get(f"{key}_before")
    return (format(before, fmt) + " -> " if before is not None else "") + format(after, fmt)


def key_metrics(s: dict) -> list[str]:
    """A stage summary's outcome, one line per kind of result, from whichever keys it has."""
    lines = []
    loss = []
    if s.get("first_logged_loss") is not None and s.get("last_logged_loss") is not None:
        loss.append(f"train loss {s['first_logged_loss']:.4g} -> {s['last_logged_loss']:.4g}")
    if s.get("eval_loss") is not None:
        loss.append(f"eval loss {s['eval_loss']:.4g}")
    if loss:
        lines.append(", ".join(loss))
    em = before_after(s, "exact_match", ".1%")
    if em:
        lines.append(f"held-out exact match {em} ({s.get('eval_items', 0)} items)")
    pairwise = before_after(s, "pairwise_accuracy", ".1%")
    if pairwise:
        margin = f"margin {s['mean_margin_after']:.2f}, " if s.get("mean_margin_after") is not None else ""
        lines.append(f"held-out pairwise accuracy {pairwise} ({margin}{s.get('eval_pairs', 0)} pairs)")
    if s.get("eval_accuracy") is not None:  # reward model, TRL's eval split
        lines.append(f"reward accuracy {s['eval_accuracy']:.1%} on the eval split")
    if s.get("eval_reward_accuracy") is not None:  # DPO's implicit reward
        margin = f", margin {s['eval_reward_margin']:.3g}" if s.get("eval_reward_margin") is not None else ""
        lines.append(f"reward accuracy {s['eval_reward_accuracy']:.1%}{margin} on the eval split")
    elif s.get("eval_reward_margin") is not None:  # KTO: desirable minus undesirable implicit reward
        lines.append(f"reward margin {s['eval_reward_margin']:.3g} (desirable minus undesirable) on the eval split")
    if s.get("teacher_divergence_before") is not None and s.get("teacher_divergence_after") is not None:
        lines.append(f"divergence to the teacher {s['teacher_divergence_before']:.3f} -> "
                     f"{s['teacher_divergence_after']:.3f} on the eval split (generalised JSD)")
    reward = []
    if s.get("reward_first") is not None and s.get("reward_last") is not None:  # PPO rollouts
        reward.append(f"rollout reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}")
    if s.get("mean_reward_first") is not None and s.get("mean_reward_last") is not None:  # GRPO
        reward.append(f"mean reward {s['mean_reward_first']:.3f} -> {s['mean_reward_last']:.3f}")
    if s.get("eval_reward") is not None:
        reward.append(f"eval reward {s['eval_reward']:.3f}")
    if s.get("kl_last") is not None:
        target = f" (target {s['kl_target']:g})" if s.get("kl_target") else ""
        reward.append(f"KL {s['kl_last']:.3f}{target}")
    if reward:
        lines.append(", ".join(reward))
    heldout = before_after(s, "heldout_reward", ".3f")
    if heldout:
        lines.append(f"held-out mean reward {heldout}")
    retain = describe_retain(s)
    if retain:
        lines.append(f"retain {retain}")
    if s.get("stopped_early_at") is not None:
        lines.append(f"stopped early at step {s['stopped_early_at']} by a search's scheduler")
    return lines


def stage_result(s: dict) -> str:
    """The held-out outcome of one stage, in words."""
    parts = []
    em = before_after(s, "exact_match", ".1%")
    if em:
        parts.append(f"exact match {em} ({s.get('eval_items', 0)} items)")
    pairwise = before_after(s, "pairwise_accuracy", ".1%")
    if pairwise:
        parts.append(f"pairwise accuracy {pairwise} (margin {s['mean_margin_after']:.2f}, {s['eval_pairs']} pairs)")
    accuracy = before_after(s, "accuracy", ".1%")
    if accuracy:
        f1 = before_after(s, "f1_macro", ".3f")
        parts.append(f"accuracy {accuracy}, macro F1 {f1} ({s.get('heldout_rows', 0)} rows)")
    reward = before_after(s, "heldout_reward", ".3f")
    if reward:
        parts.append(f"mean reward {reward}")
    if s.get("kl_last") is not None:
        target = f" (target {s['kl_target']:g})" if s.get("kl_target") else ""
        parts.append(f"KL {s['kl_last']:.3f}{target}")
    return "; ".join(parts) or "-"


def start_and_finish(summaries: list[dict]) -> str | None:
    """Where the time around the training steps went: the first stage's start-up and the last one's finish."""
    ran = [s for s in summaries if not s.get("skipped")]
    if not ran or not ran[0].get("startup_s"):
        return None
    start, finish = ran[0]["startup_s"], ran[-1].get("after_training_s") or {}

    def phases(d: dict) -> str:
        return f"{sum(d.values()):.1f}s (" + ", ".join(f"{k} {v:.1f}" for k, v in d.items()) + ")"

    return f"time         start {phases(start)}" + (f"; after training {phases(finish)}" if finish else "")


def render_summary(run_dir: Path, summaries: list[dict], seconds: float) -> str:
    lines = ["", "=" * 64, f"distft run finished in {seconds:.0f}s: {run_dir}"]
    rows = [("stage", "kind", "method", "steps", "time", "held-out result")]
    for s in summaries:
        took = "skipped" if s.get("skipped") else f"{s.get('wall_seconds', 0):.0f}s"
        rows.append((s["stage"], s["kind"], s["method"], str(s["steps"]), took, stage_result(s)))
    widths = [max(len(r[c]) for r in rows) for c in range(5)]
    for r in rows:
        lines.append("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[5])
    for s in summaries:
        pct = 100.0 * s["trainable_params"] / max(s["total_params"], 1)
        lines.append(f"stage {s['stage']} ({s['kind']}, {s['method']}): {s['trainable_params']:,} trainable params ({pct:.2f}%)")
        if s.get("train_loss") is not None:
            first, last = s.get("first_logged_loss"), s.get("last_logged_loss")
            loss = f"{first:.3f} -> {last:.3f}" if first is not None else f"{s['train_loss']:.3f} (mean)"
            lines.append(f"  train loss   {loss}, eval loss {s['eval_loss']:.3f}, {s['steps']} steps on {s['world_size']} workers")
        if s.get("reward_last") is not None:
            lines.append(f"  rollout reward {s['reward_first']:.3f} -> {s['reward_last']:.3f}, "
                         f"{s['steps']} rollouts on {s['world_size']} workers")
        full = s.get("param_elements_full")
        if full and s.get("world_size", 1) > 1:
            shares = [f"parameters {100 * s['param_elements_local'] / full:.1f}%"]
            if "optimizer_fp32_elements_local" in s:
                shares.append(f"optimizer state {100 * s['optimizer_fp32_elements_local'] / full:.1f}%")
            lines.append(f"  per rank     {', '.join(shares)} of the model, measured ({s.get('strategy', 'ddp')})")
        if s.get("peak_rss_mib") is not None:
            per_rank = s.get("peak_rss_mib_per_rank") or []
            ranks = f" (ranks: {', '.join(f'{p / 1024:.2f}' for p in per_rank)})" if len(per_rank) > 1 else ""
            lines.append(f"  peak memory  {s['peak_rss_mib'] / 1024:.2f} GiB per rank at most{ranks}, "
                         "the kernel's high-water mark (VmHWM)")
        result = stage_result(s)
        if result != "-":
            lines.append(f"  held-out     {result}")
        if s.get("early_stopped_at") is not None or s.get("best_step") not in (None, s.get("steps")):
            lines.append(f"  early stop   at step {s.get('early_stopped_at') or s['steps']}; exported the best, step "
                         f"{s['best_step']} ({s['early_stopping_metric']} {s['best_metric']:.4g})")
        retain = describe_retain(s)
        if retain:
            lines.append(f"  retain       {retain}")
        if s.get("overfitting"):
            lines.append(f"  overfitting  eval - train loss grew to {s['loss_gap']:.3f} from {s['loss_gap_smallest']:.3f}")
    timing = start_and_finish(summaries)
    if timing:
        lines.append(timing)
    lines.append(f"model        {run_dir / 'final'}")
    if summaries and summaries[-1].get("kind") not in ("reward", "classify"):  # these score; they do not generate
        lines.append(f"sample it    distft generate {run_dir} --prompt \"...\"")
        lines.append(f"score it     distft eval {run_dir} --data <held-out file>")
    lines.append("=" * 64)
    return "\n".join(lines)


def _short(node_or_sha: str) -> str:
    return node_or_sha[:12]


def _provenance_lines(p: dict | None, run_dir: str) -> list[str]:
    if p is None:
        return ["provenance  not recorded (no provenance.json: a run from before distft wrote one)"]
    git = p.get("git")
    if git:
        dirty = {True: " with uncommitted changes", False: "", None: " (working tree state unknown)"}[git.get("dirty")]
        code = f"distft {p.get('distft')}, git {_short(git['sha'])}{dirty}"
    else:
        code = f"distft {p.get('distft')}, not started from a git checkout"
    packages = p.get("packages") or {}
    stack = ", ".join([f"python {p.get('python')}"] + [f"{name} {packages[name] or '-'}" for name in PACKAGES
                                                       if name in packages])
    ended = f", finished {p['finished_at']}" if p.get("finished_at") else ", not finished"
    lines = [f"started     {p.get('started_at')} on {p.get('hostname')}{ended}",
             f"command     {' '.join(p.get('command') or [])}",
             f"code        {code}",
             f"stack       {stack}"]
    nodes = p.get("worker_nodes") or []
    if p.get("world_size"):
        where = f" on {len(nodes)} Ray node(s): {', '.join(_short(n) for n in nodes)}" if nodes else ""
        lines.append(f"workers     world size {p['world_size']}{where}")
    if p.get("earlier"):
        lines.append(f"earlier     {len(p['earlier'])} earlier launch(es) in this directory "
                     f"(first {p['earlier'][0].get('started_at')}); see {Path(run_dir) / 'provenance.json'}")
    return lines


def _stage_lines(st: dict) -> list[str]:
    s = st["summary"]
    what = ", ".join(v for v in (st["kind"], st["method"], st["strategy"]) if v)
    head = f"stage {st['label']}" + (f" ({what})" if what else "")
    if s is not None:
        world = f" on world size {s['world_size']}" if s.get("world_size") else ""
        took = f", {s['wall_seconds']:.0f}s" if s.get("wall_seconds") is not None else ""
        skipped = " (skipped: finished in an earlier launch)" if s.get("skipped") else ""
        unit = "rollouts" if st["kind"] == "ppo" else "steps"
        lines = [f"{head}: finished, {s.get('steps')} {unit}{world}{took}{skipped}"]
        lines += [f"  {line}" for line in key_metrics(s)]
        if s.get("model_dir"):
            lines.append(f"  model     {s['model_dir']}")
        return lines
    if st["status"] == "not started":
        return [f"{head}: not started"]
    step = f"last logged step {st['last_step']}" if st["last_step"] is not None else "no step logged yet"
    ckpt = st["checkpoint"]
    where = (f"latest checkpoint {ckpt['path']} (step {ckpt['step']})" if ckpt
             else "no checkpoint yet (a resume starts this stage afresh)")
    return [f"{head}: unfinished, {step}", f"  {where}"]


def render_run(run: dict) -> str:
    """`distft runs show`: the run's status, each stage with its key metrics, the model, and provenance."""
    run_dir = run["run_dir"]
    status = "finished" if run["finished"] else "unfinished"
    lines = [f"run         {run_dir}  ({status})"]
    lines += _provenance_lines(run["provenance"], run_dir)
    lines.append("")
    for st in run["stages"]:
        lines += _stage_lines(st)
    lines.append("")
    if run["final"]:
        target = f" -> {run['final_target']}" if run["final_target"] else ""
        lines.append(f"model       {run['final']}{target}")
    if any(st["tensorboard"] for st in run["stages"]):
        lines.append(f"metrics     <stage>/metrics.jsonl; tensorboard --logdir {run_dir}")
    lines += _tracking_lines(run.get("tracking") or {}, run_dir)
    if not run["finished"]:
        # Nothing in the directory tells a run still going from one that stopped; the user knows.
        lines.append(f"resume      distft resume {run_dir}   (unless it is still running)")
    return "\n".join(lines)


def _tracking_lines(tracking: dict, run_dir) -> list[str]:
    """Where the run's MLflow and W&B runs are (launch/tracking.py writes tracking.json)."""
    lines = []
    m = tracking.get("mlflow") or {}
    if m.get("run_id"):
        stages = ", ".join(f"{label} {run_id}" for label, run_id in m.get("stages", {}).items())
        lines.append(f"mlflow      {m.get('uri')} experiment {m.get('experiment')}: run {m['run_id']}"
                     + (f" ({stages})" if stages else ""))
    w = tracking.get("wandb") or {}
    if w.get("stages"):
        lines.append(f"wandb       group {w.get('group')}: " + ", ".join(f"{k} {v}" for k, v in w["stages"].items())
                     + f"; files in {Path(run_dir) / 'wandb'}")
    return lines


def _started(run: dict) -> str:
    """When the run's first launch started (a resume or rerun keeps it under `earlier`)."""
    p = run["provenance"]
    first = (p.get("earlier") or [p])[0] if p else None
    if first and first.get("started_at"):
        return datetime.fromisoformat(first["started_at"]).strftime("%Y-%m-%d %H:%M")
    # Runs from before provenance.json: config.yaml is written as the run starts.
    return datetime.fromtimestamp(run["config_mtime"]).strftime("%Y-%m-%d %H:%M")


def _last_step(run: dict) -> str:
    """Where the run got to: the stage it is in (or ended with) and its step."""
    stages = [st for st in run["stages"] if st["status"] != "not started"]
    if not stages:
        return "-"
    st = stages[-1]
    step = st["summary"].get("steps") if st["summary"] else st["last_step"]
    return f"{st['label']} {step if step is not None else '-'}"


def list_runs(root: str | Path) -> list[dict]:
    """Every run directory directly under `root` (read as `read_run` reads one), oldest first."""
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"no runs directory at {root}. Fix: pass the directory that holds your runs "
                                "(run.output_dir), e.g. distft runs list /data/runs.")
    if (root / "config.yaml").is_file():
        raise FileNotFoundError(f"{root} is a run directory, not a directory of runs. Fix: distft runs show {root}")
    runs = []
    for d in root.iterdir():
        if d.is_dir() and (d / "config.yaml").is_file():
            try:
                runs.append(read_run(d))
            except (UserError, OSError, ValueError) as e:
                # One damaged run must not hide the others: it gets a row saying why it is unreadable.
                runs.append(_unreadable(d, e))
    return sorted(runs, key=lambda r: (_started(r), r["run_dir"]))


def _unreadable(run_dir: Path, error: Exception) -> dict:
    reason = error.problems[0] if isinstance(error, ConfigError) and error.problems else str(error).splitlines()[0]
    try:
        mtime = (run_dir / "config.yaml").stat().st_mtime
    except OSError:
        mtime = 0.0
    reason = reason.split(" Fix:")[0].rstrip(".")
    run_dir = run_dir.resolve()
    return {"run_dir": str(run_dir), "unreadable": f"config.yaml {reason}; `distft runs show {run_dir}` says how to fix it",
            "finished": False,
            "stages": [], "provenance": read_provenance(run_dir), "config_mtime": mtime}


def render_run_list(root: str | Path, runs: list[dict]) -> str:
    """`distft runs list`: one row per run: name, stages, status, last step, start time."""
    if not runs:
        return f"no runs in {Path(root).resolve()} (a run directory holds a config.yaml)"
    rows = [("run", "stages", "status", "last step", "started")]
    notes = [""]
    for r in runs:
        if r.get("unreadable"):
            rows.append((Path(r["run_dir"]).name, "?", "unreadable", "-", _started(r)))
            notes.append(f"  ({r['unreadable']})")
            continue
        rows.append((Path(r["run_dir"]).name, ",".join(st["label"] for st in r["stages"]),
                     "finished" if r["finished"] else "unfinished", _last_step(r), _started(r)))
        notes.append("")
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    return "\n".join(("  ".join(v.ljust(w) for v, w in zip(row, widths)) + note).rstrip()
                     for row, note in zip(rows, notes))
