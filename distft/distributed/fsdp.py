"""FSDP2 (`fully_shard`) through the Trainer, on GPU and on CPU.

The Trainer hands FSDP to accelerate, and accelerate applies `fully_shard`
per decoder layer (its FSDP2 path: wrap policy from `_no_split_modules`,
torch distributed checkpoints, rank-0 loading). On GPU that path is taken as
is. On CPU accelerate only knows DDP: a Trainer asked for FSDP there silently
trains unsharded (see NOTES). `fully_shard` itself works over gloo, so on CPU
we switch the accelerator to its FSDP2 path before the model is prepared
(`enable_on_cpu`) instead of writing our own loop. Every summary then measures
the DTensor shards, so a silent fallback to DDP would show.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from distft.config.schema import StrategyConfig

# Read by transformers' from_pretrained and accelerate: only local rank 0 materialises the
# weights, the other ranks receive their shards from rank 0 when `fully_shard` runs (transformers
# 5.19 gives them zero-filled placeholders until then; 5.23 kept those on the meta device).
LOAD_ENV = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}


def build_fsdp_kwargs(strategy: StrategyConfig, world_size: int) -> dict:
    """TrainingArguments kwargs for FSDP2; `parallelism` holds the device-mesh sizes."""
    replicate, shard = strategy.fsdp_mesh(world_size)
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": strategy.reshard_after_forward,
            "cpu_offload": strategy.fsdp_offload,
            "state_dict_type": "SHARDED_STATE_DICT" if strategy.fsdp_state_dict == "sharded" else "FULL_STATE_DICT",
            "cpu_ram_efficient_loading": True,
            # Wrap each block named in the model's `_no_split_modules` (decoder layers).
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        },
        "parallelism": {"dp_replicate_size": replicate, "dp_shard_size": shard},
    }


def enable_on_cpu(trainer) -> bool:
    """Put a CPU Trainer on accelerate's FSDP2 path. Returns True when it switched.

    Must run after the Trainer is built and before `train()`, which is where
    accelerate prepares (shards) the model. A no-op on GPU, where accelerate
    already took the FSDP path, and with one process, where there is nothing to shard.
    """
    import torch.distributed as dist
    from accelerate.state import DistributedType
    from accelerate.utils import FullyShardedDataParallelPlugin

    args = trainer.args
    if not args.fsdp_plugin_args or trainer.is_fsdp_enabled or not (dist.is_initialized() and dist.get_world_size() > 1):
        return False
    state = trainer.accelerator.state
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**args.fsdp_plugin_args)
    trainer.is_fsdp_enabled = True
    return True


def save_full_model(trainer, out_dir: str | Path, is_main: bool) -> None:
    """Consolidate the shards into one HF model (or adapter) on rank 0. Call on every rank.

    `Trainer.save_model` writes nothing for sharded FSDP state dicts; the export must be a
    normal safetensors model that loads without distft.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if is_main:
        trainer.model.save_pretrained(str(out_dir), state_dict=state, safe_serialization=True)


@contextmanager
def load_env(enabled: bool):
    """Set `LOAD_ENV` around `from_pretrained` only, so it never leaks into later stages of the process."""
    if not enabled:
        yield
        return
    saved = {k: os.environ.get(k) for k in LOAD_ENV}
    os.environ.update(LOAD_ENV)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
