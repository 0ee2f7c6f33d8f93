"""A real multi-node Ray cluster on this machine: `distft cluster up | status | down`.

`up` starts a Ray head and N worker raylets, each its own `ray start --block`
process with its own CPUs. The head gets none, so Ray Train workers land on
the worker raylets exactly as they would on separate machines (the same steps,
one `ray start` per host, build a cluster of real machines: cluster/README.md).

Token authentication stays on. `up` reuses the token Ray would read (RAY_AUTH_TOKEN,
else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token) or writes a new one
to that file (mode 600). The state file (`$DISTFT_CACHE/cluster/cluster.json`,
default ~/.cache/distft) records the address, dashboard URL, process ids, the
node ids and the token's *path*, never its value; clients find the token through
it (`use_cluster_auth`), so nobody pastes it anywhere.

`down` stops exactly the processes `up` started, by pid. It never runs `ray stop`,
which kills every Ray process of the user: other clusters and test runs included.

Every Ray process distft starts (this cluster's, and the private cluster of a plain
`distft train`) gets the environment of `worker_environ`: an allowlist, not the user's
whole shell, and listens on the loopback interface only (`loopback_node_ip`).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from distft.launch.errors import ClusterError

DEFAULT_PORT = 6379
DEFAULT_DASHBOARD_PORT = 8265
# `ray start`'s default --min-worker-port/--max-worker-port: every raylet hands these out to its
# workers, so a head or dashboard port inside them passes a bind test now and clashes later.
RAY_WORKER_PORTS = (10002, 19999)

# What the Ray processes distft starts (and so every Ray worker) inherit from the user's shell.
# Anything else, cloud keys and tokens included, stays out; a worker gets a secret only through
# run.forward_env (the object store, launch/train.py). RAY_* is Ray's own configuration
# (RAY_AUTH_TOKEN included: the cluster's processes need it to talk to each other).
WORKER_ENV_ALLOW = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TERM", "TMPDIR",
    "PYTHONPATH", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH",
    "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE",
    "TRANSFORMERS_OFFLINE", "HF_ENDPOINT", "TOKENIZERS_PARALLELISM",
    "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "no_proxy", "all_proxy",
    # Corporate TLS: without them hub downloads in workers fail where the driver's preflight succeeded.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE",
    "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR", "GLOO_SOCKET_IFNAME", "TP_SOCKET_IFNAME",
})
# XDG_: HF's default cache lives under XDG_CACHE_HOME; CUDA_/TORCH_/PYTORCH_/TRITON_: GPU and collective
# settings (CUDA_VISIBLE_DEVICES, PYTORCH_CUDA_ALLOC_CONF, TORCH_NCCL_*, TORCH_DISTRIBUTED_DEBUG).
# OPENBLAS_/MALLOC_/KMP_/GOMP_/ATEN_: numerics and allocator settings some machines need (OPENBLAS_CORETYPE works
# around CPUs that old OpenBLAS builds miscompute on; ATEN_CPU_CAPABILITY picks torch's CPU kernels);
# PYTHON*: interpreter settings (hash seed, warnings).
WORKER_ENV_ALLOW_PREFIXES = ("LC_", "NCCL_", "OMP_", "MKL_", "DISTFT_", "RAY_", "XDG_", "CUDA_", "TORCH_",
                             "PYTORCH_", "TRITON_", "OPENBLAS_", "MALLOC_", "KMP_", "GOMP_", "PYTHON", "ATEN_")


def worker_environ(env: dict[str, str] | None = None) -> dict[str, str]:
    """The allowlisted part of `env` (default os.environ): what Ray's processes are started with."""
    env = os.environ if env is None else env
    return {k: v for k, v in env.items() if k in WORKER_ENV_ALLOW or k.startswith(WORKER_ENV_ALLOW_PREFIXES)}


# Ray 2.60 turns a loopback node IP given to `ray.init` or `ray start --node-ip-address` into the
# machine's outward address, and every gRPC server, agent and metrics port then listens on all
# interfaces. Only with this switch off does it keep 127.0.0.1, and with a loopback node IP it
# binds each of them to loopback. Its name is historic: with it off, `ray start` refuses to start
# a worker node and every client resolves 127.0.0.1 to the outward address, so it suits a private
# cluster only (one node, one client: this process).
LOOPBACK_NODE_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


@contextmanager
def private_ray_environ():
    """For the `ray.init(address="local")` inside: Ray's processes start with `worker_environ` and a
    loopback node IP. This process's own environment is restored afterwards."""
    from unittest import mock  # here, not at the top: `distft --help` imports this module (13 ms of asyncio)

    from ray._private import ray_constants

    switch = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    ray_constants.ENABLE_RAY_CLUSTER = False  # read when ray.init picks the node IP; the env var only at import
    try:
        with mock.patch.dict(os.environ, {**worker_environ(), **LOOPBACK_NODE_ENV}, clear=True):
            yield
    finally:
        if switch is not None:
            ray_constants.ENABLE_RAY_CLUSTER = switch


# Ray's smallest object store is 75 MiB; each raylet otherwise claims 30% of RAM for its own.
MIN_OBJECT_STORE = 100 * 1024**2


def state_dir() -> Path:
    return Path(os.environ.get("DISTFT_CACHE", Path.home() / ".cache" / "distft")).expanduser() / "cluster"


def state_path() -> Path:
    return state_dir() / "cluster.json"


def read_state() -> dict | None:
    path = state_path()
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ClusterError(
            f"cannot read {path} ({e}). Fix: stop leftover Ray processes yourself, then delete it."
        ) from None


def _write_state(state: dict) -> None:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(path)  # atomic: a concurrent reader sees the old or the new file, never half of one


# ---------------------------------------------------------------- token (path only, never the value)


def token_source() -> tuple[str, Path | None]:
    """Where Ray reads the token, in Ray's own order of precedence."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN", None
    if os.environ.get("RAY_AUTH_TOKEN_PATH"):
        return "RAY_AUTH_TOKEN_PATH", Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
    return "~/.ray/auth_token", Path.home() / ".ray" / "auth_token"


def secure_token_file(path: Path | None = None) -> None:
    """Mode 600 for the token file Ray reads (default: where it would look), whoever wrote it: Ray
    writes ~/.ray/auth_token at 644 when it generates the token itself (a private cluster does)."""
    if path is None:
        _, path = token_source()
    try:
        if path is not None and path.is_file() and path.stat().st_mode & 0o077:
            path.chmod(0o600)
    except OSError:
        pass  # not ours to change (another owner, a read-only mount): Ray still reads it


def ensure_token() -> tuple[str, Path | None, bool]:
    """(source, path, generated): reuse the token Ray would read, or write a new one (mode 600)."""
    source, path = token_source()
    if path is None or (path.is_file() and path.read_text().strip()):
        secure_token_file(path)
        return source, path, False
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))  # what `ray get-auth-token --generate` writes: 256 random bits
    path.chmod(0o600)
    return source, path, True


def _local_hosts() -> set[str]:
    import psutil

    hosts = {"localhost", "127.0.0.1", "0.0.0.0", socket.gethostname()}
    for addrs in psutil.net_if_addrs().values():
        hosts.update(a.address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6))
    return hosts


def _is_recorded_cluster(state: dict, address: str | None) -> bool:
    """Whether `address` names the cluster in the state file (same port, on this machine)."""
    if not address or "://" in address:
        return False
    host, _, port = address.rpartition(":")
    return port == str(state.get("port")) and host in _local_hosts()


def resolve_address(address: str | None) -> str | None:
    """`auto`: RAY_ADDRESS if set, else the cluster `distft cluster up` recorded, else Ray's own lookup."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS")
    if env and env != "auto":
        return env
    state = read_state()
    if state and any(_alive(p) for p in state.get("processes", [])):
        return state["address"]
    return address


def use_cluster_auth(address: str | None) -> None:
    """Make this process a token-auth client of the cluster at `address`; call before `ray.init`.

    RAY_AUTH_MODE=token unless the user chose a mode; for the cluster `distft cluster up`
    recorded, RAY_AUTH_TOKEN_PATH too, unless the user already points Ray at a token.
    """
    _use_token(lambda state: _is_recorded_cluster(state, address))


def use_job_server_auth(url: str) -> None:
    """The same for a client of the job server at `url` (the dashboard's HTTP address)."""
    from urllib.parse import urlparse

    def recorded(state: dict) -> bool:
        asked, known = urlparse(url), urlparse(state.get("dashboard_url", ""))
        return asked.port == known.port and asked.hostname in _local_hosts()

    _use_token(recorded)


def _use_token(is_recorded) -> None:
    secure_token_file()
    changed = False
    if "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"
        changed = True
    if not os.environ.get("RAY_AUTH_TOKEN") and not os.environ.get("RAY_AUTH_TOKEN_PATH"):
        state = read_state()
        token_path = state and state.get("token_path")
        # Only an existing file: Ray aborts the process when RAY_AUTH_TOKEN_PATH is unreadable.
        if token_path and is_recorded(state) and Path(token_path).is_file():
            os.environ["RAY_AUTH_TOKEN_PATH"] = token_path
            secure_token_file(Path(token_path))
            changed = True
    if changed:
        _refresh_ray_auth()


def _refresh_ray_auth() -> None:
    # Ray reads RAY_AUTH_MODE into its config when it is imported and caches the token
    # once loaded; a process that imported Ray before the env changed must re-read both
    # (Ray's own `_enable_token_auth` does the same).
    try:
        from ray._raylet import AuthenticationTokenLoader, Config
    except ImportError:
        return
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


# ---------------------------------------------------------------- shared storage rule (Ray-free)


def is_remote_uri(path: str) -> bool:
    """s3://, gs://, hdfs://... are reachable from every node; a plain or file:// path is local disk."""
    scheme, sep, _ = path.partition("://")
    return bool(sep) and scheme.lower() != "file"


def storage_problem(run, run_dir: Path, alive_node_ids: list[str], shared_node_ids: set[str]) -> str | None:
    """Why this run's storage cannot work on this cluster, or None.

    Rank 0 writes checkpoints, metrics and the exported model into the run directory and
    the driver reads the stage summary back from it; Ray Train restores its checkpoint
    copies from `run.storage_path` on whichever node a restarted worker lands. With more
    than one node, all of that must be storage every node sees. The run directory is
    always a local path, so a multi-node run needs `run.shared_storage=true`, unless every
    node is one that `distft cluster up` started on this machine (`shared_node_ids`).
    """
    nodes = len(alive_node_ids)
    if nodes <= 1 or run.shared_storage or (shared_node_ids and set(alive_node_ids) <= set(shared_node_ids)):
        return None
    local = [f"run.output_dir ({run_dir.parent})"]
    if run.storage_path is None:
        local.append(f"run.storage_path (default: {run_dir / 'ray'})")
    elif not is_remote_uri(run.storage_path):
        local.append(f"run.storage_path ({run.storage_path})")
    return (
        f"storage: this cluster has {nodes} nodes, but {' and '.join(local)} {'is' if len(local) == 1 else 'are'} "
        "local disk the other nodes cannot see, and run.shared_storage is false. Fix: put run.output_dir "
        "(and run.storage_path, or use s3://...) on storage every node mounts, e.g. NFS, then set "
        "run.shared_storage=true."
    )


def shared_storage_node_ids() -> set[str]:
    """Nodes started by `distft cluster up`: all on this machine, so every path is shared among them."""
    state = read_state()
    if state and state.get("storage_shared"):
        return set(state.get("node_ids", []))
    return set()


# ---------------------------------------------------------------- processes


def _alive(rec: dict) -> bool:
    """The recorded process still runs (same pid *and* start time: pids get reused)."""
    import psutil

    try:
        p = psutil.Process(rec["pid"])
        return abs(p.create_time() - rec["create_time"]) < 0.01 and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _port_in_use(port: int) -> bool:
    # Binding all interfaces (as Ray's GCS does) fails if anything listens on the port,
    # on 127.0.0.1 or elsewhere; SO_REUSEADDR ignores sockets merely in TIME_WAIT.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return True
    return False


def free_port() -> int:
    # The kernel's ephemeral range (32768+) stays clear of Ray's worker ports (10002-19999).
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _last_line(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    return lines[-1][-300:] if lines else ""


def node_temp_dir(port: int, index: int) -> str:
    """Worker raylet `index`'s Ray temp dir, inside the head's (Ray's default: $RAY_TMPDIR/ray, else /tmp/ray),
    and short: Ray puts Unix sockets under it, and their paths may not exceed 107 bytes."""
    from ray._common.utils import get_default_ray_temp_dir

    return os.path.join(get_default_ray_temp_dir(), f"distft-{port}-node{index}")


def _spawn(role: str, args: list[str], env: dict, logs: Path) -> tuple[dict, subprocess.Popen]:
    import psutil

    log = logs / f"{role}.log"
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--block", "--log-style", "record", *args]
    with open(log, "w") as out:
        # Its own session: Ctrl-C in this terminal does not reach the cluster, and every
        # process Ray starts under it shares one process group that `down` can find.
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    rec = {"role": role, "pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "log": str(log)}
    return rec, proc


def _check_running(procs: dict[str, tuple[dict, subprocess.Popen]]) -> None:
    for role, (rec, proc) in procs.items():
        if proc.poll() is not None:
            raise ClusterError(
                f"the Ray {role} exited during start-up (exit code {proc.returncode}): {_last_line(Path(rec['log']))} "
                f"Fix: read {rec['log']} (a port in use: another --port or --dashboard-port; a busy machine: "
                "a longer --timeout)."
            )


def _connect(address: str) -> None:
    import ray

    use_cluster_auth(address)
    ray.init(address=address, logging_level="warning", log_to_driver=False)


def _wait_for_port(port: int, procs: dict, deadline: float) -> None:
    """The head's GCS port first: `ray.init` on an address nobody serves retries for minutes."""
    while True:
        _check_running(procs)
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.time() > deadline:
                raise ClusterError(
                    f"the Ray head did not open port {port} in time. Fix: a longer --timeout on a busy machine, "
                    f"or read {procs['head'][0]['log']}."
                ) from None
            time.sleep(0.5)


def _wait_for_nodes(expected: int, procs: dict, deadline: float) -> list[str]:
    """Alive node ids once `expected` nodes are alive (this process is connected to the cluster)."""
    import ray

    while True:
        _check_running(procs)
        alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
        if len(alive) >= expected:
            return alive
        if time.time() > deadline:
            raise ClusterError(
                f"only {len(alive)} of {expected} Ray nodes came up in time. Fix: a longer --timeout on a "
                f"busy machine, or read the logs in {state_dir() / 'logs'}."
            )
        time.sleep(0.5)


def _family(recs: list[dict]):
    """The recorded processes and every descendant, found while the tree is intact."""
    import psutil

    found = {}
    for rec in recs:
        if not _alive(rec):
            continue
        try:
            p = psutil.Process(rec["pid"])
            found[p.pid] = p
            for c in p.children(recursive=True):
                found[c.pid] = c
        except psutil.Error:
            pass
    return found


def _group_members(pgids: set[int], since: float):
    """Processes still in the recorded process groups (orphans re-parented to init included)."""
    import psutil

    members = []
    for p in psutil.process_iter(["create_time"]):
        try:
            if os.getpgid(p.pid) in pgids and p.info["create_time"] >= since - 1:
                members.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    return members


def _stop(recs: list[dict], since: float, grace_s: float = 45.0) -> list[int]:
    """SIGTERM each `ray start --block` (it drains and stops what it started), workers before
    the head; SIGKILL whatever of theirs is left after the grace period. Returns the pids stopped."""
    import psutil

    pgids = {r["pid"] for r in recs}  # start_new_session: each one leads its own group
    stopped = []
    for batch in ([r for r in recs if r["role"] != "head"], [r for r in recs if r["role"] == "head"]):
        family = _family(batch)
        stopped += list(family)
        for rec in batch:
            if _alive(rec):
                try:
                    family[rec["pid"]].send_signal(signal.SIGTERM)
                except (KeyError, psutil.Error):
                    pass
        _, left = psutil.wait_procs(list(family.values()), timeout=grace_s)
        for p in left:
            try:
                p.kill()
            except psutil.Error:
                pass
    left = _group_members(pgids, since)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(left, timeout=5)
    return sorted(set(stopped) | {p.pid for p in left})


# ---------------------------------------------------------------- the commands


def up(
    workers: int = 2,
    cpus_per_worker: int | None = None,
    port: int = DEFAULT_PORT,
    dashboard_port: int = DEFAULT_DASHBOARD_PORT,
    timeout_s: float | None = None,
    log=print,
) -> dict:
    """Start a head (0 CPUs) and `workers` raylets on this machine; return once all are alive."""
    import psutil
    import ray

    if workers < 1 or (cpus_per_worker is not None and cpus_per_worker < 1):
        raise ClusterError(
            "--workers and --cpus-per-worker must be at least 1. Fix: e.g. --workers 2 --cpus-per-worker 1."
        )
    state = read_state()
    if state:
        running = [p for p in state.get("processes", []) if _alive(p)]
        if running:
            raise ClusterError(
                f"a distft cluster is already up at {state['address']} ({len(running)} of its "
                f"{len(state['processes'])} processes running; {state_path()}). Fix: use it "
                f"(distft train CONFIG --address {state['address']}), or stop it first: distft cluster down."
            )
        log(f"forgetting the record of a cluster that is no longer running ({state['address']})")
        state_path().unlink()
    low, high = RAY_WORKER_PORTS
    for flag, p in (("--port", port), ("--dashboard-port", dashboard_port)):
        if low <= p <= high:
            raise ClusterError(
                f"{flag} {p} is inside Ray's worker-port range ({low}-{high}), where every raylet hands out "
                f"ports to its workers; nothing was started. Fix: distft cluster up {flag} <a port outside "
                f"{low}-{high}> (defaults: --port {DEFAULT_PORT}, --dashboard-port {DEFAULT_DASHBOARD_PORT})."
            )
        if _port_in_use(p):
            raise ClusterError(
                f"port {p} is already in use (another Ray head?); nothing was started. "
                f"Fix: distft cluster up {flag} <free port>."
            )

    cpus = cpus_per_worker or max(1, (os.cpu_count() or 1) // workers)
    nodes = workers + 1
    object_store = max(MIN_OBJECT_STORE, int(0.3 * psutil.virtual_memory().total / nodes))
    source, token_path, generated = ensure_token()
    # The raylets' environment is every worker's: the allowlist, not this shell (worker_environ).
    env = {**worker_environ(), "RAY_AUTH_MODE": "token"}
    # A job's entrypoint runs `python` from the raylet's PATH. Put this interpreter first, so jobs
    # find distft even when it was started as .venv/bin/distft without activating the venv.
    env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
    # Ray Train's placement-group cleaner asks the State API; pin it to this cluster (see start_private_ray).
    env["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
    # On SIGTERM a node first drains (for Serve traffic) for up to 30 s; after a Train run the
    # head never went idle here, so `down` waited out the whole 30 s for nothing.
    env.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")
    if token_path is not None:
        env["RAY_AUTH_TOKEN_PATH"] = str(token_path)  # every raylet reads the same file
    logs = state_dir() / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    address = f"127.0.0.1:{port}"
    state = {
        "address": address,
        "port": port,
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
        "token_source": source,
        "token_path": str(token_path) if token_path else None,
        "workers": workers,
        "cpus_per_worker": cpus,
        # Every node runs on this machine, so every local path is shared by all of them.
        "storage_shared": True,
        "started_at": time.time(),
        "processes": [],
        "node_ids": [],
        "temp_dirs": [],  # the worker raylets' (the head's is Ray's default)
    }
    # Same options on every raylet: GPUs are not partitioned between raylets yet, so none are
    # claimed (each raylet would otherwise claim every GPU of the machine).
    common = ["--num-gpus", "0", "--object-store-memory", str(object_store), "--disable-usage-stats"]
    procs: dict[str, tuple[dict, subprocess.Popen]] = {}
    deadline = time.time() + (timeout_s or 60 + 20 * workers)
    try:
        head_args = [
            "--head", "--port", str(port), "--num-cpus", "0",
            # The dashboard serves the Jobs API; it stays on the loopback interface.
            "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port),
            # Fixed defaults (10001, 52365) would clash with any other Ray on this machine.
            "--ray-client-server-port", str(free_port()), "--dashboard-agent-listen-port", str(free_port()),
        ]
        # Not LOOPBACK_NODE_ENV here: Ray 2.60 rewrites the address 127.0.0.1 given to `ray start --address`
        # and to every client's `ray.init` into the machine's outward address, so a head that keeps 127.0.0.1
        # could be joined by no raylet and reached by no client (README, "What listens").
        procs["head"] = _spawn("head", head_args + common, env, logs)
        state["processes"].append(procs["head"][0])
        _write_state(state)  # from here on, `distft cluster down` can clean up even if this process dies
        _wait_for_port(port, procs, deadline)
        _connect(address)
        try:
            _wait_for_nodes(1, procs, deadline)
            for i in range(1, workers + 1):
                # Each raylet gets its own temp dir, as on separate hosts. Sharing the head's session
                # directory, every node's runtime-env agent unpacked a job's working_dir into the same
                # place: a second node's agent, not knowing the first had, deleted and re-extracted it
                # under workers whose cwd it was (a submitted job's TrainController then died:
                # "oneMKL FATAL ERROR: Cannot load libtorch_cpu.so"). Own session dirs also give each
                # node its own log monitor, which forwards only that node's worker logs.
                temp_dir = node_temp_dir(port, i)
                state["temp_dirs"].append(temp_dir)
                args = ["--address", address, "--num-cpus", str(cpus), "--temp-dir", temp_dir,
                        "--dashboard-agent-listen-port", str(free_port())]
                procs[f"worker-{i}"] = _spawn(f"worker-{i}", args + common, env, logs)
                state["processes"].append(procs[f"worker-{i}"][0])
                _write_state(state)
                # One at a time: raylets starting together on one machine race for the same free
                # ports ("bind: Address already in use" killed one here).
                state["node_ids"] = _wait_for_nodes(i + 1, procs, deadline)
        finally:
            ray.shutdown()
        _write_state(state)
    except BaseException:
        _stop(state["processes"], state["started_at"], grace_s=10)
        state_path().unlink(missing_ok=True)
        raise

    token = f"{token_path} ({'generated, mode 600' if generated else 'reused'})" if token_path else f"from {source}"
    log(f"distft cluster up: a head (0 CPUs) and {workers} worker raylet(s) with {cpus} CPU(s) each, "
        f"all {nodes} nodes alive")
    log(f"  address    {address}")
    log(f"  dashboard  {state['dashboard_url']}  (Jobs API; token required)")
    log(f"  token      {token}; distft finds it, `ray` commands need RAY_AUTH_MODE=token")
    log("  storage    shared: every node runs on this machine")
    log(f"  state      {state_path()}  (logs in {logs})")
    log(f"next: distft train CONFIG --address {address}   |   distft cluster status   |   distft cluster down")
    return state


def status(log=print) -> int:
    """Print the recorded processes and, if the head answers, every node with its resources.
    Returns 0 when every process and node is alive, 1 otherwise."""
    import ray

    state = read_state()
    if not state:
        raise ClusterError(f"no distft cluster is up (no {state_path()}). Fix: distft cluster up.")
    address = state["address"]
    log(f"cluster    {address}  (dashboard {state['dashboard_url']})")
    log(f"token      {state.get('token_path') or 'from ' + state.get('token_source', '?')}")
    healthy = True
    for rec in state["processes"]:
        ok = _alive(rec)
        healthy &= ok
        log(f"process    {rec['role']:<10} pid {rec['pid']:<8} {'running' if ok else 'NOT RUNNING'}")
    head = state["processes"][0] if state["processes"] else None
    if not head or not _alive(head):
        log("nodes      unknown: the head is not running. Fix: distft cluster down, then distft cluster up.")
        return 1
    _connect(address)
    try:
        nodes = ray.nodes()
        total = ray.cluster_resources()
        free = ray.available_resources()
    finally:
        ray.shutdown()
    recorded = set(state.get("node_ids", []))
    alive_ids = {n["NodeID"] for n in nodes if n["Alive"]}
    for n in sorted(nodes, key=lambda n: ("node:__internal_head__" not in n["Resources"], n["NodeID"])):
        res = n["Resources"]
        role = "head" if "node:__internal_head__" in res else "worker"
        extra = "" if n["NodeID"] in recorded else "  (joined later)"
        log(
            f"node       {n['NodeID'][:12]} {role:<6} {'ALIVE' if n['Alive'] else 'DEAD':<5} "
            f"CPU {res.get('CPU', 0):g}  GPU {res.get('GPU', 0):g}  "
            f"object store {res.get('object_store_memory', 0) / 1024**3:.1f} GiB{extra}"
        )
    missing = recorded - alive_ids
    healthy &= not missing
    log(
        f"resources  CPU {free.get('CPU', 0):g} free of {total.get('CPU', 0):g}, "
        f"{len(alive_ids)} node(s) alive" + (f", {len(missing)} recorded node(s) gone" if missing else "")
    )
    return 0 if healthy else 1


def down(log=print) -> int:
    """Stop every process `up` recorded (by pid), then forget the cluster."""
    state = read_state()
    if not state:
        log(f"no distft cluster is recorded ({state_path()}); nothing to stop")
        return 0
    pids = _stop(state.get("processes", []), state.get("started_at", 0))
    state_path().unlink(missing_ok=True)
    log(f"stopped the cluster at {state['address']}: {len(pids)} process(es)")
    return 0
