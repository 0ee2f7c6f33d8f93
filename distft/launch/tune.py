"""`distft tune`: a Ray Tune search whose trials are distributed Ray Train runs, with ASHA early stopping.

Design: the trial stops itself (a cooperative stop)
---------------------------------------------------
With Ray 2.60's Train V2, a trial that Tune stops early is killed from outside: Tune terminates
the trial actor, the placement group that Train's controller created for the worker group
outlives it, and its CPUs/GPUs stay taken. Later trials then time out starting their workers
and the search stalls (ray-project/ray issue 54305; reproduced with Ray 2.60 on CPU).
The V1 integration avoids it but is deprecated (ray-project/ray issue 49454).

So Tune never stops a trial here. `CooperativeASHA` is Tune's own ASHAScheduler, asked as usual
for a decision on every result; it posts the decision to a `DecisionBoard` actor and tells Tune
to continue. At every eval, rank 0 of the trial's worker group waits for the decision on that
eval's step (`SchedulerDecisions`), every rank gets the answer (`StageContext.should_stop`), and on a
stop the HF Trainer ends its loop like EarlyStoppingCallback does. The stage then finishes
normally (export, summary), `TorchTrainer.fit` returns, Train releases the worker group, and
Tune records the trial as finished. Trials are asked only at evals, at the same step on every
rank, so ranks never disagree. tests/test_tune.py runs 6 trials, 2 at a time, with ASHA
stopping some, and fails on a stall.

Resources: each trial's Tune actor only waits on `fit`, so it takes 0.01 CPU; the worker groups
take the CPUs. The concurrency is what the cluster can host at once (never more than
`tune.max_concurrent_trials`), so no trial waits for workers that cannot start.
"""

from __future__ import annotations

from dataclasses import dataclass

import csv
import json
import os
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import yaml
from ray import tune
from ray.tune.schedulers import ASHAScheduler, TrialScheduler
from ray.tune.search.optuna import OptunaSearch  # imports without optuna installed; only using it needs it

from distft.config import DistftConfig, dump_config
from distft.config.search import TuneSettings, trial_config
from distft.launch.errors import ClusterError, error_line
from distft.launch.session import caller_signal_handlers, cluster_address, init_ray
from distft.launch.placement import check_storage, place_workers, placement_problem
from distft.launch.worker_env import forwarded_env, forwarded_secrets
from distft.launch.resume import resume_point
from distft.launch.tracking import RunTracking, flat_params
from distft.launch.train import train_stage
from distft.stages.summary import read_stage_summary

TRIAL_ACTOR_CPU = 0.01  # a trial's Tune actor only waits on `fit`
SEARCH_FILE = "search.yaml"  # the config with its tune section, as the search ran it (for --resume)
_CURRENT: dict = {}  # board_name and trials_dir of the search this process runs, for a restored scheduler


class DecisionBoard:
    """Early-stop decisions per trial and step, posted by the scheduler and read by the trial's rank 0."""

    def __init__(self):
        self.decisions: dict[str, dict[int, bool]] = {}

    def post(self, trial_id: str, step: int, stop: bool) -> None:
        # The first decision on a step stands: a later result at the same step is not a new eval.
        self.decisions.setdefault(trial_id, {}).setdefault(int(step), stop)

    def decision(self, trial_id: str, step: int) -> bool | None:
        return self.decisions.get(trial_id, {}).get(int(step))


class CooperativeASHA(ASHAScheduler):
    """ASHA's decisions, delivered to the trial instead of enforced by Tune (see the module docstring)."""

    def __init__(self, board: str, trials_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.board_name = board
        self.trials_dir = trials_dir
        self._board = None
        self._replayed = False

    def __getstate__(self):  # Tune saves the scheduler with the experiment; an actor handle does not pickle
        return {**self.__dict__, "_board": None}

    def __setstate__(self, state):
        # `--resume` unpickles this from the saved search: it must use this session's board and
        # this session's path of the search directory (which may have been moved since).
        self.__dict__.update(state)
        self.__dict__.update(_CURRENT)

    def _replay_finished_trials(self) -> None:
        """Tune restores a search's trials but not its scheduler's rungs: rebuild them from the evals
        that finished trials recorded (their metrics.jsonl), so a resumed search judges new trials
        against the same results as an uninterrupted one would."""
        self._replayed = True
        for summary in sorted(Path(self.trials_dir).glob("*/*/summary.json")):
            past = SimpleNamespace(trial_id=summary.parent.parent.name)
            super().on_trial_add(None, past)
            for line in (summary.parent / "metrics.jsonl").read_text().splitlines():
                row = json.loads(line)
                if self._time_attr in row and self._metric in row:
                    super().on_trial_result(None, past, row)

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._replayed:
            self._replay_finished_trials()
        super().on_trial_add(tune_controller, trial)

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        if self._time_attr in result and self._metric in result:
            import ray

            if self._board is None:
                self._board = ray.get_actor(self.board_name)
            # Reaching max_t is the end of the run, not an early stop.
            stop = action == TrialScheduler.STOP and result[self._time_attr] < self._max_t
            self._board.post.remote(trial.trial_id, result[self._time_attr], stop)
        return TrialScheduler.CONTINUE


def is_judged(metric: str, metrics: dict) -> bool:
    """Whether this report is an eval the scheduler judges; an eval without the metric is an error."""
    if metric in metrics:
        return True
    evals = sorted(k for k in metrics if k.startswith("eval_") and k not in ("eval_runtime", "eval_samples_per_second",
                                                                           "eval_steps_per_second"))
    if evals:  # the stage's evals report other names: every trial would run unjudged
        raise ValueError(f"tune.metric={metric} is not reported by this stage's evals, which report "
                         f"{', '.join(evals)}. Fix: tune.metric=<one of those>.")
    return False


@dataclass(frozen=True)
class SchedulerDecisions:
    """A trial's early-stop hook, handed to `train_stage`: rank 0's `stop_fn` blocks at each judged
    eval until the scheduler has decided. It travels to the workers as an object (pickled by
    reference to this module), so the worker entry calls it without importing Tune's side of launch."""

    board: str
    trial_id: str
    metric: str
    timeout: float

    def stop_fn(self):
        import ray

        board = ray.get_actor(self.board)

        def ask(metrics: dict) -> bool:
            if "step" not in metrics or not is_judged(self.metric, metrics):
                return False
            deadline = time.monotonic() + self.timeout
            while True:
                decision = ray.get(board.decision.remote(self.trial_id, metrics["step"]))
                if decision is not None:
                    return decision
                if time.monotonic() > deadline:
                    print(f"[tune] no scheduler decision for step {metrics['step']} after {self.timeout:.0f}s; "
                          "the trial goes on (tune.decision_timeout_s)", flush=True)
                    return False
                time.sleep(0.05)

        return ask


def run_trial(params: dict, *, base_raw: dict, cwd: str, run_dir: str, board: str | None, metric: str,
              timeout: float, forwarded: dict[str, str], secrets: dict[str, str], tracking: dict | None = None) -> None:
    """One trial: the base config with `params` set, run as a normal distft run in trials/<trial id>.
    `tracking`: the search's MLflow parent and W&B group (RunTracking.for_trials); the trial's own run is
    made here, under it, and its stage logs into it."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from distft.launch.preflight import absolutize_paths

    trial_id = tune.get_context().get_trial_id()
    # Relative paths in the YAML mean what they meant where `distft tune` ran, not in this actor's cwd.
    cfg = absolutize_paths(trial_config(base_raw, params), Path(cwd))
    trial_dir = Path(run_dir) / "trials" / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    cfg.run.name = trial_id
    # A trial interrupted by an earlier session continues from its own latest verified checkpoint.
    done, resume_from = resume_point(cfg, trial_dir, 0)
    if done is not None:
        tune.report({"stage_done": 1, **{k: v for k, v in done.items() if isinstance(v, (int, float))}})
        return
    dump_config(cfg, trial_dir / "config.yaml")
    (trial_dir / "params.json").write_text(json.dumps(params))
    hook = SchedulerDecisions(board, trial_id, metric, timeout) if board else None
    spec = None
    if tracking and tracking.get("report_to"):
        spec = RunTracking(cfg, trial_dir).trial(tracking, trial_id, params)
    train_stage(cfg, 0, trial_dir, resume_from=resume_from, callbacks=[TuneReportCallback()], stop_hook=hook,
                forwarded=forwarded, secrets=secrets, tracking=spec)


def domain(d) -> object:
    kind, values = d.kind, d.values
    if kind == "loguniform":
        return tune.loguniform(*values)
    if kind == "uniform":
        return tune.uniform(*values)
    if kind == "randint":
        return tune.randint(*values)
    if kind == "choice":
        return tune.choice(values)
    return tune.grid_search(values)


def concurrency(cfg: DistftConfig, tune_cfg: TuneSettings, nodes: list[dict]) -> int:
    """How many trials the cluster hosts at once (≤ tune.max_concurrent_trials); ClusterError if not one.

    `nodes` are the alive nodes' resources. Trials are placed the way Ray places them, node by
    node, each worker whole on one node: cluster-wide totals would count a worker split across
    two nodes (3 trials of 2 x 3-CPU workers do not fit two 9-CPU nodes), and such a trial
    would wait forever for its placement group.
    """
    s = cfg.scaling
    per = {k: v for k, v in s.resources_per_worker().items() if v > 0}
    free = [dict(n) for n in nodes]
    hosted = 0
    while hosted < tune_cfg.max_concurrent_trials:
        # The trial's Tune actor is not in its worker group's placement group: any node will do.
        if not (place_workers(free, {"CPU": TRIAL_ACTOR_CPU}, 1, "PACK")
                and place_workers(free, per, s.num_workers, s.placement_strategy)):
            break
        hosted += 1
    if hosted == 0:
        total = {k: sum(n.get(k, 0) for n in nodes) for k in per}
        short = [k for k, v in per.items() if v * s.num_workers + (TRIAL_ACTOR_CPU if k == "CPU" else 0) > total[k]]
        if short:
            k = short[0]
            smaller = ("a smaller scaling.cpus_per_worker (e.g. 0.5, with scaling.torch_threads=1)" if k == "CPU"
                       else f"a smaller scaling.{k.lower()}s_per_worker")
            actor = f", plus {TRIAL_ACTOR_CPU} for Tune's trial actor" if k == "CPU" else ""
            raise ClusterError(
                f"one trial needs {per[k] * s.num_workers + (TRIAL_ACTOR_CPU if k == 'CPU' else 0):g} {k} "
                f"({s.num_workers} workers x {per[k]:g}{actor}), but the cluster has {total[k]:g}. "
                f"Fix: fewer scaling.num_workers or {smaller}, or a larger cluster.")
        raise ClusterError(f"one trial cannot be placed: {placement_problem(cfg, s.num_workers, nodes)}")
    return hosted


class TrialLog(tune.Callback):
    """One line per event, instead of Tune's status tables: which trial, its values, its metric."""

    def __init__(self, metric: str, total: int):
        self.metric, self.total = metric, total
        self.shown: dict[str, int] = {}  # the last step printed per trial (a checkpoint report repeats an eval's)

    def __setstate__(self, state):  # `--resume` restores this object from the saved search
        self.__dict__.update({"shown": {}, **state})

    def _params(self, trial) -> str:
        return " ".join(f"{k}={_short(v)}" for k, v in trial.config.items())

    def on_trial_start(self, iteration, trials, trial, **info):
        print(f"[tune] trial {trial.trial_id} started: {self._params(trial)}", flush=True)

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if self.metric in result and "step" in result and self.shown.get(trial.trial_id) != result["step"]:
            self.shown[trial.trial_id] = result["step"]
            print(f"[tune] trial {trial.trial_id} step {result['step']}: {self.metric} {result[self.metric]:.4g}",
                  flush=True)

    def _end(self, trials, trial, what: str):
        # Counted from Tune's own list, so a resumed search counts the trials finished before it.
        done = {t.trial_id for t in trials if t.status in ("TERMINATED", "ERROR")} | {trial.trial_id}
        print(f"[tune] trial {trial.trial_id} {what} ({len(done)}/{self.total} done)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._end(trials, trial, "finished")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._end(trials, trial, "failed")


def _short(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def build_tuner(raw: dict, cwd: str, tune_cfg: TuneSettings, cfg: DistftConfig, run_dir: Path, board: str | None,
                max_concurrent: int, log: TrialLog, restore: bool, tracking: dict | None = None):
    # No Ray MLflowLoggerCallback / WandbLoggerCallback: each trial's stage logs into its own tracking run
    # (launch/tracking.py says why one integration per logger).
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base_raw=raw, cwd=cwd, run_dir=str(run_dir), board=board, tracking=tracking,
                             metric=tune_cfg.metric, timeout=tune_cfg.decision_timeout_s,
                             # This trial's actor may run on another node, with that node's environment.
                             forwarded=forwarded_env(), secrets=forwarded_secrets(cfg)),
        {"CPU": TRIAL_ACTOR_CPU},
    )
    if restore:
        return tune.Tuner.restore(str(run_dir / "tune"), trainable=trainable, resume_unfinished=True,
                                  resume_errored=False, restart_errored=False)
    if tune_cfg.search == "optuna":
        search_alg = optuna_search(tune_cfg)
        limit = max_concurrent  # Tune wraps the searcher in a ConcurrencyLimiter
    else:
        from ray.tune.search.basic_variant import BasicVariantGenerator
        # Tune applies max_concurrent_trials to a generator it builds itself, not to one passed in
        # (and warns that it ignores it): the limit goes to the generator.
        search_alg = BasicVariantGenerator(random_state=tune_cfg.seed, max_concurrent=max_concurrent)
        limit = None
    scheduler = None
    if tune_cfg.scheduler == "asha":
        scheduler = CooperativeASHA(board, str(run_dir / "trials"), time_attr="step", max_t=tune_cfg.max_t(cfg),
                                    grace_period=tune_cfg.grace_period(cfg),
                                    reduction_factor=tune_cfg.asha.reduction_factor)
    return tune.Tuner(
        trainable,
        param_space={path: domain(d) for path, d in tune_cfg.space.items()},
        tune_config=tune.TuneConfig(
            metric=tune_cfg.metric, mode=tune_cfg.mode, num_samples=tune_cfg.num_samples,
            max_concurrent_trials=limit, search_alg=search_alg, scheduler=scheduler,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name="tune", storage_path=str(run_dir), verbose=0, callbacks=[log],
            # A crashing trial is recorded with its error and the search goes on.
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
        ),
    )


class MetricResultsOnly(OptunaSearch):
    """Optuna TPE, fed only the results that carry the metric, and judging each trial by its last value.

    Trials can report logs without the metric (training-loss lines) as well as evals; OptunaSearch reads the metric
    from every result (a KeyError on a log) and judges a trial by its last result (which, for
    a trial's final checkpoint report, has no metric: Optuna would count it as pruned).
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.last_metric: dict[str, dict] = {}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if self.metric in result:
            self.last_metric[trial_id] = result
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if not error and (result is None or self.metric not in result):
            result = self.last_metric.get(trial_id, result)
        super().on_trial_complete(trial_id, result, error)


def optuna_search(tune_cfg: TuneSettings) -> MetricResultsOnly:
    try:
        return MetricResultsOnly(seed=tune_cfg.seed)
    except (ImportError, AssertionError) as e:  # OptunaSearch asserts that optuna imported
        raise ClusterError(f"tune.search=optuna needs Optuna ({e or 'not installed'}). Fix: pip install "
                           "'distft[optuna]', or tune.search=random.") from None


def keep_concurrency(run_dir: Path, at_once: int, restore: bool) -> None:
    """Record how many trials run at once; a resumed search keeps that number (Tune restores it with
    the search), so a cluster that now hosts fewer is refused rather than left to stall."""
    meta_path = run_dir / "search.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    started_with = meta.get("trials_at_once")
    if restore and started_with and at_once < started_with:
        raise ClusterError(f"this search runs {started_with} trials at once, and the cluster now hosts only "
                           f"{at_once}. Fix: resume it on a cluster with room for {started_with} trials of "
                           f"{run_dir / SEARCH_FILE}'s scaling, or start a new search here.")
    if not restore or not started_with:
        meta_path.write_text(json.dumps({**meta, "trials_at_once": at_once}, indent=1))


def board_name(run_dir: Path) -> str:
    """The search's own board, named in its search.json, so a resumed (even moved) search finds it again."""
    import uuid

    meta_path = run_dir / "search.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    if "board" not in meta:
        meta["board"] = f"distft-tune-board-{uuid.uuid4().hex[:12]}"
        meta_path.write_text(json.dumps(meta, indent=1))
    return meta["board"]


def search(raw: dict, tune_cfg: TuneSettings, cfg: DistftConfig, run_dir: Path, cwd: str, address: str | None = None,
           restore: bool = False, log=print) -> dict:
    """Run (or continue) the search in `run_dir`; returns {rows, best, interrupted}.

    `raw` is the base config without its tune section; relative paths in it are relative to `cwd`.
    """
    import ray

    started = time.time()
    address = cluster_address(cfg, address)
    owns_ray = not ray.is_initialized()
    # A private cluster gets one logical CPU more than the machine has, for the trials' Tune actors
    # (0.01 each), so the worker groups still get every core.
    with caller_signal_handlers():
        init_ray(cfg, address, num_cpus=(os.cpu_count() or 1) + 1)
    try:
        if address or not owns_ray:
            check_storage(cfg, run_dir)
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        at_once = concurrency(cfg, tune_cfg, nodes)
        keep_concurrency(run_dir, at_once, restore)
        total = tune_cfg.trial_count()
        if at_once < tune_cfg.max_concurrent_trials:
            log(f"[tune] the cluster hosts {at_once} trial(s) of {cfg.scaling.num_workers} worker(s) at once; "
                f"tune.max_concurrent_trials={tune_cfg.max_concurrent_trials} is capped to that, the rest queue")
        board, board_actor = None, None
        _CURRENT.clear()
        _CURRENT.update(trials_dir=str(run_dir / "trials"))
        if tune_cfg.scheduler == "asha":
            board = board_name(run_dir)
            _CURRENT.update(board_name=board)
            board_actor = ray.remote(num_cpus=0)(DecisionBoard).options(name=board, get_if_exists=True).remote()
        # Trials may report logs without the metric (loss lines, under ASHA) besides evals; Tune's strict check
        # would fail the search on the first log. A metric never reported is caught after the search.
        os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
        # TrialLog prints one line per trial event. Tune's newer console output prints its own header box,
        # its storage path and a TensorBoard hint even at verbose=0; the classic reporter at 0 is silent.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
        trial_log = TrialLog(tune_cfg.metric, total)
        tracking = RunTracking(cfg, run_dir, log)  # the search's parent run; each trial makes its own under it
        if tracking.wants:
            tracking.open("search", {**flat_params({"tune": tune_cfg.model_dump(mode="json")}),
                                     **flat_params(cfg.model_dump(mode="json"))})
        tuner = build_tuner(raw, cwd, tune_cfg, cfg, run_dir, board, at_once, trial_log, restore,
                            tracking.for_trials() if tracking.wants else None)
        log(f"[tune] {total} trial(s), {at_once} at a time, scheduler {tune_cfg.scheduler}, "
            f"metric {tune_cfg.metric} ({tune_cfg.mode})")
        # SIGTERM ends the search like Ctrl-C: Tune saves its state, so `distft tune --resume` continues.
        terminated = []

        def on_sigterm(*_):
            terminated.append(True)  # the CLI exits 143 for it, 130 for Ctrl-C
            os.kill(os.getpid(), signal.SIGINT)

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            grid = tuner.fit()
        except BaseException:
            tracking.conclude_search([], None, [], "FAILED")
            raise
        finally:
            signal.signal(signal.SIGTERM, previous)
            if board_actor is not None:
                ray.kill(board_actor)
        rows = result_rows(grid, run_dir, tune_cfg)
        interrupted = len(rows) < total or any(r["status"] == "unfinished" for r in rows)
        best = write_outputs(rows, raw, cwd, tune_cfg, run_dir) if not interrupted else None
        tracking.conclude_search(rows, best, [run_dir / f for f in ("trials.csv", "results.md", "curves.png")],
                                 "KILLED" if interrupted else "FINISHED")
        log(f"[tune] {'interrupted' if interrupted else 'done'} after {time.time() - started:.0f}s")
        return {"rows": rows, "best": best, "interrupted": interrupted, "terminated": bool(terminated)}
    finally:
        if owns_ray:
            ray.shutdown()


def result_rows(grid, run_dir: Path, tune_cfg: TuneSettings) -> list[dict]:
    """One row per trial: its values, final and best metric, steps, how it ended, wall time, its curve."""
    rows = []
    for result in grid:
        trial_id = Path(result.path).name
        trial_dir = run_dir / "trials" / trial_id
        summary_path = next(iter(sorted(trial_dir.glob("*/summary.json"))), None)
        summary = (read_stage_summary(summary_path.parent) if summary_path else None) or {}
        df = result.metrics_dataframe
        curve = []
        if df is not None and tune_cfg.metric in df and "step" in df:
            evals = df[df[tune_cfg.metric].notna() & df["step"].notna()]
            # A checkpoint's report and the stage's last one repeat the eval of their step: one point per step.
            curve = list(dict((int(s), float(v)) for s, v in zip(evals["step"], evals[tune_cfg.metric])).items())
        metrics = result.metrics or {}
        final = metrics.get(tune_cfg.metric, curve[-1][1] if curve else None)
        values = [v for _, v in curve] + ([final] if final is not None else [])
        best = (min if tune_cfg.mode == "min" else max)(values) if values else None
        if result.error is not None:
            status, how = "failed", f"failed: {error_line(result.error)}"
        elif summary:
            stopped = summary.get("stopped_early_at")
            status = "stopped" if stopped else "completed"
            how = f"stopped early by ASHA at step {stopped}" if stopped else "completed"
        else:
            status, how = "unfinished", "unfinished (interrupted)"
        rows.append({
            "trial": trial_id,
            "params": result.config or {},
            "final": final,
            "best": best,
            "steps": summary.get("steps", curve[-1][0] if curve else 0),
            "status": status,
            "stop_reason": how,
            # Tune's trial time; a trial finished before a --resume only has its own record.
            "wall_seconds": round(max(metrics.get("time_total_s") or 0.0, summary.get("wall_seconds") or 0.0), 1),
            "exact_match": summary.get("exact_match_after"),
            "curve": curve,
            "model_dir": summary.get("model_dir"),
        })
    return sorted(rows, key=lambda r: r["trial"])


def pick_best(rows: list[dict], mode: str) -> dict | None:
    """The best trial by its final metric, among those that finished (completed, or stopped by ASHA).

    Not `ResultGrid.get_best_result(scope="last")`: Tune cannot tell a trial interrupted by a ^C or a
    lost node (no summary.json) from one that finished, and ranks it too; the rows here know (status).
    trials.csv likewise is written from these rows, not `ResultGrid.get_dataframe()`, for the same
    columns (how each trial ended, its held-out score) on a resumed search as on a fresh one."""
    ranked = [r for r in rows if r["status"] in ("completed", "stopped") and r["final"] is not None]
    if not ranked:
        return None
    return (min if mode == "min" else max)(ranked, key=lambda r: r["final"])


def markdown_table(rows: list[dict], metric: str, best: dict | None) -> str:
    paths = sorted({p for r in rows for p in r["params"]})
    head = ["trial", *paths, f"{metric} (final)", f"{metric} (best)", "steps", "how it ended", "wall s"]
    if any(r["exact_match"] is not None for r in rows):
        head.insert(-2, "held-out exact match")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["trial"] + (" **best**" if best and r["trial"] == best["trial"] else "")]
        cells += [_short(r["params"].get(p, "")) for p in paths]
        cells += [_fmt(r["final"]), _fmt(r["best"]), str(r["steps"])]
        if "held-out exact match" in head:
            cells.append("-" if r["exact_match"] is None else f"{100 * r['exact_match']:.1f}%")
        cells += [r["stop_reason"], f"{r['wall_seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.4g}"


def write_outputs(rows: list[dict], raw: dict, cwd: str, tune_cfg: TuneSettings, run_dir: Path) -> dict | None:
    """trials.csv, results.md, best.yaml and best/ (the best trial's run), curves.png; returns the best row."""
    best = pick_best(rows, tune_cfg.mode)
    paths = sorted({p for r in rows for p in r["params"]})
    with (run_dir / "trials.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", *paths, "final_metric", "best_metric", "steps", "status", "stop_reason",
                    "wall_seconds", "exact_match"])
        for r in rows:
            w.writerow([r["trial"], *[r["params"].get(p, "") for p in paths], r["final"], r["best"], r["steps"],
                        r["status"], r["stop_reason"], r["wall_seconds"], r["exact_match"]])
    (run_dir / "results.md").write_text(markdown_table(rows, tune_cfg.metric, best) + "\n")
    (run_dir / "trials.json").write_text(json.dumps(rows, indent=1, default=str))
    if best is not None:
        from distft.launch.preflight import absolutize_paths

        cfg = absolutize_paths(trial_config(raw, best["params"]), Path(cwd))
        best_raw = cfg.model_dump(mode="json", exclude_defaults=True)
        best_raw.get("run", {}).pop("name", None)
        header = (f"# The best trial of {run_dir.name} ({best['trial']}): {tune_cfg.metric} {best['final']:.4g}.\n"
                  f"# Run it with: distft train {run_dir / 'best.yaml'}\n")
        (run_dir / "best.yaml").write_text(header + yaml.safe_dump(best_raw, sort_keys=False))
        link = run_dir / "best"
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(Path("trials") / best["trial"])
    plot_curves(rows, tune_cfg, run_dir / "curves.png", best)
    return best


def plot_curves(rows: list[dict], tune_cfg: TuneSettings, path: Path, best: dict | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in rows:
        if not r["curve"]:
            continue
        steps, values = zip(*r["curve"])
        label = r["trial"] + (" (best)" if best and r["trial"] == best["trial"] else "")
        line, = ax.plot(steps, values, marker=".", lw=2.5 if best and r is best else 1.2, label=label)
        if r["status"] == "stopped":
            ax.plot(steps[-1], values[-1], "x", color=line.get_color(), ms=11, mew=2.5)
    ax.plot([], [], "kx", ms=9, mew=2, label="stopped by ASHA")
    ax.set_xlabel("step")
    ax.set_ylabel(tune_cfg.metric)
    ax.set_title(f"{path.parent.name}: {tune_cfg.metric} per trial ({tune_cfg.scheduler})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
