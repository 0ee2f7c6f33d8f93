"""Packing on long-tailed SFT data: the useful-token fraction of padded batches, and tokens/s with and without packing.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/packing.py           # 5 reps per mode, 2-6 min on 2 cores
    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/packing.py --quick   # 3 reps, shorter runs, < 2 min

The data are prompt_completion rows whose token lengths are lognormal (median ~56, a long
tail up to model.max_seq_len=512, max/median ~9), as instruction data tends to be. The SFT
stage runs for real (`distft.stages.sft.run`, one process, Ray-free, full fine-tuning of the
pretrained tiny base) with data.packing=false and data.packing=true, the same rows and the
same micro-batch size B: a padded batch is B rows padded to the longest of them; a packed
batch is B best-fit-decreasing bins of up to max_seq_len tokens. With sdpa or eager attention
(here) distft keeps each bin a row, its documents told apart by position_ids
(distft/data/packing.py); with flash attention TRL's one padding-free row. The modes alternate for
--reps repetitions.

A step's time is the wall time between consecutive optimizer steps (data collation, forward,
backward, optimizer step). The first --warmup steps of every run are left out. A run's
tokens/s is its measured tokens over its measured time; total tokens count padding, useful
tokens do not. The table gives the median over repetitions and the min-max range, never a
single run. Target (the issue's): packed useful tokens/s >= 0.9 x padded total tokens/s,
i.e. packing keeps the raw throughput while it stops spending it on padding.

Reading the numbers: a packed row is max_seq_len long, a padded one only as long as its batch's
longest row, and causal attention costs more per token in a longer row; so packed total
tokens/s sits a little under padded total tokens/s on a CPU, while useful tokens/s is what
packing buys. Before distft kept bins as rows, TRL's flattened row of B x max_seq_len tokens had
one dense mask over all of it: packing ran at 0.30x the padded total tokens/s here.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TARGET = 0.9
MODES = {"padded": False, "packed": True}


class MeasurementDone(Exception):
    """Raised after the last measured step: the stage's evaluation and export are not timed."""


def long_tailed_rows(tokenizer, n: int, median: int, sigma: float, max_len: int, seed: int) -> list[dict]:
    """prompt_completion rows whose token lengths (prompt + completion + EOS) follow a lognormal law.

    Completions are runs of words from the tiny base's own corpus, so the text tokenizes the way
    the model saw it; lengths are counted with the tokenizer, word by word, and capped at max_len.
    """
    from distft.models.tiny import generic_corpus

    rng = random.Random(seed)
    words = " ".join(generic_corpus(2000, seed=seed)).split()
    cost: dict[str, int] = {}

    def tokens(word: str) -> int:
        if word not in cost:
            cost[word] = len(tokenizer(" " + word, add_special_tokens=False)["input_ids"])
        return cost[word]

    prompt = "Continue the story:"
    fixed = len(tokenizer(prompt, add_special_tokens=False)["input_ids"]) + 1  # the prompt and EOS
    rows = []
    for _ in range(n):
        target = min(max_len, max(fixed + 4, round(rng.lognormvariate(math.log(median), sigma))))
        budget = target - fixed
        start, picked = rng.randrange(len(words)), []
        while budget > 0:
            word = words[(start + len(picked)) % len(words)]
            budget -= tokens(word)
            picked.append(word)
        rows.append({"prompt": prompt, "completion": " " + " ".join(picked)})
    return rows


def length_summary(tokenizer, rows: list[dict]) -> dict:
    lengths = sorted(len(tokenizer(r["prompt"] + r["completion"], add_special_tokens=False)["input_ids"]) + 1
                     for r in rows)
    median = statistics.median(lengths)
    return {"rows": len(lengths), "median": median, "mean": statistics.fmean(lengths),
            "p90": lengths[int(0.9 * (len(lengths) - 1))], "max": lengths[-1], "max_over_median": lengths[-1] / median}


def stage_config(model_dir: Path, data: Path, packing: bool, args) -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_len": args.max_len},
        "scaling": {"num_workers": 1, "torch_threads": args.threads},
        "stage": "sft",
        "method": {"name": "full"},
        "data": {"train": str(data), "packing": packing, "max_eval_samples": 2},
        "evaluate": {"data": None},
        # No checkpoint, eval or log line inside the measured steps.
        "train": {"max_steps": args.steps, "global_batch_size": args.batch, "micro_batch_size": args.batch,
                  "log_every": 10_000, "save_every": 10_000, "eval_every": 10_000, "seed": 0},
    }


class StepLog:
    """Per-step wall time and token counts of the run in progress, filled by the stage's patched callback."""

    steps: ClassVar[list[dict]] = []
    pending: ClassVar[dict] = {}
    max_steps: ClassVar[int] = 0

    @classmethod
    def reset(cls, max_steps: int, pad_id: int) -> None:
        cls.steps, cls.pending, cls.max_steps, cls.pad_id = [], {"tokens": 0, "useful": 0}, max_steps, pad_id

    @classmethod
    def count(cls, module, args, kwargs) -> None:
        """A forward pre-hook: the tokens each training forward sees."""
        if module.training:
            ids = kwargs["input_ids"]
            # Packed batches have no mask: each bin is a row, right-padded to the longest bin with pad ids.
            mask = kwargs.get("attention_mask")
            cls.pending["tokens"] += ids.numel()
            cls.pending["useful"] += int(mask.sum()) if mask is not None else int((ids != cls.pad_id).sum())


def step_timer(base):
    class StepTimer(base):
        """The stage's own callback, plus a clock at each optimizer step and the token counts of its forwards."""

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            model.register_forward_pre_hook(StepLog.count, with_kwargs=True)
            return super().on_train_begin(args, state, control, model=model, **kwargs)

        def on_step_begin(self, args, state, control, **kwargs):
            StepLog.pending.setdefault("last", time.perf_counter())  # later steps start where the previous ended
            return super().on_step_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            now, pending = time.perf_counter(), StepLog.pending
            StepLog.steps.append({"seconds": now - pending["last"], "tokens": pending["tokens"],
                                  "useful": pending["useful"]})
            pending.update(last=now, tokens=0, useful=0)
            result = super().on_step_end(args, state, control, **kwargs)
            if state.global_step >= StepLog.max_steps:
                raise MeasurementDone
            return result

    return StepTimer


def run_once(raw: dict, run_dir: Path) -> list[dict]:
    """One real SFT stage run in this process, stopped after its last step; returns the per-step log.

    In-process, not a fresh process per run: importing torch, transformers, TRL and peft takes
    ~12 s here, longer than a quick run's measured steps. What the runs share (the allocator,
    datasets' cache of the tokenized rows) is shared by both modes alike.
    """
    import gc

    from distft.config import build_config
    from distft.stages import sft
    from distft.stages.context import StageContext

    from distft.models.loading import load_tokenizer

    cfg = build_config(raw)
    StepLog.reset(cfg.stages[0].train.max_steps, load_tokenizer(cfg.model).pad_token_id)
    try:
        sft.run(cfg, StageContext(run_dir=run_dir))
    except MeasurementDone:
        pass
    gc.collect()
    return list(StepLog.steps)


def summarize(steps: list[dict], warmup: int) -> dict:
    kept = steps[warmup:]
    seconds = sum(s["seconds"] for s in kept)
    tokens, useful = sum(s["tokens"] for s in kept), sum(s["useful"] for s in kept)
    return {"total_tps": tokens / seconds, "useful_tps": useful / seconds, "useful_fraction": useful / tokens,
            "tokens_per_step": tokens / len(kept), "step_s": seconds / len(kept)}


def machine_lines() -> list[str]:
    import torch
    import transformers
    import trl

    from mfu import device_name  # benchmarks/ is on sys.path when a benchmark runs as a script

    return [f"date: {datetime.date.today().isoformat()}   machine: {device_name(gpu=False)}",
            f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"trl {trl.__version__}"]


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(runs: dict[str, list[dict]], args, lengths: dict, model_dir: Path) -> str:
    padded, packed = runs["padded"], runs["packed"]
    # Paired by repetition: a run and the other mode's run right after it saw the same machine state.
    ratios = [k["useful_tps"] / p["total_tps"] for p, k in zip(padded, packed)]
    gains = [k["useful_tps"] / p["useful_tps"] for p, k in zip(padded, packed)]
    ratio = statistics.median(ratios)
    lines = [
        f"model: {model_dir.name} (full fine-tuning, {args.threads} torch threads), attention: sdpa",
        f"data: {lengths['rows']} prompt_completion rows, tokens per row median {lengths['median']:.0f}, "
        f"mean {lengths['mean']:.0f}, p90 {lengths['p90']}, max {lengths['max']} "
        f"(max/median {lengths['max_over_median']:.1f}); model.max_seq_len={args.max_len}",
        f"micro-batch B={args.batch}; {args.steps} steps per run, first {args.warmup} left out; "
        f"{args.reps} alternating repetitions per mode; median (min-max) over repetitions",
        "",
        "| mode | useful-token fraction | tokens / step | step time | total tok/s | useful tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for name, rs in runs.items():
        lines.append(f"| {name} | {spread([r['useful_fraction'] for r in rs], '{:.3f}')} "
                     f"| {spread([r['tokens_per_step'] for r in rs])} "
                     f"| {spread([1000 * r['step_s'] for r in rs])} ms "
                     f"| {spread([r['total_tps'] for r in rs])} | {spread([r['useful_tps'] for r in rs])} |")
    lines += [
        "",
        f"packed useful tok/s / padded total tok/s: {spread(ratios, '{:.2f}')} "
        f"(target >= {TARGET}: {'met' if ratio >= TARGET else 'MISSED'})",
        f"packed useful tok/s / padded useful tok/s (what packing buys): {spread(gains, '{:.2f}')}",
    ]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions per mode (>= 3 for a spread)")
    p.add_argument("--steps", type=int, default=24, help="optimizer steps per run")
    p.add_argument("--warmup", type=int, default=4, help="first steps of each run left out")
    p.add_argument("--batch", type=int, default=8, help="micro-batch size B (rows or packed bins)")
    p.add_argument("--max-len", type=int, default=512, help="model.max_seq_len, and the packed bin size")
    p.add_argument("--rows", type=int, default=3000)
    p.add_argument("--median", type=int, default=56, help="median tokens per row")
    p.add_argument("--sigma", type=float, default=0.8, help="lognormal sigma of the row lengths")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--model", type=Path, help="a Llama-style HF directory (default: the pretrained tiny base)")
    p.add_argument("--quick", action="store_true", help="3 reps of 6 steps (first 2 left out): under 2 minutes")
    p.add_argument("--json", type=Path, help="also write every run's per-step measurements here")
    args = p.parse_args()
    if args.quick:
        args.reps, args.steps, args.warmup = 3, 6, 2
    if args.steps - args.warmup < 2:
        p.error("--steps must exceed --warmup by at least 2")

    started = time.time()
    from transformers import AutoTokenizer

    from distft.data.task import write_jsonl
    from distft.stages import trainer_setup as setup
    from distft.models.bundled import tiny_base_dir

    # trainer_setup.stage_callbacks looks this name up each time the stage builds its callbacks.
    setup.ReportCallback = step_timer(setup.ReportCallback)
    model_dir = args.model or tiny_base_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = long_tailed_rows(tokenizer, args.rows, args.median, args.sigma, args.max_len, seed=0)
    lengths = length_summary(tokenizer, rows)
    runs: dict[str, list[dict]] = {name: [] for name in MODES}
    raw_steps: dict[str, list] = {name: [] for name in MODES}
    with tempfile.TemporaryDirectory(prefix="distft-packing-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        write_jsonl(rows, data)
        for rep in range(args.reps):
            # Alternate which mode goes first, so a slow drift of the machine does not favour one.
            order = list(MODES) if rep % 2 == 0 else list(MODES)[::-1]
            for name in order:
                t0 = time.time()
                steps = run_once(stage_config(model_dir, data, MODES[name], args), work / f"{name}-{rep}")
                runs[name].append(summarize(steps, args.warmup))
                raw_steps[name].append(steps)
                r = runs[name][-1]
                print(f"[rep {rep + 1}/{args.reps}] {name}: {r['total_tps']:,.0f} total tok/s, "
                      f"{r['useful_tps']:,.0f} useful tok/s, useful fraction {r['useful_fraction']:.3f} "
                      f"({time.time() - t0:.0f}s)", flush=True)
    print()
    print("\n".join(machine_lines()))
    print(table(runs, args, lengths, model_dir))
    print(f"benchmark wall time: {time.time() - started:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"runs": runs, "steps": raw_steps, "lengths": lengths}, indent=2))


if __name__ == "__main__":
    main()
