"""The process group, created up front so a stage can use collectives before its Trainer exists.

Ray Train creates it before the stage starts; torchrun and our multiprocessing tests
only set RANK/WORLD_SIZE/MASTER_* and leave creation to whoever needs it first. The
held-out score before training all-reduces its counts, so that is the stage itself.
accelerate (inside the Trainer) reuses an existing group.
"""

from __future__ import annotations

import os


class ProcessGroupError(RuntimeError):
    """The ranks could not form their process group in time; the message says where to look."""


def ensure_process_group(world_size: int, use_gpu: bool, deepspeed: bool = False, timeout_s: float = 1800.0) -> None:
    """Join (or create) the group. `timeout_s` bounds the rendezvous and every later collective:
    a rank that never arrives, or hangs, fails the run instead of stalling it."""
    if world_size <= 1:
        return
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        if use_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        except (RuntimeError, TimeoutError) as e:  # torch raises DistStoreError (a RuntimeError) on timeout
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            raise ProcessGroupError(
                f"rank {os.environ.get('RANK', '?')} of {world_size} could not form the {backend} process group at "
                f"{where} within {timeout_s:g} s ({type(e).__name__}: {str(e).splitlines()[0][:200]}). Fix: check that "
                "every worker started and that the nodes reach each other on that port; a slow start may need a "
                "larger run.collective_timeout_s."
            ) from None
    if deepspeed:
        # ZeRO-3's zero.Init runs inside from_pretrained, before the Trainer; DeepSpeed's own
        # comm layer must already wrap the group there, or it partitions for a world of 1.
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)


def leave_process_group() -> None:
    """Tear the group down once every rank is done with it; call at the end of a process that ran stages.

    Left to interpreter exit, gloo's threads can be destroyed while still joinable, and a rank that
    finished all its work dies with "terminate called without an active exception" (SIGABRT; seen in
    a 4-rank FSDP2 run in CI). The barrier keeps rank 0, which hosts the rendezvous store, from
    leaving while another rank still talks to it. Ray Train owns its workers' group and tears it down
    itself, so only the torchrun path (and our spawned test ranks) call this.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
