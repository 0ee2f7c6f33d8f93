"""The environment a stage's workers start with: the forwarded keys, the secrets named in
`run.forward_env`, and what distft sets for them (thread pools, the allocator)."""

from __future__ import annotations

import os

from distft.config import DistftConfig



# Workers inherit these so per-process thread pools match the CPUs Ray reserved.
SYNC_UPLOAD_ENV = "DISTFT_SYNC_UPLOAD"
WORKER_ENV_KEYS = ("DISTFT_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR",
                   "DISTFT_SYNC_HASH_MAX_BYTES", SYNC_UPLOAD_ENV,
                   # distft sets these for workers (_worker_env); the submitter's own value wins
                   "MALLOC_MMAP_THRESHOLD_")


def forwarded_env() -> dict[str, str]:
    """The submitter's settings that workers need (caches, offline mode), read where distft was started."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}


def forwarded_secrets(cfg: DistftConfig) -> dict[str, str]:
    """The values of `run.forward_env`, from this environment (preflight has checked they are set)."""
    return {k: os.environ[k] for k in cfg.run.forward_env if k in os.environ}


MALLOC_MMAP_THRESHOLD = 4 * 2**20  # bytes; see _worker_env


def layer_blocks_over_mmap_threshold(cfg: DistftConfig) -> bool:
    """Whether the model's largest weight matrix, in fp32, reaches MALLOC_MMAP_THRESHOLD (unknown: yes)."""
    from distft.distributed.plan import architecture_of
    from distft.models.shapes import largest_matrix

    elements = largest_matrix(architecture_of(cfg, cfg.init_source(0)))
    return elements is None or elements * 4 >= MALLOC_MMAP_THRESHOLD


def _worker_env(cfg: DistftConfig, forwarded: dict[str, str] | None = None) -> dict[str, str]:
    threads = str(cfg.scaling.threads_per_worker())
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        # Train V2 replaces `print` in workers with a tee to the console and a logger. That
        # shows every line twice, and it breaks code that captures stdout to read it back
        # (dill, which datasets uses to hash map functions, then dumps bytecode to the log).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.scaling.use_gpu and layer_blocks_over_mmap_threshold(cfg):
        # CPU workers keep the model states in host RAM, and glibc's adaptive mmap threshold (up to 32 MB)
        # leaves freed layer-sized blocks (gathered ZeRO-3 weights, full gradients before their reduce) in
        # its heap. A fixed 4 MB threshold returns them on free: a 0.44B ZeRO-3 worker peaked at 7.3 GiB
        # instead of 9.8 (benchmarks/plan_accuracy.py). Only for models with such blocks: every block over
        # the threshold is then mmapped and faulted in afresh at each step, which made the tiny base's step
        # under Ray 1.40x the bare Trainer's instead of 1.18x (benchmarks/step.py), and saves nothing when
        # no weight matrix reaches 4 MB. A MALLOC_MMAP_THRESHOLD_ the user exports is forwarded and wins.
        env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    env.update(forwarded_env() if forwarded is None else forwarded)
    return env
