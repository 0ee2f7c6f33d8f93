"""Real services the tests (and benchmarks/tracking.py) start on loopback."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_mlflow_server(root: Path, start_timeout_s: float = 90):
    """`mlflow server` on 127.0.0.1 with a sqlite backend and a local artifact store under `root`, served
    through the server as a team server does; yields its URI and stops it afterwards."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with (root / "server.log").open("w") as log:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port),
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination",
             str(root / "artifacts"), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT, cwd=root)
        uri = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + start_timeout_s
            while True:
                try:
                    with urllib.request.urlopen(f"{uri}/health", timeout=2):
                        break
                except OSError:
                    if proc.poll() is not None or time.time() > deadline:
                        raise RuntimeError("mlflow server did not start: "
                                           + (root / "server.log").read_text()[-2000:]) from None
                    time.sleep(0.3)
            yield uri
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
