"""`build_deepspeed_config(...) -> dict`: a pure function of the typed config.

Every batch value is explicit (no "auto") and derived from the same
`global_batch_size` and world size as the Trainer's arguments, so the HF
integration's consistency check catches any drift instead of silently
training with another batch. A user JSON (`strategy.deepspeed_config`) is
merged over these defaults, key by key.
"""

from __future__ import annotations

import json
from pathlib import Path

from distft.config.schema import StrategyConfig, TrainConfig


def _offload(device: str, nvme_path: str | None) -> dict | None:
    if device == "none":
        return None
    out = {"device": device, "pin_memory": True}
    if device == "nvme":
        out["nvme_path"] = nvme_path
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def build_deepspeed_config(strategy: StrategyConfig, train: TrainConfig, precision: str, world_size: int) -> dict:
    """`precision` is the resolved training precision: fp32, bf16 or fp16."""
    zero: dict = {"stage": strategy.zero_stage}
    if strategy.zero_stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True)
    if strategy.zero_stage == 3:
        zero.update(
            stage3_param_persistence_threshold=strategy.param_persistence_threshold,
            # The final export must be one consolidated HF model, not per-rank shards.
            stage3_gather_16bit_weights_on_model_save=True,
        )
    for key, device in (("offload_optimizer", strategy.offload_optimizer), ("offload_param", strategy.offload_params)):
        offload = _offload(device, strategy.nvme_path)
        if offload:
            zero[key] = offload
    config = {
        "train_batch_size": train.global_batch_size,
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.grad_accum(world_size),
        "gradient_clipping": train.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,  # the stage prints progress itself
        "wall_clock_breakdown": False,
    }
    if strategy.deepspeed_config:
        config = _merge(config, json.loads(Path(strategy.deepspeed_config).read_text()))
    return config
