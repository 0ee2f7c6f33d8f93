"""Next-token loss over plain-text documents: the bundled base's recorded held-out loss and the
retain sets' perplexity (stages/retain.py) are the same computation.

Each document is encoded as the pretraining stage encodes text (BOS, the text, EOS), cut to
`max_len` tokens; the loss is the mean over every predicted token, all documents weighted by
their length. `document_nll` returns the sum and the count, so that ranks scoring shares of the
documents add them up exactly.
"""

from __future__ import annotations


def encode_documents(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    return [(tokenizer(t, add_special_tokens=True)["input_ids"] + [tokenizer.eos_token_id])[:max_len] for t in texts]


def document_nll(model, docs: list[list[int]], pad_token_id: int, batch_size: int = 32) -> tuple[float, int]:
    """(summed next-token loss, predicted tokens) over `docs`, in fp32, in eval mode, without gradients."""
    import torch

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for i in range(0, len(docs), batch_size):
                batch = docs[i:i + batch_size]
                width = max(map(len, batch))
                ids = torch.tensor([d + [pad_token_id] * (width - len(d)) for d in batch], device=device)
                mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in batch], device=device)
                # The last `width` positions: prompt tuning puts its virtual tokens' logits in front.
                logits = model(input_ids=ids, attention_mask=mask).logits[:, -width:][:, :-1].float()
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                                         ignore_index=-100, reduction="sum")
                total += loss.item()
                count += int((labels != -100).sum())
    finally:
        if was_training:
            model.train()
    return total, count
