"""Packed bins as batch rows, for attention without a varlen kernel (sdpa, eager: every CPU run).

TRL's padding-free packing concatenates a batch's bins into one row and tells documents apart
by `position_ids`. A flash-attention varlen kernel then attends within each document only; sdpa
and eager build one dense mask over the whole row instead: with B bins of up to max_seq_len
tokens, (B x max_seq_len)^2 scores, B times the attention work of padded rows. Measured on the
2-core CPU (benchmarks/packing.py): TRL's flattened 1x4096 row took 3.07 s per step, the same
tokens as 8 rows of 512 took 0.66 s.

So here each bin stays a row. Rows are right-padded to the longest bin; the padding tail is
one more "document" (its positions restart at 0) with no labels, and causal attention keeps
real tokens from ever seeing it. There is no attention mask: transformers then builds the
per-document causal mask from the position resets, within each row. A document's first
token gets no label, since its prediction would come from the previous document.
"""

from __future__ import annotations

from distft.data.formats import IGNORE

REAL_TOKENS = "distft_real_tokens"  # the batch's tokens without padding, for the trainer's count (not the model)


def uses_varlen_kernel(model) -> bool:
    """Flash attention packs efficiently by itself (TRL's flattened row); everything else wants rows."""
    return str(getattr(model.config, "_attn_implementation", "") or "").startswith("flash")


def packed_rows_collator(pad_token_id: int):
    import torch

    def collate(examples: list[dict]) -> dict:
        width = max(len(e["input_ids"]) for e in examples)
        input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        position_ids = torch.zeros((len(examples), width), dtype=torch.long)
        for row, e in enumerate(examples):
            n = len(e["input_ids"])
            lengths = list(e["seq_lengths"]) + ([width - n] if width > n else [])
            position_ids[row] = torch.cat([torch.arange(k) for k in lengths])
            input_ids[row, :n] = torch.as_tensor(e["input_ids"])
            labels[row, :n] = torch.as_tensor(e.get("labels", e["input_ids"]))
        labels[position_ids == 0] = IGNORE
        real = torch.tensor(sum(len(e["input_ids"]) for e in examples))
        return {"input_ids": input_ids, "labels": labels, "position_ids": position_ids, REAL_TOKENS: real}

    return collate
