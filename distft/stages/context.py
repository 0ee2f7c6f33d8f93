"""What a stage needs from its environment, injected so stages never import Ray.

Under Ray Train the launcher builds a `StageContext` whose `report` wraps
`ray.train.report`; in tests and single-process runs it is a plain object
(report appends to `reported`), and stages run unchanged.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass
class StageContext:
    run_dir: Path
    stage_index: int = 0
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    # A checkpoint directory to resume from (the latest registered one), if any.
    resume_from: str | None = None
    # (metrics, checkpoint_dir, progress): `progress` marks a training-progress line a launcher may
    # keep to itself (it is in metrics.jsonl already); checkpoints, evals and the end always go out.
    report_fn: Callable[[dict, str | None, bool], None] | None = None
    # Pre-sharded data streams by name (e.g. Ray Data); None means "load from data.* paths".
    shard_fn: Callable[[str], object] | None = None
    # Under `distft tune`: given an eval's metrics, whether the search stopped this trial early.
    # Asked on rank 0 only, at evals; the stage shares the answer so every rank stops together.
    stop_fn: Callable[[dict], bool] | None = None
    # The tracking runs this stage logs to (MLflow, W&B: distft/launch/tracking.py makes them); rank 0 attaches.
    tracking: dict | None = None
    reported: list[dict] = field(default_factory=list)
    _trackers: object = field(default=None, repr=False)

    @property
    def trackers(self):
        """Rank 0's `Trackers` (stages/tracking.py) for `tracking`; None on the other ranks and without one."""
        if self._trackers is None and self.is_main and self.tracking:
            from distft.stages.tracking import Trackers

            self._trackers = Trackers(self.tracking, self.log)
        return self._trackers

    def close_trackers(self, ok: bool) -> None:
        if self._trackers is not None:
            self._trackers.close(ok)
            self._trackers = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def report(self, metrics: dict, checkpoint_dir: str | None = None, progress: bool = False) -> None:
        """Report metrics (and optionally a complete checkpoint directory). Call on every rank, with the
        same `progress` on each: a launcher that drops progress lines drops them on every rank alike."""
        self.reported.append(dict(metrics))
        if self.report_fn is not None:
            self.report_fn(metrics, checkpoint_dir, progress)

    def should_stop(self, metrics: dict) -> bool:
        """Rank 0's answer from `stop_fn` (False without one). Call on every rank when `stop_fn` is set."""
        from distft.distributed.collectives import broadcast_from_rank0

        return bool(broadcast_from_rank0(self.stop_fn(metrics) if self.is_main else None))

    def dataset_shard(self, name: str):
        return self.shard_fn(name) if self.shard_fn else None

    def log(self, message: str) -> None:
        if self.is_main:
            print(message, file=sys.stdout, flush=True)


def context_from_env(run_dir: str | Path, stage_index: int = 0, **kwargs) -> StageContext:
    """A context for torchrun or one process: rank and world size from the usual env vars."""
    return StageContext(
        run_dir=Path(run_dir),
        stage_index=stage_index,
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        **kwargs,
    )
