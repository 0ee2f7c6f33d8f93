"""Training stages. Each `run(cfg, ctx)` builds model, data and trainer, then trains; none imports Ray."""

import pkgutil
import time
from functools import wraps

from distft.stages.context import StageContext


class StageWriteError(RuntimeError):
    """A stage could not write (checkpoint or disk); the message says what is intact and how to go on."""


def _writes_explained(run):
    """Every stage's runner, wrapped: a failed write becomes one line naming what is intact; and rank 0's
    tracking runs (MLflow, W&B) get the stage's outcome and end with it, however it ends."""

    @wraps(run)
    def guarded(cfg, ctx: StageContext):
        started = time.time()
        ok = False
        try:
            result = run(cfg, ctx)
            ok = True
            return result
        except Exception as e:
            from distft.distributed.checkpoint import write_failure

            stage = cfg.stages[ctx.stage_index]
            problem = write_failure(ctx.run_dir / stage.label() / "checkpoints", e,
                                    f"`distft resume {ctx.run_dir}`", since=started)
            if problem is None:
                raise
            raise StageWriteError(f"stage {stage.label()}: {problem}") from e
        finally:
            if ctx.trackers is not None:  # the stage's tracking runs end with it (FINISHED or FAILED)
                stage_dir = ctx.run_dir / cfg.stages[ctx.stage_index].label()
                if ok:
                    ctx.trackers.log_outcome(stage_dir, [stage_dir / "summary.json", ctx.run_dir / "config.yaml"],
                                             stage_dir / "final")
                ctx.close_trackers(ok)

    return guarded


def stage_runner(kind: str):
    """The `run` function of a stage kind."""
    from distft.stages.quiet import quiet_libraries
    from distft.stages.tracking import DeepSpeedWithoutMLflow

    quiet_libraries()  # before the stage's module imports transformers (and with it bitsandbytes)
    DeepSpeedWithoutMLflow.install()  # before transformers imports DeepSpeed
    from distft.config.schema import STAGE_CLASSES

    if kind not in STAGE_CLASSES:
        raise ValueError(f"unknown stage kind {kind!r}")
    return _writes_explained(pkgutil.resolve_name(STAGE_CLASSES[kind].runner))


__all__ = ["StageContext", "StageWriteError", "stage_runner"]
