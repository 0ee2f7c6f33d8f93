"""Library output that would drown the stages' own lines: progress bars and known-harmless notices.

Kept apart from reporting.py, which imports transformers: the notices below are logged at import time,
so the filters must be in place before the first transformers import.
"""

from __future__ import annotations


class _DropMessages:
    """A logging filter that drops records whose message contains one of `parts`."""

    def __init__(self, *parts: str):
        self.parts = parts

    def filter(self, record) -> bool:
        return not any(part in str(record.msg) for part in self.parts)


def quiet_libraries() -> None:
    """Per-item progress bars from datasets/transformers drown our progress lines in worker logs, and a few
    known-harmless notices repeat in every worker of every run. Called before a stage imports transformers."""
    import logging
    import warnings

    # bitsandbytes (imported with transformers whenever installed) looks for an optional hub kernel for
    # 4-bit CPU matmuls and falls back to its own; the notice says to install `kernels`, which would fetch
    # code from the hub.
    bnb_cpu = logging.getLogger("bitsandbytes.backends.cpu.ops")
    if not any(isinstance(f, _DropMessages) for f in bnb_cpu.filters):
        bnb_cpu.addFilter(_DropMessages("from kernels-community"))

    import datasets
    import transformers

    # accelerate logs every FSDP shard it saves or loads at INFO ("[RANK 0] Optimizer state saved in ...").
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    # peft probes `is_gradient_checkpointing` with getattr on every model it wraps; transformers 5.23 has
    # deprecated that name, so each wrap warns about peft's code, not the user's.
    warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
