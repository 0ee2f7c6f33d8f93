"""`data.streaming`: Ray Data reads and tokenizes, each worker trains on its own shard, memory stays flat."""

from __future__ import annotations

import itertools
import json
import os
import random

import pytest

from distft.config import ConfigError, build_config
from distft.data.formats import DataError
from distft.launch.streaming import check_sample, data_files, spare_cpu_problem

STREAMED = {"stage": "pretrain", "train": {"max_steps": 10}}


def streamed_cfg(tmp_path, **data):
    return build_config({**STREAMED, "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"),
                                              "streaming": True, **data}})


def test_streaming_names_what_it_needs(tmp_path):
    with pytest.raises(ConfigError) as e:
        build_config({"stage": "sft", "data": {"train": "t.jsonl", "streaming": True, "packing": True}})
    msg = str(e.value)
    for need in ("train.max_steps", "data.eval", "data.format", "data.packing=false"):
        assert f"data.streaming needs {need}" in msg
    with pytest.raises(ConfigError, match="the reward stage reads its data whole"):
        build_config({"stage": "reward", "train": {"max_steps": 5},
                      "data": {"train": "p.jsonl", "eval": "e.jsonl", "streaming": True, "format": "preference"}})


def test_streamed_source_is_checked_on_a_sample_before_launch(tmp_path):
    cfg = streamed_cfg(tmp_path)
    rows = [{"text": f"row {i}"} for i in range(5)] + [{"txt": "misnamed"}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"t.jsonl row 6: .*text"):
        check_sample(str(tmp_path / "t.jsonl"), cfg.stages[0].data)
    (tmp_path / "t.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    with pytest.raises(DataError, match="line 2 is not valid JSON"):
        check_sample(str(tmp_path / "t.jsonl"), cfg.stages[0].data)
    with pytest.raises(DataError, match="data.train: data.streaming reads local files"):
        data_files(str(tmp_path / "missing-dir"))
    busy = build_config({**STREAMED, "scaling": {"num_workers": 2, "cpus_per_worker": 1},
                         "data": {"train": "t.jsonl", "eval": "e.jsonl", "streaming": True, "format": "text"}})
    assert "cpus_per_worker=0.5" in spare_cpu_problem(busy, 2) and spare_cpu_problem(busy, 3) is None
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.jsonl").write_text('{"text": "x"}\n')
    (tmp_path / "d" / "b.parquet").write_bytes(b"")
    with pytest.raises(DataError, match="mixes json, parquet files"):
        data_files(str(tmp_path / "d"))


def write_corpus(path, rows: int, words_per_row: int, seed: int = 0) -> int:
    from distft.models.tiny import generic_corpus

    vocab = sorted({w for doc in generic_corpus(400) for w in doc.split()})
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(rows):
            f.write(json.dumps({"text": " ".join(rng.choice(vocab) for _ in range(words_per_row))}) + "\n")
    return path.stat().st_size


# make test-slow: about 2 minutes, and the full tier is at its budget; the streaming path itself (Ray Data
# tasks, shards, the secrets' object ref) stays in the full tier below.
@pytest.mark.slowest
def test_streamed_data_larger_than_the_memory_cap_trains_with_flat_memory(ray_cluster, tiny_base, tmp_path):
    """Text far larger than the cap, read and tokenized by Ray Data tasks, one full epoch over 2 workers: once
    training has warmed up, a worker's own memory (RssAnon, in every log line) stays flat while it reads the
    rest of its shard, so the rows never pile up. Measured: +25 MiB over the first 25 steps (allocator and
    Trainer warm-up, as without Ray), steps of up to +47 MiB in some runs until step ~150, then within 3 MiB
    over the second half; a worker's share of the second half's text alone is about 14 MiB."""
    from distft.launch.train import launch

    cap_mib = 12
    size = write_corpus(tmp_path / "t.jsonl", rows=24_000, words_per_row=400)
    write_corpus(tmp_path / "e.jsonl", rows=64, words_per_row=400, seed=1)
    micro, workers = 32, 2
    steps = 24_000 // (micro * workers)  # one epoch: every row once, over both shards
    # What one worker reads in the second half, as raw text: rows piling up would hold at least that.
    assert size / 2 / workers > cap_mib * 2**20
    cfg = build_config({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 32},
        # Half a CPU each: Ray Data's tasks need one of the 2 (refused otherwise, see the test above).
        "scaling": {"num_workers": workers, "cpus_per_worker": 0.5, "torch_threads": 1},
        "stage": "pretrain",
        "data": {"train": str(tmp_path / "t.jsonl"), "eval": str(tmp_path / "e.jsonl"), "streaming": True,
                 "format": "text"},
        "train": {"max_steps": steps, "micro_batch_size": micro, "global_batch_size": micro * workers,
                  "lr": 1e-3, "log_every": 25, "save_every": steps, "eval_every": steps},
    })
    (summary,) = launch(cfg, tmp_path / "run", log=lambda m: None)

    assert summary["steps"] == steps and summary["train_rows"] is None  # no worker ever held the rows to count
    assert summary["train_rss_growth_mib"] is not None  # reported in every summary
    lines = [json.loads(x) for x in (tmp_path / "run" / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    logs = [x for x in lines if "loss" in x and "rss_mib" in x]
    # The second half: Ray Data's buffers and the allocator still grew in steps (+18 to +47 MiB) as late as
    # steps 100-150 in some runs, then stayed flat; rows piling up would grow on to the end.
    warm = [x["rss_mib"] for x in logs if x["step"] >= steps // 2]
    assert len(warm) >= 7 and max(warm) - warm[0] < cap_mib, [(x["step"], x["rss_mib"]) for x in logs]
    assert logs[-1]["loss"] < logs[0]["loss"]


def test_a_shard_streams_pass_after_pass_and_an_empty_one_is_an_error():
    """Endless, so the Trainer sees one epoch of max_steps and no pass ends inside a gradient-accumulation
    group (whose gradients would leak into the next pass's first step)."""
    from distft.data.loading import stream_dataset

    class Shard:
        def __init__(self, n):
            self.n, self.passes = n, 0

        def iter_rows(self):
            self.passes += 1
            for i in range(self.n):
                yield {"input_ids": [i, i + 1], "labels": [-100, i + 1]}

    shard = Shard(3)
    rows = list(itertools.islice(iter(stream_dataset(shard)), 7))
    assert [r["input_ids"][0] for r in rows] == [0, 1, 2, 0, 1, 2, 0] and shard.passes == 3
    with pytest.raises(DataError, match="shard of the stream is empty"):
        next(iter(stream_dataset(Shard(0))))


def test_streamed_eval_rows_are_capped_and_a_stream_needs_ray(tmp_path):
    from distft.data.loading import streamed_split

    (tmp_path / "e.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(10)))
    data = streamed_cfg(tmp_path, format="text", max_eval_samples=4).stages[0].data
    _, held_out, fmt = streamed_split(data, shard=object())
    assert (len(held_out), fmt) == (4, "text")
    with pytest.raises(DataError, match="data.streaming: no Ray Data shard reached this process"):
        streamed_split(data, shard=None)


@pytest.mark.slow
def test_tokenize_tasks_get_the_forwarded_secrets_from_the_object_store(ray_cluster, tiny_base, tmp_path, monkeypatch):
    """A gated hub tokenizer needs HF_TOKEN in Ray Data's tokenize tasks too; it travels as an object ref
    (like the workers'), never in the runtime env, which Ray shows in its dashboard and state API."""
    import distft.models.loading as loading
    from distft.launch import streaming

    real_load = loading.load_tokenizer
    seen = []

    def recording_load(model, path):
        seen.append(os.environ.get("DISTFT_PROBE_TOKEN"))
        return real_load(model, path)

    monkeypatch.setattr(loading, "load_tokenizer", recording_load)
    monkeypatch.setenv("DISTFT_PROBE_TOKEN", "unset")  # registers the restore of the variable's absence
    monkeypatch.delenv("DISTFT_PROBE_TOKEN")
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": f"row {i}"}) + "\n" for i in range(8)))
    cfg = build_config({**STREAMED, "model": {"name_or_path": str(tiny_base)},
                        "data": {"train": str(tmp_path / "t.jsonl"), "eval": "e.jsonl", "streaming": True,
                                 "format": "text"}})
    secrets = ray_cluster.put({"DISTFT_PROBE_TOKEN": "hf_probe"})
    env = {"TOKENIZERS_PARALLELISM": "false"}

    # The function Ray Data runs, called here: it loads the tokenizer with the secrets in the environment,
    # and the runtime env it is given carries none of them.
    class Rows:
        def flat_map(self, fn, runtime_env=None):
            self.fn, self.runtime_env = fn, runtime_env
            return self

    rows = Rows()
    monkeypatch.setattr(streaming, "read_rows", lambda files: rows)
    streaming.token_rows(cfg, 0, tmp_path / "a", env=env, secrets=secrets)
    encoded = rows.fn({"text": "row 1"})
    assert seen == ["hf_probe"] and encoded[0]["input_ids"]
    assert rows.runtime_env == {"env_vars": env}

    # In Ray Data's own tasks, the ref inside the function resolves.
    monkeypatch.undo()
    got = streaming.token_rows(cfg, 0, tmp_path / "b", env=env, secrets=secrets).take_all()
    assert len(got) == 8 and all(r["input_ids"] for r in got)
