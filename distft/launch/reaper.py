"""Stop the private Ray cluster of a distft process that was killed outright (SIGKILL, OOM killer).

On a normal exit, and on Ctrl-C or SIGTERM, `ray.shutdown()` stops the cluster that
`ray.init(address="local")` started. A process killed outright runs nothing: Ray's GCS and
raylet notice and exit, but its dashboard agent and runtime-env agent were seen still running
a minute later (Ray 2.60), orphans holding ports and memory. So, once the cluster is up, a
small watcher process records the cluster's processes (pid and start time, so a reused pid is
never touched) and waits for the distft process to end; whatever is left of them then is
killed, with its children.

    python -m distft.launch.reaper OWNER_PID OWNER_START PID:START [PID:START ...]
"""

from __future__ import annotations

import subprocess
import sys
import time


def start_reaper(owner_pid: int) -> subprocess.Popen | None:
    """Watch `owner_pid`'s current descendants (its private Ray cluster); None if there are none."""
    import psutil

    owner = psutil.Process(owner_pid)
    family = [f"{p.pid}:{p.create_time()}" for p in owner.children(recursive=True)]
    if not family:
        return None
    return subprocess.Popen([sys.executable, "-m", "distft.launch.reaper", str(owner_pid), str(owner.create_time()),
                             *family], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)


def _same(pid: int, started: float):
    import psutil

    try:
        p = psutil.Process(pid)
        return p if abs(p.create_time() - started) < 0.01 and p.status() != psutil.STATUS_ZOMBIE else None
    except psutil.Error:
        return None


def main(argv: list[str]) -> int:
    import psutil

    owner_pid, owner_start, *family = argv
    watched = [(int(pid), float(start)) for pid, start in (x.split(":") for x in family)]
    while _same(int(owner_pid), float(owner_start)):
        if not any(_same(*w) for w in watched):
            return 0  # the cluster was shut down normally (ray.shutdown): nothing to watch
        time.sleep(1.0)
    time.sleep(5.0)  # Ray's own processes get a moment to exit by themselves first
    left = [p for p in (_same(*w) for w in watched) if p]
    for p in left:
        try:
            for child in p.children(recursive=True):
                child.kill()
            p.kill()
        except psutil.Error:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
