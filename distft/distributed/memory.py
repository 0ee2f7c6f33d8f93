"""Per-rank memory: model-state bytes read from the live shards, and process RSS.

The ZeRO paper splits a rank's "model states" into parameters, gradients and
optimizer states. `model_state_bytes` reads each from the objects that hold it
right now (DeepSpeed partitions, FSDP2 local shards, `optimizer.state`), never
from the config, and counts every storage once: ZeRO-1/2 parameters are views
into one flat buffer, tied weights share a tensor, and ZeRO-3's fp32 "master"
partition is the parameter partition itself in fp32 training, so summing
`numel()` per tensor would double count. A storage is counted whole, padding
included, because that is what the process holds.

`expected_model_state_bytes` is the paper's formula for comparison. Pure
functions of objects passed in; no Ray, no process group.
"""

from __future__ import annotations

import re
from pathlib import Path

from distft.distributed.sharding import local_part

# Adam keeps two moments per parameter; the paper's fp32 formula is params 4, grads 4, Adam 8 bytes per
# parameter. Mixed precision adds a 4-byte fp32 master copy to the optimizer side (the paper's K = 12).
ADAM_STATE_BYTES_PER_PARAM = 8


def _storages(tensors) -> dict[int, int]:
    """{storage address: bytes} for real (non-meta, non-empty) tensors, each storage once."""
    out: dict[int, int] = {}
    for t in tensors:
        if t is None:
            continue
        t = local_part(t)
        if t.device.type == "meta" or t.numel() == 0:
            continue
        storage = t.untyped_storage()
        out[storage.data_ptr()] = storage.nbytes()
    return out


def _tensors(obj):
    """Tensors inside DeepSpeed's gradient bookkeeping: a tensor, a list of them, a dict of lists, or None."""
    import torch

    if obj is None:
        return
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _tensors(value)
    elif isinstance(obj, (list, tuple)):
        for value in obj:
            yield from _tensors(value)


def optimizer_chain(optimizer) -> list:
    """Wrappers down to the torch optimizer: accelerate's AcceleratedOptimizer -> DeepSpeed ZeRO -> torch AdamW."""
    chain = []
    while optimizer is not None and all(optimizer is not seen for seen in chain):
        chain.append(optimizer)
        optimizer = getattr(optimizer, "optimizer", None)
    return chain


def _zero_optimizer(chain):
    for opt in chain:
        if hasattr(opt, "single_partition_of_fp32_groups") or hasattr(opt, "fp32_partitioned_groups_flat"):
            return opt
    return None


def _torch_optimizer(chain):
    import torch

    found = [opt for opt in chain if isinstance(opt, torch.optim.Optimizer)]
    return found[-1] if found else None


def _zero_grad_buffers(zero) -> list:
    """The gradient partitions a DeepSpeed ZeRO optimizer holds between backward and step.

    ZeRO-1/2 (stage_1_and_2.py): `averaged_gradients` (views or copies of the reduced partition),
    `grads_in_partition` (ZeRO-2's contiguous partition buffer). ZeRO-3 (stage3.py):
    `grad_partitions_flat_buffer`, the fp32 partition every gradient is reduced into.
    Communication buckets (ipg buffers) are not model states and are left out.
    """
    out = list(_tensors(getattr(zero, "averaged_gradients", None)))
    for name in ("grads_in_partition", "grad_partitions_flat_buffer"):
        out += list(_tensors(getattr(zero, name, None)))
    return out


def model_state_bytes(model, optimizer) -> dict:
    """Bytes of parameters, gradients, optimizer state and master copy this rank holds now.

    `model` is the HF module (DeepSpeed ZeRO-3 parameters carry `ds_tensor`, FSDP2 ones are
    DTensors); `optimizer` is whatever the Trainer holds (wrappers are followed down).
    Measure between backward and the optimizer step, where gradients exist; after step 1,
    Adam's moments exist too. `master` is the optimizer's own copy of the weights when it
    is not the parameters' storage (DeepSpeed ZeRO-1/2 clone an fp32 partition even in fp32).
    """
    params = list(model.parameters())
    chain = optimizer_chain(optimizer)
    zero, torch_opt = _zero_optimizer(chain), _torch_optimizer(chain)

    param_tensors = []
    for p in params:
        param_tensors.append(p.data)  # ZeRO-3: an empty placeholder outside forward, unless persistent
        if hasattr(p, "ds_tensor"):
            param_tensors.append(p.ds_tensor)
    param_st = _storages(param_tensors)

    opt_params = [p for group in torch_opt.param_groups for p in group["params"]] if torch_opt else []
    master_st = {k: v for k, v in _storages(opt_params).items() if k not in param_st}

    grad_tensors = [p.grad for p in params] + [getattr(p, "grad_accum", None) for p in params]
    grad_tensors += [p.grad for p in opt_params]
    if zero is not None:
        grad_tensors += _zero_grad_buffers(zero)
    grad_st = {k: v for k, v in _storages(grad_tensors).items() if k not in param_st and k not in master_st}

    state_tensors = []
    if torch_opt is not None:
        for state in torch_opt.state.values():
            state_tensors += [v for v in state.values() if hasattr(v, "untyped_storage") or hasattr(v, "to_local")]
    state_st = {k: v for k, v in _storages(state_tensors).items() if k not in param_st}

    out = {
        "params": sum(param_st.values()),
        "grads": sum(grad_st.values()),
        "optimizer": sum(state_st.values()),
        "master": sum(master_st.values()),
    }
    out["total"] = sum(out.values())
    return out


def touch_local_parameters(model) -> None:
    """Write every parameter element this rank holds, in place and unchanged (x *= 1).

    transformers maps safetensors checkpoints lazily (copy-on-write): right after
    `from_pretrained` most weights are not resident, so RSS under-counts a load until
    the first optimizer step writes them. Touching makes loads comparable.
    """
    import torch

    with torch.no_grad():
        for p in model.parameters():
            for t in (p.data, getattr(p, "ds_tensor", None)):
                if t is not None:
                    t = local_part(t)
                    if t.device.type != "meta" and t.numel():
                        t.mul_(1)


def full_param_count(model) -> int:
    """Ψ: the model's logical parameter count, whatever the sharding (ZeRO-3 ds_numel, DTensor global numel)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def expected_model_state_bytes(psi: int, world_size: int, zero_stage: int, bytes_per_param: int = 4,
                               master_bytes: int = 0) -> dict:
    """The ZeRO paper's per-rank model states for Adam: params, grads, optimizer over N by stage.

    Stage 0 is plain data parallelism (DDP); 1 partitions the optimizer states, 2 also the
    gradients, 3 also the parameters. FSDP2 full sharding is stage 3. `master_bytes` per
    parameter (4 for 16-bit training) is a partitioned fp32 copy counted with the optimizer.
    """
    n = world_size
    params = bytes_per_param * psi / (n if zero_stage >= 3 else 1)
    grads = bytes_per_param * psi / (n if zero_stage >= 2 else 1)
    optimizer = ADAM_STATE_BYTES_PER_PARAM * psi / (n if zero_stage >= 1 else 1)
    master = master_bytes * psi / (n if zero_stage >= 1 else 1)
    return {"params": params, "grads": grads, "optimizer": optimizer, "master": master,
            "total": params + grads + optimizer + master}


def rss_bytes() -> int:
    """Resident set size of this process now."""
    import psutil

    return psutil.Process().memory_info().rss


def trim_allocator() -> bool:
    """Hand glibc's free heap pages back to the OS (malloc_trim), so RSS shows memory in use.

    Freed tensors below glibc's (adaptive) mmap threshold stay in its heap; after a load that
    gathers and frees full-size layers, that slack can be as large as the shards. False
    where there is no glibc.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0)) if name else False
    except (OSError, AttributeError):
        return False


def live_tensor_bytes() -> int:
    """Bytes of every CPU tensor storage reachable from Python, each storage once (a diagnostic)."""
    import gc

    import torch

    tensors = []
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                tensors.append(obj)
        except Exception:  # objects whose isinstance check fails (lazy proxies)
            continue
    return sum(_storages(tensors).values())


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS; False where Linux refuses."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """The kernel's peak RSS of this process since start or the last `reset_peak_rss`.

    VmHWM on Linux, which the kernel updates itself, so a spike allocated and freed between two
    reads is still counted (no sampling thread needed). Off Linux, getrusage's ru_maxrss
    (kilobytes on most systems, bytes on macOS), which `reset_peak_rss` cannot reset. None if neither.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    m = re.search(r"VmHWM:\s+(\d+) kB", status)
    if m:
        return int(m.group(1)) * 1024
    try:
        import resource
        import sys

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    except (ImportError, OSError):
        return None
    return maxrss if sys.platform == "darwin" else maxrss * 1024
