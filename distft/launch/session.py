"""The Ray session: which cluster a run uses, starting a private one, and what its logs may show.

With no `run.address` and no RAY_ADDRESS, a private local cluster is started with
`ray.init(address="local")`: a bare `ray.init()` would silently join any cluster that `ray start`
left running on the machine. The dashboard binds to 127.0.0.1.
"""

from __future__ import annotations

import os
import re
from contextlib import contextmanager

from distft.config import DistftConfig
from distft.launch.errors import ClusterError, error_line
from distft.launch.cluster import free_port, private_ray_environ, resolve_address, secure_token_file, use_cluster_auth
from distft.launch.reaper import start_reaper



def cluster_address(cfg: DistftConfig, address: str | None = None) -> str | None:
    return resolve_address(address or cfg.run.address or os.environ.get("RAY_ADDRESS") or None)


def start_private_ray(num_cpus: int, **init_kwargs) -> None:
    """`ray.init(address="local")`, with the State API pinned to this cluster's own dashboard.

    Ray Train's placement-group cleaner (an actor) asks the State API whether the controller is
    alive. Without an address, the State API finds its cluster through /tmp/ray/ray_current_cluster,
    which only `ray start` writes: after any earlier `ray start` on this machine, it names that
    (usually dead) cluster. The cleaner then hung on it until Train gave up stopping it, 12-19 s
    lost at the end of every run ("Failed to stop PlacementGroupCleaner gracefully"). Workers
    inherit the environment the raylet is started with, so setting RAY_API_SERVER_ADDRESS there
    reaches them.

    Ray's processes start with the allowlisted environment only (cluster.worker_environ: a planted
    X_SECRET in this shell never reaches a worker) and a loopback node IP, so every port Ray opens
    listens on 127.0.0.1. This process's own environment is left as it was.
    """
    import ray


    port = free_port()
    init_kwargs.setdefault("logging_level", "warning")
    # Left set in this process, RAY_API_SERVER_ADDRESS would override the address of any job server it
    # (or a child, e.g. `distft submit` from a test) talks to later: it lives in the scrubbed copy only.
    with private_ray_environ():
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{port}"
        # Train's PreemptionWatcher (an actor per worker group) watches for node drains, which a private
        # one-machine cluster never has; Ray core logs an error-level line for every one it creates
        # (constructor arguments in the object store with max_restarts > 0, ray-project/ray#53727).
        os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
        ray.init(address="local", num_cpus=num_cpus, dashboard_host="127.0.0.1", dashboard_port=port,
                 include_dashboard=True, **init_kwargs)
    secure_token_file()  # Ray writes the token it generates at mode 644


def init_ray(cfg: DistftConfig, address: str | None, num_cpus: int | None = None):
    import ray

    if ray.is_initialized():
        return ray
    if address:

        use_cluster_auth(address)  # token auth on; the token of a `distft cluster up` cluster found by path
        try:
            # logging_level: without it Ray prints two INFO lines ("Connecting to existing Ray cluster ...").
            ray.init(address=address, log_to_driver=True, logging_level="warning")
        except Exception as e:  # ConnectionError, auth errors, timeouts: all mean "cannot use it"
            raise ClusterError(
                f"could not connect to the Ray cluster at {address}: {type(e).__name__}: {str(e).splitlines()[0]}. "
                "Fix: check the address (`distft cluster status`, or `ray status` on the head) and that this machine "
                "has the cluster's token (~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN), or drop "
                "--address/run.address/RAY_ADDRESS to use a private local cluster."
            ) from None
    else:
        try:
            start_private_ray(num_cpus or os.cpu_count(), log_to_driver=True)
        except Exception as e:  # its temp dir, a full disk, a daemon that died at start: Ray's error says which
            ray.shutdown()  # whatever part of it did start
            raise ClusterError(
                f"could not start a private Ray cluster: {error_line(e)}. Fix: check that Ray's temp dir "
                "(RAY_TMPDIR, default /tmp/ray) is writable and has free space (its logs say more), or use an "
                "existing cluster (--address)."
            ) from None

        start_reaper(os.getpid())  # if this process is killed outright, its cluster goes too
    filter_streamed_logs()
    return ray


# Lines Ray streams to the driver's console that a user cannot act on. Ray Train's controller logs the
# traceback of its own failed cleanup after a worker died ("Graceful shutdown of backend failed. This
# is expected if one of the workers has crashed."), Ray core logs an error-level line for every
# PreemptionWatcher (ray-project/ray#53727), and the raylet announces each dead worker: the stage's
# one-line error says what happened, and <stage>/error.log has every traceback.
_CONTROLLER_NOISE = re.compile(r"^(Traceback \(most recent call last\):|\s|[\w.]+(Error|Exception)\b|The actor is dead|"
                               r"Graceful shutdown of backend failed)")
_ANY_NOISE = re.compile(r"class name: 'PreemptionWatcher'|A worker died or was killed while executing a task by an "
                        r"unexpected system error")


def _streamed_line_kept(data: dict, line: str) -> bool:
    if _ANY_NOISE.search(line):
        return False
    return not (str(data.get("actor_name") or "").startswith("TrainController") and _CONTROLLER_NOISE.match(line))


def filter_streamed_logs() -> None:
    """Drop the lines above from what Ray prints here (not from Ray's log files); DISTFT_VERBOSE=1 keeps all.

    Ray has no public hook for this: its console printer is a handler of a private dispatcher. With
    another Ray layout nothing is filtered, which costs noise, never a line of the run's own output.
    """
    if os.environ.get("DISTFT_VERBOSE") == "1":
        return
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return

    def filtered(handle):
        def emit(data):
            lines = [ln for ln in data.get("lines", []) if _streamed_line_kept(data, ln)]
            if lines:
                handle({**data, "lines": lines})

        emit.distft_filtered = True
        return emit

    try:
        with dispatcher._lock:
            dispatcher.handlers = [(name, h if getattr(h, "distft_filtered", False) or name != "ray_print_logs"
                                    else filtered(h)) for name, h in dispatcher.handlers]
    except (AttributeError, TypeError, ValueError):  # another layout of that private dispatcher
        return


@contextmanager
def caller_signal_handlers():
    """Keep this process's SIGINT and SIGTERM handlers across `ray.init`.

    Ray's core worker installs absl's failure-signal handler when it connects: a SIGTERM then
    prints a crash dump (`*** SIGTERM received ... PC: @ ...`) and exits 134, so the CLI's own
    handler (stop the workers, keep the checkpoints, print the resume command, exit 143) never runs;
    and `ray.shutdown` uninstalls it by setting SIGTERM to its default, so a second SIGTERM while
    distft stops killed it outright. Ray's own switch keeps the C++ handler out of this process
    only (the cluster's processes keep their crash dumps); `ray.init` also sets a Python SIGTERM
    handler of its own (sys.exit), replaced here by the caller's again.
    """
    import signal
    import threading

    from ray._private import ray_constants

    # Read by the core worker when it starts, from this module: this process only.
    ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except SystemExit as e:
        # A SIGTERM while Ray starts reached Ray's interim handler (sys.exit(15)). Stop what had started,
        # then let the caller's handler take it, as it would any other SIGTERM (exit 143, the resume hint).
        if e.code != signal.SIGTERM or not callable(saved[signal.SIGTERM]):
            raise
        import ray

        ray.shutdown()
        signal.signal(signal.SIGTERM, saved[signal.SIGTERM])
        saved[signal.SIGTERM](signal.SIGTERM, None)
        raise
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)
