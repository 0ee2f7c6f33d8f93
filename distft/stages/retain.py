"""Retain sets: what a model knew before a stage and should keep, scored before and after it.

Fine-tuning on narrow data can make a model lose what it knew (catastrophic forgetting); the
eval split and the held-out task only say how well it learned the new task. A retain set is
general data away from that task:
- text rows are scored by perplexity: the next-token loss over the documents, encoded as
  pretraining encodes text (models/perplexity.py), exponentiated;
- instruction rows by exact match of greedy answers, as the held-out task is, or by the mean of a
  reward function over them (`reward_fn`, as PPO and GRPO score rollouts);
- labelled rows (classify stages) by accuracy, with the stage's own labels and scorer.

Each rank scores a strided share and the sums are added, so the ranks' results are one result.
The change is relative and signed so that positive is worse: perplexity after/before - 1; exact
match, accuracy and reward (before - after)/|before|. A stage whose change on any set exceeds
`evaluate.forgetting_tolerance` is flagged `forgetting` in its summary.

The default: the bundled tiny base's held-out pretraining documents when the run's model is
`distft://tiny-base` (each stage of a pipeline built on it keeps that set); none for other models.
The scores before the stage are kept in `<stage>/retain_before.json`, so a resumed stage compares
against the model it really started from.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from distft.config import DistftConfig
from distft.data.formats import DataError
from distft.distributed.collectives import sum_over_ranks
from distft.distributed.sharding import full_parameters
from distft.models.bundled import bundled_texts
from distft.models.perplexity import document_nll, encode_documents
from distft.rl.rewards import RewardFunctionError, resolve
from distft.stages.context import StageContext
from distft.stages.evaluate import exact_match, mean_reward
from distft.stages.summary import describe_change, format_score as _fmt

BEFORE_FILE = "retain_before.json"
PROMPT_FORMATS = ("alpaca", "messages", "prompt_completion")


@dataclass
class RetainSet:
    name: str
    kind: str  # perplexity | exact_match | reward | accuracy
    source: str
    texts: list[str] | None = None  # perplexity
    rows: object = None  # exact_match, accuracy: the validated rows (a datasets.Dataset)
    fmt: str | None = None
    # accuracy: the stage's own scorer (a classifier's labels and encoding are the stage's), model -> accuracy;
    # reward: the reward function, (prompts, answers, references) -> scores
    score_fn: object = None

    @property
    def metric(self) -> str:
        """Its key in metrics and the summary: retain_<name>_<kind>; at evals, eval_retain_<name>_<kind>."""
        return f"retain_{self.name}_{self.kind}"

    @property
    def items(self) -> int:
        return len(self.texts) if self.texts is not None else len(self.rows)

    def worse_by(self, before: float | None, after: float | None) -> float | None:
        """The relative change, positive when worse; None without both scores."""
        if before is None or after is None:
            return None
        if self.kind == "perplexity":
            return after / before - 1.0
        # Higher is better; a reward may be negative, so the drop is relative to its size.
        return (before - after) / abs(before) if before else (0.0 if after >= before else 1.0)


def load_retain_sets(cfg: DistftConfig, stage) -> list[RetainSet]:
    """Each retain set read, validated and capped at its `max_samples` (the first rows)."""
    from distft.data.loading import load_checked

    sets = []
    for i, rc in enumerate(cfg.retain_for(stage)):
        field = f"evaluate.retain.{i}.data"
        texts = bundled_texts(rc.data)
        if texts is not None:
            fmt = "text"
        else:
            data = stage.data.model_copy(update={"format": "auto", "split": "train"})
            rows, fmt = load_checked(rc.data, data, field)
        kind = rc.kind or {"text": "perplexity", "classification": "accuracy"}.get(fmt, "exact_match")
        if kind == "accuracy" and fmt != "classification":
            raise DataError(f"{field}: accuracy is scored on labelled rows (text and label); {rc.data} has {fmt} "
                            "rows. Fix: point it at labelled rows.")
        if kind == "perplexity" and fmt != "text":
            raise DataError(f"{field}: perplexity is scored on text rows; {rc.data} has {fmt} rows. Fix: "
                            f"evaluate.retain.{i}.kind=exact_match, or point it at rows with a `text` field.")
        if kind in ("exact_match", "reward") and fmt not in PROMPT_FORMATS:
            raise DataError(f"{field}: {kind.replace('_', ' ')} scores answers to prompts (alpaca, messages or "
                            f"prompt_completion rows); {rc.data} has {fmt} rows. Fix: "
                            f"evaluate.retain.{i}.kind=perplexity.")
        if texts is None and kind == "perplexity":
            texts = list(rows["text"])
        score_fn = None
        if kind == "reward":
            try:
                score_fn = resolve(rc.reward_fn)
            except RewardFunctionError as e:
                raise DataError(f"evaluate.retain.{i}.reward_fn: {e}") from None
        if texts is not None:
            sets.append(RetainSet(rc.label(), kind, rc.data, texts=texts[:rc.max_samples], fmt=fmt))
        else:
            sets.append(RetainSet(rc.label(), kind, rc.data, rows=rows.select(range(min(len(rows), rc.max_samples))),
                                  fmt=fmt, score_fn=score_fn))
    return sets


def replay_texts(source: str, sets: list[RetainSet]) -> list[str]:
    """The text rows of `data.replay.source`, refused where they overlap a retain set: training on the
    retain set would hide the forgetting it is there to show."""
    from types import SimpleNamespace

    from distft.data.loading import load_checked

    texts = bundled_texts(source)
    if texts is None:
        rows, fmt = load_checked(source, SimpleNamespace(split="train", format="auto", text_field="text"),
                                 "data.replay.source")
        if fmt != "text":
            raise DataError(f"data.replay.source: replay rows are general text; {source} has {fmt} rows. Fix: "
                            "point it at rows with a `text` field.")
        texts = list(rows["text"])
    replayed = set(texts)
    for s in sets:
        kept = s.texts if s.texts is not None else []
        overlap = sum(t in replayed for t in kept)
        if overlap:
            raise DataError(f"data.replay.source: {overlap} of the {len(kept)} rows of the retain set {s.name} "
                            f"({s.source}) are also in {source}: training on them would hide forgetting. Fix: "
                            "replay text that no retain set holds (distft://tiny-base/corpus is disjoint from the "
                            "base's held-out documents).")
    return texts


def score_retain(model, tokenizer, sets: list[RetainSet], stage, ctx: StageContext, max_len: int,
                 rank0_only: bool = False) -> dict[str, float]:
    """{metric: score} for every set. Every rank calls it (each scores its share); `rank0_only`: only rank 0
    holds weights (FSDP2 before the Trainer shards the model), so it scores all and shares the result."""
    from distft.stages.trainer_setup import score_on_rank0  # (see retain_at_eval: it imports transformers')

    ev = stage.evaluate

    def one(s: RetainSet, rank: int, world: int) -> float:
        with full_parameters(model, stage.strategy.label()):
            if s.kind == "accuracy":  # every rank scores every row, as the classify stage's held-out score
                return s.score_fn(model)
            if s.kind == "perplexity":
                docs = encode_documents(tokenizer, s.texts[rank::world], max_len)
                nll, count = document_nll(model, docs, tokenizer.pad_token_id)
                if world > 1:
                    nll, count = sum_over_ranks([nll, count])
                return math.exp(nll / max(count, 1))
            if s.kind == "reward":
                return mean_reward(model, tokenizer, s.rows, s.fmt, s.score_fn, ev.max_new_tokens, ev.batch_size,
                                   rank, world)
            return exact_match(model, tokenizer, s.rows, s.fmt, ev.max_new_tokens, ev.batch_size, rank,
                               world).accuracy

    scores = {}
    for s in sets:
        if rank0_only and ctx.world_size > 1:
            scores[s.metric] = score_on_rank0(lambda s=s: one(s, 0, 1), ctx)
        else:
            scores[s.metric] = one(s, ctx.rank, ctx.world_size)
    return scores


def describe(sets: list[RetainSet], scores: dict[str, float]) -> str:
    return ", ".join(f"{s.name} {s.kind.replace('_', ' ')} {_fmt(s.kind, scores[s.metric])} ({s.items} items)"
                     for s in sets if s.metric in scores)


def save_before(stage_dir: Path, scores: dict[str, float]) -> None:
    Path(stage_dir).mkdir(parents=True, exist_ok=True)
    (Path(stage_dir) / BEFORE_FILE).write_text(json.dumps(scores, indent=1))


def read_before(stage_dir: Path) -> dict[str, float]:
    """The scores before the stage, as its first attempt recorded them; {} when there are none."""
    try:
        scores = json.loads((Path(stage_dir) / BEFORE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return {k: float(v) for k, v in scores.items() if isinstance(v, (int, float))} if isinstance(scores, dict) else {}


def forgetting_summary(sets: list[RetainSet], before: dict[str, float], after: dict[str, float],
                       tolerance: float) -> dict:
    """The summary's `retain` rows (before -> after, relative change) and the `forgetting` flag."""
    rows = []
    for s in sets:
        b, a = before.get(s.metric), after.get(s.metric)
        change = s.worse_by(b, a)
        rows.append({"name": s.name, "kind": s.kind, "source": s.source, "items": s.items, "before": b, "after": a,
                     "worse_by": None if change is None else round(change, 6),
                     "forgot": change is not None and change > tolerance})
    return {"retain": rows, "forgetting": any(r["forgot"] for r in rows), "forgetting_tolerance": tolerance}


class RetainWatch:
    """A stage's retain sets, scored before and after it: logged, written to metrics.jsonl and TensorBoard
    (step 0 and the last step, on rank 0) and summarised. Every rank calls `before` and `after`."""

    def __init__(self, sets: list[RetainSet], tokenizer, stage, ctx: StageContext, stage_dir: Path, max_len: int,
                 metrics_log=None):
        self.sets, self.tokenizer, self.stage, self.ctx = sets, tokenizer, stage, ctx
        self.stage_dir, self.max_len, self.metrics_log = Path(stage_dir), max_len, metrics_log
        self.scores_before: dict[str, float] = {}

    def before(self, model, rank0_only: bool = False) -> None:
        if not self.sets:
            return
        # A resumed stage starts from the same model; its first attempt's scores are what it started with.
        saved = read_before(self.stage_dir) if self.ctx.resume_from else {}
        if all(s.metric in saved for s in self.sets):
            self.scores_before = saved
            return
        self.scores_before = score_retain(model, self.tokenizer, self.sets, self.stage, self.ctx, self.max_len,
                                          rank0_only=rank0_only)
        self.ctx.log(f"[{self.stage.label()}] retain before training: {describe(self.sets, self.scores_before)}")
        if self.ctx.is_main:
            save_before(self.stage_dir, self.scores_before)
            self._write(0, self.scores_before)

    def after(self, model, step: int) -> dict:
        """The summary's keys: `retain` rows, `forgetting`, `forgetting_tolerance` ({} without retain sets)."""
        if not self.sets:
            return {}
        after = score_retain(model, self.tokenizer, self.sets, self.stage, self.ctx, self.max_len)
        tolerance = self.stage.evaluate.forgetting_tolerance
        summary = forgetting_summary(self.sets, self.scores_before, after, tolerance)
        changes = ", ".join(describe_change(r) for r in summary["retain"] if r["before"] is not None)
        flag = (f"FORGETTING: beyond evaluate.forgetting_tolerance={tolerance:g}" if summary["forgetting"]
                else f"within evaluate.forgetting_tolerance={tolerance:g}")
        self.ctx.log(f"[{self.stage.label()}] retain after training: {changes or describe(self.sets, after)}; {flag}")
        if self.ctx.is_main:
            self._write(step, after)
        return summary

    def _write(self, step: int, scores: dict[str, float]) -> None:
        if self.metrics_log is not None:
            self.metrics_log.write({"step": step, **scores})


class RetainAtEval:
    """`evaluate.retain_every_eval`: the retain scores join each eval's metrics as eval_retain_<name>_<kind>,
    so they reach metrics.jsonl, TensorBoard, a search's scheduler and early stopping like any eval metric.

    It adds them in `on_log` of the eval row, before distft's ReportCallback writes it: the Trainer hands
    every callback the same dict, and later the same one to `on_evaluate` (early stopping reads it there).
    Every rank logs an eval, so every rank scores its share. Made a TrainerCallback by `retain_at_eval`."""

    def __init__(self, tokenizer, sets: list[RetainSet], stage, ctx: StageContext, max_len: int):
        self.tokenizer, self.sets, self.stage, self.ctx, self.max_len = tokenizer, sets, stage, ctx, max_len

    def on_log(self, args, state, control, logs=None, model=None, **kwargs):
        if logs is None or "eval_loss" not in logs or model is None:
            return
        scores = score_retain(model, self.tokenizer, self.sets, self.stage, self.ctx, self.max_len)
        logs.update({f"eval_{k}": v for k, v in scores.items()})


def retain_at_eval(tokenizer, sets: list[RetainSet], stage, ctx: StageContext, max_len: int):
    # TrainerCallback here, not at the top: preflight imports this module to check retain sets, and
    # transformers' Trainer utilities would add 1.3 s to every `distft validate` and `train` (measured).
    from transformers import TrainerCallback

    cls = type("RetainAtEvalCallback", (RetainAtEval, TrainerCallback), {})
    return cls(tokenizer, sets, stage, ctx, max_len)
