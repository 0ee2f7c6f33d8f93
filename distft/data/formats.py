"""Row formats -> token ids and loss labels.

Five formats are understood:

- `alpaca`: instruction, optional input, output
- `messages`: a list of {role, content} turns, rendered with the tokenizer's chat template
- `prompt_completion`: raw prompt and completion strings, concatenated
- `text`: one plain-text field (continued pretraining)
- `preference`: `chosen` and `rejected` responses to the same optional `prompt`, either all
  strings (concatenated, as TRL does) or all lists of {role, content} turns (chat template);
  reward models and preference methods train on these
- `feedback`: one `completion` to a `prompt` with a boolean `label` (desirable or not), both
  strings or both chat turns: unpaired binary feedback, which KTO trains on

Instruction rows train on the completion / assistant turns only (unless
`loss_on: all`). Chat templates need no `{% generation %}` markers: each
assistant turn's span is found by rendering the conversation prefix with and
without that turn, which works for any prefix-stable template. The text is then cut at
every span's ends and each piece tokenized on its own (see `_encode_chat`).
"""

from __future__ import annotations

from dataclasses import dataclass

from distft.errors import UserError

IGNORE = -100

REQUIRED = {
    "alpaca": ("instruction", "output"),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
}
ROLES = ("system", "user", "assistant")


class DataError(UserError, ValueError):
    """A dataset problem, with the file, row and field it concerns."""


def detect_format(columns: list[str], text_field: str = "text") -> str:
    cols = set(columns)
    if {"chosen", "rejected"} <= cols:
        return "preference"
    if {"prompt", "completion", "label"} <= cols:
        return "feedback"
    if {text_field, "label"} <= cols:
        return "classification"
    if "messages" in cols:
        return "messages"
    if {"instruction", "output"} <= cols:
        return "alpaca"
    if {"prompt", "completion"} <= cols:
        return "prompt_completion"
    if text_field in cols:
        return "text"
    raise DataError(
        f"cannot tell the data format from columns {sorted(cols)}. Fix: set data.format to one of alpaca "
        f"(instruction/input/output), messages, prompt_completion (prompt/completion), text (data.text_field) "
        f"preference (chosen/rejected, optional prompt), feedback (prompt/completion/label true or false) or "
        f"classification (data.text_field and label)."
    )


def check_row(row: dict, fmt: str, text_field: str) -> str | None:
    """Why `row` is unusable for `fmt`, or None if it is fine."""
    if fmt == "preference":
        return _check_preference(row)
    if fmt == "feedback":
        return _check_feedback(row)
    if fmt == "classification":
        label = row.get("label")
        if label is None:
            return "field `label` is missing"
        if isinstance(label, bool) or not isinstance(label, (str, int)):
            return f"field `label` must be a class name or an integer, got {type(label).__name__}"
    fields = (text_field,) if fmt in ("text", "classification") else REQUIRED[fmt]
    for field in fields:
        value = row.get(field)
        if value is None:
            return f"field `{field}` is missing"
        if fmt == "messages":
            return _check_messages(value)
        if not isinstance(value, str):
            return f"field `{field}` must be a string, got {type(value).__name__}"
        if field != "input" and not value.strip():
            return f"field `{field}` is empty"
    if fmt == "alpaca" and row.get("input") is not None and not isinstance(row["input"], str):
        return "field `input` must be a string"
    return None


def _check_messages(msgs) -> str | None:
    problem = _check_turns(msgs, "messages")
    if problem is None and not any(m["role"] == "assistant" for m in msgs):
        return "`messages` has no assistant turn to learn from"
    return problem


def _check_turns(msgs, field: str) -> str | None:
    if not isinstance(msgs, list) or not msgs:
        return f"field `{field}` must be a non-empty list of {{role, content}} turns"
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            return f"{field}[{j}] must have `role` and `content`"
        if m["role"] not in ROLES:
            return f"{field}[{j}].role {m['role']!r} is not one of {', '.join(ROLES)}"
        if not isinstance(m["content"], str):
            return f"{field}[{j}].content must be a string"
    return None


def _check_preference(row: dict) -> str | None:
    """A pair is `chosen`/`rejected` (plus an optional `prompt`), all strings or all chat turns."""
    for field in ("chosen", "rejected"):
        if row.get(field) is None:
            return f"field `{field}` is missing"
    chat = isinstance(row["chosen"], list)
    kind = "a list of {role, content} turns" if chat else "a string"
    for field in ("chosen", "rejected"):
        value = row[field]
        if chat:
            if not isinstance(value, list):
                return f"field `{field}` must be {kind} like `chosen`, got {type(value).__name__}"
            problem = _check_turns(value, field)
            if problem:
                return problem
            if value[-1]["role"] != "assistant":
                return f"field `{field}` must end with an assistant turn (the response that is scored)"
        elif not isinstance(value, str):
            return f"field `{field}` must be a string or a list of {{role, content}} turns, got {type(value).__name__}"
        elif not value.strip():
            return f"field `{field}` is empty"
    prompt = row.get("prompt")
    if prompt is not None:
        if chat != isinstance(prompt, list) or not isinstance(prompt, (list, str)):
            return f"field `prompt` must be {kind} like `chosen`, got {type(prompt).__name__}"
        if chat:
            problem = _check_turns(prompt, "prompt")
            if problem:
                return problem
    if row["chosen"] == row["rejected"]:
        return "fields `chosen` and `rejected` are identical, so the pair prefers nothing"
    return None


def _check_feedback(row: dict) -> str | None:
    """One response with a true/false label: `prompt` and `completion` both strings or both chat turns."""
    label = row.get("label")
    if not isinstance(label, bool):
        got = "missing" if label is None else f"{label!r} ({type(label).__name__})"
        return f"field `label` must be true or false (is the completion desirable?), got {got}"
    prompt, completion = row.get("prompt"), row.get("completion")
    for field, value in (("prompt", prompt), ("completion", completion)):
        if value is None:
            return f"field `{field}` is missing"
    if isinstance(prompt, list) or isinstance(completion, list):
        for field, value in (("prompt", prompt), ("completion", completion)):
            if not isinstance(value, list):
                return (f"field `{field}` must be a list of {{role, content}} turns like the other field, got "
                        f"{type(value).__name__}")
            problem = _check_turns(value, field)
            if problem:
                return problem
        if completion[-1]["role"] != "assistant":
            return "field `completion` must end with an assistant turn (the response that is labelled)"
        return None
    for field, value in (("prompt", prompt), ("completion", completion)):
        if not isinstance(value, str):
            return f"field `{field}` must be a string or a list of {{role, content}} turns, got {type(value).__name__}"
    if not completion.strip():
        return "field `completion` is empty"
    return None


def alpaca_prompt(row: dict) -> str:
    extra = (row.get("input") or "").strip()
    return f"{row['instruction']}\n\n{extra}" if extra else row["instruction"]


def to_messages(row: dict, fmt: str) -> list[dict]:
    if fmt == "messages":
        return row["messages"]
    if fmt == "alpaca":
        return [{"role": "user", "content": alpaca_prompt(row)}, {"role": "assistant", "content": row["output"]}]
    raise ValueError(fmt)


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # before truncation

    @property
    def truncated(self) -> bool:
        return self.full_length > len(self.input_ids)


def _finish(ids: list[int], labels: list[int], max_len: int) -> Encoded:
    return Encoded(ids[:max_len], labels[:max_len], len(ids))


def encode_row(row: dict, fmt: str, tokenizer, max_len: int, loss_on: str, text_field: str = "text") -> Encoded:
    if fmt in ("preference", "feedback"):
        fields, stages = (("chosen/rejected", "`stage: reward`, dpo, kto, orpo or simpo") if fmt == "preference"
                          else ("prompt, completion, label", "`stage: kto`"))
        raise DataError(
            f"{fmt} rows ({fields}) train a reward model or a preference method, not a language model by "
            f"next-token loss. Fix: use {stages}, or give this stage alpaca, messages, prompt_completion or text rows."
        )
    if fmt == "text":
        ids = tokenizer(row[text_field], add_special_tokens=True)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return _finish(ids, list(ids), max_len)
    if fmt == "prompt_completion":
        prompt = tokenizer(row["prompt"], add_special_tokens=True)["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            completion = completion + [tokenizer.eos_token_id]
        ids = prompt + completion
        labels = ids if loss_on == "all" else [IGNORE] * len(prompt) + completion
        return _finish(ids, list(labels), max_len)
    return _encode_chat(to_messages(row, fmt), tokenizer, max_len, loss_on)


def _encode_chat(messages: list[dict], tokenizer, max_len: int, loss_on: str) -> Encoded:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "the tokenizer has no chat template, so alpaca/messages rows cannot be rendered. Fix: use a model "
            "with a chat template, or convert the data to prompt_completion (data.format=prompt_completion)."
        )
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for j, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:j], tokenize=False, add_generation_prompt=True)
        upto = tokenizer.apply_chat_template(messages[: j + 1], tokenize=False)
        if not (full.startswith(upto) and upto.startswith(before)):
            raise DataError(
                "the chat template does not render conversations prefix by prefix, so assistant turns cannot be "
                "located for masking. Fix: set data.loss_on=all, or use a template without lookahead."
            )
        spans.append((len(before), len(upto)))
    # The boundary rule: the rendered conversation is cut at every assistant turn's start and end, and each
    # piece is tokenized on its own, as TRL tokenizes prompt and completion. No token then straddles the
    # boundary (tokenizing the whole text, a byte-level BPE merged the space that ends "assistant: " into
    # the answer's first token, which counted as prompt: no answer's first token was ever trained), and
    # the prompt's tokens are exactly those the model sees at generation time, when the prompt is tokenized
    # alone and the answer follows it token by token.
    cuts = sorted({0, len(full), *(i for span in spans for i in span)})
    answers = {a for a, _ in spans}
    ids, labels = [], []
    for start, end in zip(cuts, cuts[1:]):
        piece = tokenizer(full[start:end], add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if loss_on == "all" or start in answers else [IGNORE] * len(piece)
    return _finish(ids, labels, max_len)


def prompt_turns(row: dict, fmt: str) -> list[dict]:
    """The conversation before the (last) answer of an alpaca or messages row."""
    messages = to_messages(row, fmt)
    last = max(j for j, m in enumerate(messages) if m["role"] == "assistant")
    return messages[:last]


def generation_prompt(row: dict, fmt: str, tokenizer) -> str:
    """The text a model is given at eval time: everything before the (last) answer."""
    if fmt == "prompt_completion":
        return row["prompt"]
    if fmt == "text":
        raise DataError("exact-match evaluation needs prompt/answer rows, not plain text (data.format=text).")
    return tokenizer.apply_chat_template(prompt_turns(row, fmt), tokenize=False, add_generation_prompt=True)


def policy_prompt(row: dict, fmt: str, tokenizer) -> str | list[dict]:
    """What an RL policy is prompted with: the prompt string of prompt_completion rows (SFT trained on it
    raw), else the turns before the answer, which the trainer renders with the chat template itself.
    Rendered, it is `generation_prompt`: rollouts see what the exact-match evaluation sees."""
    if fmt == "prompt_completion":
        return row["prompt"]
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"the tokenizer has no chat template, so {fmt} rows cannot be turned into prompts. Fix: use a model "
            "with a chat template, or convert the data to prompt_completion (data.format=prompt_completion)."
        )
    return prompt_turns(row, fmt)


def reference_answer(row: dict, fmt: str) -> str:
    if fmt == "prompt_completion":
        return row["completion"]
    return [m for m in to_messages(row, fmt) if m["role"] == "assistant"][-1]["content"]


def scored_ids(prompt, response, tokenizer) -> list[int]:
    """The tokens a reward model reads for `response` to `prompt`, as TRL's RewardTrainer builds them.

    Chat turns (lists of {role, content}) are rendered with the chat template, prompt turns
    first; strings are concatenated and end with the EOS token. PPO scores its samples
    through this function too, so the reward model sees exactly what it was trained on.
    """
    if isinstance(response, list):
        if not getattr(tokenizer, "chat_template", None):
            raise DataError(
                "the tokenizer has no chat template, so preference rows made of chat turns cannot be rendered. "
                "Fix: use a model with a chat template, or give `prompt`/`chosen`/`rejected` as strings."
            )
        text = tokenizer.apply_chat_template(list(prompt or []) + list(response), tokenize=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = (prompt or "") + response
    eos = tokenizer.eos_token
    if eos and not text.endswith(eos):
        text += eos
    return tokenizer(text)["input_ids"]


def encode_preference(row: dict, tokenizer) -> tuple[list[int], list[int]]:
    """(chosen_ids, rejected_ids) for a validated preference row."""
    prompt = row.get("prompt")
    return scored_ids(prompt, row["chosen"], tokenizer), scored_ids(prompt, row["rejected"], tokenizer)
