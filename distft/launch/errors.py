"""The launcher's errors and how a worker's failure is told to the user.

`ClusterError` (a cluster that cannot be reached or cannot host the request) and `StageError`
(a stage that failed in a worker) are the launch layer's kinds of `distft.errors`' hierarchy;
`stage_failed` turns whatever Ray raised into one line and a log file with the tracebacks.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from distft.errors import StageFailed, UserError



class ClusterError(UserError, RuntimeError):
    """The Ray cluster cannot be reached or cannot host the request; the message says how to fix it."""


class StageError(StageFailed):
    """A stage's workers failed; the message names the rank and the cause, `log_path` holds the tracebacks."""


def stage_failed(label: str, error: BaseException, log_path: Path | None = None) -> StageError:
    """Ray Train's error, reduced to what failed where: the first failed rank's own message.

    Ray 2.60 raises it from `TorchTrainer.fit()` with every rank's traceback inside (60-160 lines);
    those go to `log_path` (appended: a resumed run keeps its earlier failures), not to the terminal.
    """
    failures = {rank: getattr(c, "cause", None) or c  # a RayTaskError wraps the worker's exception
                for rank, c in (getattr(error, "worker_failures", None) or {}).items()}
    if failures:
        # A rank whose process died (killed, or by Ray's memory monitor) is the cause; the others then
        # fail their collectives with "Connection reset by peer", which says nothing of why.
        rank = min(failures, key=lambda r: (not _process_died(failures[r]), r))
        cause = failures[rank]
        where = f" on rank {rank}" if len(failures) < 2 else f" on rank {rank} (and {len(failures) - 1} more)"
    else:
        cause, where = getattr(error, "controller_failure", None) or error, ""
    line = describe_cause(cause)
    hint = STARTUP_HINT if "WorkerGroupStartup" in f"{type(cause).__name__} {line}" else ""
    written = _write_error_log(log_path, label, error) if log_path is not None else None
    return StageError(f"stage {label} failed{where}: {line}{hint}", log_path=written)


_DIED = re.compile(r"ActorDiedError|actor died|worker process has died|process .* (was )?killed", re.I)


def _oom_killed(cause: BaseException) -> bool:
    text = str(cause)
    return "running low on memory" in text or "OutOfMemoryError" in f"{type(cause).__name__} {text[:300]}"


def _process_died(cause: BaseException) -> bool:
    return _oom_killed(cause) or bool(_DIED.search(str(cause)))


def describe_cause(cause: BaseException) -> str:
    """One line for what ended a worker: its own error, or why Ray ended its process."""
    text = str(cause)
    if _oom_killed(cause):
        # Ray's memory monitor kills the newest worker when the node passes its threshold (95% by default).
        # Ray 2.60: "... was 21.9GB used / 23.4GB limit (0.95)"; earlier: "... was running was 21.9GB / 23.4GB (0.95)".
        figures = re.search(r"Memory on the node \(IP: [^)]*\).*? was (?:running was )?([\d.]+) ?GB(?: used)? / "
                            r"([\d.]+) ?GB(?: limit)? \(([\d.]+)\)", text)
        used = f" (the node used {figures[1]} of {figures[2]} GB, {float(figures[3]):.0%})" if figures else ""
        return (f"the worker was killed by Ray's memory monitor: its node ran low on memory{used}. Fix: size the run "
                "with `distft plan CONFIG` and give each worker more memory (fewer workers per node, a smaller "
                "train.micro_batch_size or model.max_seq_len, or a sharded strategy).")
    if _DIED.search(text):
        exit_detail = re.search(r"Worker exit detail: ([^.]*\.)", text)
        detail = f" ({exit_detail[1].strip()})" if exit_detail else ""
        return (f"the worker process died unexpectedly{detail}: killed from outside (SIGKILL: the OOM killer, "
                "a preempted node, `kill -9`) or crashed. Fix: check the node's memory (`distft plan CONFIG`, dmesg); "
                "run.max_failures=N lets Ray Train restart the workers from the latest checkpoint.")
    return error_line(cause)


def _write_error_log(path: Path, label: str, error: BaseException) -> str | None:
    """Every rank's traceback, as Ray gave it, plus the driver's own. Where the run directory cannot take it
    (the full disk that may be the failure itself), the system's temp dir does; None if neither can."""
    import tempfile
    import traceback

    text = [f"=== {time.strftime('%Y-%m-%dT%H:%M:%S%z')} stage {label} failed\n",
            f"{type(error).__name__}: {error}\n\n"]
    for rank, cause in sorted((getattr(error, "worker_failures", None) or {}).items()):
        text.append(f"--- rank {rank}: {type(cause).__name__}\n{cause}\n\n")  # a worker's traceback is in its text
    text += [*traceback.format_exception(error), "\n"]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            f.write("".join(text))
        return str(path)
    except OSError:
        pass
    try:
        fd, fallback = tempfile.mkstemp(prefix=f"distft-{label}-error-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            f.write("".join(text))
        return fallback
    except OSError:
        return None


STARTUP_HINT = (" Fix: check that the cluster has room for every worker (distft cluster status, ray status), or "
                "raise run.worker_start_timeout_s when workers start slowly (image pulls, large imports).")


def error_line(error) -> str:
    """The innermost `SomeError: message` of a (Ray-wrapped) exception, on one line."""
    text = str(error)
    lines = [ln.strip() for ln in text.splitlines() if re.match(r"^\s*[\w.]*(Error|Exception)\b.*:", ln)]
    if lines:
        return lines[-1][:600]
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(error).__name__}: {first}"[:600]
