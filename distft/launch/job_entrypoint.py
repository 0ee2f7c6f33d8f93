"""Moved to `distft.job_entrypoint`: the job's entry point runs the `distft` command line, a layer
above launch (pyproject.toml's import-linter contracts). This stub names the new path for anyone
who still runs or imports the old one."""

import sys

MOVED = ("distft.launch.job_entrypoint moved to distft.job_entrypoint: run `python -m distft.job_entrypoint "
         "JOB_ID train config.yaml ...` (what `distft submit` runs), or import main from distft.job_entrypoint")

if __name__ == "__main__":
    sys.exit(MOVED)
raise ImportError(MOVED)
