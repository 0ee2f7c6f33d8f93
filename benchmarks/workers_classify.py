"""Does the worker count change what a classifier learns? MiniLM-L6, binary sentiment, one epoch at global
batch 16: 1 process x 16 against 2 gloo ranks x 8 (no Ray: the stage itself, as torchrun runs it), per seed.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/workers_classify.py --seeds 1 2 3 --out /tmp/wc

The held-out sentences use only sentiment words that never occur in training, so what carries over is what
the pretrained encoder knows about them. Prints one line per (seed, workers) and writes `<out>/results.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import time
from pathlib import Path

# Training words and held-out words never overlap.
POSITIVE = (["good", "great", "excellent", "wonderful", "lovely", "pleasant", "delightful", "enjoyable"],
            ["fantastic", "superb", "brilliant", "marvelous", "splendid", "terrific"])
NEGATIVE = (["bad", "awful", "terrible", "poor", "unpleasant", "disappointing", "boring", "nasty"],
            ["horrible", "dreadful", "lousy", "miserable", "appalling", "atrocious"])
THINGS = ["film", "meal", "hotel", "concert", "book", "service", "game", "trip", "show", "coffee", "room", "class"]
TEMPLATES = ["The {thing} was {word}.", "I thought the {thing} was {word}.", "What a {word} {thing} that was.",
             "Honestly, the {thing} felt {word} to me.", "Our {thing} yesterday was {word}.",
             "Everyone agreed the {thing} was {word}.", "It was a {word} {thing}, all things considered."]


def sentiment_rows(n: int, held_out: bool, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        words = (POSITIVE if label == "positive" else NEGATIVE)[int(held_out)]
        text = rng.choice(TEMPLATES).format(thing=rng.choice(THINGS), word=rng.choice(words))
        rows.append({"text": text, "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, world: int, port: int, stage: str, cfg_json: str, run_dir: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import DistftConfig
    from distft.distributed.process_group import leave_process_group
    from distft.stages import stage_runner
    from distft.stages.context import context_from_env

    ctx = context_from_env(run_dir)
    summary = stage_runner(stage)(DistftConfig.model_validate_json(cfg_json), ctx)
    losses = {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}
    Path(run_dir, f"rank{rank}.json").write_text(json.dumps({"summary": summary, "losses": losses}))
    leave_process_group()


def run_stage(stage: str, raw: dict, world: int, run_dir: Path) -> dict:
    """The stage on `world` spawned gloo ranks (in this process when 1); rank 0's summary and losses."""
    import torch.multiprocessing as mp

    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    cfg = build_config({**raw, "scaling": {"num_workers": world, "torch_threads": 1}})
    run_dir.mkdir(parents=True, exist_ok=True)
    if world == 1:
        ctx = StageContext(run_dir=run_dir)
        summary = stage_runner(stage)(cfg, ctx)
        return {"summary": summary,
                "losses": {m["step"]: m["loss"] for m in ctx.reported if "loss" in m and "stage_done" not in m}}
    mp.start_processes(_rank, args=(world, _free_port(), stage, cfg.model_dump_json(), str(run_dir)),
                       nprocs=world, start_method="spawn")
    return json.loads((run_dir / "rank0.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--train-rows", type=int, default=320)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--model", default="distft://minilm-l6")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()

    train = write_jsonl(a.out / "train.jsonl", sentiment_rows(a.train_rows, held_out=False, seed=0))
    held = write_jsonl(a.out / "held.jsonl", sentiment_rows(200, held_out=True, seed=1))
    results = []
    for seed in a.seeds:
        for world in a.workers:
            raw = {"model": {"name_or_path": a.model, "max_seq_len": 64}, "stage": "classify",
                   "data": {"train": str(train), "eval_fraction": 0.05},
                   "method": {"name": "full"},
                   "train": {"lr": a.lr, "scheduler": "linear", "warmup_ratio": 0.1, "epochs": 1, "seed": seed,
                             "global_batch_size": 16, "micro_batch_size": 16 // world, "log_every": 1,
                             "early_stopping": None},
                   "evaluate": {"data": str(held)}}
            started = time.time()
            r = run_stage("classify", raw, world, a.out / f"seed{seed}-w{world}")
            s = r["summary"]
            line = {"seed": seed, "workers": world, "steps": s["steps"], "accuracy_before": s["accuracy_before"],
                    "accuracy_after": s["accuracy_after"], "first_loss": s["first_logged_loss"],
                    "last_loss": s["last_logged_loss"], "seconds": round(time.time() - started, 1)}
            results.append(line)
            print(json.dumps(line), flush=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=2))
    for world in a.workers:
        acc = [r["accuracy_after"] for r in results if r["workers"] == world]
        print(f"{world} worker(s): held-out accuracy {min(acc):.3f}-{max(acc):.3f} over seeds {a.seeds}")


if __name__ == "__main__":
    main()
