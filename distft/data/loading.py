"""Load rows from local files or `datasets`, validate them, and tokenize for training.

Errors name the file, the row and the field. Truncation is counted and
reported, never silent.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from distft.data.formats import (
    IGNORE,
    DataError,
    check_row,
    detect_format,
    encode_preference,
    encode_row,
    scored_ids,
)

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def looks_local(source: str) -> bool:
    return source.startswith((".", "/", "~")) or Path(source).suffix in LOCAL_BUILDERS


def load_rows(source: str, split: str = "train", field: str = "data.train"):
    """A `datasets.Dataset` from a local file/directory or a hub/`datasets` name."""
    import datasets

    path = Path(source).expanduser()
    if path.is_file():
        builder = LOCAL_BUILDERS.get(path.suffix)
        if builder is None:
            raise DataError(f"{field}: {path} has an unsupported extension. Fix: use .json, .jsonl, .parquet or .csv.")
        if path.stat().st_size == 0:
            raise DataError(f"{field}: {path} is empty. Fix: point it at a file with rows.")
        if path.suffix in (".json", ".jsonl", ".csv"):
            _check_text(path, field, jsonl=path.suffix == ".jsonl")
        try:
            ds = datasets.load_dataset(builder, data_files=str(path), split="train")
        except Exception as e:  # datasets wraps parser errors several layers deep
            raise DataError(f"{field}: could not read {path}: {type(e).__name__}: {e}".splitlines()[0]) from None
    elif path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "state.json").exists():
            ds = datasets.load_from_disk(str(path))
            if isinstance(ds, datasets.DatasetDict):
                ds = ds[split]
        else:
            ds = datasets.load_dataset(str(path), split=split)
    elif looks_local(source):
        raise DataError(f"{field}: file not found: {source}. Fix: check the path (a relative path is looked for from the cwd, then beside the config file).")
    else:
        try:
            ds = datasets.load_dataset(source, split=split)
        except Exception as e:
            raise DataError(
                f"{field}: could not load dataset {source!r} (split {split!r}): {type(e).__name__}: {e}".splitlines()[0]
            ) from None
    if len(ds) == 0:
        raise DataError(f"{field}: {source} has no rows. Fix: point it at a non-empty dataset.")
    return ds


def _check_text(path: Path, field: str, jsonl: bool) -> None:
    """UTF-8 throughout (what the json and csv builders read), and for JSON Lines one object per line.
    datasets reports a bad byte as a bare DatasetGenerationError; this names the line."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{field}: {path} line {lineno}, column {e.start + 1}: byte 0x{raw[e.start]:02x} is "
                                f"not UTF-8 text. Fix: save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 "
                                f"{path.name} > fixed{path.suffix}`), or remove that character.") from None
            if not jsonl or not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{field}: {path} line {lineno} is not valid JSON: {e.msg}.") from None
            if not isinstance(row, dict):
                raise DataError(f"{field}: {path} line {lineno} must be a JSON object, got {type(row).__name__}.")


def validate_rows(ds, fmt: str, text_field: str, source: str, field: str) -> None:
    """Fail on the first unusable row, naming its 1-based row number and field."""
    for i, row in enumerate(ds):
        problem = check_row(row, fmt, text_field)
        if problem:
            raise DataError(f"{field}: {source} row {i + 1}: {problem} (format {fmt}).")


def resolve_format(ds, declared: str, text_field: str, field: str) -> str:
    if declared != "auto":
        return declared
    try:
        return detect_format(ds.column_names, text_field)
    except DataError as e:
        raise DataError(f"{field}: {e}") from None


@dataclass
class TokenStats:
    rows: int
    truncated: int
    dropped: int
    max_tokens: int
    mean_tokens: float
    cached: bool = False  # loaded from an earlier run's tokenization

    def describe(self, max_len: int) -> str:
        pct = 100.0 * self.truncated / max(self.rows, 1)
        return (
            f"{self.rows} rows, mean {self.mean_tokens:.0f} / max {self.max_tokens} tokens before truncation; "
            f"{self.truncated} ({pct:.1f}%) truncated to model.max_seq_len={max_len}; "
            f"{self.dropped} dropped with no trainable tokens left"
            + ("; tokenization reused from the cache" if self.cached else "")
        )


# Part of every cache key: bump it when encode_row / encode_preference change what they produce,
# so no run trains on ids cached by the old code.
ENCODING_VERSION = 2  # 2: prompt and answers tokenized apart (the SFT loss-mask boundary rule)


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what decides the token ids: the vocabulary and merges, special tokens and chat
    template. Not the path: a tokenizer retrained in place must not reuse the old ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # Without the call-time settings: transformers rewrites truncation and padding on every call
        # (a batched, padded call leaves padding on, and a saved tokenizer.json keeps it).
        model = {k: v for k, v in json.loads(backend.to_str()).items() if k not in ("truncation", "padding")}
    parts = [model if backend is not None else sorted(tokenizer.get_vocab().items()),
             tokenizer.special_tokens_map, getattr(tokenizer, "chat_template", None),
             type(tokenizer).__name__, getattr(tokenizer, "add_bos_token", None), getattr(tokenizer, "add_eos_token", None)]
    return hashlib.sha256(json.dumps(parts, default=str, sort_keys=True).encode()).hexdigest()


def _cache_key(ds, *inputs) -> str:
    """The map's cache fingerprint: the rows' own fingerprint (datasets derives it from the file's path,
    size and modification time, and the split taken from it) plus every input of the encoding;
    explicit, so datasets need not hash the closure."""
    key = [getattr(ds, "_fingerprint", None), ENCODING_VERSION, *inputs]
    return hashlib.sha256(json.dumps(key, default=str).encode()).hexdigest()[:32]


def tokenize_dataset(ds, fmt: str, tokenizer, max_len: int, loss_on: str, text_field: str = "text",
                     field: str = "data.train"):
    """Returns (dataset with input_ids/labels, TokenStats).

    Tokenized once: a rerun with the same rows, tokenizer and settings loads the result from the
    datasets cache (`TokenStats.cached`), next to the rows' own cache files.
    """
    encoded = 0

    def encode(row):
        nonlocal encoded
        encoded += 1
        enc = encode_row(row, fmt, tokenizer, max_len, loss_on, text_field)
        return {"input_ids": enc.input_ids, "labels": enc.labels, "_truncated": enc.truncated, "_len": enc.full_length}

    fingerprint = _cache_key(ds, "sft", fmt, max_len, loss_on, text_field, tokenizer_fingerprint(tokenizer))
    out = ds.map(encode, remove_columns=ds.column_names, desc="Tokenizing", new_fingerprint=fingerprint)
    keep = [any(t != IGNORE for t in labels) for labels in out["labels"]]
    lengths = out["_len"]
    stats = TokenStats(
        rows=len(out),
        truncated=sum(out["_truncated"]),
        dropped=keep.count(False),
        max_tokens=max(lengths),
        mean_tokens=sum(lengths) / len(lengths),
        cached=encoded == 0,
    )
    if stats.dropped == stats.rows:
        # Left to the Trainer, an empty dataset ends in a bare StopIteration deep inside TRL.
        if not stats.truncated:  # nothing was cut: no row has a token to learn from in the first place
            raise DataError(f"{field}: none of its {stats.rows} rows has a token to learn from with loss on "
                            f"{loss_on} (e.g. no assistant turn or an empty completion). Fix: check the rows' "
                            "answers, or data.loss_on.")
        where = "the completion is cut away" if loss_on == "completion" else "nothing is left"
        raise DataError(f"{field}: every one of its {stats.rows} rows is dropped: truncated to model.max_seq_len="
                        f"{max_len} tokens, {where} (the longest row has {stats.max_tokens}). "
                        f"Fix: model.max_seq_len={_next_power_of_two(stats.max_tokens)} or more.")
    if stats.dropped:
        out = out.select([i for i, k in enumerate(keep) if k])
    return out.remove_columns(["_truncated", "_len"]), stats


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 1).bit_length()


@dataclass
class PairStats:
    pairs: int
    dropped: int  # chosen or rejected longer than the limit
    max_tokens: int
    mean_tokens: float

    def describe(self, max_len: int) -> str:
        pct = 100.0 * self.dropped / max(self.pairs, 1)
        return (
            f"{self.pairs} pairs, mean {self.mean_tokens:.0f} / max {self.max_tokens} tokens (the longer response); "
            f"{self.dropped} ({pct:.1f}%) dropped as longer than model.max_seq_len={max_len}"
        )


def tokenize_preferences(ds, tokenizer, max_len: int, field: str = "data.train"):
    """Returns (dataset with chosen_ids/rejected_ids, PairStats).

    A pair that does not fit is dropped, not truncated: cutting both responses at the
    same length often cuts away exactly the tokens that differ. Drops are counted.
    """
    out = _encode_pairs(ds, tokenizer)
    keep, stats = _fitting(out["_len"], max_len, field)
    if stats.dropped:
        out = out.select(keep)
    return out.remove_columns(["_len"]), stats


def fitting_preferences(ds, tokenizer, max_len: int, field: str = "data.train"):
    """Returns (the validated rows of the pairs that fit, PairStats), for trainers that tokenize pairs
    themselves (DPO). Lengths are those of prompt + response, as `tokenize_preferences` counts them."""
    keep, stats = _fitting(_encode_pairs(ds, tokenizer)["_len"], max_len, field)
    return (ds.select(keep) if stats.dropped else ds), stats


def _encode_pairs(ds, tokenizer):
    def encode(row):
        chosen, rejected = encode_preference(row, tokenizer)
        return {"chosen_ids": chosen, "rejected_ids": rejected, "_len": max(len(chosen), len(rejected))}

    fingerprint = _cache_key(ds, "preference", tokenizer_fingerprint(tokenizer))
    return ds.map(encode, remove_columns=ds.column_names, desc="Tokenizing pairs", new_fingerprint=fingerprint)


def _fitting(lengths: list[int], max_len: int, field: str) -> tuple[list[int], PairStats]:
    keep = [i for i, n in enumerate(lengths) if n <= max_len]
    stats = PairStats(pairs=len(lengths), dropped=len(lengths) - len(keep), max_tokens=max(lengths),
                      mean_tokens=sum(lengths) / len(lengths))
    if not keep:
        raise DataError(f"{field}: every pair is longer than model.max_seq_len={max_len} tokens (longest "
                        f"{stats.max_tokens}). Fix: raise model.max_seq_len.")
    return keep, stats


def load_checked(source: str, data, field: str, fmt: str | None = None):
    """Load, detect the format (unless given) and validate every row. Returns (dataset, format)."""
    ds = load_rows(source, data.split, field)
    fmt = fmt or resolve_format(ds, data.format, data.text_field, field)
    validate_rows(ds, fmt, data.text_field, source, field)
    return ds, fmt


def split_rows(data, seed: int):
    """(train_rows, eval_rows, format): eval from `data.eval`, else a seeded split of train."""
    train, fmt = load_checked(data.train, data, "data.train")
    if data.eval:
        held_out, _ = load_checked(data.eval, data, "data.eval", fmt=fmt)
    else:
        if len(train) < 2:
            raise DataError("data.train: need at least 2 rows to split off an eval set. Fix: set data.eval.")
        parts = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        train, held_out = parts["train"], parts["test"]
    if data.max_train_samples:
        train = train.select(range(min(len(train), data.max_train_samples)))
    if data.max_eval_samples:
        held_out = held_out.select(range(min(len(held_out), data.max_eval_samples)))
    return train, held_out, fmt


def split_preference_rows(data, seed: int, kind: str, prepare, tokenizer, max_len: int):
    """(train, eval, the train side's PairStats): `split_rows` for a stage that trains on preference pairs
    (reward, dpo), other rows refused, each side through `prepare`: `tokenize_preferences` for a trainer
    handed token ids, `fitting_preferences` for one that tokenizes the rows itself."""
    train_rows, eval_rows, fmt = split_rows(data, seed)
    if fmt != "preference":
        raise DataError(f"data.train: the {kind} stage trains on preference pairs (chosen/rejected, optional "
                        f"prompt); {data.train} has format {fmt}.")
    train, stats = prepare(train_rows, tokenizer, max_len, "data.train")
    held, _ = prepare(eval_rows, tokenizer, max_len, "data.eval")
    return train, held, stats


def unpair(pairs):
    """Preference pairs -> feedback rows: each pair's chosen response labelled true, its rejected one false.
    A pair of strings needs its `prompt` (the response is what gets labelled); chat pairs without one
    take the turns before the last as the prompt."""

    def split(row, side):
        prompt, response = row.get("prompt"), row[side]
        if prompt is None:
            if not isinstance(response, list):
                raise DataError("data.train: a preference pair of strings without `prompt` cannot be split into "
                                "labelled responses (the prompt is part of each). Fix: add a `prompt` field, or "
                                "give feedback rows (prompt, completion, label).")
            prompt, response = response[:-1], response[-1:]
        return prompt, response

    def rows(batch):
        out = {"prompt": [], "completion": [], "label": []}
        for row in ({k: batch[k][i] for k in batch} for i in range(len(batch["chosen"]))):
            for side, label in (("chosen", True), ("rejected", False)):
                prompt, response = split(row, side)
                out["prompt"].append(prompt)
                out["completion"].append(response)
                out["label"].append(label)
        return out

    return pairs.map(rows, batched=True, remove_columns=pairs.column_names, desc="Unpairing preferences")


def fitting_feedback(ds, tokenizer, max_len: int, field: str = "data.train"):
    """(the feedback rows whose prompt + completion fit max_len, PairStats counting rows): KTOTrainer
    would truncate a longer one, often cutting away the response that carries the label."""
    lengths = ds.map(lambda row: {"_len": len(scored_ids(row["prompt"], row["completion"], tokenizer))},
                     remove_columns=ds.column_names, desc="Measuring responses")["_len"]
    keep, stats = _fitting(lengths, max_len, field)
    return (ds.select(keep) if stats.dropped else ds), stats


def split_feedback_rows(data, seed: int, tokenizer, max_len: int):
    """(train, eval, the train side's PairStats, how many pairs were unpaired) for the kto stage: feedback
    rows as they are, preference pairs split into one labelled row per response."""
    train_rows, eval_rows, fmt = split_rows(data, seed)
    if fmt not in ("feedback", "preference"):
        raise DataError(f"data.train: the kto stage trains on labelled responses (prompt, completion, label true/"
                        f"false) or preference pairs; {data.train} has format {fmt}.")
    pairs = len(train_rows) if fmt == "preference" else 0
    if fmt == "preference":
        train_rows, eval_rows = unpair(train_rows), unpair(eval_rows)
    train, stats = fitting_feedback(train_rows, tokenizer, max_len, "data.train")
    held, _ = fitting_feedback(eval_rows, tokenizer, max_len, "data.eval")
    return train, held, stats, pairs


def streamed_split(data, shard):
    """(the stream of this worker's shard, eval rows, format) under `data.streaming`: the eval rows
    come from `data.eval`, capped at `data.max_eval_samples` as in memory."""
    if shard is None:
        raise DataError("data.streaming: no Ray Data shard reached this process; streams come through `distft "
                        "train` (Ray Train). Fix: data.streaming=false to run the stage without Ray.")
    held_out, fmt = load_checked(data.eval, data, "data.eval", fmt=data.format)
    if data.max_eval_samples:
        held_out = held_out.select(range(min(len(held_out), data.max_eval_samples)))
    return stream_dataset(shard), held_out, fmt


def stream_dataset(shard):
    """A `datasets.IterableDataset` over one worker's shard of token rows: anything with `iter_rows()`
    (Ray Data's DataIterator under `data.streaming`).

    Endless: passes over the shard follow each other, and the Trainer sees one epoch of
    train.max_steps steps. A pass whose last micro-batches did not fill a gradient-accumulation
    group would otherwise end the Trainer's epoch with their gradients unapplied and carried into
    the next pass's first step. Every rank's shard has the same length (Ray Train splits equally),
    so passes stay in step across ranks.
    """
    import datasets

    def rows():
        while True:
            n = 0
            for row in shard.iter_rows():
                n += 1
                yield {"input_ids": [int(t) for t in row["input_ids"]], "labels": [int(t) for t in row["labels"]]}
            if n == 0:
                raise DataError("data.train: this worker's shard of the stream is empty (fewer rows than workers?). "
                                "Fix: more rows, or fewer scaling.num_workers.")

    return datasets.IterableDataset.from_generator(rows)


def mix_replay(train_ds, texts: list[str], fraction: float, tokenizer, max_len: int, seed: int):
    """(the training rows with replay rows added, how many): general text against forgetting, so that
    `fraction` of the rows are replay. Replay rows are text with loss on every token, drawn at random
    (seeded) without replacement while the source lasts, then again. The Trainer shuffles them in."""
    import random

    import datasets

    want = round(len(train_ds) * fraction / (1 - fraction))
    if want == 0 or not texts:
        return train_ds, 0
    rng = random.Random(seed)
    picked = []
    while len(picked) < want:
        order = list(range(len(texts)))
        rng.shuffle(order)
        picked += order[:want - len(picked)]
    rows = datasets.Dataset.from_dict({"text": [texts[i] for i in picked]})
    replay, _ = tokenize_dataset(rows, "text", tokenizer, max_len, "all", "text", field="data.replay.source")
    columns = [c for c in train_ds.column_names if c not in replay.column_names]
    if columns:  # e.g. packing metadata: replay rows carry only token ids and labels
        raise DataError(f"data.replay: the training rows have columns replay rows lack ({', '.join(columns)}). "
                        "Fix: data.packing=false with replay.")
    return datasets.concatenate_datasets([train_ds, replay.cast(train_ds.features)]), len(replay)
