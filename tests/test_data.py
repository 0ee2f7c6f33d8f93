"""Data formats, loss masking, validation errors and truncation statistics."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from distft.config import build_config
from distft.data.formats import IGNORE, DataError, detect_format, encode_row
from distft.data.loading import load_checked, load_rows, split_rows, tokenize_dataset


@pytest.fixture(scope="module")
def tok(tiny_random):
    return AutoTokenizer.from_pretrained(tiny_random)


def trained_text(tok, enc) -> str:
    return tok.decode([t for t, l in zip(enc.input_ids, enc.labels) if l != IGNORE])


def data_cfg(**data):
    return build_config({"stage": "sft", "data": data}).stages[0].data


def test_alpaca_trains_only_on_the_answer(tok):
    row = {"instruction": "Which animal is in this sentence?", "input": "The red fox ran.", "output": "fox"}
    enc = encode_row(row, "alpaca", tok, 128, "completion")
    assert trained_text(tok, enc).strip() == "fox</s>"
    full = tok.decode(enc.input_ids)
    assert "Which animal" in full and "The red fox ran." in full
    assert trained_text(tok, encode_row(row, "alpaca", tok, 128, "all")) == full


def test_multi_turn_messages_mask_every_non_assistant_turn(tok):
    msgs = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Name an animal."},
        {"role": "assistant", "content": "owl"},
        {"role": "user", "content": "Another one."},
        {"role": "assistant", "content": "goat"},
    ]
    enc = encode_row({"messages": msgs}, "messages", tok, 256, "completion")
    kept = trained_text(tok, enc)
    assert "owl" in kept and "goat" in kept
    assert "Name an animal" not in kept and "Be brief" not in kept and "Another" not in kept
    assert kept.count("</s>") == 2  # each assistant turn learns to stop


def test_prompt_completion_and_text(tok):
    enc = encode_row({"prompt": "The cat is", "completion": " red"}, "prompt_completion", tok, 64, "completion")
    assert trained_text(tok, enc) == " red</s>"
    enc = encode_row({"text": "The old dog reads the book."}, "text", tok, 64, "all")
    assert enc.labels == enc.input_ids and tok.decode(enc.input_ids).endswith("</s>")


def test_format_detection():
    assert detect_format(["instruction", "input", "output"]) == "alpaca"
    assert detect_format(["messages"]) == "messages"
    assert detect_format(["prompt", "completion"]) == "prompt_completion"
    assert detect_format(["text", "id"]) == "text"
    with pytest.raises(DataError, match="cannot tell the data format"):
        detect_format(["question", "answer"])


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_every_local_file_type_loads(tmp_path, alpaca_rows, suffix):
    import pandas as pd

    df = pd.DataFrame(alpaca_rows[:20])
    path = tmp_path / f"d{suffix}"
    {".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".json": lambda: df.to_json(path, orient="records"),
     ".csv": lambda: df.to_csv(path, index=False),
     ".parquet": lambda: df.to_parquet(path)}[suffix]()
    ds, fmt = load_checked(str(path), data_cfg(train=str(path)), "data.train")
    assert (len(ds), fmt) == (20, "alpaca")
    assert ds[3]["output"] == alpaca_rows[3]["output"]


def test_saved_datasets_directory_loads(tmp_path, alpaca_rows):
    import datasets

    datasets.Dataset.from_list(alpaca_rows[:5]).save_to_disk(tmp_path / "saved")
    assert len(load_rows(str(tmp_path / "saved"))) == 5


def test_row_missing_its_field_names_file_row_and_field(tmp_path, alpaca_rows):
    rows = [dict(r) for r in alpaca_rows[:10]]
    del rows[6]["output"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as e:
        load_checked(str(path), data_cfg(train=str(path)), "data.train")
    assert str(e.value) == f"data.train: {path} row 7: field `output` is missing (format alpaca)."


def test_wrong_typed_and_empty_fields(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    with pytest.raises(DataError, match="row 1: `messages` has no assistant turn"):
        load_checked(str(path), data_cfg(train=str(path)), "data.train")
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "  "}])
    with pytest.raises(DataError, match="row 1: field `completion` is empty"):
        load_checked(str(path), data_cfg(train=str(path)), "data.train")


def test_corrupt_jsonl_line_is_located(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "broken"\n')
    with pytest.raises(DataError, match=r"line 2 is not valid JSON"):
        load_rows(str(path))


def test_empty_and_missing_datasets(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match=r"empty.jsonl is empty. Fix: point it at a file with rows"):
        load_rows(str(empty))
    with pytest.raises(DataError, match="file not found: ./nope.jsonl"):
        load_rows("./nope.jsonl")


def test_eval_split_is_seeded_and_disjoint(tmp_path, alpaca_rows):
    path = write_jsonl(tmp_path / "t.jsonl", alpaca_rows)
    cfg = data_cfg(train=str(path), eval_fraction=0.1, max_eval_samples=None)
    train, held, fmt = split_rows(cfg, seed=1)
    assert (len(train), len(held)) == (180, 20)
    key = lambda r: (r["instruction"], r["input"])  # noqa: E731
    assert not {key(r) for r in train} & {key(r) for r in held}
    again, _, _ = split_rows(cfg, seed=1)
    assert again["input"] == train["input"]


def test_truncation_is_counted_not_silent(tok):
    import datasets

    rows = datasets.Dataset.from_list([{"text": "word " * 5}, {"text": "word " * 200}])
    ds, stats = tokenize_dataset(rows, "text", tok, max_len=32, loss_on="all")
    assert stats.truncated == 1 and stats.max_tokens > 32
    assert max(len(x) for x in ds["input_ids"]) == 32
    assert "1 (50.0%) truncated to model.max_seq_len=32" in stats.describe(32)


def test_rows_left_without_trainable_tokens_are_dropped_and_counted(tok):
    import datasets

    rows = datasets.Dataset.from_list(
        [{"prompt": "word " * 100, "completion": " yes"}, {"prompt": "short", "completion": " no"}]
    )
    ds, stats = tokenize_dataset(rows, "prompt_completion", tok, max_len=16, loss_on="completion")
    assert (len(ds), stats.dropped) == (1, 1)


def test_shipped_task_files_match_the_generator_and_are_disjoint():
    import json

    from conftest import REPO
    from distft.data.task import make_splits

    train, test = make_splits()
    read = lambda name: [json.loads(x) for x in (REPO / "configs" / "data" / name).read_text().splitlines()]  # noqa: E731
    assert read("facts_train.jsonl") == train and read("facts_test.jsonl") == test
    assert len(test) >= 500
    assert not {r["input"] for r in train} & {r["input"] for r in test}
    assert {r["instruction"] for r in test} == {r["instruction"] for r in train}  # same 4 question kinds


def test_shipped_topic_files_match_the_generator_and_test_only_unseen_words():
    import json

    from conftest import REPO
    from distft.data.formats import detect_format
    from distft.data.task import TOPIC_WORDS, make_topic_splits

    train, test = make_topic_splits()
    read = lambda name: [json.loads(x) for x in (REPO / "configs" / "data" / name).read_text().splitlines()]  # noqa: E731
    assert read("topics_train.jsonl") == train and read("topics_test.jsonl") == test
    assert detect_format(list(train[0])) == "classification"
    assert {r["label"] for r in test} == {r["label"] for r in train} == set(TOPIC_WORDS)
    seen = {w for words, _ in TOPIC_WORDS.values() for w in words}
    assert not any(w in r["text"].replace(",", " ").replace(".", " ").split() for r in test for w in seen)


def test_classification_rows_are_checked():
    from distft.data.formats import check_row

    assert check_row({"text": "a storm", "label": "weather"}, "classification", "text") is None
    assert check_row({"text": "a storm", "label": 3}, "classification", "text") is None
    assert check_row({"text": "a storm"}, "classification", "text") == "field `label` is missing"
    assert check_row({"text": "a", "label": [1]}, "classification", "text").startswith("field `label` must be")
    assert check_row({"label": "x"}, "classification", "text") == "field `text` is missing"


def test_tokenization_runs_once_and_a_rerun_reads_the_cache(tmp_path, alpaca_rows, tok):
    """The second preparation of the same rows reuses the first's token ids; any input of the
    encoding that changes (length limit, loss mask, the tokenizer's template) tokenizes afresh."""
    path = write_jsonl(tmp_path / "cached.jsonl", alpaca_rows)
    cfg = data_cfg(train=str(path), eval_fraction=0.1)

    def prepare(tokenizer, max_len=64, loss_on="completion"):
        train, _, fmt = split_rows(cfg, seed=1)  # loaded again from the file, as a rerun does
        return tokenize_dataset(train, fmt, tokenizer, max_len, loss_on)

    first, stats = prepare(tok)
    assert not stats.cached
    again, stats = prepare(tok)
    assert stats.cached and "reused from the cache" in stats.describe(64)
    assert again["input_ids"] == first["input_ids"] and again["labels"] == first["labels"]
    assert not prepare(tok, max_len=48)[1].cached
    assert not prepare(tok, loss_on="all")[1].cached
    other = AutoTokenizer.from_pretrained(tok.name_or_path)  # same path, retemplated: must not reuse
    other.chat_template = tok.chat_template.replace("</s>", "</s>\n")
    assert other.chat_template != tok.chat_template
    assert not prepare(other)[1].cached


def test_tokenizer_fingerprint_ignores_call_time_padding_and_truncation(tok):
    """transformers rewrites a fast tokenizer's padding and truncation on every call; a padded batch call
    (held-out scoring does one) must not change the cache key of the next tokenization."""
    from distft.data.loading import tokenizer_fingerprint

    before = tokenizer_fingerprint(tok)
    tok(["a b", "a b c d"], padding=True, truncation=True, max_length=3)
    assert tokenizer_fingerprint(tok) == before


BOUNDARY_TEMPLATES = {
    # A template whose generation prompt ends in a space: a byte-level BPE merges that space into the
    # answer's first token (" bear") when the whole text is tokenized at once.
    "space": ("{% for m in messages %}{% if m['role'] == 'user' %}user: {{ m['content'] }}\n"
              "{% else %}assistant: {{ m['content'] }}</s>\n{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}assistant: {% endif %}"),
    "newline": ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>\n{{ m['content'] }}\n"
                "{% else %}<|assistant|>\n{{ m['content'] }}</s>\n{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"),
    "special-token": ("{% for m in messages %}{% if m['role'] == 'user' %}<|user|>{{ m['content'] }}"
                      "{% else %}<|assistant|>{{ m['content'] }}</s>{% endif %}{% endfor %}"
                      "{% if add_generation_prompt %}<|assistant|>{% endif %}"),
}


@pytest.mark.parametrize("template", BOUNDARY_TEMPLATES, ids=list(BOUNDARY_TEMPLATES))
def test_the_first_answer_token_carries_loss_whatever_the_template_ends_with(tok, template):
    """The prompt and each answer are tokenized apart (the boundary rule in formats._encode_chat): the
    prompt's tokens are the ones generation sees, and the answer's first token is trained."""
    from distft.data.formats import alpaca_prompt, generation_prompt

    tok = tok.__class__.from_pretrained(tok.name_or_path)  # a copy: the module's fixture keeps its template
    tok.chat_template = BOUNDARY_TEMPLATES[template]
    rows = [{"instruction": "Which animal is in this sentence?", "input": "The bear ran.", "output": "bear"},
            {"instruction": "How many friends?", "output": "7"}]
    for row in rows:
        enc = encode_row(row, "alpaca", tok, 128, "completion")
        prompt = tok(generation_prompt(row, "alpaca", tok), add_special_tokens=False)["input_ids"]
        first = next(i for i, label in enumerate(enc.labels) if label != IGNORE)
        assert enc.input_ids[:first] == prompt  # what the model is prompted with at eval time, token for token
        assert enc.labels[first] == enc.input_ids[first]
        assert trained_text(tok, enc).strip() == f"{row['output']}</s>"
        assert tok.decode(enc.input_ids) == tok.apply_chat_template(
            [{"role": "user", "content": alpaca_prompt(row)}, {"role": "assistant", "content": row["output"]}],
            tokenize=False)  # nothing lost or added by the cuts
    if template == "space":
        # The fault is real for this tokenizer: tokenized whole, the answer's first token holds the space.
        whole = tok.apply_chat_template([{"role": "user", "content": rows[0]["instruction"] + "\n\n" +
                                          rows[0]["input"]}, {"role": "assistant", "content": "bear"}],
                                        tokenize=False)
        pieces = tok.convert_ids_to_tokens(tok(whole, add_special_tokens=False)["input_ids"])
        assert "Ġbear" in pieces
