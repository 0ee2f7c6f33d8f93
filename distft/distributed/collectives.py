"""Cross-rank operations, in one place: barrier, leader-first, broadcast, gather and sum.

Each is a no-op (or returns its input) when there is no process group or one rank, so stages call
them unconditionally. Built on torch.distributed rather than accelerate's PartialState helpers
(`local_main_process_first`, `broadcast_object_list`, `reduce`): those initialise accelerate's
process-wide state on first use, and stages call these before the Trainer configures it (a
one-rank worker drops LOCAL_RANK first, trainer_setup.prepare_worker), and in PPO's loop, which
has no Trainer. NCCL needs its tensors and barriers on the rank's GPU; gloo on the CPU.
"""

from __future__ import annotations

from contextlib import contextmanager


def _group_ready() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if not _group_ready():
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


@contextmanager
def local_leader_first(local_rank: int):
    """The body runs on each node's local rank 0 first, then on the others at once: work that
    fills a node-local cache (tokenization) is done once per node, and the rest read it.
    Every rank must enter it, exactly once per use. A leader that fails still releases the
    others (they then fail on the same input themselves) rather than leave them at the barrier."""
    if local_rank != 0:
        barrier()
        yield
        return
    try:
        yield
    finally:
        barrier()


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (a small picklable object)."""
    if not _group_ready():
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_from_every_rank(value) -> list:
    """Every rank's `value` (a small picklable object), in rank order, on every rank; [value] with one process."""
    if not _group_ready():
        return [value]
    import torch.distributed as dist

    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of every rank's `values` (float64, so counts stay exact), on every rank."""
    if not _group_ready():
        return [float(v) for v in values]
    import torch
    import torch.distributed as dist

    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return t.tolist()
