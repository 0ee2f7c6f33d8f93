"""Generation-based evaluation: greedy answers scored by exact match.

With several ranks each scores a strided shard and the counts are summed, so
500 held-out items cost 1/N of the time on N workers.
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.data.formats import generation_prompt, reference_answer
from distft.distributed.collectives import sum_over_ranks
from distft.rl.rewards import normalize_answer


@dataclass
class ExactMatch:
    correct: int
    total: int
    examples: list[tuple[str, str, str]]  # (prompt, expected, got), a few for the log

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)


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


def answers(model, tokenizer, rows, fmt: str, max_new_tokens: int, batch_size: int = 64, rank: int = 0,
            world_size: int = 1) -> tuple[list[str], list[str | None], list[str]]:
    """(prompts, reference answers, greedy answers) of this rank's strided share of `rows`."""
    rows = list(rows)[rank::world_size]
    prompts = [generation_prompt(r, fmt, tokenizer) for r in rows]
    refs = [reference_answer(r, fmt) for r in rows]
    was_training = model.training
    model.eval()
    got = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
    if was_training:
        model.train()
    return prompts, refs, got


def exact_match(model, tokenizer, rows, fmt: str, max_new_tokens: int, batch_size: int = 64,
                rank: int = 0, world_size: int = 1) -> ExactMatch:
    prompts, refs, got = answers(model, tokenizer, rows, fmt, max_new_tokens, batch_size, rank, world_size)
    correct = sum(normalize_answer(g) == normalize_answer(r) for g, r in zip(got, refs))
    total = len(prompts)
    if world_size > 1:  # not when rank 0 scores alone (score_on_rank0): the others are elsewhere
        correct, total = (int(x) for x in sum_over_ranks([correct, total]))
    return ExactMatch(correct, total, list(zip(prompts, refs, got))[:3])


def mean_reward(model, tokenizer, rows, fmt: str, reward_fn, max_new_tokens: int, batch_size: int = 64,
                rank: int = 0, world_size: int = 1) -> float:
    """The mean of `reward_fn(prompts, answers, references)` over greedy answers to every row."""
    prompts, refs, got = answers(model, tokenizer, rows, fmt, max_new_tokens, batch_size, rank, world_size)
    total, count = float(sum(reward_fn(prompts, got, refs))) if prompts else 0.0, len(prompts)
    if world_size > 1:
        total, count = sum_over_ranks([total, count])
    return total / max(count, 1)


def reward_scores(model, sequences: list[list[int]], pad_token_id: int, batch_size: int = 64):
    """One scalar per token sequence from a sequence-classification (reward) model, as a float tensor.

    Batches are right-padded; the model reads its score at the last non-pad token.
    """
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for i in range(0, len(sequences), batch_size):
            batch = sequences[i : i + batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(batch), width), dtype=torch.long)
            for j, s in enumerate(batch):
                ids[j, : len(s)] = torch.tensor(s)
                mask[j, : len(s)] = 1
            with torch.no_grad():
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            out.append(logits[:, 0].float().cpu())
    finally:
        if was_training:
            model.train()
    return torch.cat(out) if out else torch.zeros(0)


@dataclass
class Pairwise:
    correct: int
    total: int
    margin_sum: float  # sum of score(chosen) - score(rejected)
    by_kind: dict[str, tuple[int, int]]  # kind -> (correct, total), for rows that carry a `kind`

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.total, 1)

    @property
    def mean_margin(self) -> float:
        return self.margin_sum / max(self.total, 1)


def pairwise_accuracy(model, pad_token_id: int, chosen: list[list[int]], rejected: list[list[int]],
                      kinds: list[str] | None = None, batch_size: int = 64, rank: int = 0,
                      world_size: int = 1) -> Pairwise:
    """Share of pairs whose chosen response scores strictly above the rejected one (ties count as wrong)."""
    import torch

    names = sorted(set(kinds)) if kinds else []
    mine = range(rank, len(chosen), world_size)
    good = reward_scores(model, [chosen[i] for i in mine], pad_token_id, batch_size)
    bad = reward_scores(model, [rejected[i] for i in mine], pad_token_id, batch_size)
    wins = (good > bad).long()
    # counts: correct, total, then (correct, total) per kind; the margin's sum goes with them
    counts = torch.tensor([int(wins.sum()), len(wins)] + [0] * (2 * len(names)), dtype=torch.long)
    for win, i in zip(wins.tolist(), mine):
        if names:
            k = 2 + 2 * names.index(kinds[i])
            counts[k] += win
            counts[k + 1] += 1
    c, margin = counts.tolist(), float((good - bad).sum())
    if world_size > 1:  # not when rank 0 scores alone (score_on_rank0): the others are elsewhere
        *sums, margin = sum_over_ranks([*c, margin])
        c = [int(x) for x in sums]
    by_kind = {name: (c[2 + 2 * j], c[3 + 2 * j]) for j, name in enumerate(names)}
    return Pairwise(c[0], c[1], float(margin), by_kind)
