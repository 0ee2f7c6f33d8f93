"""Packing never lets attention cross sample boundaries: packed loss == unpacked loss."""

from __future__ import annotations

import datasets
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl.data_utils import pack_dataset
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from distft.data.loading import tokenize_dataset


def token_loss_sum(logits, labels) -> tuple[float, int]:
    logits, labels = logits[:, :-1], labels[:, 1:]
    keep = labels != -100
    loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum")
    return loss.item(), int(keep.sum())


def test_packed_loss_equals_unpacked_loss(tiny_base, alpaca_rows):
    tok = AutoTokenizer.from_pretrained(tiny_base)
    model = AutoModelForCausalLM.from_pretrained(tiny_base, attn_implementation="sdpa").eval()
    rows = datasets.Dataset.from_list(alpaca_rows[:12])
    ds, _ = tokenize_dataset(rows, "alpaca", tok, max_len=128, loss_on="all")

    with torch.no_grad():
        unpacked = [token_loss_sum(model(input_ids=torch.tensor([r["input_ids"]])).logits,
                                   torch.tensor([r["labels"]])) for r in ds]
    total, count = sum(u[0] for u in unpacked), sum(u[1] for u in unpacked)

    packed = pack_dataset(ds.select_columns(["input_ids", "labels"]), seq_length=128, strategy="bfd")
    assert len(packed) < len(ds)  # several samples really share a row
    batch = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id, padding_free=True)(list(packed))
    assert "attention_mask" not in batch  # boundaries come from position_ids
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits
    p_total, p_count = token_loss_sum(logits, batch["labels"])
    assert p_count == count
    assert abs(p_total - total) / total < 1e-4

    # The same packed row with attention allowed across samples gives a different loss,
    # so the equality above is evidence of masking, not an accident.
    with torch.no_grad():
        leaky = model(input_ids=batch["input_ids"], attention_mask=torch.ones_like(batch["input_ids"])).logits
    l_total, _ = token_loss_sum(leaky, batch["labels"])
    assert abs(l_total - total) / total > 1e-3
