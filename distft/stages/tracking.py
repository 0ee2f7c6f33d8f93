"""A stage's remote experiment trackers (MLflow, Weights & Biases), written by rank 0 beside metrics.jsonl.

The launcher makes the tracking runs (a parent per run or search, a child per stage or trial: see
distft/launch/tracking.py) and hands the stage a `spec` naming them; this module attaches to them and logs.

Why not the Trainer's own MLflowCallback / WandbCallback (what `report_to` means in transformers):
- One path for every stage. The Trainer stages, PPO (no Trainer) and distft's own figures (retain
  scores, memory, checkpoint stalls) all pass through `MetricsLog`; the Trainer's callbacks see the
  Trainer's logs only, and beside ours would log every loss twice into the same run.
- A tracking server that stops answering, or answers slowly, must never stall training. The Trainer's
  MLflowCallback drains its asynchronous queue at end_run with MLflow's retries: a dead server holds
  the end of the run for retries x timeout per queued batch, and it cannot be told to give up. Here
  metric rows go out on a thread of their own (`Sender`), each MLflow request has run.mlflow.timeout_s
  and no retries, the first failure turns that tracker off with one warning, and the end of the stage
  waits for what is queued at most run.mlflow.timeout_s; metrics.jsonl and TensorBoard keep everything.
- Resume continues the launcher's runs by id, which the callbacks would start afresh per process.
The clients are MLflow's and W&B's own (`MlflowClient.log_batch`, `wandb.init` / `Run.log`).

No secret is read or written here: MLflow and W&B take their tokens from the environment
(run.forward_env), and the spec holds names and ids only.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

_ILLEGAL_KEY = re.compile(r"[^0-9A-Za-z_\-. :/]")


class DeepSpeedWithoutMLflow:
    """An import hook: DeepSpeed's autotuner (which distft never runs) imports MLflow at DeepSpeed's import
    whenever MLflow is installed, and transformers imports DeepSpeed in every Trainer stage where it is
    installed: 113 MB and 0.8 s more in every worker, measured here, for nothing. Refused for that one
    importer (it catches the error and goes on without MLflow); distft's own tracker imports MLflow as usual."""

    IMPORTER = "deepspeed.autotuning.autotuner"

    def find_spec(self, name, path=None, target=None):
        if name == "mlflow":
            frame = sys._getframe(1)
            while frame is not None:
                if frame.f_globals.get("__name__") == self.IMPORTER:
                    raise ModuleNotFoundError(f"distft keeps {self.IMPORTER} from importing mlflow", name=name)
                frame = frame.f_back
        return None

    @classmethod
    def install(cls) -> None:
        if not any(isinstance(f, cls) for f in sys.meta_path):
            sys.meta_path.insert(0, cls())


def mlflow_environment(timeout_s: float) -> dict[str, str]:
    """MLflow client settings for a process that logs: one bounded attempt per request, no URL banner."""
    return {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout_s))),
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",
    }


def numeric_items(values: dict, prefix: str = "") -> dict[str, float]:
    """The numbers in a (nested) dict as flat metric names: {"startup_s": {"ray": 3.1}} -> {"startup_s/ray": 3.1};
    a list of rows with a `name` (the retain scores) by that name. Booleans count as 0/1."""
    out: dict[str, float] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, bool):
            out[name] = float(value)
        elif isinstance(value, (int, float)) and math.isfinite(value):
            out[name] = float(value)
        elif isinstance(value, dict):
            out.update(numeric_items(value, f"{name}/"))
        elif isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            for row in value:
                out.update(numeric_items({k: v for k, v in row.items() if k != "name"}, f"{name}/{row['name']}/"))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
            # Per rank or per checkpoint (peak_rss_mib_per_rank, checkpoint_blocked_s): one metric each.
            out.update(numeric_items({str(i): v for i, v in enumerate(value[:64])}, f"{name}/"))
    return {_ILLEGAL_KEY.sub("_", k)[:250]: v for k, v in out.items()}


def reason(e: BaseException) -> str:
    """One line for a tracker's failure (a connection error's repr can be a page long)."""
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class Sender:
    """MLflow's metric rows, sent off the training thread: one daemon thread and a bounded queue, so a slow
    server (answering, but slowly) never holds a step either. A failed request, or a queue the server
    cannot keep up with, gives MLflow up (`give_up`); `close` waits for the rows still queued at most
    `timeout_s`."""

    def __init__(self, send, give_up, timeout_s: float, capacity: int = 1000):
        import queue
        import threading

        self.send, self.give_up, self.timeout_s = send, give_up, timeout_s
        self.batch_metrics = 900  # under MLflow's 1000 per log_batch, with room for one more row
        self.queue: queue.Queue = queue.Queue(maxsize=capacity)
        self.stopped = False
        self.thread = threading.Thread(target=self._run, name="distft-mlflow", daemon=True)
        self.thread.start()

    def put(self, item) -> None:
        import queue

        if self.stopped:
            return
        try:
            self.queue.put_nowait(item)
        except queue.Full:
            self.stopped = True
            self.give_up(RuntimeError(f"the server is slower than training: {self.queue.maxsize} rows waiting"))

    def _run(self) -> None:
        import queue

        done = False
        while not done:
            items = [self.queue.get()]
            # What queued up during the last request goes in one request (MLflow takes 1000 metrics per batch).
            while items[-1] is not None and sum(len(i[2]) for i in items) < self.batch_metrics:
                try:
                    items.append(self.queue.get_nowait())
                except queue.Empty:
                    break
            if items[-1] is None:
                done = True
                items.pop()
            if self.stopped or not items:
                continue
            try:
                self.send(items)
            except Exception as e:
                self.stopped = True
                self.give_up(e)

    def close(self) -> bool:
        """Whether every queued row went out within `timeout_s`."""
        self.queue.put(None)
        self.thread.join(self.timeout_s)
        if self.thread.is_alive():
            self.stopped = True
            self.give_up(RuntimeError(f"rows still unsent after {self.timeout_s:g} s at the end of the stage"))
            return False
        return not self.stopped


class Trackers:
    """Rank 0's trackers for one stage. Every call is guarded: a tracker that fails (server down or slow,
    W&B not starting) is warned about once and dropped for the rest of the stage."""

    def __init__(self, spec: dict | None, log=print):
        self.spec = spec or {}
        self.log = log
        self.off: set[str] = set()
        self._client = None  # MlflowClient
        self._sender: Sender | None = None  # MLflow's metric rows, off the training thread
        self._wandb = None  # the W&B run
        if "mlflow" in self.spec:
            os.environ.update(mlflow_environment(self.spec["mlflow"].get("timeout_s", 10.0)))

    def _give_up(self, name: str, what: str, e: BaseException) -> None:
        if name not in self.off:
            self.off.add(name)
            self.log(f"[tracking] {name}: {what} failed ({reason(e)}); this stage goes on without {name} "
                     "(metrics.jsonl keeps every metric)")

    def _mlflow(self):
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.spec["mlflow"]["uri"])
        return self._client

    def _wandb_run(self):
        if self._wandb is None:
            import wandb

            w = self.spec["wandb"]
            Path(w["dir"]).mkdir(parents=True, exist_ok=True)
            # console="off": W&B would wrap this process's stdout and stderr, which Ray streams to the user.
            settings = wandb.Settings(init_timeout=w.get("init_timeout_s", 60.0), console="off", silent=True,
                                      x_disable_stats=True)
            self._wandb = wandb.init(
                project=w["project"], entity=w.get("entity"), dir=w["dir"], id=w["id"], resume="allow",
                group=w.get("group"), name=w.get("name"), job_type=w.get("job_type"), mode=w["mode"],
                config=w.get("config"), settings=settings, reinit="create_new",
            )
            # Steps are a metric, not W&B's own step counter: a resumed stage logs steps again from its
            # checkpoint, which W&B's monotonic step would drop.
            self._wandb.define_metric("step")
            self._wandb.define_metric("*", step_metric="step")
        return self._wandb

    def log_metrics(self, metrics: dict, step: int) -> None:
        values = numeric_items({k: v for k, v in metrics.items() if k not in ("step", "time")})
        if not values:
            return
        if "mlflow" in self.spec and "mlflow" not in self.off:
            if self._sender is None:
                run_id = self.spec["mlflow"]["run_id"]

                def send(rows):
                    from mlflow.entities import Metric

                    self._mlflow().log_batch(run_id, metrics=[Metric(k, v, when, at) for when, at, numbers in rows
                                                              for k, v in numbers.items()])

                self._sender = Sender(send, lambda e: self._give_up("mlflow", "logging metrics", e),
                                      self.spec["mlflow"].get("timeout_s", 10.0))
            self._sender.put((int(time.time() * 1000), step, values))
        if "wandb" in self.spec and "wandb" not in self.off:
            try:
                self._wandb_run().log({**values, "step": step})
            except Exception as e:
                self._give_up("wandb", "logging metrics", e)

    def log_outcome(self, stage_dir: Path, files: list[Path], model_dir: Path | None = None) -> None:
        """The end of a stage: its summary's figures (as `summary/<key>` metrics in MLflow, the run summary in
        W&B), summary.json and the stage's config as files, and the exported model when asked."""
        from distft.stages.summary import read_stage_summary

        summary = read_stage_summary(stage_dir) or {}
        figures = numeric_items(summary)
        step = int(summary.get("steps") or 0)
        files = [f for f in files if f.is_file()]
        self._flush()
        if "mlflow" in self.spec and "mlflow" not in self.off:
            run_id = self.spec["mlflow"]["run_id"]
            try:
                from mlflow.entities import Metric

                client, now = self._mlflow(), int(time.time() * 1000)
                metrics = [Metric(f"summary/{k}", v, now, step) for k, v in figures.items()]
                for i in range(0, len(metrics), 1000):  # MLflow's batch limit
                    client.log_batch(run_id, metrics=metrics[i:i + 1000])
                for f in files:
                    client.log_artifact(run_id, str(f))
                if model_dir is not None and self.spec["mlflow"].get("log_model") and model_dir.is_dir():
                    client.log_artifacts(run_id, str(model_dir), artifact_path="model")
            except Exception as e:
                self._give_up("mlflow", "logging the stage's outcome", e)
        if "wandb" in self.spec and "wandb" not in self.off:
            try:
                run = self._wandb_run()
                run.summary.update(figures)
                for f in files:  # files in the run's directory go up with it (offline: `wandb sync`)
                    shutil.copy2(f, Path(run.dir) / f.name)
            except Exception as e:
                self._give_up("wandb", "logging the stage's outcome", e)

    def _flush(self) -> None:
        if self._sender is not None:
            sender, self._sender = self._sender, None
            sender.close()

    def close(self, ok: bool) -> None:
        """End the stage's runs: MLflow's as FINISHED or FAILED, W&B's flushed to its files (or server)."""
        self._flush()
        if "mlflow" in self.spec and "mlflow" not in self.off:
            try:
                self._mlflow().set_terminated(self.spec["mlflow"]["run_id"], "FINISHED" if ok else "FAILED")
            except Exception as e:
                self._give_up("mlflow", "ending the run", e)
        if self._wandb is not None:
            run, self._wandb = self._wandb, None
            try:
                run.finish(exit_code=0 if ok else 1)
            except Exception as e:
                self._give_up("wandb", "ending the run", e)
