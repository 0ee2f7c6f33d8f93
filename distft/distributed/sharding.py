"""What is really sharded, measured on the live model and optimizer, never assumed from the config.

Reported in every stage summary, so a run that claims ZeRO-3 shows the
fraction of parameter elements each rank holds (about 1/N when it works).
"""

from __future__ import annotations

from contextlib import contextmanager


def local_part(t):
    """The part of a tensor this rank holds: an FSDP2 DTensor's local shard, or the tensor itself."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def parameter_shard(model) -> dict:
    """Local vs full parameter elements on this rank (ZeRO-3 and FSDP2 partition; otherwise local == full)."""
    local = full = 0
    for p in model.parameters():
        if hasattr(p, "ds_tensor"):
            local += p.ds_tensor.numel()
            full += p.ds_numel
        else:
            local += local_part(p).numel()
            full += p.numel()
    return {"param_elements_local": local, "param_elements_full": full}


def optimizer_shard(engine, optimizer=None) -> dict:
    """Optimizer partition held by this rank, in parameter elements; {} when it is not partitioned.

    DeepSpeed ZeRO-1/2/3: the fp32 master partition of its engine. FSDP2: the Adam
    moments are DTensors shaped like the parameters, so their local shard counts.
    """
    opt = getattr(engine, "optimizer", None)
    groups = getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if groups is None:
        groups = getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if groups is not None:
        return {"optimizer_fp32_elements_local": sum(g.numel() for g in groups)}
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    states = [st.get("exp_avg") for st in getattr(inner, "state", {}).values()]
    if not states or not all(hasattr(t, "to_local") for t in states):
        return {}
    return {"optimizer_fp32_elements_local": sum(local_part(t).numel() for t in states)}


@contextmanager
def gathered(params: list, strategy: str):
    """ZeRO-3: `params` whole on every rank inside the block, read only (a collective: every rank enters);
    under other strategies they are whole already."""
    if strategy == "deepspeed-zero3":
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
        return
    yield


@contextmanager
def full_parameters(model, strategy: str):
    """Every rank holds the whole model inside the block: gathered once, not per generated token.

    Generation runs a different number of forward passes on each rank (answers end at
    different lengths), so per-module gathers inside it would deadlock the collectives.
    """
    if strategy == "deepspeed-zero3":
        with gathered(list(model.parameters()), strategy):
            yield
        return
    from torch.distributed.fsdp import FSDPModule

    sharded = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if strategy != "fsdp" or not sharded:
        yield
        return
    for m in sharded:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in sharded:
            m.reshard()
