"""Training stages. Each `run(cfg, ctx)` builds model, data and trainer, then trains; none imports Ray."""

from distft.stages.context import StageContext


def stage_runner(kind: str):
    """The `run` function of a stage kind."""
    if kind == "sft":
        from distft.stages.sft import run
    elif kind == "pretrain":
        from distft.stages.pretrain import run
    elif kind == "reward":
        from distft.stages.reward import run
    elif kind == "ppo":
        from distft.stages.ppo import run
    elif kind == "dpo":
        from distft.stages.dpo import run
    elif kind == "grpo":
        from distft.stages.grpo import run
    else:
        raise ValueError(f"unknown stage kind {kind!r}")
    return run


__all__ = ["StageContext", "stage_runner"]
