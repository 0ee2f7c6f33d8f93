"""Run directories: claimed atomically, checked before Ray starts, released when a launch fails early.

- The claim is `mkdir` itself: two `distft train` started in the same second with the default
  name (`<config stem>-<YYYYmmdd-HHMMSS>`) cannot both get it; the second takes the next free
  suffix (`-2`, `-3`, ...). An explicit `run.name` that exists is refused when it holds anything,
  and used when it is an empty directory (one the user made for the run).
- `check_run_paths` refuses, before any cluster is taken, what would otherwise fail deep inside
  a launch: `run.output_dir` that is a file or cannot be written (tested by writing: as root,
  permission bits say nothing), and a file-size limit (`ulimit -f`) below what a private Ray cluster maps as one file.
- A launch that fails before its first stage starts releases the claim: the files this
  invocation wrote are deleted, then the directory if this invocation made it and nothing else
  is in it. Nothing else is ever deleted.
"""

from __future__ import annotations

import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from distft.errors import UserError
from distft.owned import PathError, WRITE_ERRNOS, probe_writable, refuse_file_in_path, write_error

FIELD = "run.output_dir"
# What `launch` writes into the run directory before the first stage starts (`start_provenance`).
LAUNCH_FILES = ("provenance.json",)


class RunDirError(UserError):
    """The run directory cannot be claimed (taken, or the wrong kind of path); the message names it."""


@dataclass
class ResumeHint:
    """The command that continues a run, once there is one to continue: printed when it is interrupted.
    The command line makes it (this module is cheap to import); launch/lifecycle.py keeps it current."""

    command: str | None = None


class Claim:
    """A run directory this invocation holds: whether it made the directory, and which files it wrote."""

    def __init__(self, path: Path, created: bool, fresh: bool | None = None, made_parents: tuple[Path, ...] = ()):
        self.path, self.created = path, created
        self.fresh = created if fresh is None else fresh  # held nothing when claimed
        self.made_parents = made_parents  # run.output_dir and the directories above it that the claim made
        self.wrote: list[Path] = []

    def write(self, name: str, writer: Callable[[Path], object]) -> Path:
        """`writer(path)` for the file `name` in the run directory; an OSError becomes one line."""
        path = self.path / name
        self.wrote.append(path)
        try:
            writer(path)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS:
                raise
            raise write_error(path, e, FIELD) from None
        return path

    def write_text(self, name: str, text: str) -> Path:
        return self.write(name, lambda p: p.write_text(text))

    def release(self, extra: tuple[str, ...] = LAUNCH_FILES) -> bool:
        """Undo the claim after a launch that failed before any stage started; True if the directory went.

        Only when the directory holds nothing but the files this invocation wrote (and `extra`, which
        the launch writes on its behalf): those are deleted, then the directory if this invocation
        made it. Anything else there (a stage's files, a log, the user's) keeps it all."""
        if not self.fresh:
            return False
        ours = {p.name for p in self.wrote} | set(extra)
        try:
            present = set(os.listdir(self.path))
        except OSError:
            return False
        if not present <= ours:
            return False
        for name in present:
            try:
                (self.path / name).unlink()
            except OSError:
                return False
        if not self.created:
            return False
        try:
            self.path.rmdir()
        except OSError:
            return False
        for parent in self.made_parents:  # innermost first; one holding anything else stays
            try:
                parent.rmdir()
            except OSError:
                break
        return True

    def release_after(self, error: BaseException, resumable: bool) -> bool:
        """`release` after an error; after an interrupt only when there is nothing to resume yet."""
        if isinstance(error, Exception) or not resumable:
            return self.release()
        return False


def _taken(path: Path) -> RunDirError:
    return RunDirError(f"run directory {path} already exists and is not empty; nothing was changed. "
                       "Fix: choose another run.name=..., or delete it yourself.")


def claim_run_dir(output_dir: str | Path, name: str | None, default_stem: str, reuse: bool = False) -> Claim:
    """Take `output_dir/name` (or a fresh default name) for this invocation; `reuse`: a stable pipeline
    directory that may already hold earlier attempts."""
    parent = Path(output_dir).resolve()
    refuse_file_in_path(parent, FIELD)
    made = tuple(p for p in [parent, *parent.parents] if not p.exists())
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(parent, e, FIELD) from None
    explicit = name is not None
    base = name or f"{default_stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    for n in range(1, 1000):
        path = parent / (base if n == 1 else f"{base}-{n}")
        try:
            path.mkdir()
            return Claim(path, created=True, made_parents=made)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                if explicit or reuse:
                    raise RunDirError(f"run.name: {path} exists and is not a directory; nothing was changed. "
                                      "Fix: choose another run.name=...") from None
                continue
            empty = next(path.iterdir(), None) is None
            if reuse:
                return Claim(path, created=False, fresh=empty)
            if explicit:
                if not empty:
                    raise _taken(path) from None
                return Claim(path, created=False, fresh=True)  # an empty directory made for this run
        except OSError as e:
            raise write_error(parent, e, FIELD) from None
    raise RunDirError(f"no free run name {base}-N under {parent}. Fix: set run.name=..., or clear old runs.")


def check_run_paths(output_dir: str | Path, private_cluster: bool) -> list[str]:
    """Refuse paths and limits that would fail a launch late, before any of it starts; notes for `validate`."""
    probe_writable(Path(output_dir).resolve(), FIELD)
    notes = []
    if private_cluster:
        notes += check_file_size_limit()
    return notes


def check_file_size_limit() -> list[str]:
    """A private cluster's object store is one memory-mapped file (in /dev/shm) of about 30% of memory;
    under a smaller `ulimit -f` its raylet dies at start, and Ray reports a startup timeout 30 s later."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft == resource.RLIM_INFINITY:
        return []
    need = object_store_bytes()
    if soft < need:
        raise PathError(f"the file-size limit (ulimit -f) is {_size(soft)}, but the private Ray cluster's object "
                        f"store is one file of about {_size(need)}, so Ray cannot start. Fix: raise the limit "
                        "(ulimit -f unlimited), or run on an existing cluster (--address).")
    return [f"file-size limit {_size(soft)} (ulimit -f): checkpoints and exports larger than that will fail"]


def object_store_bytes() -> int:
    try:
        from ray._private.utils import get_system_memory, resolve_object_store_memory

        return int(resolve_object_store_memory(get_system_memory()))
    except Exception:  # Ray moved its private helpers: its documented default, 30% of memory
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.3)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"

