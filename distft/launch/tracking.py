"""The tracking runs of a distft run or search (MLflow, W&B), made on the launching side (run.report_to).

Layout (README, "Tracking"):
- MLflow, `distft train` / `pipeline` / `resume`: one parent run per run directory (named after it; the
  resolved config as params; config.yaml, provenance.json and summary.json as artifacts when the run
  ends) and one nested child per stage (the stage's settings as params, its curves, its summary's
  figures as `summary/...` metrics, its summary.json and, with run.mlflow.log_model, its model).
- MLflow, `distft tune`: one parent per search (the space and the scheduler as params; trials.csv,
  results.md and curves.png as artifacts), one child per trial (its hyperparameters as params, its
  curve, the tag `distft.stop_reason`: asha, completed or failed); the best trial is tagged
  `distft.best=true` and the parent `distft.best_trial=<id>`.
- W&B has no nesting: one W&B run per stage or trial, grouped by the run's or search's name.
- Ids are kept in `<run>/tracking.json` (a trial's in its own directory), so `distft resume`, a pipeline
  rerun and `distft tune --resume` continue the same runs. A stage that starts over (not from a
  checkpoint) gets a new child; the one it replaces is tagged `distft.superseded=true`.

Why not Ray Tune's MLflowLoggerCallback / WandbLoggerCallback: a trial is a distft stage, whose rank 0
already logs every metric into the trial's run; Tune's callbacks would log the same trial a second time,
from the driver, with only what reached Tune. One integration per logger: distft's.

A tracking server that cannot be reached, or answers slower than run.mlflow.timeout_s, is given up
with one warning: the run goes on, logging to metrics.jsonl (and TensorBoard).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path

from distft.config import DistftConfig
from distft.stages.tracking import mlflow_environment, reason

FILE = "tracking.json"
MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value's length
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch


def tracking_uri(cfg: DistftConfig) -> str | None:
    return cfg.run.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or None


def flat_params(values: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: dotted keys (the override syntax), values as text."""
    out: dict[str, str] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flat_params(value, f"{name}."))
        elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):  # stages.0.train.lr
            out.update(flat_params({str(i): v for i, v in enumerate(value)}, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            out[name[:250]] = text[:MAX_PARAM_VALUE]
    return out


def read_tracking(run_dir: Path) -> dict | None:
    """A run directory's tracking.json (its MLflow and W&B ids), or None when there is none or it does not read."""
    try:
        state = json.loads((Path(run_dir) / FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


class RunTracking:
    """The MLflow parent run and the per-stage (or per-trial) runs of one run directory, and W&B's ids."""

    def __init__(self, cfg: DistftConfig, run_dir: Path, log=print):
        self.cfg, self.run_dir, self.log = cfg, Path(run_dir), log
        self.wants = [n for n in cfg.run.report_to if n in ("mlflow", "wandb")]
        # The server: the config's, else this process's MLFLOW_TRACKING_URI (a trial's actor, which may run on
        # another node without it, takes the search's: `trial`).
        self.uri = tracking_uri(cfg)
        self.state = read_tracking(self.run_dir) or {}
        self.mlflow_ok = "mlflow" in self.wants
        self._client = None
        self.opened = False
        self.current: str | None = None  # the child run of the stage now running

    # -- the record -----------------------------------------------------------------------------------

    def _save(self) -> None:
        tmp = self.run_dir / f".{FILE}.tmp"
        tmp.write_text(json.dumps(self.state, indent=1))
        tmp.replace(self.run_dir / FILE)

    # -- MLflow, guarded --------------------------------------------------------------------------------
    def client(self):
        if self._client is None:
            os.environ.update(mlflow_environment(self.cfg.run.mlflow.timeout_s))
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _mlflow(self, what: str, fn):
        """`fn()` unless MLflow was given up; the first failure gives it up for this run, with one warning."""
        if not self.mlflow_ok:
            return None
        try:
            return fn()
        except Exception as e:
            self.mlflow_ok = False
            self.log(f"[tracking] mlflow: {what} at {self.uri} failed ({reason(e)}); this run goes "
                     "on without MLflow, logging to metrics.jsonl"
                     + (" and TensorBoard" if "tensorboard" in self.cfg.run.report_to else ""))
            return None

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = list(params.items())
        for i in range(0, len(items), PARAMS_PER_BATCH):
            self.client().log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + PARAMS_PER_BATCH]])

    def _reopen(self, run_id: str) -> str:
        self.client().update_run(run_id, status="RUNNING")
        return run_id

    def _new_run(self, name: str, params: dict[str, str], tags: dict[str, str], parent: str | None) -> str:
        client = self.client()
        experiment = self.state["mlflow"]["experiment_id"]
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run_id = client.create_run(experiment, run_name=name, tags=tags).info.run_id
        self._log_params(run_id, params)
        return run_id

    def _experiment(self) -> str:
        """This run's MLflow state for the current server: kept when the server is the same, else started."""
        uri, name = self.uri, self.cfg.run.mlflow.experiment
        state = self.state.get("mlflow")
        if state and state.get("uri") == uri and state.get("experiment") == name:
            return state["experiment_id"]
        client = self.client()
        found = client.get_experiment_by_name(name)
        experiment_id = found.experiment_id if found else client.create_experiment(name)
        self.state["mlflow"] = {"uri": uri, "experiment": name, "experiment_id": experiment_id, "stages": {}}
        return experiment_id

    # -- a run: parent, then one child per stage --------------------------------------------------------
    def open(self, kind: str, params: dict[str, str]) -> None:
        """The parent run (once per process): reopened when tracking.json has it for this server."""
        if self.opened or not self.wants:
            return
        self.opened = True
        name = self.cfg.run.mlflow.run_name or self.run_dir.name
        if "mlflow" in self.wants:
            def parent():
                self._experiment()
                state = self.state["mlflow"]
                if state.get("run_id"):
                    self._reopen(state["run_id"])
                else:
                    state["run_id"] = self._new_run(name, params, {"distft.kind": kind}, None)
                self._save()
                self.log(f"[tracking] mlflow: run {name} ({state['run_id']}) in experiment "
                         f"{self.cfg.run.mlflow.experiment} at {self.uri}")
            self._mlflow("starting the parent run", parent)
        if "wandb" in self.wants:
            self.state.setdefault("wandb", {"group": name, "stages": {}})
            self._save()

    def stage(self, index: int, resumed: bool) -> dict | None:
        """The tracking spec of stage `index` for its workers: its child run, continued when the stage
        resumes from a checkpoint, new when it starts over. Opens the parent run first if needed."""
        if not self.wants:
            return None
        if not self.opened:
            self.open("run", flat_params(self.cfg.model_dump(mode="json")))
        stage = self.cfg.stages[index]
        label = stage.label()
        spec: dict = {}
        if self.mlflow_ok and self.state.get("mlflow", {}).get("run_id"):
            state = self.state["mlflow"]

            def child():
                known = state["stages"].get(label)
                if known and resumed:
                    return self._reopen(known)
                if known:  # the stage starts over: its earlier run stays, marked as replaced
                    self.client().set_tag(known, "distft.superseded", "true")
                params = flat_params(stage.model_dump(mode="json"))
                return self._new_run(label, params, {"distft.stage": label, "distft.kind": stage.stage},
                                     state["run_id"])

            run_id = self._mlflow(f"starting the run of stage {label}", child)
            if run_id:
                state["stages"][label] = run_id
                self.current = run_id
                spec["mlflow"] = self._mlflow_spec(run_id)
        if "wandb" in self.wants:
            state = self.state["wandb"]
            if not (resumed and label in state["stages"]):
                state["stages"][label] = uuid.uuid4().hex[:12]
            spec["wandb"] = self._wandb_spec(state["stages"][label], state["group"], label, stage.stage,
                                             self.cfg.model_dump(mode="json"))
        self._save()
        return spec or None

    def _mlflow_spec(self, run_id: str) -> dict:
        m = self.cfg.run.mlflow
        return {"uri": self.uri, "run_id": run_id, "timeout_s": m.timeout_s, "log_model": m.log_model}

    def _wandb_spec(self, run_id: str, group: str, name: str, job_type: str, config: dict) -> dict:
        w = self.cfg.run.wandb
        return {"project": w.project, "entity": w.entity, "mode": w.mode, "dir": str(self.run_dir), "id": run_id,
                "group": group, "name": name, "job_type": job_type, "config": config,
                "init_timeout_s": w.init_timeout_s}

    def finish(self, status: str, files: list[Path]) -> None:
        """End the parent run: FINISHED, FAILED or KILLED (an interrupt), with the run's files attached. A stage
        whose workers died without ending their run is ended with the same status."""
        state = self.state.get("mlflow") or {}
        if not (self.opened and self.mlflow_ok and state.get("run_id")):
            return

        def end():
            client = self.client()
            if status != "FINISHED" and self.current:
                if client.get_run(self.current).info.status == "RUNNING":
                    client.set_terminated(self.current, status)
            for f in files:
                if f.is_file():
                    client.log_artifact(state["run_id"], str(f))
            client.set_terminated(state["run_id"], status)

        self._mlflow("ending the run", end)

    # -- a search: parent, then one run per trial (made in the trial's actor) ----------------------------
    def for_trials(self) -> dict:
        """What a trial's actor needs to make its own run under this search's parent (no secrets)."""
        seed: dict = {"report_to": self.wants}
        state = self.state.get("mlflow") or {}
        if self.mlflow_ok and state.get("run_id"):
            seed["mlflow"] = {"uri": state["uri"], "experiment": state["experiment"],
                              "experiment_id": state["experiment_id"], "parent": state["run_id"]}
        if "wandb" in self.wants:
            seed["wandb"] = {"group": self.state["wandb"]["group"]}
        return seed

    def trial(self, seed: dict, trial_id: str, params: dict) -> dict | None:
        """A trial's run (in its own directory's tracking.json, kept however the trial continues) and the spec
        its stage logs with."""
        spec: dict = {}
        stage = self.cfg.stages[0]
        if "mlflow" in seed:
            self.uri = seed["mlflow"]["uri"]
            self.state.setdefault("mlflow", {k: seed["mlflow"][k] for k in ("uri", "experiment", "experiment_id")})

            def run():
                # A trial interrupted before its first checkpoint starts again from step 0 in the same
                # directory (its metrics.jsonl goes on with a restart mark): likewise its run goes on.
                known = self.state["mlflow"].get("run_id")
                if known:
                    return self._reopen(known)
                values = {k: v if isinstance(v, str) else json.dumps(v) for k, v in params.items()}
                return self._new_run(trial_id, values, {"distft.trial": trial_id, "distft.kind": stage.stage},
                                     seed["mlflow"]["parent"])

            run_id = self._mlflow(f"starting the run of trial {trial_id}", run)
            if run_id:
                self.state["mlflow"]["run_id"] = run_id
                spec["mlflow"] = self._mlflow_spec(run_id)
        else:
            self.mlflow_ok = False
        if "wandb" in seed:
            state = self.state.setdefault("wandb", {"group": seed["wandb"]["group"], "stages": {}})
            state["stages"].setdefault("trial", uuid.uuid4().hex[:12])
            spec["wandb"] = self._wandb_spec(state["stages"]["trial"], state["group"], trial_id, stage.stage,
                                             {**self.cfg.model_dump(mode="json"), "trial_params": params})
        self.opened = True
        self._save()
        return spec or None

    def conclude_search(self, rows: list[dict], best: dict | None, files: list[Path], status: str) -> None:
        """After the search: each trial's run tagged with how it ended, the best one marked, the parent ended."""
        state = self.state.get("mlflow") or {}
        if not (self.mlflow_ok and state.get("run_id")):
            return
        how = {"stopped": "asha", "completed": "completed", "failed": "failed", "unfinished": "unfinished"}

        trial_runs = {row["trial"]: (RunTracking(self.cfg, self.run_dir / "trials" / row["trial"]).state.get("mlflow")
                                     or {}).get("run_id") for row in rows}

        def conclude():
            client = self.client()
            for row in rows:
                trial_run = trial_runs[row["trial"]]
                if not trial_run:
                    continue
                client.set_tag(trial_run, "distft.stop_reason", how.get(row["status"], row["status"]))
                client.set_tag(trial_run, "distft.stop_detail", row["stop_reason"][:500])
                if best is not None and row["trial"] == best["trial"]:
                    client.set_tag(trial_run, "distft.best", "true")
                if row["status"] in ("failed", "unfinished") and client.get_run(trial_run).info.status == "RUNNING":
                    client.set_terminated(trial_run, "FAILED" if row["status"] == "failed" else "KILLED")
            if best is not None:
                client.set_tag(state["run_id"], "distft.best_trial", best["trial"])
                if trial_runs.get(best["trial"]):
                    client.set_tag(state["run_id"], "distft.best_run_id", trial_runs[best["trial"]])
            for f in files:
                if f.is_file():
                    client.log_artifact(state["run_id"], str(f))
            client.set_terminated(state["run_id"], status)

        self._mlflow("ending the search's run", conclude)


def run_tree(client, experiment: str) -> str:
    """The experiment's runs as a tree, parents first: what README's "Tracking" section shows
    (benchmarks/tracking.py prints it for a real search)."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return f"(no experiment {experiment})"
    runs = client.search_runs([exp.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    children: dict[str | None, list] = {}
    for r in runs:
        children.setdefault(r.data.tags.get("mlflow.parentRunId"), []).append(r)
    lines: list[str] = []

    def show(run, depth: int) -> None:
        tags, metrics = run.data.tags, run.data.metrics
        notes = [run.info.status]
        if "distft.stop_reason" in tags:
            notes.append(f"stop: {tags['distft.stop_reason']}")
        if tags.get("distft.best") == "true":
            notes.append("BEST")
        shown = dict(run.data.params) if "distft.trial" in tags else {}  # a trial's params: its hyperparameters
        curve = {k: metrics[k] for k in ("eval_loss", "loss", "summary/exact_match_after") if k in metrics}
        line = "  " * depth + f"{run.info.run_name}  [{', '.join(notes)}]"
        if shown:
            line += "  " + " ".join(f"{k}={_short(v)}" for k, v in sorted(shown.items()))
        if curve:
            line += "  " + " ".join(f"{k}={v:.4g}" for k, v in curve.items())
        lines.append(line)
        for child in children.get(run.info.run_id, []):
            show(child, depth + 1)

    for root in children.get(None, []):
        show(root, 0)
    return "\n".join(lines)


def _short(text: str) -> str:
    try:
        value = float(text)
    except ValueError:
        return text
    return f"{value:.3g}"
