"""`distft cluster up|status|down`: a real multi-raylet Ray cluster with token auth, and the storage rule.

The storage rule, token handling and address resolution are tested without Ray (fast tier).
The `slow` tests start one cluster for the module (a head with 0 CPUs and 2 worker
raylets with 1 CPU each) on free ports, with its state and token in a temp directory,
so they never touch a user's cluster or ~/.ray/auth_token; `down` runs even if a test fails.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml

from conftest import REPO, write_jsonl
from servers import free_port
from distft.config import build_config
from distft.launch import cluster
from distft.launch.placement import ray_storage_path

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS")


def run_cfg(**run):
    return build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "run": run})


# ---------------------------------------------------------------- fast: no Ray


def test_storage_rule_refuses_local_storage_on_several_nodes():
    run_dir = Path("/work/runs/r1")
    three = ["a", "b", "c"]

    problem = cluster.storage_problem(run_cfg().run, run_dir, three, set())
    assert problem.startswith("storage: this cluster has 3 nodes, but run.output_dir (/work/runs)")
    assert "run.storage_path (default: /work/runs/r1/ray)" in problem
    assert "run.shared_storage is false" in problem and "set run.shared_storage=true" in problem

    local = cluster.storage_problem(run_cfg(storage_path="/mnt/ckpt").run, run_dir, three, set())
    assert "run.storage_path (/mnt/ckpt)" in local

    # Object storage is reachable from every node, but the run directory is still local disk.
    s3 = cluster.storage_problem(run_cfg(storage_path="s3://bucket/ckpt").run, run_dir, three, set())
    assert "run.output_dir (/work/runs)" in s3 and "run.storage_path (" not in s3


def test_storage_rule_accepts_one_node_declared_shared_storage_and_a_distft_cluster():
    run_dir = Path("/work/runs/r1")
    assert cluster.storage_problem(run_cfg().run, run_dir, ["a"], set()) is None
    assert cluster.storage_problem(run_cfg(shared_storage=True).run, run_dir, ["a", "b"], set()) is None
    # Every node was started by `distft cluster up` on this machine: local paths are shared.
    assert cluster.storage_problem(run_cfg().run, run_dir, ["a", "b", "c"], {"a", "b", "c"}) is None
    # ... unless a node from elsewhere joined it later.
    assert cluster.storage_problem(run_cfg().run, run_dir, ["a", "b", "x"], {"a", "b", "c"}) is not None


def test_ray_storage_path_and_remote_uris(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs" / "r1"
    assert ray_storage_path(run_cfg(), run_dir) == str(run_dir / "ray")
    assert ray_storage_path(run_cfg(storage_path="s3://b/ckpt/"), run_dir) == "s3://b/ckpt/r1"
    monkeypatch.chdir(tmp_path)
    assert ray_storage_path(run_cfg(storage_path="ckpt"), run_dir) == str(tmp_path / "ckpt" / "r1")
    assert [cluster.is_remote_uri(p) for p in ("s3://b", "gs://b/x", "file:///x", "/x", "x")] == [
        True, True, False, False, False]


@pytest.fixture()
def no_ray_auth_env(monkeypatch, tmp_path):
    """No auth variables, a private distft cache; whatever the code under test sets is undone."""
    for var in AUTH_VARS:
        monkeypatch.setenv(var, "x")  # recorded, so teardown removes what the test's code sets
        monkeypatch.delenv(var)
    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(cluster, "_refresh_ray_auth", lambda: None)  # keep this process's Ray config alone


def test_token_is_generated_once_with_mode_600_and_never_printed(no_ray_auth_env, monkeypatch, tmp_path, capsys):
    path = tmp_path / "secret" / "token"
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(path))
    assert cluster.ensure_token() == ("RAY_AUTH_TOKEN_PATH", path, True)
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert cluster.ensure_token() == ("RAY_AUTH_TOKEN_PATH", path, False) and path.read_text() == token
    out = capsys.readouterr()
    assert token not in out.out + out.err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")  # Ray's first choice: nothing to write
    assert cluster.ensure_token() == ("RAY_AUTH_TOKEN", None, False)


def write_state(port: int, token_path: Path | None, pid: int | None = None) -> None:
    import psutil

    procs = [{"role": "head", "pid": pid, "create_time": psutil.Process(pid).create_time(), "log": ""}] if pid else []
    cluster._write_state({"address": f"127.0.0.1:{port}", "port": port, "token_path": str(token_path),
                          "storage_shared": True, "node_ids": ["n1", "n2"], "processes": procs})


def test_clients_find_the_recorded_clusters_token_by_path(no_ray_auth_env, monkeypatch, tmp_path):
    token = tmp_path / "tok"
    token.write_text("t" * 64)
    write_state(6399, token)

    cluster.use_cluster_auth("10.9.9.9:6399")  # another cluster: token auth, Ray's default token lookup
    assert os.environ["RAY_AUTH_MODE"] == "token" and "RAY_AUTH_TOKEN_PATH" not in os.environ

    cluster.use_cluster_auth("127.0.0.1:6399")
    assert os.environ["RAY_AUTH_TOKEN_PATH"] == str(token)

    # The user's own choices win.
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", "/elsewhere")
    cluster.use_cluster_auth("127.0.0.1:6399")
    assert os.environ["RAY_AUTH_MODE"] == "disabled" and os.environ["RAY_AUTH_TOKEN_PATH"] == "/elsewhere"
    assert cluster.shared_storage_node_ids() == {"n1", "n2"}


def test_auto_address_prefers_ray_address_then_the_running_distft_cluster(no_ray_auth_env, monkeypatch, tmp_path):
    assert cluster.resolve_address("auto") == "auto"  # nothing recorded: Ray's own lookup
    assert cluster.resolve_address("10.0.0.1:6379") == "10.0.0.1:6379"
    write_state(6398, None, pid=os.getpid())  # "running": this very process stands in for the head
    assert cluster.resolve_address("auto") == "127.0.0.1:6398"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster.resolve_address("auto") == "10.0.0.2:6379"


def distft(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def clean_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in AUTH_VARS}
    env.update({k: str(v) for k, v in extra.items()})
    return env


def test_status_and_down_without_a_cluster(tmp_path):
    env = clean_env(DISTFT_CACHE=tmp_path)
    r = distft("cluster", "status", env=env)
    assert r.returncode == 2 and "error: no distft cluster is up" in r.stderr and "Fix: distft cluster up" in r.stderr
    r = distft("cluster", "down", env=env)
    assert r.returncode == 0 and "nothing to stop" in r.stdout
    r = distft("cluster", "up", "--workers", "0", env=env)
    assert r.returncode == 2 and "--workers and --cpus-per-worker must be at least 1" in r.stderr
    assert "Traceback" not in r.stderr


# ---------------------------------------------------------------- slow: a real cluster


@contextmanager
def one_raylet_cluster(home: Path, cpus: int = 2):
    """`distft cluster up --workers 1 --cpus-per-worker CPUS` on free ports, its state in `home`; always `down`
    afterwards. Yields the client environment, the address and the pids `up` recorded."""
    port, dash = free_port(), free_port()
    env = clean_env(DISTFT_CACHE=home, RAY_AUTH_TOKEN_PATH=home / "token")
    try:
        r = distft("cluster", "up", "--workers", 1, "--cpus-per-worker", cpus, "--port", port, "--dashboard-port", dash,
                   env=env, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        state = json.loads((home / "cluster" / "cluster.json").read_text())
        yield {"env": env, "address": f"127.0.0.1:{port}", "pids": [p["pid"] for p in state["processes"]]}
    finally:
        distft("cluster", "down", env=env, timeout=300)


@pytest.fixture(scope="module")
def live_cluster(tmp_path_factory):
    """`distft cluster up --workers 2 --cpus-per-worker 1` on free ports; always `down` afterwards."""
    home = tmp_path_factory.mktemp("cluster")
    token = home / "token"
    # `up` generates the token at RAY_AUTH_TOKEN_PATH; clients then find it through the state file.
    up_env = clean_env(DISTFT_CACHE=home, RAY_AUTH_TOKEN_PATH=token)
    # As in CI: the venv is not on PATH (make calls .venv/bin/python), and jobs must still find distft.
    venv_bin = os.path.dirname(sys.executable)
    up_env["PATH"] = os.pathsep.join(p for p in up_env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    port, dash = free_port(), free_port()
    info = {"home": home, "token": token, "port": port, "dashboard": dash, "address": f"127.0.0.1:{port}",
            "env": clean_env(DISTFT_CACHE=home)}
    try:
        started = info["started"] = time.time()
        r = distft("cluster", "up", "--workers", 2, "--cpus-per-worker", 1, "--port", port,
                   "--dashboard-port", dash, env=up_env, timeout=300)
        info["up"], info["up_seconds"] = r, time.time() - started
        assert r.returncode == 0, r.stdout + r.stderr
        info["state"] = json.loads((home / "cluster" / "cluster.json").read_text())
        yield info
    finally:
        distft("cluster", "down", env=info["env"], timeout=300)


@pytest.mark.slow
def test_the_dashboard_and_job_server_listen_on_loopback_only(live_cluster):
    """Ray 2.60 binds the GCS and raylets to every interface whatever --node-ip-address says (token auth guards
    them: see the job auth tests); the dashboard, which serves the Jobs API, is ours to bind, to 127.0.0.1."""
    import psutil

    dash = [c.laddr.ip for c in psutil.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == live_cluster["dashboard"]]
    assert dash and set(dash) <= {"127.0.0.1", "::ffff:127.0.0.1"}, dash


@pytest.mark.slow
def test_up_starts_every_node_and_status_lists_them(live_cluster):
    up, state = live_cluster["up"], live_cluster["state"]
    assert "all 3 nodes alive" in up.stdout and f"address    {live_cluster['address']}" in up.stdout
    assert f"{live_cluster['token']} (generated, mode 600)" in up.stdout
    assert len(state["node_ids"]) == 3 and len(state["processes"]) == 3 and state["storage_shared"]

    # The token's value is nowhere: not printed, not in the state file, not in the logs.
    token = live_cluster["token"].read_text()
    logs = "".join(p.read_text(errors="replace") for p in (live_cluster["home"] / "cluster" / "logs").iterdir())
    assert token not in up.stdout + up.stderr + json.dumps(state) + logs

    r = distft("cluster", "status", env=live_cluster["env"])
    assert r.returncode == 0, r.stdout + r.stderr
    nodes = [line.split() for line in r.stdout.splitlines() if line.startswith("node ")]
    assert sorted((n[2], n[3], n[5]) for n in nodes) == [("head", "ALIVE", "0"), ("worker", "ALIVE", "1"),
                                                       ("worker", "ALIVE", "1")]
    assert "CPU 2 free of 2, 3 node(s) alive" in r.stdout
    assert r.stdout.count(" running") == 3


@pytest.mark.slow
def test_a_second_up_is_refused(live_cluster):
    r = distft("cluster", "up", "--port", free_port(), env=live_cluster["env"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert f"error: a distft cluster is already up at {live_cluster['address']}" in r.stderr
    assert "distft cluster down" in r.stderr


@pytest.mark.slow
def test_clients_without_the_token_are_refused(live_cluster):
    jobs = f"http://127.0.0.1:{live_cluster['dashboard']}/api/jobs/"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(jobs, timeout=30)
    assert e.value.code == 401
    token = live_cluster["token"].read_text()
    with urllib.request.urlopen(urllib.request.Request(jobs, headers={"Authorization": f"Bearer {token}"}),
                                timeout=30) as ok:
        assert ok.status == 200

    # A Ray client that does not send a token: the GCS refuses it (few retries, so it fails fast).
    probe = (f"import ray\ntry:\n    ray.init(address='{live_cluster['address']}', logging_level='error')\n"
             "    print('CONNECTED')\nexcept Exception as e:\n    print('REFUSED', type(e).__name__)\n")
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                       env=clean_env(RAY_AUTH_MODE="disabled", RAY_gcs_server_port_wait_time_s=3))
    assert "REFUSED ConnectionError" in r.stdout, r.stdout + r.stderr[-2000:]
    assert "InvalidAuthToken" in r.stderr


def tiny_config(tmp_path, model, rows) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", rows[:64])
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model), "max_seq_len": 64},
        "scaling": {"num_workers": 2, "cpus_per_worker": 1, "torch_threads": 1},
        "stage": "sft",
        "data": {"train": str(data), "eval_fraction": 0.1, "max_eval_samples": 4},
        "method": {"name": "lora", "lora": {"r": 4, "alpha": 8}},
        "train": {"max_steps": 2, "global_batch_size": 8, "micro_batch_size": 4, "log_every": 1},
        "run": {"output_dir": str(tmp_path / "runs"), "name": "on-cluster"},
    }))
    return path


@pytest.mark.slow
def test_a_two_worker_run_puts_one_worker_on_each_raylet(live_cluster, tiny_random, alpaca_rows, tmp_path):
    """`distft train --address` with no token in the environment: distft finds it through the state file."""
    config = tiny_config(tmp_path, tiny_random, alpaca_rows)
    r = distft("train", config, "--address", live_cluster["address"], env=live_cluster["env"], timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    (summary,) = json.loads((tmp_path / "runs" / "on-cluster" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    head = live_cluster["state"]["node_ids"]
    rank0, rank1 = summary["worker_nodes"]
    assert rank0 != rank1, "both Ray Train workers ran on one raylet"
    assert {rank0, rank1} <= set(head)


@pytest.mark.slow
def test_storage_rule_refuses_a_cluster_distft_did_not_start(live_cluster, tiny_random, alpaca_rows, tmp_path):
    """The same cluster seen without its state file: 3 nodes, local run directory, nothing declared shared."""
    config = tiny_config(tmp_path, tiny_random, alpaca_rows)
    env = clean_env(DISTFT_CACHE=tmp_path / "no-state", RAY_AUTH_TOKEN_PATH=live_cluster["token"])
    r = distft("train", config, "--address", live_cluster["address"], env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "error: storage: this cluster has 3 nodes, but run.output_dir" in r.stderr
    assert "set run.shared_storage=true" in r.stderr
    assert not (tmp_path / "runs" / "on-cluster" / "sft").exists()  # refused before any worker started


FAKE_TOKEN = "hf_FAKEjobtoken0123456789abcdefSECRET"


def job_env(live_cluster, **extra) -> dict:
    return {**live_cluster["env"], "HF_TOKEN": FAKE_TOKEN, "PYTHONUNBUFFERED": "1", **extra}


@pytest.mark.slow
def test_a_submitted_job_runs_to_success_with_a_secret_that_is_never_written(live_cluster, tiny_random,
                                                                            alpaca_rows, tmp_path):
    """`distft submit --follow` over HTTP with token auth (found through the state file), a local
    model and data shipped with the job, HF_TOKEN forwarded to the workers and written nowhere."""
    config = tiny_config(tmp_path, tiny_random, alpaca_rows)
    r = distft("submit", config, "run.forward_env=[HF_TOKEN]", "--follow", env=job_env(live_cluster), timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("submitted "))
    assert f"to http://127.0.0.1:{live_cluster['dashboard']}" in r.stdout and f"{job_id} SUCCEEDED" in r.stdout
    assert "forwarding HF_TOKEN to the job and its workers (value not shown)" in r.stdout
    run_dir = tmp_path / "runs" / "on-cluster"
    assert (run_dir / "sft" / "final" / "adapter_model.safetensors").is_file()
    (summary,) = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["forwarded_env"] == ["HF_TOKEN"]  # every worker had it

    status = distft("jobs", "status", job_id, env=live_cluster["env"])
    assert status.returncode == 0 and "status   SUCCEEDED" in status.stdout and "run      on-cluster" in status.stdout
    logs = distft("jobs", "logs", job_id, env=live_cluster["env"])
    assert "[sft] step 2/2" in logs.stdout
    # The token's value: not in what distft printed, the job's logs or metadata, the run directory,
    # or the cluster's own logs.
    token = live_cluster["token"].read_text()
    api = urllib.request.Request(f"http://127.0.0.1:{live_cluster['dashboard']}/api/jobs/",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(api, timeout=30) as resp:
        listing = resp.read().decode()
    assert job_id in listing
    written = [p.read_text(errors="replace") for p in run_dir.rglob("*")
               if p.is_file() and p.stat().st_size < 5_000_000]
    roots = [Path("/tmp/ray"), *map(Path, live_cluster["state"]["temp_dirs"])]
    assert len(roots) == 3 and len(set(roots)) == 3, "each raylet has its own temp dir, as on separate hosts"
    session_logs = [p.read_text(errors="replace") for root in roots for p in (root / "session_latest/logs").glob("*")
                    if p.is_file() and p.stat().st_size < 20_000_000]
    everything = [r.stdout, r.stderr, status.stdout, logs.stdout, listing, *written, *session_logs]
    assert not [i for i, text in enumerate(everything) if FAKE_TOKEN in text]
    # The package's secrets file: taken by the entrypoint, and every node's unpacked copy deleted by its workers.
    sessions = [d for root in roots for d in root.glob("session_2*") if d.stat().st_mtime >= live_cluster["started"] - 5]
    assert len(sessions) >= 3
    assert not [p for d in sessions for p in (d / "runtime_resources").rglob(".distft_secrets.json")]
    # No node's runtime-env agent deleted an unpacked working_dir to unpack it again: with one directory
    # for all nodes, a second agent did so under the workers whose cwd it was, and the job died (CI, stop 27).
    setup_logs = "".join(p.read_text(errors="replace") for d in sessions for p in (d / "logs").glob("runtime_env_setup-*"))
    assert "_ray_pkg_" in setup_logs and "Removing " not in setup_logs, setup_logs[-3000:]


@pytest.mark.slow
def test_a_running_job_stops_and_the_job_commands_report_it(live_cluster, tiny_random, alpaca_rows, tmp_path):
    config = tiny_config(tmp_path, tiny_random, alpaca_rows)
    r = distft("submit", config, "train.max_steps=100000", "run.name=long", env=job_env(live_cluster))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    job_id = next(line.split()[1] for line in r.stdout.splitlines() if line.startswith("submitted "))
    deadline = time.time() + 240
    while "[sft] step" not in distft("jobs", "logs", job_id, env=live_cluster["env"]).stdout:
        assert time.time() < deadline, "the job never started training"
        time.sleep(3)
    stop = distft("jobs", "stop", job_id, env=live_cluster["env"], timeout=180)
    assert stop.returncode == 0 and f"{job_id} STOPPED" in stop.stdout, stop.stdout + stop.stderr
    listed = distft("jobs", "list", env=live_cluster["env"])
    row = next(line for line in listed.stdout.splitlines() if line.startswith(job_id))
    assert row.split()[1] == "STOPPED" and row.endswith("long")
    again = distft("jobs", "stop", job_id, env=live_cluster["env"])
    assert again.returncode == 0 and "already STOPPED; nothing to stop" in again.stdout
    missing = distft("jobs", "status", "distft-no-such-job", env=live_cluster["env"])
    assert missing.returncode == 2 and "no job 'distft-no-such-job'" in missing.stderr and "Traceback" not in missing.stderr


@pytest.mark.slow
def test_job_commands_without_the_right_token_say_how_to_fix_it(live_cluster):
    url = f"http://127.0.0.1:{live_cluster['dashboard']}"
    wrong = distft("jobs", "list", "--address", url, env=clean_env(DISTFT_CACHE=live_cluster["home"],
                                                                   RAY_AUTH_TOKEN="f" * 64))
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert f"the job server at {url} needs the cluster's auth token, and the token was refused" in wrong.stderr
    none = distft("jobs", "list", "--address", url, env=clean_env(DISTFT_CACHE=live_cluster["home"],
                                                                  RAY_AUTH_MODE="disabled"))
    assert none.returncode == 2 and "no token was sent" in none.stderr and "Fix: export RAY_AUTH_TOKEN_PATH" in none.stderr


@pytest.mark.slow
def test_down_stops_every_process_it_started(live_cluster):
    """Last in this module: the fixture's own `down` then finds nothing to stop."""
    import psutil

    recorded = live_cluster["state"]["processes"]
    family = []
    for rec in recorded:
        p = psutil.Process(rec["pid"])
        assert abs(p.create_time() - rec["create_time"]) < 0.01
        family += [p, *p.children(recursive=True)]
    assert len(family) > 3 * 3  # gcs, raylets, dashboard, agents...: each `ray start` runs a tree

    r = distft("cluster", "down", env=live_cluster["env"])
    assert r.returncode == 0 and f"stopped the cluster at {live_cluster['address']}" in r.stdout
    left = [p for p in family if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not left, [(p.pid, p.name()) for p in left]
    assert not in_process_groups({rec["pid"] for rec in recorded})  # orphans of those trees included
    assert not (live_cluster["home"] / "cluster" / "cluster.json").exists()
    r = distft("cluster", "status", env=live_cluster["env"])
    assert r.returncode == 2 and "no distft cluster is up" in r.stderr


def in_process_groups(pgids: set[int]) -> list[int]:
    import psutil

    found = []
    for pid in psutil.pids():
        try:
            if os.getpgid(pid) in pgids:
                found.append(pid)
        except ProcessLookupError:
            pass
    return found
