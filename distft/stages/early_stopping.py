"""Early stopping on an eval metric, with the best checkpoint kept and exported; and the overfitting watch.

transformers' EarlyStoppingCallback relies on `load_best_model_at_end`, which reloads from the path
the Trainer saved to. distft seals checkpoints by moving them out of that staging path (and rotates
them itself), so the Trainer's record of "the best checkpoint" would name a directory that no
longer exists. This callback makes the same decision (patience, min_delta), protects the best
sealed checkpoint from rotation, and `restore_best` loads it through the Trainer's own loader
(`_load_best_model`: DeepSpeed, FSDP, peft adapters, plain weights) once its manifest verifies.
"""

from __future__ import annotations

from pathlib import Path

from transformers import TrainerCallback

from distft.config.schema import EarlyStoppingSettings
from distft.distributed.checkpoint import CheckpointError, verify_checkpoint


class EarlyStopping(TrainerCallback):
    def __init__(self, settings: EarlyStoppingSettings, checkpoints_dir: Path, publisher=None, log=print,
                 label: str = "stage"):
        self.settings, self.dir, self.publisher, self.log, self.label = settings, Path(checkpoints_dir), publisher, log, label
        self.best: float | None = None
        self.best_step: int | None = None
        self.bad_evals = 0
        self.stopped_at: int | None = None

    def improved(self, value: float) -> bool:
        if self.best is None:
            return True
        delta = self.settings.min_delta
        return value < self.best - delta if self.settings.direction() == "min" else value > self.best + delta

    def on_train_end(self, args, state, control, **kwargs):
        self.training_over = True

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if getattr(self, "training_over", False):  # the stage's evaluate() of the exported model: no decision
            return
        if state.global_step == 0:  # eval_on_start (the preference stages' "before"): no checkpoint to keep
            return
        metric = self.settings.metric
        if not metrics or metric not in metrics:
            raise KeyError(f"train.early_stopping.metric: {metric} is not among this stage's eval metrics "
                           f"({', '.join(sorted(k for k in (metrics or {}) if k.startswith('eval_')))}). "
                           f"Fix: train.early_stopping.metric=<one of them>.")
        value = float(metrics[metric])
        if self.improved(value):
            self.best, self.best_step, self.bad_evals = value, state.global_step, 0
            if self.publisher is not None:
                self.publisher.best_step = state.global_step  # rotation keeps it from now on
            return
        self.bad_evals += 1
        if self.bad_evals >= self.settings.patience and state.global_step < state.max_steps:
            self.stopped_at = state.global_step
            control.should_training_stop = True
            self.log(f"[{self.label}] early stopping at step {state.global_step}: {metric} has not improved on "
                     f"{self.best:.4g} (step {self.best_step}) for {self.bad_evals} evals")

    def summary(self) -> dict:
        return {"early_stopping_metric": self.settings.metric, "best_metric": self.best, "best_step": self.best_step,
                "early_stopped_at": self.stopped_at}


def restore_best(trainer, log=print) -> int | None:
    """Load the best checkpoint into the trainer's model before export; the step loaded, or None if the last
    state is the best (or there is no early stopping)."""
    early = next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStopping)), None)
    if early is None or early.best_step is None or early.best_step == trainer.state.global_step:
        return None
    best = early.dir / f"checkpoint-{early.best_step}"
    problems = verify_checkpoint(best)
    if problems:
        raise CheckpointError(f"the best checkpoint {best} does not verify, so it is not exported:\n  - "
                              + "\n  - ".join(problems))
    trainer.state.best_model_checkpoint = str(best)
    trainer._load_best_model()
    log(f"[{early.label}] exporting the best checkpoint: step {early.best_step}, "
        f"{early.settings.metric} {early.best:.4g}")
    return early.best_step


def overfitting(history: list[dict], gap_limit: float) -> dict:
    """The gap between eval loss and the train loss logged just before it, at each eval; flagged when it grew
    by more than `gap_limit` from its smallest."""
    gaps, last_train = [], None
    for entry in history:
        if "loss" in entry:
            last_train = entry["loss"]
        if "eval_loss" in entry and last_train is not None:
            gaps.append((entry.get("step"), entry["eval_loss"] - last_train))
    if not gaps:
        return {"loss_gap": None, "overfitting": None}
    smallest = min(g for _, g in gaps)
    widened = gaps[-1][1] - smallest
    return {"loss_gap": round(gaps[-1][1], 4), "loss_gap_smallest": round(smallest, 4),
            "overfitting": widened > gap_limit}
