"""A distft Ray Job's entrypoint, for `ray job submit` users:

    ray job submit --working-dir <dir with config.yaml> -- python entrypoint.py JOB_NAME train config.yaml --address auto

`distft submit` runs the same code as `python -m distft.job_entrypoint ...` (it is part
of the installed package, so clusters that install distft from a wheel have it); see
distft/job_entrypoint.py for what it does and why.
"""

import sys

from distft.job_entrypoint import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
