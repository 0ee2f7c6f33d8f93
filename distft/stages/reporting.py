"""A Trainer callback that makes a run observable: progress lines, metrics JSONL, and reports to `ctx`.

`ray.train.huggingface.RayTrainReportCallback` reports only when a checkpoint
is saved; Tune's early stopping and users watching a run need every log and
every eval, so this reports on each `on_log` and attaches checkpoints on save.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from transformers import TrainerCallback

from distft.config import dump_config


PROGRESS_KEYS = ("loss", "eval_loss", "learning_rate", "grad_norm")


def _fmt_seconds(s: float) -> str:
    s = int(s)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class ReportCallback(TrainerCallback):
    def __init__(self, ctx, label: str, stage_dir: Path, total_steps: int, cfg):
        self.ctx, self.label, self.stage_dir, self.total_steps, self.cfg = ctx, label, Path(stage_dir), total_steps, cfg
        self.metrics_path = self.stage_dir / "metrics.jsonl"
        self.started = time.time()
        self.last: dict = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.started = time.time()
        self.start_step = state.global_step
        if self.ctx.is_main:
            self.stage_dir.mkdir(parents=True, exist_ok=True)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = {k: v for k, v in (logs or {}).items() if isinstance(v, (int, float))}
        metrics = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        self.last.update(metrics)
        if self.ctx.is_main:
            with self.metrics_path.open("a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **metrics}) + "\n")
            if any(k in logs for k in PROGRESS_KEYS):
                self.ctx.log(self._progress_line(state, logs))
        self.ctx.report(metrics)

    def _progress_line(self, state, logs: dict) -> str:
        step, total = state.global_step, max(state.max_steps or self.total_steps, 1)
        done = step - getattr(self, "start_step", 0)
        elapsed = time.time() - self.started
        eta = elapsed / done * (total - step) if done > 0 else 0.0
        shown = " ".join(f"{k} {v:.4g}" for k, v in logs.items() if k in PROGRESS_KEYS)
        return f"[{self.label}] step {step}/{total} ({100 * step / total:.0f}%) {shown} | {_fmt_seconds(elapsed)} elapsed, eta {_fmt_seconds(eta)}"

    def on_save(self, args, state, control, **kwargs):
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if self.ctx.is_main and ckpt.is_dir():
            dump_config(self.cfg, ckpt / "distft_config.yaml")
        self.ctx.report(dict(self.last, step=state.global_step), checkpoint_dir=str(ckpt) if ckpt.is_dir() else None)


def quiet_libraries() -> None:
    """Per-item progress bars from datasets/transformers drown our progress lines in worker logs."""
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
