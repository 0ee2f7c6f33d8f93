"""The tiny base that ships with distft: `distft://tiny-base`.

Its weights, tokenizer and the held-out split of its pretraining corpus are package data
(`distft/models/tiny_base/`, about 2 MB), built once by `distft tiny-model` (the recipe in
`distft.stages.tiny_base`) and recorded in `manifest.json`: each file's sha256, and the
held-out loss the weights give (`heldout_loss`). Every machine then fine-tunes the same base:
rebuilding it per machine gave different floating-point results on every CPU, and every
learning figure with it.

The name resolves on each machine that loads it (workers included) to the installed package's
files, which are checked against the manifest once per process. A build left in the distft
cache by an earlier version is not used.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

# The checkpoints' file hash (chunked): the same sha256 their manifests record.
from distft.distributed.checkpoint import _sha256 as sha256
from distft.config.schema import TINY_BASE_CORPUS, TINY_BASE_HELDOUT
from distft.errors import UserError

TINY_BASE_DIR = Path(__file__).parent / "tiny_base"
MANIFEST = "manifest.json"
HELDOUT = "heldout.jsonl"
# The files `from_pretrained` reads, plus the held-out corpus: what the manifest hashes.
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", HELDOUT)
# The context the base was pretrained with: the held-out loss is measured over the same window.
PRETRAIN_SEQ_LEN = 128
# The pretraining corpus: generated stories (models/tiny.py: generic_corpus, its default seed), every
# HELDOUT_EVERY-th held out. 12,000 stories, 8 epochs: with 4,000 (the first shipped recipe) the base reached
# a held-out loss of 0.73 and the quickstart 78-79% exact match over 3 seeds; 4,000 for 16 epochs: 0.68 and
# 95% (one seed); 12,000 for 8 epochs: 0.645 and 100% (one seed, 300 items). Measured 2026-12-06, 2 cores.
CORPUS_DOCS = 12_000
HELDOUT_EVERY = 50  # 2% of the corpus


class BundledModelError(UserError):
    """The files of a bundled model are missing or do not match what was shipped."""


def read_manifest(directory: Path | None = None) -> dict:
    directory = directory or TINY_BASE_DIR
    try:
        return json.loads((directory / MANIFEST).read_text())
    except (OSError, ValueError) as e:
        raise BundledModelError(f"distft://tiny-base: {directory / MANIFEST} cannot be read ({e}). Fix: reinstall "
                                "distft (pip install --force-reinstall distft, or `make install` in a checkout).")


def file_hashes(directory: Path) -> dict[str, str]:
    return {name: sha256(directory / name) for name in SHIPPED_FILES}


@lru_cache(maxsize=None)
def tiny_base_dir() -> Path:
    """The shipped tiny base, verified against its manifest (once per process: hashing is ~10 ms)."""
    expected = read_manifest(TINY_BASE_DIR)["sha256"]
    for name in SHIPPED_FILES:
        path = TINY_BASE_DIR / name
        if not path.is_file():
            raise BundledModelError(f"distft://tiny-base: {path} is missing. Fix: reinstall distft "
                                    "(pip install --force-reinstall distft, or `make install` in a checkout).")
        if sha256(path) != expected.get(name):
            raise BundledModelError(
                f"distft://tiny-base: {path} does not match the sha256 its manifest records, so it is not the "
                "base distft shipped. Fix: reinstall distft, or pass a rebuilt base by its path "
                "(model.name_or_path=DIR from `distft tiny-model DIR`).")
    return TINY_BASE_DIR


def heldout_rows(directory: Path | None = None) -> list[str]:
    """The held-out split of the base's pretraining corpus: documents it never trained on."""
    directory = directory or TINY_BASE_DIR
    return [json.loads(line)["text"] for line in (directory / HELDOUT).read_text().splitlines() if line.strip()]


def split_corpus(corpus: list[str]) -> tuple[list[str], list[str]]:
    """(the documents trained on, the held-out ones) of a pretraining corpus."""
    return [t for i, t in enumerate(corpus) if i % HELDOUT_EVERY], corpus[::HELDOUT_EVERY]


def bundled_texts(source: str) -> list[str] | None:
    """The text rows a `distft://tiny-base/...` data source names, or None for any other source.

    `heldout`: the shipped held-out documents (the default retain set). `corpus`: the documents the
    base was pretrained on, regenerated from the recipe (about 0.3 s) and checked against the shipped
    held-out split, so a replay source is the base's real pretraining data or an error."""
    if source == TINY_BASE_HELDOUT:
        return heldout_rows(tiny_base_dir())
    if source != TINY_BASE_CORPUS:
        return None
    from distft.models.tiny import generic_corpus

    trained, heldout = split_corpus(generic_corpus(n_docs=CORPUS_DOCS))
    if heldout != heldout_rows(tiny_base_dir()):
        raise BundledModelError(f"{TINY_BASE_CORPUS}: the corpus generator in this version of distft no longer "
                                "makes the documents the shipped base was pretrained on. Fix: replay a text "
                                "file of your own (data.replay.source=PATH).")
    return trained


def heldout_loss(directory: Path, batch_size: int = 32) -> float:
    """Mean next-token loss over the held-out corpus, every token weighted alike, each document encoded as
    the pretraining stage encoded it (BOS, text, EOS; the first PRETRAIN_SEQ_LEN tokens), fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.models.perplexity import document_nll, encode_documents

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
    total, count = document_nll(model, encode_documents(tok, heldout_rows(directory), PRETRAIN_SEQ_LEN),
                                tok.pad_token_id, batch_size)
    return total / count
