"""A submitted job's package on the cluster: its forwarded secrets and the copy of its files it works from.

1. The forwarded secrets (run.forward_env) come in the job's package; `take_secrets` moves them
   into the job process's environment and deletes the file, so they live there and, through the
   object store, in the Ray Train workers' (launch/jobs.py explains why not runtime_env env_vars).
   Ray may unpack the package again on other nodes (and on this one, when several raylets share a
   machine); each Ray Train worker deletes the copy on its node as it starts (`scrub_unpacked_secrets`).
2. `settle` moves the job to a copy of its files in `<run.output_dir>/.jobs/<run name>-<job id>/`.
   Ray's unpacked copy is not a safe place to stay: when several raylets share a machine, each one
   may unpack the package again into the same directory as the job's runtime env reaches it,
   deleting the driver's working directory under it (seen with Ray 2.60). The output directory is
   where every node can read (launch/cluster.py's storage rule), so the workers find the data there.

The job's entry point itself (`python -m distft.job_entrypoint`) is a layer above: it runs the
`distft` command line.
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
