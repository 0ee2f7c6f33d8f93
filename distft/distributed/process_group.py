"""The process group, created up front so a stage can use collectives before its Trainer exists.

Ray Train creates it before the stage starts; torchrun and our multiprocessing tests
only set RANK/WORLD_SIZE/MASTER_* and leave creation to whoever needs it first. The
held-out score before training all-reduces its counts, so that is the stage itself.
accelerate (inside the Trainer) reuses an existing group.
"""

from __future__ import annotations

import os


def ensure_process_group(world_size: int, use_gpu: bool, deepspeed: bool = False) -> None:
    if world_size <= 1:
        return
    import torch
    import torch.distributed as dist

    backend = "nccl" if use_gpu else "gloo"
    if not dist.is_initialized():
        if use_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend=backend)
    if deepspeed:
        # ZeRO-3's zero.Init runs inside from_pretrained, before the Trainer; DeepSpeed's own
        # comm layer must already wrap the group there, or it partitions for a world of 1.
        import deepspeed as ds

        ds.init_distributed(dist_backend=backend)
