"""A stage's summary, `<stage>/summary.json`: written and read here only.

`StageSummary` types the keys every stage writes (`run_summary` for the Trainer stages, PPO its own);
each stage adds keys of its own beside them (task metrics, data counts), kept as they are. The file
keeps the order the stage wrote its keys in. A summary whose typed keys do not check is refused
when written (a bug of ours) and read as no summary (a damaged or foreign file: the stage counts as
not finished, and `distft runs` shows it so).
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError

FILE = "summary.json"


class StageSummary(BaseModel):
    model_config = ConfigDict(extra="allow")

    stage: str  # its label (the output sub-directory)
    kind: str | None = None  # sft, pretrain, reward, ppo, dpo, grpo, classify
    method: str | None = None
    strategy: str | None = None  # ddp, fsdp, zero2 ... (StrategyConfig.label)
    world_size: int | None = None
    steps: int | None = None
    trainable_params: int | None = None
    total_params: int | None = None
    wall_seconds: float | None = None
    model_dir: str | None = None  # the export, `<stage>/final`
    # Digest of everything the stage's output depends on; a pipeline rerun reuses the stage while it is unchanged.
    fingerprint: str | None = None


def write_stage_summary(stage_dir: Path, summary: dict) -> None:
    StageSummary.model_validate(summary)
    (Path(stage_dir) / FILE).write_text(json.dumps(summary, indent=2))


def read_stage_summary(stage_dir: Path) -> dict | None:
    """The summary in `stage_dir`, or None when there is none or it does not read as one."""
    try:
        summary = json.loads((Path(stage_dir) / FILE).read_text())
        StageSummary.model_validate(summary)
    except (OSError, ValueError, ValidationError):  # ValidationError is a ValueError; named for the reader
        return None
    return summary


def format_score(kind: str, value: float) -> str:
    """A retain score as people read it: exact match in percent, perplexity to three decimals."""
    return f"{value:.1%}" if kind in ("exact_match", "accuracy") else f"{value:.3f}"


def describe_change(row: dict) -> str:
    """`base perplexity 3.214 -> 3.402 (+5.8%)`: a summary's retain row, with its score's own relative change."""
    kind, before, after = row["kind"], row.get("before"), row.get("after")
    if before is None or after is None:
        known = after if after is not None else before
        return f"{row['name']} {kind.replace('_', ' ')} {format_score(kind, known)}" if known is not None else row["name"]
    change = f" ({after / before - 1:+.1%})" if before else ""
    return f"{row['name']} {kind.replace('_', ' ')} {format_score(kind, before)} -> {format_score(kind, after)}{change}"


def describe_retain(summary: dict) -> str | None:
    """The retain result of a stage summary in one line, or None when it scored no retain set."""
    rows = summary.get("retain") or []
    if not rows:
        return None
    tolerance = summary.get("forgetting_tolerance")
    verdict = (f"FORGETTING (a score worse by more than {tolerance:.0%}; data.replay kept it within that in "
               "benchmarks/forgetting.py: README, \"Forgetting\")" if summary.get("forgetting")
               else f"no forgetting beyond {tolerance:.0%}") if tolerance is not None else ""
    return ", ".join(describe_change(r) for r in rows) + (f"; {verdict}" if verdict else "")
