"""Run a config's stages without Ray, one process per rank under torchrun (or one process alone).

    torchrun --nproc-per-node 2 -m distft.stages configs/quickstart.yaml runs/plain [overrides]

The same stage code a Ray Train worker runs, given its rank from torchrun's environment.
For machines where Ray cannot go (a lone GPU box for a benchmark), and to tell Ray's cost
apart from the stage's (benchmarks/step.py). No resume, no Tune, no jobs: `distft train`
is the product; this is the stages with nothing around them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m distft.stages", description=__doc__.splitlines()[0])
    p.add_argument("config")
    p.add_argument("run_dir")
    p.add_argument("overrides", nargs="*")
    a = p.parse_args(argv)

    from distft.config import ConfigError, load_config
    from distft.distributed.process_group import leave_process_group
    from distft.stages import stage_runner
    from distft.stages.context import context_from_env

    try:
        cfg = load_config(a.config, a.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    for i, stage in enumerate(cfg.stages):
        stage_runner(stage.kind)(cfg, context_from_env(Path(a.run_dir), stage_index=i))
    leave_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
