"""Library output that would drown the stages' own lines: progress bars and known-harmless notices.

Kept apart from reporting.py, which imports transformers: the notices below are logged at import time,
so the filters must be in place before the first transformers import.

Each notice is dropped by its logger (or warning category) and its text, never by level: a warning
the user can act on, from the same library, still shows. A successful `distft train` prints no
WARNING- or ERROR-level line besides these (tests/test_ray_launch.py::test_quickstart_cli_meets_its_target).
"""

from __future__ import annotations

# (logger name, text in the message): notices that say nothing the user can act on.
KNOWN_NOTICES = (
    # bitsandbytes (imported by peft and transformers whenever installed) looks for an optional hub
    # kernel for 4-bit CPU matmuls at import and falls back to its own, even for models that are not
    # quantized; the notice says to install `kernels`, which would fetch code from the hub.
    ("bitsandbytes.backends.cpu.ops", "from kernels-community"),
    # A one-rank worker trains without DDP on purpose (trainer_setup.prepare_worker: nothing to
    # synchronise); the process group Ray Train or torchrun made stays, and transformers notices.
    ("transformers.training_args", "process group is initialized, but parallel_mode != ParallelMode.DISTRIBUTED"),
    # TRL's GKDTrainer (the distill stage) samples with a generation config and return_dict_in_generate
    # side by side, which transformers 5 has deprecated: TRL's call, once per process.
    ("transformers.generation.utils", "Passing `generation_config` together with generation-related"),
)
# Only in the CLI's own process, which computes nothing with DeepSpeed: accelerate imports it when
# saving a model (export, the tiny base) just to look for a DeepSpeed wrapper, and on a machine
# without a GPU DeepSpeed says it settled on the CPU. Workers set DS_ACCELERATOR for CPU runs, so
# there a GPU run that finds no GPU still says so.
DRIVER_NOTICES = (
    ("DeepSpeed", "Setting accelerator to CPU"),
    # Ray 2.60 turns token auth on by default for a new local cluster and says so, with how to opt out
    # (which distft does not want: the README promises token auth). A cluster where it is off still warns.
    ("ray._private.authentication.authentication_token_setup", "Token authentication is enabled for this Ray cluster"),
)
# (message regex, category): warnings about library code calling library code.
KNOWN_WARNINGS = (
    # peft probes `is_gradient_checkpointing` with getattr on every model it wraps; transformers 5 has
    # deprecated that name, so each wrap warns about peft's code, not the user's.
    (r"`is_gradient_checkpointing` is deprecated", FutureWarning),
    # DeepSpeed 0.19.8's ZeRO-3 calls the collectives torch 2.13 renamed, 26 times in a short run.
    (r"`torch\.distributed\.(all_gather_into_tensor|reduce_scatter_tensor)` is deprecated", FutureWarning),
    # The orpo, simpo and distill stages use TRL 1.16's experimental trainers, which warn on import; the
    # README's table of algorithms says which stages those are, where the user chooses one.
    (r"You are importing from 'trl\.experimental'", Warning),
    # `grpo.generation: vllm`: TRL 1.16 names vLLM 0.31 as its newest; distft runs 0.32 (transformers' pin)
    # and replaces the one call of TRL's that 0.32 broke (models/vllm_engine.trl_colocate_sync).
    (r"TRL currently supports vLLM versions from", UserWarning),
    # vLLM 0.32 itself, at import: a torch name it still reads.
    (r"`torch\.distributed\.reduce_op` is deprecated", FutureWarning),
)


class _DropMessages:
    """A logging filter that drops records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        self.parts = parts

    def filter(self, record) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


def _drop(logger_name: str, text: str) -> None:
    import logging

    log = logging.getLogger(logger_name)  # created now if its library is not imported yet; it keeps the filter
    if not any(isinstance(f, _DropMessages) and text in f.parts for f in log.filters):
        log.addFilter(_DropMessages(text))


def quiet_notices(driver: bool = False) -> None:
    """The known-harmless notices, dropped by logger and text. Cheap (imports no library), idempotent;
    call before the libraries are imported. `driver`: the CLI's own process (see DRIVER_NOTICES)."""
    import warnings

    for logger_name, text in KNOWN_NOTICES + (DRIVER_NOTICES if driver else ()):
        _drop(logger_name, text)
    for message, category in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)


def quiet_libraries() -> None:
    """Per-item progress bars from datasets/transformers drown our progress lines in worker logs, and a few
    known-harmless notices repeat in every worker of every run. Called before a stage imports transformers."""
    import logging
    import os

    quiet_notices()
    # vLLM configures its logging when first imported, which TRL's GRPO module does whenever vLLM is
    # installed, even for `generation: hf`: its INFO lines and import-time notices (Triton without a CPU
    # backend, no tcmalloc preloaded) would then fill every GRPO worker's log. Its errors still show.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    import datasets
    import transformers

    # accelerate logs every FSDP shard it saves or loads at INFO ("[RANK 0] Optimizer state saved in ...").
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
