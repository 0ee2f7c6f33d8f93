"""Faults as users meet them: spawn the real `distft` command, then check what the user sees.

Every case of the fault tables (tests/test_user_faults*.py) goes through `check_failure`:
- the exit code;
- stderr has at most `max_lines` lines (default 5) and no `Traceback`;
- the key phrase is in stderr;
- every file under the watched directories is byte-identical afterwards (nothing the user had
  was changed or deleted); new files are allowed only where the case says so.

A case must first prove that its fault is in effect (these machines run as root, so chmod alone
injects nothing): see `immutable` (chattr +i) and `fsize_limit` (RLIMIT_FSIZE).
"""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# The console script users run, from the venv the tests run in (CI does not put the venv on PATH).
DISTFT = str(Path(sys.executable).parent / "distft")


def user_env(**extra) -> dict[str, str]:
    """The test process's environment as a user's shell would have it, plus `extra` (str()-ed)."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.update({k: str(v) for k, v in extra.items()})
    return env


def run_distft(*args: str, env: dict | None = None, cwd: Path | str = REPO, timeout: float = 600,
               preexec_fn=None, input: str | None = None) -> subprocess.CompletedProcess:
    """`distft ARGS...` as a subprocess; text stdout/stderr captured."""
    return subprocess.run([DISTFT, *map(str, args)], cwd=cwd, env=env or user_env(), capture_output=True,
                          text=True, timeout=timeout, preexec_fn=preexec_fn, input=input)


def snapshot(*roots: Path | str) -> dict[str, str]:
    """path -> sha256 of every file under `roots` (a file root is itself); symlinks by their target."""
    out: dict[str, str] = {}
    for root in map(Path, roots):
        if not root.exists() and not root.is_symlink():
            continue
        paths = [root] if not root.is_dir() or root.is_symlink() else sorted(root.rglob("*"))
        for p in paths:
            if p.is_symlink():
                out[str(p)] = "link:" + os.readlink(p)
            elif p.is_file():
                out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
            elif p.is_dir():
                out[str(p)] = "dir"
    return out


def assert_unchanged(before: dict[str, str], after: dict[str, str], allow_new: tuple[str, ...] = ()) -> None:
    """Nothing that existed before was changed or removed; new paths only under `allow_new` prefixes."""
    changed = [p for p, h in before.items() if after.get(p) != h]
    assert not changed, f"changed or deleted by distft: {changed[:10]}"
    new = [p for p in after if p not in before and not any(p.startswith(str(a)) for a in allow_new)]
    assert not new, f"created by distft where nothing may be: {new[:10]}"


def check_failure(r: subprocess.CompletedProcess, rc: int, phrase: str | tuple[str, ...],
                  max_lines: int = 5) -> None:
    """The user-visible contract of a failure: exit code, short stderr, the phrase, no traceback."""
    err = r.stderr
    context = f"\n--- exit {r.returncode}; stderr ({len(err.splitlines())} lines):\n{err[-4000:]}\n--- stdout:\n{r.stdout[-1500:]}"
    assert r.returncode == rc, f"exit {r.returncode}, wanted {rc}" + context
    assert "Traceback" not in err, "a traceback reached the user" + context
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) <= max_lines, f"{len(lines)} stderr lines, at most {max_lines}" + context
    for p in (phrase,) if isinstance(phrase, str) else phrase:
        assert p in err, f"missing {p!r}" + context


@contextmanager
def immutable(path: Path):
    """`chattr +i PATH` for the block (root cannot write into it either); proven in effect first."""
    if not shutil.which("chattr"):
        import pytest

        pytest.skip("chattr is not installed")
    subprocess.run(["chattr", "+i", str(path)], check=True)
    try:
        probe = Path(path) / ".distft-probe" if Path(path).is_dir() else Path(path)
        try:
            if Path(path).is_dir():
                probe.write_text("x")
                probe.unlink()
            else:
                with open(probe, "a"):
                    pass
        except OSError:
            pass  # the fault is in effect
        else:
            import pytest

            pytest.skip(f"chattr +i has no effect on {path} (file system without immutable files)")
        yield path
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=False)


def fsize_limit(nbytes: int):
    """A preexec_fn: the child (and everything it starts) may write no file larger than `nbytes`."""

    def limit():
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, nbytes))

    return limit


def non_utf8(path: Path, text: str) -> Path:
    """Write `text` with one real non-UTF-8 byte (Latin-1 'é') in a comment line at the end."""
    path.write_bytes(text.encode() + b"\n# caf\xe9\n")
    return path
