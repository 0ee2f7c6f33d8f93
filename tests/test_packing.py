"""Packing, as the SFT stage builds it: documents never see each other, and padding shrinks.

The trainer under test is the one `distft.stages.sft.run` builds (its SFTConfig, model,
tokenized data and collator), captured just before it would train. Every check feeds
batches through `SFTTrainer.compute_loss`, the call training makes, because transformers
only separates packed documents under conditions that call sets up (no attention mask, no
KV cache); a bare `model(...)` call on a hub config with `use_cache: true` would leak.
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from conftest import write_jsonl
from distft.config import ConfigError, build_config
from distft.stages import StageContext

WORDS = "the cat sees a green river and an old dog reads one long letter in the busy city".split()
MAX_LEN = 128


class TrainerBuilt(Exception):
    """Stops the stage once its trainer exists: nothing here needs training."""


def long_tailed_rows(n: int, seed: int = 0) -> list[dict]:
    """prompt_completion rows whose lengths are lognormal (median ~15 words, a few past MAX_LEN tokens)."""
    rng = random.Random(seed)
    return [{"prompt": " ".join(rng.choices(WORDS, k=rng.randint(3, 8))) + ":",
             "completion": " " + " ".join(rng.choices(WORDS, k=1 + int(rng.lognormvariate(2.5, 0.9))))}
            for _ in range(n)]


def raw_config(model_dir, train_file, packing: bool, method: str = "full") -> dict:
    return {
        "model": {"name_or_path": str(model_dir), "max_seq_len": MAX_LEN},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(train_file), "packing": packing, "max_eval_samples": 4},
        "method": {"name": method},
        "evaluate": {"data": None},
        "train": {"global_batch_size": 4, "micro_batch_size": 4, "max_steps": 1},
    }


def stage_trainer(monkeypatch, tmp_path, raw: dict):
    """The SFTTrainer exactly as the SFT stage configures it: taken when the stage skeleton calls `prepare_trainer` on
    it, after it has set its own collator and before any training."""
    from distft.stages import sft, trainer_stage

    built = {}

    def capture(trainer, stage, ctx):
        built["trainer"] = trainer
        raise TrainerBuilt

    monkeypatch.setattr(trainer_stage, "prepare_trainer", capture)
    with pytest.raises(TrainerBuilt):
        sft.run(build_config(raw), StageContext(run_dir=tmp_path / "run"))
    trainer = built["trainer"]
    trainer.model.eval()  # no dropout, so differences can only come from attention
    return trainer


def token_log_probs(trainer, batch: dict) -> torch.Tensor:
    """Per-token log-probs of the labels (zero where ignored), from the forward `compute_loss` runs."""
    seen = {}
    hook = trainer.model.register_forward_hook(lambda m, args, kwargs, out: seen.update(lp=out.log_probs),
                                               with_kwargs=True)
    try:
        with torch.no_grad():
            trainer.compute_loss(trainer.model, dict(batch))
    finally:
        hook.remove()
    return seen["lp"][0]


@pytest.fixture()
def train_file(tmp_path):
    return write_jsonl(tmp_path / "train.jsonl", long_tailed_rows(120))


@pytest.mark.parametrize("method", ["full", "lora"])
def test_packed_documents_attend_only_to_themselves(tiny_random, train_file, tmp_path, monkeypatch, method):
    # tiny_random's config keeps transformers' default use_cache=true, as hub models do.
    trainer = stage_trainer(monkeypatch, tmp_path, raw_config(tiny_random, train_file, packing=True, method=method))
    full = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in full  # boundaries come only from position_ids
    # Each packed bin is a row of its own (distft/data/packing.py): the row with the most documents.
    row = int((full["position_ids"] == 0).sum(dim=1).argmax())
    batch = {k: v[row:row + 1] for k, v in full.items() if v.dim()}  # not the batch's token count
    positions = batch["position_ids"][0]
    bounds = (positions == 0).nonzero().flatten().tolist() + [positions.numel()]
    assert len(bounds) > 4, "too few documents share the packed batch to test anything"

    packed = token_log_probs(trainer, batch)
    for start, end in itertools.pairwise(bounds):
        if (batch["labels"][0, start:end] == -100).all():
            continue  # the padding tail: nothing to compare
        ids = batch["input_ids"][:, start:end]
        alone = token_log_probs(trainer, {"input_ids": ids, "labels": batch["labels"][:, start:end],
                                          "attention_mask": torch.ones_like(ids)})
        torch.testing.assert_close(packed[start:end - 1], alone, atol=1e-4, rtol=0)

    # The same packed batch with a KV cache (what a plain forward does when the config says use_cache):
    # transformers then builds one causal mask over the whole row, and the documents after the first
    # change. So the equality above is the per-document mask at work, not an insensitive check.
    model_inputs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    with torch.no_grad():
        masked = trainer.model(**model_inputs, use_cache=False).logits
        leaky = trainer.model(**model_inputs, use_cache=True).logits
    second = slice(bounds[1], bounds[2])
    assert (masked[0, second] - leaky[0, second]).abs().max() > 1e-3


@pytest.mark.parametrize("method", ["prompt_tuning", "prefix_tuning"])
def test_packing_is_refused_for_virtual_token_methods(tmp_path, method):
    # peft drops position_ids for prompt tuning, and prefix tuning's cache disables the per-document
    # mask: measured here, packed log-probs then differ from the unpacked ones by 0.16 and 0.42.
    with pytest.raises(ConfigError, match=r"data\.packing.*Fix: data\.packing=false"):
        build_config(raw_config(tmp_path, tmp_path / "train.jsonl", packing=True, method=method))


def test_packing_cuts_padding_on_long_tailed_data(tiny_random, train_file, tmp_path, monkeypatch):
    def epoch(packing: bool) -> dict:
        trainer = stage_trainer(monkeypatch, tmp_path / str(packing), raw_config(tiny_random, train_file, packing))
        seen = {"batches": 0, "tokens": 0, "useful": 0}
        pad = trainer.processing_class.pad_token_id
        for batch in trainer.get_train_dataloader():
            seen["batches"] += 1
            seen["tokens"] += batch["input_ids"].numel()
            mask = batch.get("attention_mask")
            seen["useful"] += int(mask.sum()) if mask is not None else int((batch["input_ids"] != pad).sum())
        return seen

    padded, packed = epoch(False), epoch(True)
    assert packed["useful"] == padded["useful"]  # the same documents, none dropped or repeated
    assert padded["useful"] / padded["tokens"] < 0.7  # the long tail: most of a padded batch is padding
    assert packed["useful"] / packed["tokens"] > 0.9  # bins are nearly full rows
    assert packed["batches"] < padded["batches"] / 2


def test_packed_bins_stay_rows_with_their_documents_positions():
    from distft.data.packing import REAL_TOKENS, packed_rows_collator

    collate = packed_rows_collator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7, 8, 9], "labels": [-100, 6, 7, -100, 9], "seq_lengths": [3, 2]},
                     {"input_ids": [4, 3], "labels": [4, 3], "seq_lengths": [2]}])
    # No mask: documents come from positions. The real-token count is for the trainer's num_tokens.
    assert set(batch) == {"input_ids", "labels", "position_ids", REAL_TOKENS}
    assert batch[REAL_TOKENS].item() == 7
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9], [4, 3, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]  # the padding tail is its own
    # A document's first token is not predicted from the one before it; padding is never a target.
    assert batch["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, 3, -100, -100, -100]]
