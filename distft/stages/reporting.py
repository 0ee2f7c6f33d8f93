"""A Trainer callback that makes a run observable: progress lines, metrics (JSONL, TensorBoard), reports to `ctx`.

`ray.train.huggingface.RayTrainReportCallback` reports only when a checkpoint
is saved; Tune's early stopping and users watching a run need every log and
every eval, so this reports on each `on_log` and attaches checkpoints on save.

Checkpoints: the Trainer writes each one into `checkpoints/.partial/` and this
callback seals it (manifest written last, then one rename into `checkpoints/`,
see distft/distributed/checkpoint.py) before any report names it. Only rank 0
attaches the checkpoint (Ray Train takes a checkpoint from any rank, and one
copy of a directory shared by all ranks is enough); every rank still reports.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from transformers import TrainerCallback

from distft.config import dump_config
from distft.distributed.checkpoint import CheckpointPublisher, checkpoint_step, staging_dir
from distft.distributed.collectives import barrier, broadcast_from_rank0, gather_from_every_rank
from distft.distributed.memory import peak_rss_bytes

PROGRESS_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")
RSS_WARMUP_STEPS = 5  # allocator, optimizer state and data prefetch are in place by then


def tensorboard_tag(key: str) -> str:
    """A metric's TensorBoard name, grouped as the Trainer's own TensorBoard callback groups it
    (eval_loss -> eval/loss, loss -> train/loss), so distft runs sit beside plain HF runs."""
    return f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"


def _quiet_tensorboard_writer_threads() -> None:
    """Keep TensorBoard's event-writer thread from printing its own traceback when a write fails.

    The thread (tensorboard's `_AsyncWriterThread`) stores its exception and re-raises it, so Python's
    default hook prints a raw traceback to the worker's stderr, which Ray forwards to the user. The same
    exception is raised again in the training thread by the writer's next `flush()` (each `write` ends
    with one), where the stage's error handling turns it into one line (e.g. a full disk). Installed once;
    any other thread's exception still goes to the previous hook.
    """
    previous = threading.excepthook
    if getattr(previous, "_distft_tensorboard", False):
        return

    def hook(args):
        if type(args.thread).__name__ == "_AsyncWriterThread" and isinstance(args.exc_value, Exception):
            return
        previous(args)

    hook._distft_tensorboard = True
    threading.excepthook = hook


class MetricsLog:
    """A stage's metrics, written on rank 0 only: one JSON object per line in `<stage>/metrics.jsonl`
    and the same scalars, at the same steps, as TensorBoard events in `<stage>/tensorboard/` and to the
    run's MLflow / W&B runs (run.report_to).

    Each write is flushed, so a live `tensorboard --logdir` sees it and a crash loses nothing
    logged. `close()` ends the event file; a write after it starts a new one in the same
    directory. TensorBoard reads them all; when a resumed run logs a step again, it drops the
    earlier attempt's points from that step on.

    A stage that starts from a checkpoint first writes an event line (`mark_resume`):
    `{"time": ..., "event": "resume", "from_step": 20, "last_step": 35, ...}`. The rows after it with
    a step above `from_step` redo (and replace) the rows before it up to `last_step`. Event lines have
    no `step`: readers that want metrics skip lines with an `event` key.
    """

    def __init__(self, stage_dir: Path, tensorboard: bool = True, trackers=None):
        self.path = Path(stage_dir) / "metrics.jsonl"
        self.tensorboard_dir = Path(stage_dir) / "tensorboard"
        self.tensorboard = tensorboard  # run.report_to has tensorboard
        self.trackers = trackers  # MLflow / W&B (stages/tracking.py), or None
        self._writer = None

    @classmethod
    def for_stage(cls, cfg, ctx, stage_dir: Path) -> MetricsLog | None:
        """Rank 0's log of a stage, to every logger in run.report_to; None on the other ranks."""
        if not ctx.is_main:
            return None
        return cls(stage_dir, tensorboard="tensorboard" in cfg.run.report_to, trackers=ctx.trackers)

    def write(self, metrics: dict) -> None:
        now = round(time.time(), 3)
        with self.path.open("a") as f:
            f.write(json.dumps({"time": now, **metrics}) + "\n")
        if self.trackers is not None:  # guarded: a tracker that fails is dropped with one warning
            self.trackers.log_metrics(metrics, metrics["step"])
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only where metrics are written

            _quiet_tensorboard_writer_threads()
            self._writer = SummaryWriter(log_dir=str(self.tensorboard_dir))
        for key, value in metrics.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(tensorboard_tag(key), value, global_step=metrics["step"], walltime=now)
        self._writer.flush()

    def mark_resume(self, checkpoint: str | Path, from_step: int | None, source: str) -> dict:
        """The event line of a restart from `checkpoint` (at `from_step`), before the stage logs anything."""
        row = {"time": round(time.time(), 3), "event": "resume", "from_step": from_step,
               "last_step": last_step(self.path), "source": source, "checkpoint": str(checkpoint)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        return row

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def last_step(metrics_jsonl: Path, window: int = 1 << 16) -> int | None:
    """The highest step logged in the last `window` bytes of a metrics.jsonl (None: nothing logged yet)."""
    try:
        with open(metrics_jsonl, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - window))
            tail = f.read().decode("utf-8", errors="replace")
    except OSError:
        return None
    steps = []
    for line in tail.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue  # the first line, cut by the window
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            steps.append(row["step"])
    return max(steps, default=None)


class RssWatch:
    """How much a process's own memory grew after a warm-up point: what training added once the model,
    optimizer state and first batches exist. What `data.streaming` keeps flat however large the data.

    Own memory is RssAnon, sampled at every step end: the resident shared-memory pages of Ray's object
    store that a worker has read blocks from (RssShmem) belong to the store, which bounds and reuses
    them, and a memory limit on the worker does not charge them to it. Linux only (None elsewhere).
    """

    def __init__(self):
        self.base: int | None = None
        self.peak: int | None = None

    @staticmethod
    def anon_bytes() -> int | None:
        try:
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))
        except (OSError, StopIteration):
            return None

    def start(self) -> None:
        self.base = self.peak = self.anon_bytes()

    def sample(self) -> None:
        if self.base is not None:
            self.peak = max(self.peak, self.anon_bytes() or 0)

    def growth_mib(self) -> float | None:
        return None if self.base is None else round((self.peak - self.base) / 2**20, 1)


def mib(n: int) -> float:
    return round(n / 2**20, 1)


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ReportCallback(TrainerCallback):
    def __init__(self, ctx, label: str, stage_dir: Path, total_steps: int, cfg):
        self.ctx, self.label, self.stage_dir, self.total_steps, self.cfg = ctx, label, Path(stage_dir), total_steps, cfg
        self.metrics = MetricsLog.for_stage(cfg, ctx, self.stage_dir)
        self.started = time.time()  # reset when training begins
        self.ended: float | None = None
        self.stopped_at: int | None = None  # the step a search's scheduler stopped this run at
        self.training_over = False  # the final evaluate() after train() logs too; no decision is asked then
        self.checkpoints = None
        # Seconds training stood still for each checkpoint: the Trainer's write, the seal (hashing, when
        # inline), the report that hands it to Ray. Measured from the last event before the save.
        self.checkpoint_blocked: list[float] = []
        self.rss = RssWatch()
        self.peak_rss_mib_per_rank: list[float | None] | None = None  # every rank's high-water mark, at train end
        self._mark = time.time()
        self._last_shown: tuple[int, dict] | None = None  # (step, values) of the last progress line
        if ctx.is_main:
            self.checkpoints = CheckpointPublisher(
                self.stage_dir / "checkpoints", keep=cfg.run.keep_checkpoints, world_size=ctx.world_size,
                strategy=cfg.stages[ctx.stage_index].strategy.label(), log=ctx.log,
            )

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()

        self.start_step = state.global_step
        staging = staging_dir(self.stage_dir / "checkpoints")
        if Path(args.output_dir).resolve() != staging.resolve():
            raise ValueError(f"the Trainer's output_dir is {args.output_dir}, but ReportCallback seals checkpoints "
                             f"staged in {staging}. Fix: build the Trainer with "
                             "output_dir=staging_dir(<stage>/checkpoints).")
        if self.ctx.is_main:
            self.stage_dir.mkdir(parents=True, exist_ok=True)
            self.checkpoints.recover()

    def on_step_end(self, args, state, control, **kwargs):
        self._mark = time.time()
        if state.global_step - self.start_step == RSS_WARMUP_STEPS:
            self.rss.start()
        self.rss.sample()

    def on_evaluate(self, args, state, control, **kwargs):
        self._mark = time.time()

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        metrics = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        anon = RssWatch.anon_bytes()
        training_row = not self.training_over and not any(k.startswith("eval_") for k in logs)
        if anon is not None and training_row:  # this rank's own memory, for metrics.jsonl and TensorBoard
            metrics["rss_mib"] = round(anon / 2**20, 1)
        peak = peak_rss_bytes()
        if peak is not None and training_row:
            # The kernel's high-water mark since the worker started: a peak inside a step (gathered ZeRO-3
            # layers, a logits spike) that RSS at the step end no longer shows. Rank 0's own, as rank 0 writes
            # the rows: gathering every rank's at each log would add a collective to the training loop, and
            # on_log is not called in lockstep everywhere. The summary has every rank's (`memory_summary`).
            metrics["peak_rss_mib"] = mib(peak)
        if self.ctx.is_main:
            self.metrics.write(metrics)
            if self.training_over:  # the stage's evaluate() after training: nothing else is logged after it
                self.metrics.close()
            shown = (state.global_step, {k: v for k, v in logs.items() if k in PROGRESS_KEYS})
            # The stage's evaluate() after a run whose last step was an eval scores the same weights
            # again: the same line twice. After a best checkpoint is restored, it differs and shows.
            if shown[1] and not (self.training_over and shown == self._last_shown):
                self.ctx.log(self._progress_line(state, logs))
            if shown[1]:
                self._last_shown = shown
        self.ctx.report(metrics, progress=not any(k.startswith("eval_") for k in logs))
        # Tune's early stop ends the run from inside, at an eval, like EarlyStoppingCallback: the stage
        # exports and returns, Ray Train releases the workers, and the next trial can start.
        last_step = state.global_step >= state.max_steps  # the run ends here anyway: nothing to ask
        if self.ctx.stop_fn is not None and not (self.training_over or last_step) and self.ctx.should_stop(metrics):
            self.ctx.log(f"[{self.label}] stopped early at step {state.global_step} by the search's scheduler")
            self.stopped_at = state.global_step
            control.should_training_stop = True
        self._mark = time.time()

    def memory_summary(self) -> dict:
        """The summary's peak memory: each rank's kernel high-water mark (VmHWM) at the end of training, since
        its process started (model loading included), and their maximum; {} before training ended."""
        per_rank = self.peak_rss_mib_per_rank
        if not per_rank or any(p is None for p in per_rank):
            return {}
        return {"peak_rss_mib": max(per_rank), "peak_rss_mib_per_rank": per_rank}

    def _progress_line(self, state, logs: dict) -> str:
        step, total = state.global_step, max(state.max_steps or self.total_steps, 1)
        done = step - getattr(self, "start_step", 0)
        elapsed = time.time() - self.started
        eta = elapsed / done * (total - step) if done > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k in PROGRESS_KEYS)
        return f"[{self.label}] step {step}/{total} ({100 * step / total:.0f}%) {shown} | {_fmt_seconds(elapsed)} elapsed, eta {_fmt_seconds(eta)}"

    def on_save(self, args, state, control, **kwargs):
        barrier()  # every rank has written its files (rng_state_<rank>.pth, ZeRO shards) before rank 0 hashes them
        ready = None
        if self.ctx.is_main:
            staged = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if staged.is_dir():
                dump_config(self.cfg, staged / "distft_config.yaml")
            ready = self.checkpoints.publish(state.global_step)
        self._report(state, ready)
        self.checkpoint_blocked.append(round(time.time() - self._mark, 3))

    def on_train_end(self, args, state, control, **kwargs):
        self.ended = time.time()  # the run summary's timeline: what follows is evaluation, export, teardown
        self.rss.sample()  # the last sample: the final eval and the export are not training
        # Every rank passes here once (the collective below needs that), unlike on_log.
        peak = peak_rss_bytes()
        self.peak_rss_mib_per_rank = gather_from_every_rank(mib(peak) if peak is not None else None)
        self.training_over = True
        if self.metrics is not None:
            self.metrics.close()
        # Background seals finish before the stage goes on (and before the process can exit);
        # the newest one not yet registered is registered now. Rank 0 alone knows whether
        # there is one, and every rank must make the same reports: it tells them.
        ready = self.checkpoints.finish() if self.ctx.is_main else None
        if broadcast_from_rank0(ready is not None):
            self._report(state, ready)

    def _report(self, state, checkpoint: Path | None) -> None:
        # Only where the run is, not the last logged metrics again: a repeated eval metric would be
        # a stale point at this step for a search's scheduler and in the learning curves.
        metrics = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4)}
        if checkpoint is not None:
            metrics["checkpoint_step"] = checkpoint_step(checkpoint)
        self.ctx.report(metrics, checkpoint_dir=str(checkpoint) if checkpoint is not None else None)
        if self.ctx.is_main:
            self.checkpoints.rotate()  # after the report: Ray has copied what it registered
