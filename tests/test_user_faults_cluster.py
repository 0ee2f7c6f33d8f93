"""Issue 18, items 7, 8 and 11, as users meet them: the worker environment, what listens, and the
local multi-node cluster's token, ports, job list and logs; each through the real `distft` command.

Fast cases need no Ray: a port inside Ray's worker-port range, a token file that does not exist
(with and without a server to talk to), and a token file at mode 644 that distft finds.
Slow cases: one private-cluster `distft train` that samples, while it runs, every listening socket
of distft's and Ray's processes and a Ray Train worker's /proc/<pid>/environ; one `distft cluster up`
that checks its ports, its token's mode, `jobs list` and `jobs logs`.
"""

from __future__ import annotations

import http.server
import json
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from faults import REPO, assert_unchanged, check_failure, run_distft, snapshot, user_env
from servers import free_port

AUTH_VARS = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
LOOPBACK = ("127.0.0.1", "::1", "::ffff:127.0.0.1")


def clean_env(home: Path, **extra) -> dict[str, str]:
    """A user's environment with its own HOME (so ~/.ray/auth_token is this test's) and no Ray auth set."""
    env = user_env(HOME=home, DISTFT_CACHE=home / "cache", **extra)
    for key in AUTH_VARS:
        if key not in extra:
            env.pop(key, None)
    return env


def closed_port() -> int:
    port = free_port()
    with pytest.raises(OSError):  # the fault: nothing listens there
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    return port


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def http_server():
    """A server that answers on loopback, so only the token can be what is missing."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---------------------------------------------------------------- fast: no Ray


def test_port_inside_rays_worker_port_range_is_refused_up_front(tmp_path):
    port = 16379
    assert 10002 <= port <= 19999  # the fault: Ray's default --min/--max-worker-port
    before = snapshot(tmp_path)
    r = run_distft("cluster", "up", "--port", port, env=clean_env(tmp_path), timeout=120)
    check_failure(r, 2, ("--port 16379 is inside Ray's worker-port range (10002-19999)", "Fix: distft cluster up --port"))
    assert_unchanged(before, snapshot(tmp_path))  # nothing started: no state, no token, no logs


@pytest.mark.parametrize("server", ["none", "answers"])
def test_missing_token_file_is_named(tmp_path, server):
    home = tmp_path / "home"
    home.mkdir()
    assert not (home / ".ray" / "auth_token").exists()  # the fault: no token anywhere
    srv = http_server() if server == "answers" else None
    url = f"http://127.0.0.1:{srv.server_address[1] if srv else closed_port()}"
    before = snapshot(tmp_path)
    try:
        r = run_distft("jobs", "list", "--address", url, env=clean_env(home), timeout=120)
    finally:
        if srv:
            srv.shutdown()
    if srv:
        check_failure(r, 2, (f"the token file {home / '.ray' / 'auth_token'} does not exist", "Fix: export RAY_AUTH_TOKEN_PATH"))
        assert "refused" not in r.stderr
    else:  # no server either: that is said first
        check_failure(r, 2, f"cannot reach a Ray job server at {url}")
    assert_unchanged(before, snapshot(tmp_path))


def test_token_path_naming_no_file_is_said_not_aborted(tmp_path):
    missing = tmp_path / "cluster-token"
    assert not missing.exists()  # the fault: RAY_AUTH_TOKEN_PATH points at nothing (Ray itself aborts on it)
    srv = http_server()
    before = snapshot(tmp_path)
    try:
        r = run_distft("jobs", "list", "--address", f"http://127.0.0.1:{srv.server_address[1]}",
                       env=clean_env(tmp_path, RAY_AUTH_TOKEN_PATH=missing), timeout=120)
    finally:
        srv.shutdown()
    check_failure(r, 2, f"the token file {missing} does not exist")
    assert_unchanged(before, snapshot(tmp_path))


def test_token_file_found_at_644_is_made_600(tmp_path):
    home = tmp_path / "home"
    token = home / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("0" * 64)
    token.chmod(0o644)
    assert stat.S_IMODE(token.stat().st_mode) == 0o644  # the fault: what Ray writes when it generates a token
    before = snapshot(tmp_path)
    r = run_distft("jobs", "list", "--address", f"http://127.0.0.1:{closed_port()}", env=clean_env(home),
                   timeout=120)
    check_failure(r, 2, "cannot reach a Ray job server")
    assert stat.S_IMODE(token.stat().st_mode) == 0o600
    assert_unchanged(before, snapshot(tmp_path))  # the same bytes: only the mode changed


# ---------------------------------------------------------------- slow: real Ray


def listening(pids) -> list[tuple[int, str, str, int]]:
    """(pid, process title, ip, port) of every listening TCP socket of `pids`."""
    out = []
    for pid in pids:
        try:
            p = psutil.Process(pid)
            title = " ".join(p.cmdline())[:80] or p.name()
            out += [(pid, title, c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="inet")
                    if c.status == psutil.CONN_LISTEN]
        except psutil.Error:
            pass
    return out


def environ_of(pid: int) -> dict[str, str] | None:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return None
    return dict(x.decode(errors="replace").partition("=")[::2] for x in raw.split(b"\0") if x)


def descendants(pid: int) -> list[int]:
    try:
        return [p.pid for p in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


@pytest.mark.slow
def test_private_cluster_workers_get_the_allowlist_and_every_port_is_on_loopback(tmp_path, tiny_random):
    """One private-cluster run: a planted X_SECRET never reaches a worker; a name in run.forward_env
    does; every port of distft's and Ray's processes is on loopback but torch's TCPStore on rank 0
    (README: "What listens"); the token Ray generated is mode 600 afterwards."""
    home = tmp_path / "home"
    home.mkdir()
    out = tmp_path / "runs"
    cfg = yaml.safe_load((REPO / "configs" / "quickstart.yaml").read_text())
    cfg["run"] = {"forward_env": ["DEMO_API_KEY"], "output_dir": str(out), "name": "envcheck"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    env = clean_env(home, X_SECRET="planted-do-not-forward", DEMO_API_KEY="forwarded-value")
    before = snapshot(tmp_path / "c.yaml", tiny_random)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "distft"), "train", str(tmp_path / "c.yaml"),
         f"model.name_or_path={tiny_random}", "train.max_steps=4", "scaling.num_workers=1",
         "evaluate.max_samples=4", "train.epochs=1"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    sockets: set = set()
    workers: dict[int, dict] = {}
    try:
        while proc.poll() is None:
            family = descendants(proc.pid)
            sockets.update(listening([proc.pid, *family]))
            for pid in family:
                try:
                    title = " ".join(psutil.Process(pid).cmdline()).strip()
                except psutil.Error:
                    continue
                if not title.startswith("ray::"):
                    continue
                if pid in workers:  # a pooled ray::IDLE process takes the actor's name once it runs it
                    workers[pid]["titles"].add(title)
                elif (seen := environ_of(pid)) is not None:
                    workers[pid] = {"titles": {title}, "env": seen}
            time.sleep(0.3)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    context = f"\n--- stderr:\n{stderr[-3000:]}\n--- stdout:\n{stdout[-2000:]}"
    assert proc.returncode == 0, f"exit {proc.returncode}" + context
    assert "Traceback" not in stderr, context

    train_workers = {pid: w for pid, w in workers.items() if any("RayTrainWorker" in t for t in w["titles"])}
    assert train_workers, f"no Ray Train worker was seen: {[w['titles'] for w in workers.values()]}"
    for pid, w in workers.items():  # every Ray worker and actor: the controller, the train workers...
        assert "X_SECRET" not in w["env"], f"{w['titles']} (pid {pid}) has the planted X_SECRET"
        assert "DEMO_API_KEY" not in w["env"]  # forwarded through the object store, not the environ
    # What each rank found in its environment once the stage ran (names only; the driver's summary field).
    placed = [json.loads(f.read_text()) for f in out.glob("envcheck/*/placement/rank-*.json")]
    assert placed and all(p["forwarded_env"] == ["DEMO_API_KEY"] for p in placed), placed

    assert sockets, "no listening socket was sampled"
    exposed = [s for s in sockets if s[2] not in LOOPBACK]
    # Documented: torch's TCPStore (rank 0's rendezvous) listens on all interfaces, whatever its address.
    undocumented = [s for s in exposed if not (s[0] in train_workers and s[2] in ("::", "0.0.0.0"))]
    assert not undocumented, f"listening beyond loopback: {undocumented}"

    token = home / ".ray" / "auth_token"
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600
    assert_unchanged(before, snapshot(tmp_path / "c.yaml", tiny_random))


@pytest.fixture()
def local_cluster(tmp_path):
    """`distft cluster up` with one worker raylet, a 644 token Ray wrote before, its own HOME; always downed."""
    home = tmp_path / "home"
    token = home / ".ray" / "auth_token"
    token.parent.mkdir(parents=True)
    token.write_text("a" * 64)
    token.chmod(0o644)
    env = clean_env(home)
    port, dash = free_port(), free_port()
    up = run_distft("cluster", "up", "--workers", "1", "--cpus-per-worker", "1", "--port", port,
                    "--dashboard-port", dash, env=env, timeout=300)
    try:
        assert up.returncode == 0, up.stderr[-3000:] + up.stdout[-2000:]
        yield {"env": env, "token": token, "address": f"127.0.0.1:{port}", "url": f"http://127.0.0.1:{dash}",
               "state": json.loads((home / "cache" / "cluster" / "cluster.json").read_text())}
    finally:
        run_distft("cluster", "down", env=env, timeout=300)


@pytest.mark.slow
def test_local_cluster_token_ports_jobs_and_logs(local_cluster):
    env, url = local_cluster["env"], local_cluster["url"]
    assert stat.S_IMODE(local_cluster["token"].stat().st_mode) == 0o600  # reused, and made 600

    pids = [rec["pid"] for rec in local_cluster["state"]["processes"]]
    family = pids + [c for p in pids for c in descendants(p)]
    dash = int(url.rsplit(":", 1)[1])
    # The Jobs API is on loopback; what else listens, and why it cannot be, is in the README ("What listens").
    assert {s[2] for s in listening(family) if s[3] == dash} <= set(LOOPBACK)

    assert run_distft("cluster", "status", env=env, timeout=120).returncode == 0  # a driver connection
    # A job whose Ray task prints one marker line (built at run time: the log echoes the entrypoint): it must
    # reach the job's log once, not once per node.
    script = ("import ray; ray.init(address='auto'); "
              "f = ray.remote(num_cpus=1)(lambda: print('distft-' + 'marker-line', flush=True)); "
              "ray.get(f.remote()); import time; time.sleep(3)")
    submit = subprocess.run(
        [sys.executable, "-c", "import sys\nfrom ray.job_submission import JobSubmissionClient\n"
         f"c = JobSubmissionClient({url!r})\nprint(c.submit_job(entrypoint=sys.argv[1], entrypoint_num_cpus=0))",
         f"python -c \"{script}\""],
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(local_cluster["token"])},
        capture_output=True, text=True, timeout=120)
    assert submit.returncode == 0, submit.stderr[-2000:]
    job_id = submit.stdout.strip().splitlines()[-1]
    follow = run_distft("jobs", "logs", job_id, "--follow", "--address", url, env=env, timeout=180)
    assert follow.returncode == 0, follow.stderr[-2000:] + follow.stdout[-2000:]
    assert follow.stdout.count("distft-marker-line") == 1, follow.stdout[-2000:]
    logs = run_distft("jobs", "logs", job_id, "--address", url, env=env, timeout=120)
    assert logs.stdout.count("distft-marker-line") == 1, logs.stdout[-2000:]

    listed = run_distft("jobs", "list", "--address", url, env=env, timeout=120)
    assert listed.returncode == 0, listed.stderr
    rows = [ln for ln in listed.stdout.splitlines()[1:] if ln.strip()]
    assert len(rows) == 1 and rows[0].startswith(job_id), listed.stdout  # no drivers of up/status
