"""Build the bundled tiny base: random init -> our own `pretrain` stage on a generated corpus.

The quickstart then fine-tunes a base that has already learned something,
through the same `from_pretrained` path as a real model. The result is cached
(`$DISTFT_CACHE`, default ~/.cache/distft) and reused; it is built in a
temporary directory and renamed into place, so an interrupted build leaves
nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path

from distft.config import build_config
from distft.models.loading import tiny_base_path
from distft.models.tiny import generic_corpus, save_random_init
from distft.stages.context import StageContext

PRETRAIN = {
    "model": {"max_seq_len": 128},
    "scaling": {"num_workers": 1},
    "stage": "pretrain",
    "data": {"format": "text", "eval_fraction": 0.02, "max_eval_samples": 64},
    "method": {"name": "full"},
    "train": {
        "lr": 2e-3,
        "scheduler": "cosine",
        "warmup_ratio": 0.05,
        "epochs": 8,
        "global_batch_size": 32,
        "micro_batch_size": 32,
        "log_every": 25,
        "seed": 0,
    },
    "evaluate": {"data": None},
}


def ensure_tiny_base(out_dir: str | Path | None = None, force: bool = False, log=print) -> Path:
    out = Path(out_dir) if out_dir else tiny_base_path()
    if (out / "config.json").exists() and not force:
        return out
    log(f"building the tiny base model in {out} (one-time, about 90 s on 2 cores)...")
    started = time.time()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".tiny-base-build-") as tmp:
        tmp = Path(tmp)
        corpus = generic_corpus()
        save_random_init(tmp / "init", corpus=corpus)
        (tmp / "corpus.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus))
        raw = json.loads(json.dumps(PRETRAIN))
        raw["model"]["name_or_path"] = str(tmp / "init")
        raw["data"]["train"] = str(tmp / "corpus.jsonl")
        raw["scaling"]["torch_threads"] = os.cpu_count() or 1
        cfg = build_config(raw, source="<tiny-base recipe>")
        from distft.stages.pretrain import run

        summary = run(cfg, StageContext(run_dir=tmp / "run"))
        final = tmp / "run" / "pretrain" / "final"
        (final / "distft_pretrain_summary.json").write_text(json.dumps(summary, indent=2))
        if out.exists():
            shutil.rmtree(out)
        final.rename(out)
    log(f"tiny base ready in {time.time() - started:.0f}s: {out} (eval loss {summary['eval_loss']:.3f})")
    return out
