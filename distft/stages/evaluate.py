"""Generation-based evaluation: greedy answers scored by exact match.

With several ranks each scores a strided shard and the counts are summed, so
500 held-out items cost 1/N of the time on N workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.data.formats import generation_prompt, reference_answer


@dataclass
class ExactMatch:
    correct: int
    total: int
    examples: list[tuple[str, str, str]]  # (prompt, expected, got), a few for the log

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy completions for raw prompt strings (left-padded batches)."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    device = next(model.parameters()).device
    out: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.no_grad():
                ids = model.generate(
                    **batch,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                )
            new = ids[:, batch["input_ids"].shape[1] :]
            out.extend(tokenizer.batch_decode(new, skip_special_tokens=True))
    finally:
        tokenizer.padding_side = side
    return out


def exact_match(model, tokenizer, rows, fmt: str, max_new_tokens: int, batch_size: int = 64,
                rank: int = 0, world_size: int = 1) -> ExactMatch:
    rows = list(rows)[rank::world_size]
    prompts = [generation_prompt(r, fmt, tokenizer) for r in rows]
    refs = [reference_answer(r, fmt) for r in rows]
    was_training = model.training
    model.eval()
    got = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    if was_training:
        model.train()
    correct = sum(normalize_answer(g) == normalize_answer(r) for g, r in zip(got, refs))
    total = len(rows)
    if world_size > 1:
        import torch
        import torch.distributed as dist

        counts = torch.tensor([correct, total], dtype=torch.long)
        if dist.get_backend() == "nccl":
            counts = counts.cuda()
        dist.all_reduce(counts)
        correct, total = (int(x) for x in counts.tolist())
    return ExactMatch(correct, total, list(zip(prompts, refs, got))[:3])
