"""Where the workers go: whether the cluster can hold a stage's worker group, and storage every node reaches."""

from __future__ import annotations

from pathlib import Path

from distft.config import DistftConfig
from distft.launch.errors import ClusterError
from distft.launch.cluster import is_remote_uri, shared_storage_node_ids, storage_problem
from distft.launch.streaming import spare_cpu_problem


def place_workers(free: list[dict], per: dict, workers: int, strategy: str) -> bool:
    """Take `workers` bundles of `per` from the nodes' `free` resources (in place), as the worker group's
    placement group would under `strategy`; False, with `free` untouched, when they do not fit.

    A bundle is whole on one node. PACK and SPREAD are preferences (Ray falls back to any node),
    so any node that fits will do; STRICT_PACK needs one node for them all and STRICT_SPREAD a
    different node for each.

    Not a trial placement group with a timeout: that asks whether the group fits what is free now,
    and on a busy cluster it would refuse a run that Ray Train can start once other work ends; this
    asks whether it can ever fit, against the nodes' totals, before any resource is taken. Tune's
    trial packing (tune.py) uses it to size how many trials run at once.
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


    alive = [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    problem = storage_problem(cfg.run, run_dir, alive, shared_storage_node_ids())
    if problem:
        raise ClusterError(problem)


def ray_storage_path(cfg: DistftConfig, run_dir: Path) -> str:
    """Ray Train's checkpoint copies: <run.storage_path>/<run name>, else <run dir>/ray."""
    run = cfg.run
    if not run.storage_path:
        return str(run_dir / "ray")
    if is_remote_uri(run.storage_path):
        return f"{run.storage_path.rstrip('/')}/{run_dir.name}"
    local = run.storage_path.removeprefix("file://")
    return str(Path(local).expanduser().resolve() / run_dir.name)
