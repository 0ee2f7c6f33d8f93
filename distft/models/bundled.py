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
from distft.errors import UserError

TINY_BASE_DIR = Path(__file__).parent / "tiny_base"
MANIFEST = "manifest.json"
HELDOUT = "heldout.jsonl"
# The files `from_pretrained` reads, plus the held-out corpus: what the manifest hashes.
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", HELDOUT)
# The context the base was pretrained with: the held-out loss is measured over the same window.
PRETRAIN_SEQ_LEN = 128


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


def heldout_loss(directory: Path, batch_size: int = 32) -> float:
    """Mean next-token loss over the held-out corpus, every token weighted alike, each document encoded as
    the pretraining stage encoded it (BOS, text, EOS; the first PRETRAIN_SEQ_LEN tokens), fp32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, use_safetensors=True).eval()
    docs = [(tok(t, add_special_tokens=True)["input_ids"] + [tok.eos_token_id])[:PRETRAIN_SEQ_LEN]
            for t in heldout_rows(directory)]
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(docs), batch_size):
            batch = docs[i:i + batch_size]
            width = max(map(len, batch))
            ids = torch.tensor([d + [tok.pad_token_id] * (width - len(d)) for d in batch])
            mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in batch])
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += loss.item()
            count += int((labels != -100).sum())
    return total / count
