"""Run stages on Ray Train. This package is the only one that imports Ray.

With no `run.address` and no RAY_ADDRESS, a private local cluster is started
with `ray.init(address="local")`: a bare `ray.init()` would silently join any
cluster that `ray start` left running on the machine. The dashboard binds to
127.0.0.1.
"""

from __future__ import annotations

import json
import os
import re
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

from distft.config import DistftConfig
from distft.errors import DistftError, StageFailed, UserError

# Workers inherit these so per-process thread pools match the CPUs Ray reserved.
SYNC_UPLOAD_ENV = "DISTFT_SYNC_UPLOAD"
WORKER_ENV_KEYS = ("DISTFT_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "TORCH_EXTENSIONS_DIR", "DS_ACCELERATOR",
                   "DISTFT_SYNC_HASH_MAX_BYTES", SYNC_UPLOAD_ENV,
                   # distft sets these for workers (_worker_env); the submitter's own value wins
                   "MALLOC_MMAP_THRESHOLD_")


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


def cluster_address(cfg: DistftConfig, address: str | None = None) -> str | None:
    from distft.launch.cluster import resolve_address

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

    from distft.launch.cluster import free_port, private_ray_environ, secure_token_file

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
        from distft.launch.cluster import use_cluster_auth

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
        from distft.launch.reaper import start_reaper

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


def place_workers(free: list[dict], per: dict, workers: int, strategy: str) -> bool:
    """Take `workers` bundles of `per` from the nodes' `free` resources (in place), as the worker group's
    placement group would under `strategy`; False, with `free` untouched, when they do not fit.

    A bundle is whole on one node. PACK and SPREAD are preferences (Ray falls back to any node),
    so any node that fits will do; STRICT_PACK needs one node for them all and STRICT_SPREAD a
    different node for each.
    """
    need = {k: v for k, v in per.items() if v > 0}

    def fits(node: dict, times: int = 1) -> bool:
        return all(node.get(k, 0) + 1e-9 >= v * times for k, v in need.items())

    def take(node: dict, times: int = 1) -> None:
        for k, v in need.items():
            node[k] = node.get(k, 0) - v * times

    # Fullest node first that still fits: packing leaves the roomiest nodes for later groups.
    order = sorted(range(len(free)), key=lambda i: free[i].get("CPU", 0))
    if strategy == "STRICT_PACK":
        node = next((free[i] for i in order if fits(free[i], workers)), None)
        if node is None:
            return False
        take(node, workers)
        return True
    trial = [dict(n) for n in free]
    used: set[int] = set()
    for _ in range(workers):
        i = next((i for i in order if fits(trial[i]) and not (strategy == "STRICT_SPREAD" and i in used)), None)
        if i is None:
            return False
        take(trial[i])
        used.add(i)
    free[:] = trial
    return True


def check_cluster_resources(cfg: DistftConfig) -> None:
    """On an existing cluster, refuse requests it can never satisfy instead of waiting forever."""
    import ray

    total = ray.cluster_resources()
    s = cfg.scaling
    workers = s.fewest_workers()  # an elastic run can start with its minimum
    for key, per in s.resources_per_worker().items():
        need = per * workers
        have = total.get(key, 0)
        if need > have:
            raise ClusterError(
                f"scaling asks for {need:g} {key} ({workers} workers x {per:g}), but the cluster has {have:g}. "
                "Fix: fewer scaling.num_workers, smaller per-worker resources, or add nodes."
            )
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    if not place_workers([dict(n) for n in nodes], s.resources_per_worker(), workers, s.placement_strategy):
        raise ClusterError(placement_problem(cfg, workers, nodes))
    from distft.launch.streaming import spare_cpu_problem

    problem = spare_cpu_problem(cfg, total.get("CPU", 0))
    if problem:
        raise ClusterError(problem)


def placement_problem(cfg: DistftConfig, workers: int, nodes: list[dict]) -> str:
    """Why `workers` workers fit the cluster's totals but not its nodes, and the fix."""
    s = cfg.scaling
    per = {k: v for k, v in s.resources_per_worker().items() if v > 0}
    field = {"CPU": "scaling.cpus_per_worker", "GPU": "scaling.gpus_per_worker"}
    largest = {k: max((n.get(k, 0) for n in nodes), default=0) for k in per}
    each = ", ".join(f"{v:g} {k}" for k, v in per.items())
    too_big = [k for k, v in per.items() if v > largest[k] + 1e-9]
    if too_big:
        k = too_big[0]
        return (f"a worker needs {per[k]:g} {k} and the largest node has {largest[k]:g} (a worker cannot span "
                f"nodes). Fix: {field.get(k, 'scaling.resources_per_worker')}={largest[k]:g} or less"
                + (" (e.g. 0.5, with scaling.torch_threads=1)" if k == "CPU" else "") + ", or larger nodes.")
    if s.placement_strategy == "STRICT_PACK":
        return (f"scaling.placement_strategy=STRICT_PACK puts all {workers} workers ({each} each) on one node, and "
                f"no node holds them all. Fix: scaling.placement_strategy=PACK (workers may then span nodes), "
                "fewer scaling.num_workers, or a larger node.")
    if s.placement_strategy == "STRICT_SPREAD":
        hosts = sum(place_workers([dict(n)], per, 1, "PACK") for n in nodes)
        return (f"scaling.placement_strategy=STRICT_SPREAD puts each of the {workers} workers ({each} each) on its "
                f"own node, and only {hosts} of the cluster's {len(nodes)} nodes can host one. Fix: "
                "scaling.placement_strategy=SPREAD (a preference, not a rule), fewer scaling.num_workers, "
                "or more nodes.")
    free = ", ".join("/".join(f"{n.get(k, 0):g}" for k in per) for n in nodes[:8]) + (", ..." if len(nodes) > 8 else "")
    return (f"{workers} workers ({each} each) fit the cluster's totals but not its nodes together: a worker cannot "
            f"span nodes, and the nodes have {free} {'/'.join(per)}. Fix: fewer scaling.num_workers, or smaller "
            f"per-worker resources that divide the nodes evenly.")


def check_storage(cfg: DistftConfig, run_dir: Path) -> None:
    """On a cluster of several nodes, refuse run storage that only one node can see."""
    import ray

    from distft.launch.cluster import shared_storage_node_ids, storage_problem

    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    problem = storage_problem(cfg.run, run_dir, alive, shared_storage_node_ids())
    if problem:
        raise ClusterError(problem)


def forwarded_env() -> dict[str, str]:
    """The submitter's settings that workers need (caches, offline mode), read where distft was started."""
    return {k: os.environ[k] for k in WORKER_ENV_KEYS if k in os.environ}


def forwarded_secrets(cfg: DistftConfig) -> dict[str, str]:
    """The values of `run.forward_env`, from this environment (preflight has checked they are set)."""
    return {k: os.environ[k] for k in cfg.run.forward_env if k in os.environ}


MALLOC_MMAP_THRESHOLD = 4 * 2**20  # bytes; see _worker_env


def layer_blocks_over_mmap_threshold(cfg: DistftConfig) -> bool:
    """Whether the model's largest weight matrix, in fp32, reaches MALLOC_MMAP_THRESHOLD (unknown: yes)."""
    from distft.distributed.plan import architecture_of
    from distft.models.shapes import largest_matrix

    elements = largest_matrix(architecture_of(cfg, cfg.init_source(0)))
    return elements is None or elements * 4 >= MALLOC_MMAP_THRESHOLD


def _worker_env(cfg: DistftConfig, forwarded: dict[str, str] | None = None) -> dict[str, str]:
    threads = str(cfg.scaling.threads_per_worker())
    env = {
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "TOKENIZERS_PARALLELISM": "false",
        # Train V2 replaces `print` in workers with a tee to the console and a logger. That
        # shows every line twice, and it breaks code that captures stdout to read it back
        # (dill, which datasets uses to hash map functions, then dumps bytecode to the log).
        "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    }
    if not cfg.scaling.use_gpu and layer_blocks_over_mmap_threshold(cfg):
        # CPU workers keep the model states in host RAM, and glibc's adaptive mmap threshold (up to 32 MB)
        # leaves freed layer-sized blocks (gathered ZeRO-3 weights, full gradients before their reduce) in
        # its heap. A fixed 4 MB threshold returns them on free: a 0.44B ZeRO-3 worker peaked at 7.3 GiB
        # instead of 9.8 (benchmarks/plan_accuracy.py). Only for models with such blocks: every block over
        # the threshold is then mmapped and faulted in afresh at each step, which made the tiny base's step
        # under Ray 1.40x the bare Trainer's instead of 1.18x (benchmarks/step.py), and saves nothing when
        # no weight matrix reaches 4 MB. A MALLOC_MMAP_THRESHOLD_ the user exports is forwarded and wins.
        env["MALLOC_MMAP_THRESHOLD_"] = str(MALLOC_MMAP_THRESHOLD)
    env.update(forwarded_env() if forwarded is None else forwarded)
    return env


def ray_storage_path(cfg: DistftConfig, run_dir: Path) -> str:
    """Ray Train's checkpoint copies: <run.storage_path>/<run name>, else <run dir>/ray."""
    from distft.launch.cluster import is_remote_uri

    run = cfg.run
    if not run.storage_path:
        return str(run_dir / "ray")
    if is_remote_uri(run.storage_path):
        return f"{run.storage_path.rstrip('/')}/{run_dir.name}"
    local = run.storage_path.removeprefix("file://")
    return str(Path(local).expanduser().resolve() / run_dir.name)


RAY_RUN_NAMES = "ray_run_name"  # in the stage directory: one Ray Train run name per launch attempt, oldest first


def ray_run_name(stage_dir: Path) -> str:
    """A new Ray Train run name for this launch attempt of the stage, recorded in the stage directory.

    Train restores a run of the same name and storage from its own latest registered copy, whatever
    distft passes and without verifying it. So every attempt gets a name of its own: within one
    attempt, a worker group restarted after a failure continues from this attempt's copy
    (`ray.train.get_checkpoint()`); across `distft` invocations the driver chooses the checkpoint
    (`resume_point`: local ones and the earlier attempts' copies, the newest that verifies) and
    passes it to the workers explicitly.
    """
    name = f"{stage_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:4]}"
    stage_dir.mkdir(parents=True, exist_ok=True)
    with (stage_dir / RAY_RUN_NAMES).open("a") as f:
        f.write(name + "\n")
    return name


def earlier_ray_runs(stage_dir: Path) -> list[str]:
    """The Ray Train run names of the stage's launch attempts so far, oldest first."""
    try:
        names = (stage_dir / RAY_RUN_NAMES).read_text(errors="replace").split()
    except OSError:
        return []
    return [n for n in names if re.fullmatch(r"[\w.-]+", n) and n not in (".", "..")]  # a name, never a path


def train_stage(cfg: DistftConfig, stage_index: int, run_dir: Path, resume_from: str | None = None,
                callbacks: list | None = None, stop_hook: dict | None = None,
                forwarded: dict[str, str] | None = None, secrets: dict[str, str] | None = None) -> dict:
    """One stage on a Ray Train worker group. `callbacks` are Train run callbacks (Tune's reporter);
    `stop_hook` names the board a Tune trial asks for early-stop decisions (launch/tune.py);
    `forwarded` is the submitter's environment for workers when this runs elsewhere (a Tune trial
    actor on a cluster node), default this process's; so are `secrets` (run.forward_env's values).

    Secrets reach the workers through the object store, not the runtime env: Ray shows runtime
    envs (env_vars included) in the dashboard, the state API and job listings.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    stage = cfg.stages[stage_index]
    s = cfg.scaling
    # Ray Train reads it from the driver's environment and hands it to its controller.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(cfg.run.worker_start_timeout_s)
    # The controller takes each worker's report (one at a time: a second one blocks training) and
    # notices the end of the run only when it polls, every 2 s by default; 0.5 s costs little.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    secrets_ref = ray.put(forwarded_secrets(cfg) if secrets is None else secrets)
    streamed = {}
    if stage.data.streaming:  # Ray Data reads and tokenizes; Train splits it into one shard per worker
        from distft.launch.streaming import token_rows

        streamed["train"] = token_rows(cfg, stage_index, run_dir, env=_worker_env(cfg, forwarded), secrets=secrets_ref)
    trainer = TorchTrainer(
        train_loop_per_worker=_worker_entry,
        # Ray Train forms the process group: the same bound on its rendezvous and every collective.
        torch_config=TorchConfig(timeout_s=max(1, round(cfg.run.collective_timeout_s))),
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "stage_index": stage_index,
            "run_dir": str(run_dir),
            "resume_from": resume_from,
            "stop_hook": stop_hook,
            "secrets": secrets_ref,
        },
        datasets=streamed or None,
        scaling_config=ScalingConfig(
            # Elastic: Ray Train starts with what fits (at least the minimum), restarts the group
            # smaller from the latest checkpoint when a worker is lost, and larger when room appears.
            num_workers=(s.min_workers, s.num_workers) if s.elastic() else s.num_workers,
            elastic_resize_monitor_interval_s=s.elastic_resize_interval_s,
            use_gpu=s.use_gpu,
            resources_per_worker=s.resources_per_worker(),
            placement_strategy=s.placement_strategy,
        ),
        run_config=RunConfig(
            name=ray_run_name(run_dir / stage.label()),
            storage_path=ray_storage_path(cfg, run_dir),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.run.keep_checkpoints),
            failure_config=FailureConfig(max_failures=cfg.run.max_failures),
            worker_runtime_env={"env_vars": _worker_env(cfg, forwarded)},
            # Keeps the `ray.train` logger's INFO chatter off the console; the per-report
            # INFO lines come from another logger, quieted in the worker (_quiet_report_logger).
            logging_config=LoggingConfig(log_level="WARNING"),
            callbacks=callbacks,
        ),
    )
    error_log = run_dir / stage.label() / "error.log"
    fit_started = time.time()
    try:
        result = _fit_interruptibly(trainer)
    except (KeyboardInterrupt, DistftError):
        raise
    except Exception as e:  # Ray 2.60 raises the workers' error from fit(); its tracebacks go to error_log
        raise stage_failed(stage.label(), e, error_log) from None
    if result.error:  # the Ray versions that return it instead
        raise stage_failed(stage.label(), result.error, error_log) from None
    fit_ended = time.time()
    summary = json.loads((run_dir / stage.label() / "summary.json").read_text())
    placement = run_dir / stage.label() / "placement"
    # Files of an earlier, larger worker group (an elastic run that shrank) are not this one's.
    placed = [p for p in map(json.loads, (f.read_text() for f in placement.glob("rank-*.json")))
              if p.get("world_size", summary.get("world_size")) == summary.get("world_size")]
    summary["worker_nodes"] = [p["node_id"] for p in sorted(placed, key=lambda p: p["rank"])]
    groups_file = placement / "groups.jsonl"
    # Every worker group this stage ran with, in order (restarts, elastic resizes; earlier launches too).
    groups = [json.loads(line) for line in groups_file.read_text().splitlines()] if groups_file.is_file() else []
    if groups_file.is_file():
        summary["worker_groups"] = [g["world_size"] for g in groups]
    entered = [g["time"] for g in groups if g["time"] >= fit_started]  # this launch's first group
    summary.update(stage_timeline(fit_started, fit_ended, entered[0] if entered else None,
                                  summary.pop("trained_between", None)))
    if cfg.run.forward_env and placed:  # which forwarded variables every worker received (names only)
        summary["forwarded_env"] = sorted(set.intersection(*(set(p.get("forwarded_env", [])) for p in placed)))
    return summary


def stage_timeline(fit_started: float, fit_ended: float, entered: float | None,
                   trained_between: list[float | None] | None) -> dict:
    """Where a stage's wall time went around its training steps, in seconds by phase (the run summary).

    startup_s: `workers`, from `fit()` to the training function's start on rank 0 (Ray Train's
    controller, the worker processes, the process group); `setup`, from there to the first step
    (imports, data, model, Trainer). after_training_s: `finish`, from the last step until `fit()`
    returned (final evaluation, export, the worker group's exit). The launcher adds the phases before
    the first stage (`cli`, `ray`) and after the last (`teardown`)."""
    began, ended = trained_between or (None, None)
    startup, after = {}, {}
    if entered is not None:
        startup["workers"] = round(entered - fit_started, 2)
        if began is not None:
            startup["setup"] = round(began - entered, 2)
    if ended is not None:
        after["finish"] = round(fit_ended - ended, 2)
    return {"startup_s": startup, "after_training_s": after}


def _fit_interruptibly(trainer):
    """`trainer.fit()` on a helper thread, so Ctrl-C and SIGTERM reach distft.

    On the main thread Ray Train installs its own SIGINT handler: it aborts the run, then the
    process exits with status 1 and no message. Off the main thread Ray installs none, the
    KeyboardInterrupt lands here, and `launch` shuts down the Ray it started, which stops the
    workers; sealed checkpoints stay as they are for `distft resume`.
    """
    import threading

    box: dict = {}

    def fit():
        try:
            box["result"] = trainer.fit()
        except BaseException as e:  # re-raised on the caller's thread
            box["error"] = e

    thread = threading.Thread(target=fit, name="distft-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
    if "error" in box:
        raise box["error"]
    return box["result"]


def _record_placement(stage_dir: Path, rank: int, world_size: int, forward_env: list[str]) -> None:
    """Which Ray node this rank runs on; the driver adds them to the summary as `worker_nodes`."""
    import ray

    out = stage_dir / "placement"
    out.mkdir(parents=True, exist_ok=True)
    node = ray.get_runtime_context().get_node_id()
    received = sorted(k for k in forward_env if os.environ.get(k))  # names only: what arrived, never values
    (out / f"rank-{rank}.json").write_text(json.dumps({"rank": rank, "world_size": world_size, "node_id": node,
                                                        "forwarded_env": received}))
    if rank == 0:
        with (out / "groups.jsonl").open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), "world_size": world_size}) + "\n")


def _quiet_report_logger() -> None:
    """Train V2 logs every report (with its whole metrics dict) at INFO, twice per log step.

    That logger is named after its file, so `LoggingConfig(log_level=...)`, which sets
    the `ray.train` logger, does not reach it; quiet it by name.
    """
    import logging

    # Train V2 also logs a failing training function's whole traceback from the worker, which Ray streams
    # to the driver's console; the driver writes it to <stage>/error.log and prints one line instead.
    logging.getLogger("ray.train.v2._internal.util").setLevel(logging.CRITICAL)
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


class CheckpointUploadTimeout(RuntimeError):
    """A checkpoint handed to Ray's background upload was not uploaded in time; the message says what to check."""


class UploadWatch:
    """The snapshots handed to Ray's asynchronous upload, which deletes each once it is uploaded.

    Ray 2.60 has no timeout for that upload; a storage path that stops answering would let
    training go on for hours with nothing registered. Checked at every report (each log step),
    so a stuck upload fails the run within about `timeout_s` plus one log interval."""

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self.pending: list[tuple[Path, float]] = []

    def add(self, snapshot: Path, now: float | None = None) -> None:
        self.pending.append((Path(snapshot), time.monotonic() if now is None else now))

    def check(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.pending = [(p, t) for p, t in self.pending if p.exists()]
        late = [(p, t) for p, t in self.pending if now - t > self.timeout_s]
        if late:
            snapshot, started = late[0]
            name = snapshot.name.rsplit("-", 1)[0]  # checkpoint-N-<8 hex>
            raise CheckpointUploadTimeout(
                f"the upload of {name} to run.storage_path has not finished after {now - started:.0f} s "
                f"(run.checkpoint_upload_timeout_s={self.timeout_s:g}). Fix: check that the storage is reachable "
                "from every node and fast enough for checkpoints this size, or raise run.checkpoint_upload_timeout_s; "
                f"the checkpoint itself is complete in {snapshot.parent.parent / name}."
            )

    def drain(self, poll_s: float = 0.5, clock=time.monotonic, sleep=time.sleep) -> None:
        """Wait for the pending uploads, within the same timeout: after the training function returns,
        Ray would wait for them with none, and a stuck upload would hang the finished run."""
        while True:
            self.check(clock())
            if not self.pending:
                return
            sleep(poll_s)


def linkable_storage(checkpoint_dir: str):
    """Ray Train's storage context when its checkpoint copies can be hard links to `checkpoint_dir`, else None.

    That takes storage on a local (or mounted) filesystem, the one `checkpoint_dir` is on, which this
    node sees as Ray does: the marker file Ray's controller writes into the run's storage at start
    must be here (a local storage_path on another node's disk is not). Remote URIs (s3://, gs://) and
    other filesystems keep Ray's upload.
    """
    import pyarrow.fs
    import ray.train

    from distft.distributed.checkpoint import same_filesystem

    try:
        storage = ray.train.get_context().get_storage()  # a DeveloperAPI in 2.60
        from ray.train.v2._internal.constants import VALIDATE_STORAGE_MARKER_FILENAME as marker
    except (AttributeError, ImportError, NotImplementedError):
        return None
    if not isinstance(getattr(storage, "storage_filesystem", None), pyarrow.fs.LocalFileSystem):
        return None
    experiment = Path(storage.experiment_fs_path)
    if not (experiment / marker).is_file() or not same_filesystem(checkpoint_dir, experiment):
        return None
    return storage


def link_upload(storage):
    """Ray's `checkpoint_upload_fn`: its copy of the checkpoint, at the path Ray chose, as hard links.

    Ray's rotation (CheckpointConfig.num_to_keep) later deletes that directory, which unlinks its names
    only: the sealed checkpoint under <stage>/checkpoints keeps its data (and the other way round). If
    linking fails after all, Ray's own copy is made instead."""
    import ray.train

    from distft.distributed.checkpoint import link_copy

    def upload(checkpoint, checkpoint_dir_name: str):
        target = storage.build_checkpoint_path_from_name(checkpoint_dir_name)
        if link_copy(checkpoint.path, target):
            return ray.train.Checkpoint(target, filesystem=storage.storage_filesystem)
        return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)

    return upload


def _worker_entry(config: dict) -> None:
    """Runs in every Ray Train worker: everything comes from `config`, nothing from driver globals."""
    from distft.stages.quiet import quiet_notices

    quiet_notices()  # first: the imports below reach bitsandbytes, which logs a harmless notice at import
    import ray.train

    from distft.config import DistftConfig
    from distft.distributed.checkpoint import read_manifest, upload_snapshot
    from distft.stages import StageContext, stage_runner

    _quiet_report_logger()
    # Before anything reads them (hub downloads read HF_TOKEN); never logged, never written.
    os.environ.update(ray.get(config["secrets"]) if config.get("secrets") is not None else {})
    from distft.launch.job_entrypoint import scrub_unpacked_secrets

    # A submitted job's package is unpacked on every node it uses, with the secrets file the
    # entrypoint already took; the environment has the values now, so no copy stays on disk.
    scrub_unpacked_secrets()
    cfg = DistftConfig.model_validate(config["config"])
    stage_index = config["stage_index"]
    tctx = ray.train.get_context()
    stop_fn = None
    if config.get("stop_hook"):  # a Tune trial: evals wait for the scheduler's continue/stop decision
        from distft.launch.tune import stop_asker

        stop_fn = stop_asker(config["stop_hook"])

    uploads = UploadWatch(cfg.run.checkpoint_upload_timeout_s)
    # Training waits for each upload: for storage that cannot take a second writer, and the
    # baseline benchmarks/checkpoint_cost.py measures the background upload against.
    sync_upload = os.environ.get(SYNC_UPLOAD_ENV) == "1"

    def report(metrics: dict, checkpoint_dir: str | None, progress: bool) -> None:
        uploads.check()
        if progress and stop_fn is None:
            # A training-progress line is in metrics.jsonl and TensorBoard already, and outside a search
            # nothing on the Ray side reads it. Reporting it would cost a stall per log: Ray Train queues
            # one report per worker, and a second report waits until the controller's next poll.
            return
        storage = linkable_storage(checkpoint_dir) if checkpoint_dir else None
        if storage is not None:
            # Storage on this filesystem (the default <run>/ray, a local run.storage_path): Ray's registered
            # copy is made of hard links to the sealed checkpoint, so it is stored once, and "uploading" it
            # takes milliseconds on the training thread.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                             checkpoint_upload_fn=link_upload(storage))
            return
        snapshot = upload_snapshot(checkpoint_dir) if checkpoint_dir and not sync_upload else None
        if snapshot is None:  # no checkpoint, or no hard links possible: Ray copies it while training waits
            ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
            ray.train.report(metrics, checkpoint=ckpt)
            return
        # Training goes on while Ray copies the checkpoint to run.storage_path (possibly s3://); it
        # registers it once copied, then deletes the hard-linked snapshot.
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(snapshot)),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC,
                         delete_local_checkpoint_after_upload=True)
        uploads.add(snapshot)

    def run(resume_from: str | None) -> None:
        ctx = StageContext(
            run_dir=Path(config["run_dir"]),
            stage_index=stage_index,
            rank=tctx.get_world_rank(),
            world_size=tctx.get_world_size(),
            local_rank=tctx.get_local_rank(),
            resume_from=resume_from,
            report_fn=report,
            stop_fn=stop_fn,
            shard_fn=ray.train.get_dataset_shard,
        )
        if resume_from:
            step = (read_manifest(resume_from) or {}).get("step", "?")
            ctx.log(f"[{cfg.stages[stage_index].label()}] resuming from {resume_from} (step {step})")
        stage_runner(cfg.stages[stage_index].stage)(cfg, ctx)

    _record_placement(Path(config["run_dir"]) / cfg.stages[stage_index].label(), tctx.get_world_rank(),
                      tctx.get_world_size(), cfg.run.forward_env)
    # Ray only ever registers sealed checkpoints (ReportCallback attaches one after its manifest is
    # written). The stage verifies it against that manifest before building anything, as for every
    # other launcher, and refuses a damaged one (CheckpointError) naming the file and the latest
    # earlier checkpoint that verifies.
    # Each launch attempt has its own Ray run name (ray_run_name), so Ray holds a checkpoint only when
    # this attempt's worker group restarted: that one is newer than the driver's choice and wins.
    # Else the one the driver chose and verified (`distft resume`, `--from`), passed explicitly.
    checkpoint = ray.train.get_checkpoint()
    stage_dir = Path(config["run_dir"]) / cfg.stages[stage_index].label()
    if checkpoint is None:
        if config.get("resume_from"):
            _mark_resume(stage_dir, config["resume_from"], "distft resume", tctx.get_world_rank())
        elif tctx.get_world_rank() == 0 and _logged_before(stage_dir):
            # A worker group restarted before its first checkpoint: it starts again from step 0, and the
            # steps it logs again must be told apart from the first attempt's.
            from distft.stages.reporting import MetricsLog

            MetricsLog(stage_dir).mark_resume("", 0, "worker group restart (no checkpoint yet)")
        run(config.get("resume_from"))
    else:
        with checkpoint.as_directory() as path:
            _mark_resume(stage_dir, path, "worker group restart", tctx.get_world_rank())
            run(path)
    uploads.drain()


def _logged_before(stage_dir: Path) -> bool:
    from distft.stages.reporting import last_step

    return last_step(stage_dir / "metrics.jsonl") is not None


def _mark_resume(stage_dir: Path, checkpoint: str, source: str, rank: int) -> None:
    """On rank 0, the restart marker in metrics.jsonl: the steps logged after it from the checkpoint's on redo
    earlier ones, and a reader can tell them apart."""
    from distft.distributed.checkpoint import checkpoint_step, read_manifest
    from distft.stages.reporting import MetricsLog

    if rank != 0:
        return
    step = (read_manifest(checkpoint) or {}).get("step", checkpoint_step(checkpoint))
    MetricsLog(stage_dir).mark_resume(checkpoint, step if isinstance(step, int) else None, source)


def stage_done(cfg: DistftConfig, run_dir: Path, stage_index: int) -> dict | None:
    """The summary of a stage that finished in `run_dir` with this config and an intact export, else None.

    Finished means: summary.json, and a `final/` whose manifest verifies (it is written last) for the
    same stage fingerprint (model, this stage's and every earlier stage's settings).
    """
    from distft.distributed.checkpoint import verify_checkpoint

    stage_dir = run_dir / cfg.stages[stage_index].label()
    path = stage_dir / "summary.json"
    if not path.is_file() or verify_checkpoint(stage_dir / "final"):
        return None
    summary = json.loads(path.read_text())
    return summary if summary.get("fingerprint") == cfg.stage_fingerprint(stage_index) else None


def checkpoint_copies(cfg: DistftConfig, run_dir: Path, stage_index: int, log=print) -> list[tuple[int, str, Path]]:
    """Every sealed copy of the stage's checkpoints, newest step first (local before Ray's at one step):
    `<stage>/checkpoints/checkpoint-N`, and the copies Ray Train registered for the stage's earlier
    launch attempts in their storage (`<run>/ray/<run name>/checkpoint_*`, or run.storage_path).
    Copies in remote storage (s3://, ...) are not read from here: local checkpoints only, said once."""
    from distft.distributed.checkpoint import sealed_copies
    from distft.launch.cluster import is_remote_uri

    stage_dir = run_dir / cfg.stages[stage_index].label()
    names = earlier_ray_runs(stage_dir)
    storage = ray_storage_path(cfg, run_dir)
    if names and is_remote_uri(storage):
        log(f"stage {stage_dir.name}: Ray's checkpoint copies in {storage} are not checked (remote storage); "
            "choosing among the local checkpoints only")
        names = []
    return sealed_copies(stage_dir / "checkpoints", [Path(storage) / n for n in names])


def checkpoint_label(path: str | Path, run_dir: Path) -> str:
    """`checkpoint-20` for a local checkpoint, `checkpoint-20 (Ray's copy ray/...)` for one of Ray's copies."""
    from distft.distributed.checkpoint import copy_label, read_manifest

    path = Path(path)
    if path.parent.name == "checkpoints":
        return path.name
    return copy_label((read_manifest(path) or {}).get("step", "?"), "Ray's copy", path, run_dir)


def resume_point(cfg: DistftConfig, run_dir: Path, stage_index: int, log=print) -> tuple[dict | None, str | None]:
    """(summary if the stage finished, else the newest checkpoint copy that verifies, or None for a fresh start).

    Local checkpoints and Ray's copies from earlier attempts are candidates alike; each damaged one
    newer than the choice is reported (`log`) on one line and skipped, never deleted."""
    from distft.distributed.checkpoint import first_verified

    done = stage_done(cfg, run_dir, stage_index)
    if done is not None:
        return done, None
    label = cfg.stages[stage_index].label()
    if (run_dir / label / "summary.json").is_file():
        # It finished, but with other settings (or its export is damaged): its checkpoints belong to
        # that run, and continuing from them would mix two configs. It reruns from the start.
        return None, None
    copies = checkpoint_copies(cfg, run_dir, stage_index, log)
    chosen = first_verified(copies, log, run_dir)
    if chosen is None:
        if copies:
            log(f"stage {label}: no checkpoint verifies; it starts again from step 0")
        return None, None
    return None, str(chosen[2])


def start_point(cfg: DistftConfig, run_dir: Path, start_from: str, log=print) -> tuple[int, str]:
    """`--from checkpoint-N`: (the first unfinished stage, its copy of step N that verifies), or CheckpointError
    (exit 2, before any cluster is taken) naming what is wrong and the checkpoints that verify."""
    from distft.distributed.checkpoint import CheckpointError, copy_label, summarize_problems, verify_checkpoint

    m = re.fullmatch(r"(?:checkpoint-)?(\d+)", start_from.strip())
    if not m:
        raise CheckpointError(f"--from {start_from}: not a checkpoint name. Fix: --from checkpoint-N, N a step "
                              f"that has a checkpoint (`distft runs show {run_dir}` shows the latest).")
    step = int(m[1])
    index = next((i for i in range(len(cfg.stages)) if stage_done(cfg, run_dir, i) is None), None)
    if index is None:
        raise CheckpointError(f"--from checkpoint-{step}: every stage of {run_dir} finished; nothing to resume.")
    label = cfg.stages[index].label()
    if (run_dir / label / "summary.json").is_file():
        raise CheckpointError(
            f"--from checkpoint-{step}: stage {label} finished with other settings, so its checkpoints belong to "
            f"those. Fix: drop --from (the stage then starts again), or resume with the settings it ran with.")
    copies = checkpoint_copies(cfg, run_dir, index, log)
    damaged = []
    for s, where, path in copies:
        if s == step:
            problems = verify_checkpoint(path)
            if not problems:
                for line in damaged:
                    log(f"{line}; skipped")
                return index, str(path)
            damaged.append(f"{copy_label(s, where, path, run_dir)} is damaged: {summarize_problems(problems, 1)}")
    good = []
    for s, _, path in copies:
        if s != step and (not good or good[-1] != s) and not verify_checkpoint(path):
            good.append(s)
    what = "; ".join(damaged) if damaged else f"stage {label} has no checkpoint-{step}"
    listed = ", ".join(f"checkpoint-{s}" for s in good)
    fix = (f"the checkpoints of stage {label} that verify: {listed}. Fix: distft resume {run_dir} "
           f"--from checkpoint-{good[0]}." if good else
           f"no checkpoint of stage {label} verifies. Fix: distft resume {run_dir} without --from starts it again.")
    raise CheckpointError(f"--from checkpoint-{step}: {what}; {fix}")


def set_aside_newer(cfg: DistftConfig, run_dir: Path, stage_index: int, chosen: str, log=print) -> None:
    """`--from checkpoint-N` abandons what came after step N. Its checkpoints, local and Ray's copies, are
    moved (never deleted) to `<their dir>.after-<N>-<time>` beside them: left in place, the rotation (which
    keeps the highest steps) would delete the new line's checkpoints first, and a later plain `distft
    resume` would silently pick the abandoned line's newest."""
    from distft.distributed.checkpoint import read_manifest

    step = (read_manifest(chosen) or {}).get("step")
    if step is None:
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved = []
    for s, _, path in checkpoint_copies(cfg, run_dir, stage_index, log=lambda *_: None):
        if s > step and Path(path).resolve() != Path(chosen).resolve():
            target = path.parent.with_name(f"{path.parent.name}.after-{step}-{stamp}") / path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            path.rename(target)
            moved.append(target.parent)
    if moved:
        where = ", ".join(sorted({str(d.relative_to(run_dir)) if d.is_relative_to(run_dir) else str(d) for d in moved}))
        log(f"--from checkpoint-{step}: {len(moved)} newer checkpoint copies set aside in {where}")


def set_aside(stage_dir: Path) -> Path | None:
    """Move an earlier attempt's stage directory out of the way (never deleted): `<stage>.superseded-<time>`."""
    if not stage_dir.is_dir() or not any(stage_dir.iterdir()):
        return None
    target = stage_dir.with_name(f"{stage_dir.name}.superseded-{time.strftime('%Y%m%d-%H%M%S')}")
    stage_dir.rename(target)
    return target


def process_started() -> float:
    """When this process started (the kernel's record), so the start-up count includes the imports."""
    import psutil

    return psutil.Process().create_time()


def launch(cfg: DistftConfig, run_dir: Path, address: str | None = None, log=print, resume: bool = False,
           force_from: int | None = None, start_from: tuple[int, str] | None = None) -> list[dict]:
    """Run every stage in order on one Ray cluster; returns each stage's summary.

    With `resume` (`distft resume`, `distft pipeline`), a stage that finished in `run_dir` with the same
    settings is skipped and an unfinished one continues from its latest verified checkpoint (a damaged
    newer one is passed over, never deleted). Once a stage runs, every later stage runs afresh (its
    inputs changed); `force_from` reruns from that stage on. Earlier attempts are set aside, not deleted.
    `start_from` (`--from`): (stage index, checkpoint) from `start_point`, used as it is for that stage.
    """
    import ray

    from distft.launch.provenance import finish_provenance, start_provenance

    started = time.time()
    address = cluster_address(cfg, address)
    owns_ray = not ray.is_initialized()  # a caller's (or a test fixture's) cluster stays up
    last_ran = None  # (the summary of the last stage that ran, when its train_stage returned)
    cluster_taken = False  # the cluster is started (or reached) for the first stage that runs, never for none
    try:
        summaries = []
        rerun_rest = False
        for i, stage in enumerate(cfg.stages):
            done, resume_from = None, None
            if start_from is not None and i == start_from[0]:  # `--from`: chosen and verified by start_point
                resume_from = start_from[1]
            elif resume and not rerun_rest and (force_from is None or i < force_from):
                done, resume_from = resume_point(cfg, run_dir, i, log=log)
            if done is not None:
                log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()} finished earlier with these settings; skipped")
                summaries.append({**done, "skipped": True})
                continue
            first_run = not cluster_taken
            if not cluster_taken:
                reached = time.time()
                with caller_signal_handlers():
                    init_ray(cfg, address)
                # Before the first stage: this process's start up to Ray (imports, config, preflight, run
                # directory), then Ray itself (a private cluster's start, or connecting to one).
                before = {"cli": round(reached - process_started(), 2), "ray": round(time.time() - reached, 2)}
                cluster_taken = True
                if address or not owns_ray:
                    check_cluster_resources(cfg)
                    check_storage(cfg, run_dir)
                # Only once the cluster took the run: a run refused before this leaves nothing to clean up.
                start_provenance(run_dir)
            if start_from is not None and i == start_from[0]:
                set_aside_newer(cfg, run_dir, i, resume_from, log=log)
            if resume_from is None:
                moved = set_aside(run_dir / stage.label())
                if moved:
                    log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()}: the earlier attempt moved to {moved.name}")
            rerun_rest = True
            where = f", resuming from {checkpoint_label(resume_from, run_dir)}" if resume_from else ""
            s = cfg.scaling
            workers = f"{s.min_workers}-{s.num_workers} (elastic)" if s.elastic() else s.num_workers
            log(f"stage {i + 1}/{len(cfg.stages)}: {stage.label()} on {workers} Ray Train worker(s){where}")
            summary = train_stage(cfg, i, run_dir, resume_from)
            if first_run:
                summary["startup_s"] = {**before, **summary.get("startup_s", {})}
            summaries.append(summary)
            last_ran = (summary, time.time())
        if not cluster_taken:
            log("every stage finished earlier with these settings: nothing to run")
            return summaries
        finish_provenance(run_dir, summaries)
        log(f"all stages done in {time.time() - started:.0f}s")
        return summaries
    finally:
        if owns_ray and cluster_taken:
            ray.shutdown()
        if last_ran is not None:  # after the last stage: provenance, and the Ray this process started going down
            summary, returned = last_ran
            summary.setdefault("after_training_s", {})["teardown"] = round(time.time() - returned, 2)
