"""`strategy -> Trainer kwargs`: one pure function every Trainer-based stage spreads into its args.

Precision, gradient checkpointing and the strategy's engine (DeepSpeed dict or
FSDP2 config) come from the same typed section, so SFT, reward and DPO stages
cannot drift apart in how they shard.
"""

from __future__ import annotations

from distft.config.schema import StrategyConfig, TrainConfig
from distft.distributed.deepspeed import build_deepspeed_config
from distft.distributed.fsdp import build_fsdp_kwargs


def trainer_strategy_kwargs(strategy: StrategyConfig, train: TrainConfig, model_dtype: str, world_size: int,
                            hidden: int | None = None) -> dict:
    """`hidden`: the model's hidden size, which DeepSpeed's buffers are sized from (None: DeepSpeed's defaults)."""
    precision = strategy.resolved_precision(model_dtype)
    kwargs: dict = {
        "bf16": precision == "bf16",
        "fp16": precision == "fp16",
        "gradient_checkpointing": strategy.gradient_checkpointing,
        "ddp_find_unused_parameters": False,
    }
    if strategy.name == "deepspeed":
        kwargs["deepspeed"] = build_deepspeed_config(strategy, train, precision, world_size, hidden)
    elif strategy.name == "fsdp":
        fsdp = build_fsdp_kwargs(strategy, world_size)
        kwargs["fsdp"], kwargs["fsdp_config"] = fsdp["fsdp"], fsdp["fsdp_config"]
        if fsdp["parallelism"]["dp_replicate_size"] > 1:  # hybrid: a 2-D (replicate, shard) mesh
            from accelerate.parallelism_config import ParallelismConfig

            kwargs["parallelism_config"] = ParallelismConfig(**fsdp["parallelism"])
    return kwargs
