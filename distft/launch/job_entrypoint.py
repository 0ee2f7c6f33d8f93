"""What a `distft submit` job runs on the cluster: `python -m distft.launch.job_entrypoint JOB_ID train config.yaml ...`.

1. It takes the forwarded secrets (run.forward_env) out of the job's package, deleting the
   file, so they live in this process's environment and, through the object store, in the
   Ray Train workers' (launch/jobs.py explains why not runtime_env env_vars). Ray may unpack
   the package again on other nodes (and on this one, when several raylets share a machine);
   each Ray Train worker deletes the copy on its node as it starts (`scrub_unpacked_secrets`).
2. It moves to a copy of the job's files in `<run.output_dir>/.jobs/<run name>-<job id>/`.
   Ray's unpacked copy is not a safe place to stay: when several raylets share a machine
   (`distft cluster up`), each one unpacks the package again into the same directory as the
   job's runtime env reaches it, deleting the driver's working directory under it (seen with
   Ray 2.60). The output directory is where every node can read (launch/cluster.py's storage
   rule), so the workers find the data there.
3. Then it is the `distft` command line (`train`, or `pipeline` for several stages).

It lives in the package, not beside it, so that clusters that install distft from a wheel
have it; `jobs/entrypoint.py` runs the same thing for `ray job submit` users.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

SECRETS_FILE = ".distft_secrets.json"


def take_secrets() -> list[str]:
    path = Path(SECRETS_FILE)
    if not path.is_file():
        return []
    secrets = json.loads(path.read_text())
    path.unlink()
    os.environ.update(secrets)
    return sorted(secrets)


def scrub_unpacked_secrets() -> None:
    """Delete the secrets file from the job package Ray unpacked on this node (a Ray Train worker's cwd
    is elsewhere; the package's directory is on sys.path)."""
    for entry in sys.path:
        if "working_dir_files" in entry:
            Path(entry, SECRETS_FILE).unlink(missing_ok=True)
    Path(SECRETS_FILE).unlink(missing_ok=True)


def settle(config: Path, job_id: str) -> Path:
    """Copy the job's files next to its outputs and work from there; returns the new directory."""
    import yaml

    run = yaml.safe_load(config.read_text()).get("run", {})
    home = Path(run["output_dir"]) / ".jobs" / f"{run['name']}-{job_id}"
    shutil.copytree(Path.cwd(), home, ignore=shutil.ignore_patterns(SECRETS_FILE))
    os.chdir(home)
    return home


def main(argv: list[str]) -> int:
    job_id, command = argv[0], argv[1:]
    names = take_secrets()
    if names:
        print(f"[job] forwarded environment: {', '.join(names)} (values not shown)", flush=True)
    home = settle(Path(command[1]), job_id)
    print(f"[job] job files in {home}", flush=True)
    from distft.cli import main as cli

    return cli(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
