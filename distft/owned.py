"""distft deletes only what it created.

A directory distft builds (the tiny base, an export, a merged adapter) is built under a unique
hidden name beside its destination (`tempfile.mkdtemp`, so no one else's directory can have that
name) and carries a marker file, `.distft-owned`, from the moment it exists. Cleanup removes a
directory only when it carries the marker; a directory without it is the user's, whatever its
name, and is refused by name instead of replaced.

The marker records the creating process (host and pid), so a build left behind by a killed
process can be told from one still running on this host and swept; one from another host is
left alone (its process may still be running there).

Imports nothing of distft but its errors: every layer may use it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from distft.errors import UserError

MARKER = ".distft-owned"


class ForeignDirectoryError(UserError):
    """A directory distft would have to replace or write into is not one it made; nothing was changed."""


class PathError(UserError):
    """A path distft must write to is the wrong kind of path, or cannot be written; the message names it."""


def mark(path: str | Path, kind: str) -> None:
    """Claim `path` (a directory distft just created) as distft's own."""
    record = {"kind": kind, "host": socket.gethostname(), "pid": os.getpid(), "created": time.time()}
    (Path(path) / MARKER).write_text(json.dumps(record) + "\n")


def unmark(path: str | Path) -> None:
    (Path(path) / MARKER).unlink(missing_ok=True)


def owner(path: str | Path) -> dict | None:
    """The marker's record when `path` is a directory distft made, else None."""
    try:
        record = json.loads((Path(path) / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def is_owned(path: str | Path, kind: str | None = None) -> bool:
    record = owner(path)
    return record is not None and (kind is None or record.get("kind") == kind)


def remove_owned(path: str | Path) -> bool:
    """Delete `path` if distft made it (it carries the marker); False, and nothing deleted, otherwise."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir() or not is_owned(path):
        return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink() and next(path.iterdir(), None) is None


def _alive(record: dict) -> bool:
    if record.get("host") != socket.gethostname():
        return True  # cannot tell from here: treat as running
    try:
        os.kill(int(record.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (OSError, ValueError, TypeError):
        return True
    return True


def sweep_leftovers(final: str | Path) -> list[Path]:
    """Delete builds of `final` that a killed process of this host left behind (marked, process gone)."""
    final = Path(final)
    removed = []
    if not final.parent.is_dir():
        return removed
    for d in final.parent.glob(f".{final.name}.partial-*"):
        record = owner(d)
        if record is not None and d.is_dir() and not d.is_symlink() and not _alive(record):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed


@contextmanager
def building(final: str | Path, kind: str, field: str = "the output directory"):
    """A fresh, marked directory beside `final` to build it in; removed again if the block fails.

    The caller renames it into place (`publish`). An existing `final`, or an earlier `final.partial`
    of anyone, is never touched here.
    """
    final = Path(final)
    ensure_dir(final.parent, field)
    sweep_leftovers(final)
    try:
        tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.partial-"))
        # mkdtemp makes it 0700, and the mode survives the rename: an export must stay as readable as
        # any directory the user makes (a serving container, another user), so the umask decides.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        mark(tmp, kind)
    except OSError as e:
        raise write_error(final.parent, e, field) from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # made by mkdtemp above: ours
        raise


def publish(tmp: Path, final: Path, keep_mark: bool = False) -> Path:
    """Rename a finished build into place; `final` must not exist, or be an empty directory."""
    if not keep_mark:
        unmark(tmp)
    os.rename(tmp, final)
    return final


def ensure_dir(path: str | Path, field: str) -> Path:
    """`mkdir -p path`, or one line naming the path, the field and the fix."""
    path = Path(path)
    refuse_file_in_path(path, field)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise write_error(path, e, field) from None
    return path


def refuse_file_in_path(path: str | Path, field: str) -> None:
    """One line when `path`, or a directory it would be made under, is a file."""
    path = Path(path)
    for p in [*reversed(path.parents), path]:
        if p.exists() and not p.is_dir():
            what = "is a file" if p == path else f"is under {p}, which is a file"
            raise PathError(f"{field}: {path} {what}, not a directory. Fix: point {field} at a directory "
                            "(or move that file away).")


def probe_writable(path: str | Path, field: str) -> None:
    """Refuse a directory (or, when it does not exist yet, its nearest existing ancestor) that cannot
    be written. As root, permissions say nothing (immutable files, read-only mounts still refuse), so
    this really creates and removes an empty directory of its own there."""
    path = Path(path)
    refuse_file_in_path(path, field)
    existing = next(p for p in [path, *path.parents] if p.is_dir())
    try:
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".distft-probe-"))
    except OSError as e:
        raise write_error(existing, e, field) from None


# What a write refused by the system (not a bug of ours) raises as.
WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}

_FIXES = {
    errno.ENOSPC: "free disk space there, or point {field} at another disk",
    errno.EDQUOT: "free space within your quota, or point {field} at another disk",
    errno.EFBIG: "raise the file-size limit (ulimit -f unlimited), or point {field} at a disk without one",
    errno.EROFS: "point {field} at a writable file system",
    errno.EACCES: "point {field} at a directory you can write to, or fix its permissions",
    errno.EPERM: "point {field} at a directory you can write to (it may be immutable: lsattr -d; chattr -i)",
    errno.ENOTDIR: "point {field} at a directory",
    errno.EEXIST: "point {field} at a directory",
}


def write_error(path: str | Path, error: OSError, field: str) -> PathError:
    """An OSError on one of distft's own writes, as one line: the path, the cause, the field, the fix."""
    cause = error.strerror or str(error)
    name = errno.errorcode.get(error.errno or -1, "")
    fix = _FIXES.get(error.errno, "check that {field} is a writable directory").format(field=field)
    return PathError(f"{field}: cannot write {path}: {cause}{f' ({name})' if name else ''}. Fix: {fix}.")
