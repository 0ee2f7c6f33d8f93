"""`distft submit` and `distft jobs`: runs as Ray Jobs on a cluster's job server, over HTTP with token auth.

What a job carries
------------------
`submit` checks the config here first (the same preflight as `distft train`), then stages a
small working directory: the resolved config, every local file or model directory it names
(rewritten to paths inside the job). Ray zips and uploads it; the job's driver
(distft/job_entrypoint.py) runs `distft train` (one stage) or `distft pipeline`
(several) on the cluster with `--address auto`. Sizes are checked against Ray's package limit before uploading.
Code the config names as `package.module:function` (reward functions, a rollout engine) goes too
when it is imported from under the submitting directory: its top-level module or package is
copied to the package's root, which Ray puts on the job's and every worker's sys.path. An
installed package is expected on the cluster's image instead.

Secrets
-------
`run.forward_env` names variables (HF_TOKEN, cloud keys); their values are read here, at
submit time. They travel in a mode-600 file inside the job's package (which Ray keeps in the
cluster's GCS while the job runs and unpacks on the nodes it uses); the entrypoint reads and
deletes it before anything else runs, and every Ray Train worker deletes the copy unpacked on
its node as it starts. Workers get the values through the object store (launch/train.py), not
through `runtime_env.env_vars`, which Ray shows in job listings, the dashboard and the state
API. So no value is written to the config, the job's metadata, its logs or the run directory.

Where outputs go
----------------
A relative `run.output_dir` is made absolute against the directory `submit` ran in, and the
run is named here, so the printed run directory is where the model lands on the cluster's
nodes: on `distft cluster up`, the same machine; on a real cluster, put it on storage every
node mounts (`run.shared_storage: true`), or set `run.storage_path` to a cloud URI.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from distft.config import DistftConfig, dump_config
from distft.launch.job_package import SECRETS_FILE
from distft.launch.preflight import map_local_paths
from distft.launch.errors import ClusterError

# Ray keeps a job's working directory in the GCS, which refuses packages above this size
# (ray._private.runtime_env.packaging.GCS_STORAGE_MAX_SIZE).
PACKAGE_LIMIT = 512 * 1024**2
TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")


def job_server_url(address: str | None) -> str:
    """--address, else RAY_ADDRESS when it is the job server's http(s) URL, else RAY_API_SERVER_ADDRESS, else
    the job server of the cluster `distft cluster up` started, else Ray's default on this machine."""
    from distft.launch.cluster import read_state

    if address and address != "auto":
        return address if "://" in address else f"http://{address}"
    env = os.environ.get("RAY_ADDRESS", "")
    if env.startswith(("http://", "https://")):
        return env
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    state = read_state()
    if state and state.get("dashboard_url"):
        return state["dashboard_url"]
    return "http://127.0.0.1:8265"


def connect(address: str | None):
    """A JobSubmissionClient for the job server, or ClusterError saying how to reach it."""
    from ray.job_submission import JobSubmissionClient

    from distft.launch.cluster import use_job_server_auth

    url = job_server_url(address)
    use_job_server_auth(url)
    missing = _missing_token_file()
    if missing:  # Ray aborts the whole process on a RAY_AUTH_TOKEN_PATH it cannot read
        raise ClusterError(explain(RuntimeError("couldn't find an authentication token"), url))
    # Ray lets RAY_API_SERVER_ADDRESS override the address a client is given; the URL resolved above
    # (from --address first) is the one meant, so the variable is set aside while the client is made.
    saved = os.environ.pop("RAY_API_SERVER_ADDRESS", None)
    try:
        return JobSubmissionClient(url)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError or AuthenticationError here
        raise ClusterError(explain(e, url)) from None
    finally:
        if saved is not None:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def _missing_token_file() -> str | None:
    """RAY_AUTH_TOKEN_PATH when it names no file (the user's setting, so it is checked)."""
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if path and not os.environ.get("RAY_AUTH_TOKEN") and not Path(path).expanduser().is_file():
        return path
    return None


def _reachable(url: str) -> bool:
    import socket
    from urllib.parse import urlparse

    parsed = urlparse(url)
    try:
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        socket.create_connection((parsed.hostname or "127.0.0.1", port), timeout=3).close()
        return True
    except (OSError, ValueError):
        return False


def explain(error: Exception, url: str) -> str:
    """One line on what went wrong talking to the job server at `url`, and the fix."""
    text = str(error)
    lowered = text.lower()
    if "couldn't find an authentication token" in lowered or "could not find an authentication token" in lowered:
        # Ray looks for the token before it connects: say first whether there is a server at all.
        if not _reachable(url):
            return (f"cannot reach a Ray job server at {url} (and no auth token was found here either). Fix: "
                    "start one (distft cluster up), or pass its dashboard address: --address http://HOST:8265.")
        from distft.launch.cluster import token_source

        where = _missing_token_file() or token_source()[1]
        return (f"the job server at {url} needs the cluster's auth token, and the token file {where} does not exist "
                "(nor is RAY_AUTH_TOKEN set). Fix: export RAY_AUTH_TOKEN_PATH=<the cluster's token file> (distft "
                "cluster up prints it; on another machine, copy it there with mode 600), or RAY_AUTH_TOKEN.")
    # The URL's own digits are no HTTP status: port 44013 once read as a 401.
    status = re.search(r"\b40[13]\b", text.replace(url, "").replace(url.rstrip("/"), ""))
    if "authentication" in lowered or status or "unauthenticated" in lowered:
        where = os.environ.get("RAY_AUTH_TOKEN_PATH") or ("RAY_AUTH_TOKEN" if os.environ.get("RAY_AUTH_TOKEN")
                                                           else "~/.ray/auth_token")
        why = "no token was sent" if "required" in lowered or "missing" in lowered else "the token was refused"
        return (f"the job server at {url} needs the cluster's auth token, and {why} (token from {where}). "
                "Fix: export RAY_AUTH_TOKEN_PATH=<the cluster's token file> (distft cluster up prints it), or "
                "RAY_AUTH_TOKEN; keep RAY_AUTH_MODE=token.")
    if "connect" in lowered or "connection" in lowered or "timed out" in lowered:
        return (f"cannot reach a Ray job server at {url}. Fix: start one (distft cluster up), or pass its "
                "dashboard address: --address http://HOST:8265 (or RAY_ADDRESS=http://HOST:8265).")
    return f"the job server at {url} answered: {text.strip().splitlines()[-1] if text.strip() else type(error).__name__}"


def _call(client, what: str, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the SDK raises RuntimeError with the server's reply
        if args and ("does not exist" in str(e) or "404" in str(e)):
            raise ClusterError(f"no job {args[0]!r} on the job server at {client.get_address()}. "
                               "Fix: distft jobs list.") from None
        raise ClusterError(f"{what}: {explain(e, client.get_address())}") from None


# ---------------------------------------------------------------- staging (Ray-free, unit-tested)


def stage_job(cfg: DistftConfig, cwd: Path, staging: Path, secrets: dict[str, str]) -> tuple[DistftConfig, list]:
    """Fill `staging` with what the job needs; returns (the job's config, [(shipped path, bytes)]).

    Every local file or directory the config names is copied under files/ and the config is
    rewritten to point there (the job runs in its own copy of `staging`). Raises ClusterError when
    the package would pass Ray's limit.
    """
    shipped: list[tuple[str, int]] = []
    copies: dict[str, str] = {}

    def ship(value: str | None, must_exist: bool) -> str | None:
        if not value:
            return value
        source = Path(value).expanduser()
        if not source.is_absolute():
            source = cwd / source
        if not source.exists():
            if Path(value).expanduser().is_absolute():
                return value  # a path on the cluster (a shared volume): the job checks it there
            if must_exist:  # preflight has already refused missing data; a model is a hub id
                raise ClusterError(f"{value}: not found here, so it cannot go with the job.")
            return value
        key = str(source.resolve())
        if key not in copies:
            target = Path("files") / f"{len(copies)}-{source.name}"
            if source.is_dir():
                shutil.copytree(source, staging / target)
            else:
                (staging / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, staging / target)
            copies[key] = str(target)
            shipped.append((value, _size(source)))
        return copies[key]

    from distft.data.loading import looks_local

    job_cfg = map_local_paths(
        cfg,
        lambda v: ship(v, must_exist=True) if v and (looks_local(v) or (cwd / v).exists()) else v,
        lambda v: ship(v, must_exist=False),
    )
    for top in local_modules(cfg, cwd):
        target = staging / top.name
        if top.is_dir():
            shutil.copytree(top, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(top, target)
        shipped.append((str(top.relative_to(cwd.resolve())), _size(target)))
    total = sum(size for _, size in shipped)
    if total > PACKAGE_LIMIT:
        biggest = max(shipped, key=lambda item: item[1])
        raise ClusterError(
            f"the job would carry {total / 1024**2:.0f} MiB of local files (largest: {biggest[0]}, "
            f"{biggest[1] / 1024**2:.0f} MiB); Ray's limit for a job's files is {PACKAGE_LIMIT // 1024**2} MiB. "
            "Fix: put big data or models where the cluster can read them (a hub model or dataset id, or a path "
            "on storage every node mounts) and name that in the config."
        )
    output = Path(cfg.run.output_dir).expanduser()
    job_cfg.run.output_dir = str(output if output.is_absolute() else (cwd / output).resolve())
    job_cfg.run.address = None  # the job's driver runs on the cluster: --address auto
    if "mlflow" in job_cfg.run.report_to:  # the server this machine names ($MLFLOW_TRACKING_URI), for the job too
        from distft.launch.tracking import tracking_uri

        job_cfg.run.mlflow.tracking_uri = tracking_uri(job_cfg)
    dump_config(job_cfg, staging / "config.yaml")
    if secrets:
        fd = os.open(staging / SECRETS_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(secrets, f)
    return job_cfg, shipped


def code_names(cfg: DistftConfig) -> list[str]:
    """The `package.module:function` names the config's stages import (reward functions, rollout engines)."""
    names = []
    for stage in cfg.stages:
        reward = getattr(stage, "reward", None)
        names += [n for n in (reward.functions if reward else {}) if ":" in n]
        generation = getattr(getattr(stage, "ppo", None), "generation", "hf")
        names += [generation] if ":" in generation else []
    return names


def local_modules(cfg: DistftConfig, cwd: Path) -> list[Path]:
    """The top-level modules (a .py file or a package directory) of `code_names` that live under `cwd`:
    looked up in `cwd` itself first (the `distft` command does not put it on sys.path), then on sys.path
    (PYTHONPATH=src, say), and kept only where they are under `cwd` and not an installed package."""
    import importlib.machinery
    import importlib.util
    import sys

    here = cwd.resolve()
    found: dict[str, Path] = {}
    for name in code_names(cfg):
        top = name.partition(":")[0].split(".")[0]
        if top == "distft" or top in found:  # the cluster runs its own distft; a checkout's copy would shadow it
            continue
        try:
            spec = importlib.machinery.PathFinder.find_spec(top, [str(here), *sys.path])
        except (ImportError, ValueError):
            spec = None
        origins = list(spec.submodule_search_locations or []) if spec else []
        if spec and spec.origin and not origins:
            origins = [spec.origin]
        for origin in (Path(o).resolve() for o in origins):
            installed = ".venv" in origin.parts or "site-packages" in origin.parts
            if origin.is_relative_to(here) and not installed:
                found[top] = origin
    return list(found.values())


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------- commands


def submit(cfg: DistftConfig, config_path: str, address: str | None, log=print) -> tuple[str, object, Path]:
    """Submit the (preflighted) config as a job; returns (job id, client, run directory on the cluster)."""
    from distft.launch.worker_env import forwarded_secrets

    client = connect(address)
    cwd = Path.cwd()
    name = cfg.run.name or f"{Path(config_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg = cfg.model_copy(deep=True)
    cfg.run.name = name
    command = "pipeline" if len(cfg.stages) > 1 else "train"
    job_id = f"distft-{name}-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="distft-job-") as tmp:
        staging = Path(tmp)
        job_cfg, shipped = stage_job(cfg, cwd, staging, forwarded_secrets(cfg))
        for path, size in shipped:
            log(f"shipping {path} ({size / 1024**2:.1f} MiB)")
        for key in cfg.run.forward_env:
            log(f"forwarding {key} to the job and its workers (value not shown)")
        _call(client, "submitting the job", lambda: client.submit_job(
            entrypoint=f"python -m distft.job_entrypoint {job_id} {command} config.yaml --address auto",
            submission_id=job_id,
            runtime_env={"working_dir": str(staging)},
            # Never values: Ray lists job metadata to anyone who can reach the job server.
            metadata={"distft_run": name, "distft_config": Path(config_path).name, "distft_command": command},
            entrypoint_num_cpus=0,
        ))
    run_dir = Path(job_cfg.run.output_dir) / name
    return job_id, client, run_dir


def follow(client, job_id: str, log=print) -> str:
    """Print the job's logs as they come until it ends; returns its final status."""
    import asyncio

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
    except Exception as e:  # noqa: BLE001 - a dropped stream: fall back to polling the status
        log(f"[jobs] log stream ended early ({type(e).__name__}); waiting for the job to finish")
    status = _status(client, job_id)
    while status not in TERMINAL:
        time.sleep(2)
        status = _status(client, job_id)
    return status


def _status(client, job_id: str) -> str:
    return str(_call(client, "reading the job's status", client.get_job_status, job_id).value)


def list_jobs(address: str | None, log=print) -> int:
    client = connect(address)
    # Ray lists every driver that connected too (`cluster up`, `cluster status`, `distft train --address`):
    # only what was submitted is a job here.
    jobs = [j for j in _call(client, "listing jobs", client.list_jobs) if _submitted(j)]
    if not jobs:
        log(f"no jobs on {client.get_address()}")
        return 0
    log(f"{'JOB ID':<44} {'STATUS':<10} {'STARTED':<20} RUN")
    for job in sorted(jobs, key=lambda j: j.start_time or 0):
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(job.start_time / 1000)) if job.start_time else "-"
        run = (job.metadata or {}).get("distft_run", job.entrypoint[:40])
        log(f"{job.submission_id or job.job_id:<44} {job.status.value:<10} {started:<20} {run}")
    return 0


def _submitted(job) -> bool:
    kind = getattr(job, "type", None)
    return str(getattr(kind, "value", kind)).upper() == "SUBMISSION" if kind is not None else bool(job.submission_id)


def job_status(job_id: str, address: str | None, log=print) -> int:
    client = connect(address)
    info = _call(client, "reading the job", client.get_job_info, job_id)
    log(f"job      {job_id}")
    log(f"status   {info.status.value}" + (f": {info.message}" if info.message else ""))
    meta = info.metadata or {}
    if meta.get("distft_run"):
        log(f"run      {meta['distft_run']} ({meta.get('distft_command', 'train')} {meta.get('distft_config', '')})")
    if info.start_time:
        end = info.end_time or time.time() * 1000
        log(f"time     {(end - info.start_time) / 1000:.0f}s" + ("" if info.end_time else " so far"))
    return {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 1}.get(info.status.value, 0)


def job_logs(job_id: str, address: str | None, follow_logs: bool, log=print) -> int:
    client = connect(address)
    if follow_logs:
        status = follow(client, job_id, log)
        log(f"[jobs] {job_id} {status}")
        return 0 if status == "SUCCEEDED" else 1
    print(_call(client, "reading the job's logs", client.get_job_logs, job_id), end="", flush=True)
    return 0


def stop_job(job_id: str, address: str | None, log=print, wait_s: float = 60.0) -> int:
    client = connect(address)
    status = _status(client, job_id)
    if status in TERMINAL:
        log(f"{job_id} already {status}; nothing to stop")
        return 0
    _call(client, "stopping the job", client.stop_job, job_id)
    deadline = time.monotonic() + wait_s
    while (status := _status(client, job_id)) not in TERMINAL and time.monotonic() < deadline:
        time.sleep(1)
    log(f"{job_id} {status}" + ("" if status in TERMINAL else f" (still stopping after {wait_s:.0f}s)"))
    return 0 if status in TERMINAL else 1
