"""What is really sharded, measured on the live model and optimizer, never assumed from the config.

Reported in every stage summary, so a run that claims ZeRO-3 shows the
fraction of parameter elements each rank holds (about 1/N when it works).
"""

from __future__ import annotations

from contextlib import contextmanager


def parameter_shard(model) -> dict:
    """Local vs full parameter elements on this rank (ZeRO-3 partitions; otherwise local == full)."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += p.numel()
            full += p.numel()
    return {"param_elements_local": local, "param_elements_full": full}


def optimizer_shard(engine) -> dict:
    """fp32 optimizer partition held by this rank under DeepSpeed ZeRO-1/2/3; {} for other engines."""
    opt = getattr(engine, "optimizer", None)
    groups = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if groups is None:
        groups = getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if groups is None:
        return {}
    return {"optimizer_fp32_elements_local": sum(g.numel() for g in groups)}


@contextmanager
def full_parameters(model, zero3: bool):
    """Every rank holds the whole model inside the block (ZeRO-3 gathers once, not per token)."""
    if not zero3:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        yield
