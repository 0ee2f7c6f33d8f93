"""The recipe of the bundled tiny base: random init -> our own `pretrain` stage on a generated corpus.

distft ships the base this recipe built (`distft.models.bundled`), so the quickstart fine-tunes a
base that has already learned something, the same on every machine, through the same
`from_pretrained` path as a real model. `distft tiny-model DIR` runs the recipe again. It builds
in a temporary directory and renames it into place, so an interrupted build leaves nothing
half-written behind. The output carries distft's marker (`distft.owned`): a rebuild replaces only
a directory that an earlier build made.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from distft.config import build_config
from distft.models.bundled import (CORPUS_DOCS, HELDOUT, MANIFEST, PRETRAIN_SEQ_LEN, SHIPPED_FILES, file_hashes,
                                   heldout_loss, heldout_rows, read_manifest, split_corpus)
from distft.models.loading import cache_dir
from distft.models.tiny import generic_corpus, save_random_init
from distft.owned import (ForeignDirectoryError, building, is_empty_dir, is_owned, mark, refuse_file_in_path,
                          remove_owned)
from distft.stages.context import StageContext

KIND = "tiny-base"

PRETRAIN = {
    "model": {"max_seq_len": PRETRAIN_SEQ_LEN},
    "scaling": {"num_workers": 1},
    "stage": "pretrain",
    "data": {"format": "text", "max_eval_samples": 64},
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


def build_tiny_base(out_dir: str | Path | None = None, force: bool = False, log=print) -> Path:
    """Rebuild the tiny base into `out_dir` (default: `$DISTFT_CACHE/tiny-base-rebuilt`), unless a build is
    there already (`force`: rebuilt). This is the recipe that made the base distft ships
    (`distft.models.bundled`); `distft://tiny-base` always names the shipped one, so a rebuild is used by
    its path. The output holds the model, its tokenizer, the held-out corpus and a manifest with each
    file's sha256 and the held-out loss: copied into `distft/models/tiny_base/`, it is a new shipped base.

    Only a directory that is new, empty, or an earlier build of this function (it carries distft's
    marker) is written; any other directory is refused by name, untouched.
    """
    field = "tiny-model DIR" if out_dir else "DISTFT_CACHE"
    out = Path(out_dir) if out_dir else cache_dir() / "tiny-base-rebuilt"
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
    log(f"building the tiny base model in {out} (about 4 minutes on 2 cores)...")
    started = time.time()
    with building(out, KIND, field) as tmp:
        corpus = generic_corpus(n_docs=CORPUS_DOCS)
        # Every HELDOUT_EVERY-th document is held out: never trained on, shipped for scoring (and for
        # measuring what fine-tuning makes the base forget: the default retain set, stages/retain.py).
        train, heldout = split_corpus(corpus)
        save_random_init(tmp / "init", corpus=corpus)
        write_text_rows(tmp / "train.jsonl", train)
        write_text_rows(tmp / HELDOUT, heldout)
        raw = json.loads(json.dumps(PRETRAIN))
        raw["model"]["name_or_path"] = str(tmp / "init")
        raw["data"]["train"] = str(tmp / "train.jsonl")
        raw["data"]["eval"] = str(tmp / HELDOUT)
        raw["scaling"]["torch_threads"] = os.cpu_count() or 1
        cfg = build_config(raw, source="<tiny-base recipe>")
        from distft.stages.pretrain import run

        summary = run(cfg, StageContext(run_dir=tmp / "run"))
        final = tmp / "base"
        final.mkdir()
        trained = tmp / "run" / "pretrain" / "final"
        for name in SHIPPED_FILES:
            if name != HELDOUT:
                shutil.copyfile(trained / name, final / name)
        shutil.copyfile(tmp / HELDOUT, final / HELDOUT)
        write_manifest(final, summary, len(train), time.time() - started)
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
    manifest = read_manifest(out)
    log(f"tiny base ready in {time.time() - started:.0f}s: {out} "
        f"(held-out loss {manifest['heldout']['loss']:.4f} over {manifest['heldout']['docs']} documents)")
    return out


def write_text_rows(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


def write_manifest(directory: Path, summary: dict, train_docs: int, seconds: float) -> dict:
    """What was built, how, where and with what: the file hashes `tiny_base_dir()` checks, and the held-out
    loss the shipped-base test recomputes."""
    import platform

    import torch
    import transformers

    config = json.loads((directory / "config.json").read_text())
    manifest = {
        "name": "distft://tiny-base",
        "recipe": "distft tiny-model (distft.stages.tiny_base.build_tiny_base)",
        "built": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU(s), {platform.system()}",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "architecture": {k: config.get(k) for k in ("model_type", "hidden_size", "num_hidden_layers",
                                                     "num_attention_heads", "vocab_size")},
        "pretrain": {"steps": summary.get("steps"), "train_docs": train_docs, "seq_len": PRETRAIN_SEQ_LEN,
                     "seconds": round(seconds), "seed": PRETRAIN["train"]["seed"]},
        "heldout": {"file": HELDOUT, "docs": len(heldout_rows(directory)), "loss": heldout_loss(directory)},
        "sha256": file_hashes(directory),
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest
