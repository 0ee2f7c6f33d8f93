"""What a `distft submit` job runs on the cluster: `python -m distft.job_entrypoint JOB_ID train config.yaml ...`.

It takes the forwarded secrets out of the job's package, moves to a copy of the job's files beside
its outputs (launch/job_package.py says why), and then is the `distft` command line (`train`, or
`pipeline` for several stages): the same command runner as `distft` itself.

It lives in the package, not beside it, so that clusters that install distft from a wheel have
it; `jobs/entrypoint.py` runs the same thing for `ray job submit` users. It sits above the CLI
in the layers (pyproject.toml's import-linter contract), beside nothing else.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distft.cli import main as cli
from distft.launch.job_package import settle, take_secrets


def main(argv: list[str]) -> int:
    job_id, command = argv[0], argv[1:]
    names = take_secrets()
    if names:
        print(f"[job] forwarded environment: {', '.join(names)} (values not shown)", flush=True)
    home = settle(Path(command[1]), job_id)
    print(f"[job] job files in {home}", flush=True)
    return cli(command)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
