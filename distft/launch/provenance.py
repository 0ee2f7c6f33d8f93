"""`<run>/provenance.json`: what produced a run, so a result can be traced back to code and stack.

Written when a launch starts (`distft train`, `resume`, `pipeline`) and completed when it ends
with the world size and the Ray nodes the workers ran on. A later launch in the same directory
(a resume, a pipeline rerun) becomes the current record and keeps the earlier ones under
`earlier`, oldest first.

What it never holds: environment variable values (tokens live there), and the values of
command-line overrides whose key looks like a secret. No Ray imports: the record is built from
plain values, and reading it (`distft runs show`) needs no cluster.
"""

from __future__ import annotations

import json
import os
import platform
import re
import socket
import subprocess
import sys
import time
from datetime import datetime
from importlib import metadata
from pathlib import Path

PROVENANCE = "provenance.json"
# By distribution name; read from installed metadata, never imported (deepspeed and bitsandbytes
# take seconds to import and probe for accelerators).
PACKAGES = ("torch", "ray", "transformers", "peft", "trl", "datasets", "accelerate", "deepspeed", "bitsandbytes")
# "tokens" is left alone: max_new_tokens is a setting, not a secret.
SECRET_KEY = re.compile(r"token(?!s)|secret|passw|key|credential", re.IGNORECASE)
URL_PASSWORD = re.compile(r"(://[^/:@\s]+:)[^/@\s]+@")
REDACTED = "<redacted>"
GIT_TIMEOUT_S = 5


def redact_argv(argv: list[str]) -> list[str]:
    """The command line with secret-looking values replaced: `a.b.hf_token=...`, `--api-key ...`,
    `--password=...`, and the password part of any `scheme://user:password@host`."""
    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append(REDACTED)
            hide_next = False
            continue
        key, eq, _ = arg.partition("=")
        if eq and SECRET_KEY.search(key):
            out.append(f"{key}={REDACTED}")
            continue
        if arg.startswith("-") and not eq and SECRET_KEY.search(arg):
            out.append(arg)
            hide_next = True
            continue
        out.append(URL_PASSWORD.sub(rf"\g<1>{REDACTED}@", arg))
    return out


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str | None]:
    """Installed versions by distribution name; None for a package that is not installed."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def git_state(cwd: str | Path) -> dict | None:
    """{"sha", "dirty"} of the git checkout `cwd` is in; None when it is not one, or git is missing or slow.

    Never raises: a run does not depend on git. `dirty` counts untracked files too (new code is a
    change), and is None if `git status` alone failed. `--no-optional-locks`: reading the state
    must not take the index lock from a git command the user is running.
    """

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", "--no-optional-locks", *args], cwd=cwd, capture_output=True, text=True,
                                  timeout=GIT_TIMEOUT_S, check=False)
        except (OSError, subprocess.SubprocessError):
            return None

    head = git("rev-parse", "HEAD")
    if head is None or head.returncode != 0:
        return None
    status = git("status", "--porcelain")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return {"sha": head.stdout.strip(), "dirty": dirty}


def build_provenance(*, argv: list[str], started_at: str, hostname: str, cwd: str, python: str,
                     distft_version: str, versions: dict[str, str | None], git: dict | None) -> dict:
    """The record of one launch as it starts (world size and nodes come with `with_placement`)."""
    return {
        "distft": distft_version,
        "python": python,
        "packages": dict(versions),
        "git": dict(git) if git else None,
        "command": redact_argv(list(argv)),
        "cwd": cwd,
        "hostname": hostname,
        "started_at": started_at,
        "finished_at": None,
        "world_size": None,
        "worker_nodes": [],
    }


def with_placement(record: dict, summaries: list[dict], finished_at: str | None = None) -> dict:
    """`record` with where the stages that ran in this launch ran: the largest world size and every
    Ray node id, in order of first use. Stages skipped as finished earlier ran in an earlier launch."""
    ran = [s for s in summaries if not s.get("skipped")]
    sizes = [s["world_size"] for s in ran if s.get("world_size")]
    nodes = list(dict.fromkeys(n for s in ran for n in s.get("worker_nodes", [])))
    return {**record, "world_size": max(sizes) if sizes else None, "worker_nodes": nodes,
            "finished_at": finished_at or record.get("finished_at")}


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def current_provenance(argv: list[str] | None = None) -> dict:
    """This process's record: sys.argv, the installed stack, and the git state of the working directory."""
    import distft

    cwd = os.getcwd()
    return build_provenance(
        argv=sys.argv if argv is None else argv, started_at=_now(), hostname=socket.gethostname(), cwd=cwd,
        python=platform.python_version(), distft_version=distft.__version__, versions=package_versions(),
        git=git_state(cwd),
    )


def read_provenance(run_dir: Path) -> dict | None:
    try:
        record = json.loads((Path(run_dir) / PROVENANCE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def _write(run_dir: Path, record: dict) -> None:
    path = Path(run_dir) / PROVENANCE
    path.parent.mkdir(parents=True, exist_ok=True)  # `launch` may be handed a run directory not made yet
    tmp = path.with_name(f".{PROVENANCE}.{os.getpid()}.{time.time_ns()}")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)  # a reader never sees half a record


def start_provenance(run_dir: Path, argv: list[str] | None = None) -> dict:
    """Write this launch's record; an earlier launch's record moves under `earlier`."""
    record = current_provenance(argv)
    previous = read_provenance(run_dir)
    if previous is not None:
        record["earlier"] = [*previous.pop("earlier", []), previous]
    _write(run_dir, record)
    return record


def finish_provenance(run_dir: Path, summaries: list[dict]) -> dict | None:
    """Complete the current record with where the stages ran; None if it was never started."""
    record = read_provenance(run_dir)
    if record is None:
        return None
    record = with_placement(record, summaries, finished_at=_now())
    _write(run_dir, record)
    return record
