"""A distft Ray Job's entrypoint: `distft submit` ships this file with the job and runs it on the cluster.

    python entrypoint.py train config.yaml --address auto

First it takes the forwarded secrets (run.forward_env) out of the job's package, deleting the
file, so they live only in this process's environment and, through the object store, in the
Ray Train workers' (distft/launch/jobs.py explains why not runtime_env env_vars).

Then it moves to a copy of the job's files in `<run.output_dir>/.jobs/<run name>/`. Ray's
unpacked copy is not a safe place to stay: when several raylets share a machine (`distft
cluster up`), each one unpacks the package again into the same directory as the job's
runtime env reaches it, deleting the driver's working directory under it (seen with Ray 2.60).
The output directory is also where every node can read (the storage rule of launch/cluster.py),
so the workers find the data there. Then it is just the `distft` command line.
"""

import json
import os
import shutil
import sys
from pathlib import Path

SECRETS_FILE = Path(".distft_secrets.json")  # distft.launch.jobs.SECRETS_FILE


def take_secrets() -> list[str]:
    if not SECRETS_FILE.is_file():
        return []
    secrets = json.loads(SECRETS_FILE.read_text())
    SECRETS_FILE.unlink()
    os.environ.update(secrets)
    return sorted(secrets)


def settle(config: Path) -> Path:
    """Copy the job's files next to its outputs and work from there; returns the new directory."""
    import yaml

    run = yaml.safe_load(config.read_text()).get("run", {})
    home = Path(run["output_dir"]) / ".jobs" / run["name"]
    shutil.copytree(Path.cwd(), home, dirs_exist_ok=True, ignore=shutil.ignore_patterns(SECRETS_FILE.name))
    os.chdir(home)
    return home


if __name__ == "__main__":
    names = take_secrets()
    if names:
        print(f"[job] forwarded environment: {', '.join(names)} (values not shown)", flush=True)
    home = settle(Path(sys.argv[2]))
    print(f"[job] job files in {home}", flush=True)
    from distft.cli import main

    sys.exit(main(sys.argv[1:]))
