"""How one stage's output becomes the next stage's input.

A source (`init_from`, `reward.model`, `ppo.critic_from`) is an earlier stage's
name or a model path / hub id; `DistftConfig.init_source` and friends pick the
defaults (the SFT output feeds PPO, DPO and GRPO; the reward stage feeds the
reward and the critic). Here a source becomes a directory `from_pretrained`
reads. A LoRA output is merged into its base once, on rank 0, into
`<stage>/init/`: the next stage trains its own method on top of a plain model,
and under ZeRO-3 or FSDP2 every loader sees ordinary weights.
"""

from __future__ import annotations

import json
from pathlib import Path

from distft.config import DistftConfig
from distft.config.schema import ModelConfig
from distft.distributed.collectives import barrier
from distft.models.loading import final_model_dir, resolve_model_path
from distft.owned import building, publish
from distft.stages.context import StageContext


def source_path(cfg: DistftConfig, run_dir: Path, source: str) -> str:
    """A stage name -> that stage's exported model in this run; anything else -> a path or hub id."""
    if cfg.stage_named(source) is not None:
        final = Path(run_dir) / source / "final"
        if not (final / "config.json").exists() and not (final / "adapter_config.json").exists():
            raise FileNotFoundError(
                f"stage {source!r} has no exported model at {final}: it has not finished in this run. "
                f"Fix: run the whole pipeline (`distft pipeline`), or point the field at a model directory."
            )
        return str(final)
    path = resolve_model_path(source)
    return str(final_model_dir(path)) if Path(path).is_dir() else path


def is_adapter(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def merge_adapter(adapter_dir: str, out_dir: Path, trust_remote_code: bool = False, reward: bool = False) -> None:
    """Base + LoRA adapter -> one full HF model (safetensors) with the adapter's tokenizer.

    `reward`: the adapter belongs to a reward model (a sequence classifier whose head it carries).
    """
    from transformers import AutoTokenizer

    if reward:
        from distft.models.loading import load_reward_for_inference

        merged, _ = load_reward_for_inference(adapter_dir, trust_remote_code)
    else:
        from peft import AutoPeftModelForCausalLM

        merged = AutoPeftModelForCausalLM.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
        merged = merged.merge_and_unload()
    # A fresh, marked name of its own: an interrupted merge's leftover is swept only if distft made it.
    with building(out_dir, "merge", "run.output_dir") as tmp:
        merged.save_pretrained(str(tmp), safe_serialization=True)
        AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code).save_pretrained(str(tmp))
        (tmp / "distft_merged_from.json").write_text(json.dumps({"adapter": adapter_dir}))
        publish(tmp, out_dir)


def plain_model_dir(path: str, stage_dir: Path, ctx: StageContext, model: ModelConfig, name: str = "init",
                    reward: bool = False) -> str:
    """`path` itself, or for a LoRA adapter a merged copy in `<stage_dir>/<name>` (rank 0 writes, all wait)."""
    if not is_adapter(path):
        return path
    out = stage_dir / name
    if ctx.is_main and not (out / "config.json").exists():
        ctx.log(f"merging the LoRA adapter {path} into its base -> {out}")
        merge_adapter(path, out, model.trust_remote_code, reward=reward)
    barrier()
    return str(out)


def stage_model(cfg: DistftConfig, ctx: StageContext) -> ModelConfig:
    """`cfg.model` with `name_or_path` set to where this stage starts (an earlier output, merged if LoRA)."""
    source = cfg.init_source(ctx.stage_index)
    if source == cfg.model.name_or_path and cfg.stage_named(source) is None:
        return cfg.model
    return source_model(cfg, ctx, source, "init", "starts from")


def source_model(cfg: DistftConfig, ctx: StageContext, source: str, name: str, what: str) -> ModelConfig:
    """`cfg.model` pointing at `source` (an earlier stage's output or a model path), a LoRA output merged
    into `<stage>/<name>/`; logged as "[stage] <what> <source>"."""
    stage = cfg.stages[ctx.stage_index]
    path = plain_model_dir(source_path(cfg, ctx.run_dir, source), Path(ctx.run_dir) / stage.label(), ctx, cfg.model,
                           name=name)
    ctx.log(f"[{stage.label()}] {what} {source}" + (f" ({path})" if path != source else ""))
    # A path of this run carries no revision of the original hub model.
    return cfg.model.model_copy(update={"name_or_path": path, "revision": None})
