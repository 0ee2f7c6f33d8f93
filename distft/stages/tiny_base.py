"""Build the bundled tiny base: random init -> our own `pretrain` stage on a generated corpus.

The quickstart then fine-tunes a base that has already learned something,
through the same `from_pretrained` path as a real model. The result is cached
(`$DISTFT_CACHE`, default ~/.cache/distft) and reused; it is built in a
temporary directory and renamed into place, so an interrupted build leaves
nothing half-written behind. It carries distft's marker (`distft.owned`): a
rebuild replaces only a directory that an earlier build made.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from distft.config import build_config
from distft.models.loading import tiny_base_path
from distft.models.tiny import generic_corpus, save_random_init
from distft.owned import (ForeignDirectoryError, building, is_empty_dir, is_owned, mark, refuse_file_in_path,
                          remove_owned)
from distft.stages.context import StageContext

KIND = "tiny-base"

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
    """The tiny base in `out_dir` (default: the cache), built unless one is there already (`force`: rebuilt).

    Only a directory that is new, empty, or an earlier build of this function (it carries
    distft's marker) is written; any other directory is refused by name, untouched.
    """
    field = "tiny-model DIR" if out_dir else "DISTFT_CACHE"
    out = Path(out_dir) if out_dir else tiny_base_path()
    refuse_file_in_path(out, field)
    if (out / "config.json").exists() and not force:
        return out
    # A build by an earlier distft has no marker, but its own pretraining summary.
    legacy = (out / "distft_pretrain_summary.json").is_file()
    if out.exists() and not is_empty_dir(out) and not is_owned(out, KIND) and not legacy:
        fix = "pass a new or empty directory, or delete it yourself" if out_dir else \
            "set DISTFT_CACHE to another directory, or delete it yourself"
        why = "was not built by distft, so --force does not replace it" if (out / "config.json").exists() else \
            "is not empty and was not made by distft"
        raise ForeignDirectoryError(f"{field}: {out} {why}; nothing was changed. Fix: {fix}.")
    log(f"building the tiny base model in {out} (one-time, about 90 s on 2 cores)...")
    started = time.time()
    with building(out, KIND, field) as tmp:
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
        mark(final, KIND)  # so that a later --force may replace it
        replaced = None
        if out.exists() and not is_empty_dir(out):  # an earlier build of ours (checked above)
            if legacy and not is_owned(out, KIND):
                mark(out, KIND)  # ours by its summary: marked, so the cleanup below may remove it
            replaced = out.with_name(f".{out.name}.partial-replaced-{os.getpid()}")
            os.rename(out, replaced)
        try:
            os.rename(final, out)  # onto nothing, or onto an empty directory
        except OSError:
            if not (out / "config.json").exists():
                if replaced is not None:
                    os.rename(replaced, out)  # the earlier build stays where it was
                raise
            log(f"another process finished a tiny base in {out} first; using it")
        if replaced is not None:
            remove_owned(replaced)
    remove_owned(tmp)  # the build's scratch (corpus, init, run logs): made by `building`
    log(f"tiny base ready in {time.time() - started:.0f}s: {out} (eval loss {summary['eval_loss']:.3f})")
    return out
