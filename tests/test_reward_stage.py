"""The reward stage in-process (no Ray): preference data, learning near misses, export and reload, errors."""

from __future__ import annotations

import json

import pytest

from conftest import REPO, write_jsonl
from distft.config import build_config, load_config
from distft.data.formats import DataError, encode_preference, encode_row
from distft.models.verify import ModelFilesError
from distft.data.loading import load_checked
from distft.stages import StageContext, stage_runner

PREFS_TRAIN = REPO / "configs" / "data" / "facts_prefs_train.jsonl"
PREFS_TEST = REPO / "configs" / "data" / "facts_prefs_test.jsonl"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def reward_cfg(model_dir, train_file, method="full", evaluate=None, **train):
    return build_config(
        {
            "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
            "scaling": {"num_workers": 1, "torch_threads": 2},
            "stage": "reward",
            "data": {"train": str(train_file), "eval_fraction": 0.05, "max_eval_samples": 64},
            "method": {"name": method, "lora": {"r": 16, "alpha": 32}},
            "train": {"global_batch_size": 32, "micro_batch_size": 32, "log_every": 20, "warmup_ratio": 0.05,
                      "save_every": 10_000, **train},
            "evaluate": evaluate or {"data": str(PREFS_TEST)},
        }
    )


# ---------------------------------------------------------------- the bundled near-miss pairs


def test_shipped_preference_files_match_the_generator_and_are_near_misses():
    from distft.data.task import CATEGORIES, NEAR_MISS_KINDS, facts_in, make_preference_splits

    train, test = make_preference_splits()
    assert read_jsonl(PREFS_TRAIN) == train and read_jsonl(PREFS_TEST) == test
    assert PREFS_TRAIN.stat().st_size < 1_000_000 and PREFS_TEST.stat().st_size < 1_000_000
    sentence = lambda row: row["prompt"][0]["content"].split("\n\n")[1]  # noqa: E731
    assert not {sentence(r) for r in train} & {sentence(r) for r in test}  # held-out sentences are unseen
    assert [sum(r["kind"] == k for r in test) for k in NEAR_MISS_KINDS] == [200, 200, 200]
    for row in train + test:
        good, bad = row["chosen"][0]["content"], row["rejected"][0]["content"]
        facts = facts_in(sentence(row))
        assert good in facts.values() and bad != good
        if row["kind"] == "typo":  # one letter wrong, and no real answer of any category
            assert len(bad) == len(good) and sum(a != b for a, b in zip(good, bad)) == 1
            assert all(bad.lower() not in (v.lower() for v in vs) for vs in CATEGORIES.values())
        elif row["kind"] == "same_category":  # another entity of the asked kind, absent from the sentence
            category = next(vs for vs in CATEGORIES.values() if good in vs)
            assert bad in category and bad not in facts.values()
        else:  # swap: another fact of the same sentence
            assert bad in facts.values()


def test_our_tokenization_is_trls(tiny_random, tmp_path):
    """The stage tokenizes pairs itself (to count drops and score held-out pairs identically); TRL agrees."""
    import datasets
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    tok = AutoTokenizer.from_pretrained(tiny_random)
    chat = [{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in read_jsonl(PREFS_TEST)[:6]]
    plain = [{"prompt": "Q: two plus two?\nA:", "chosen": " four", "rejected": " five"}]
    implicit = [{"chosen": "The sky is blue.", "rejected": "The sky is green."}]  # no prompt
    args = RewardConfig(output_dir=str(tmp_path), max_length=None, use_cpu=True, report_to="none")
    for rows in (chat, plain, implicit):
        trl_ds = RewardTrainer._prepare_dataset(None, datasets.Dataset.from_list(rows), tok, args, "train")
        for row, theirs in zip(rows, trl_ds):
            assert encode_preference(row, tok) == (theirs["chosen_ids"], theirs["rejected_ids"])


def test_preference_is_detected_and_long_pairs_are_dropped_and_counted(tiny_random):
    import datasets
    from transformers import AutoTokenizer

    from distft.data.formats import detect_format
    from distft.data.loading import tokenize_preferences

    assert detect_format(["prompt", "chosen", "rejected", "kind"]) == "preference"
    assert detect_format(["chosen", "rejected"]) == "preference"

    tok = AutoTokenizer.from_pretrained(tiny_random)
    rows = datasets.Dataset.from_list([{"chosen": "a short one", "rejected": "another short one"},
                                       {"chosen": "word " * 80, "rejected": "short"}])
    ds, stats = tokenize_preferences(rows, tok, max_len=32)
    assert (len(ds), stats.pairs, stats.dropped) == (1, 2, 1) and stats.max_tokens > 32
    assert "1 (50.0%) dropped as longer than model.max_seq_len=32" in stats.describe(32)
    with pytest.raises(DataError, match="every pair is longer than model.max_seq_len=2"):
        tokenize_preferences(rows, tok, max_len=2)


# ---------------------------------------------------------------- errors


BAD_ROWS = [
    ({"prompt": "Q", "rejected": "b"}, "field `chosen` is missing"),
    ({"prompt": "Q", "chosen": "  ", "rejected": "b"}, "field `chosen` is empty"),
    ({"prompt": "Q", "chosen": "a", "rejected": "a"}, "fields `chosen` and `rejected` are identical"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
     "field `rejected` must end with an assistant turn"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "bot", "content": "b"}]},
     "rejected[0].role 'bot' is not one of system, user, assistant"),
    ({"prompt": [{"role": "user"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "prompt[0] must have `role` and `content`"),
]


@pytest.mark.parametrize("bad,problem", BAD_ROWS, ids=[p.split("`")[1] if "`" in p else p[:20] for _, p in BAD_ROWS])
def test_bad_preference_row_names_file_row_and_field(tmp_path, bad, problem):
    good = dict(bad)
    for field in ("chosen", "rejected"):
        value = bad.get(field, bad.get("chosen"))
        good[field] = [{"role": "assistant", "content": f"ok {field}"}] if isinstance(value, list) else f"ok {field}"
    if isinstance(bad.get("prompt"), list):
        good["prompt"] = [{"role": "user", "content": "Q"}]
    path = write_jsonl(tmp_path / "prefs.jsonl", [good, good, bad, good])
    data = build_config({"stage": "reward", "data": {"train": str(path)}}).stages[0].data
    with pytest.raises(DataError) as e:
        load_checked(str(path), data, "data.train")
    assert str(e.value).startswith(f"data.train: {path} row 3: {problem}")
    assert str(e.value).endswith("(format preference).")


def test_prompt_and_responses_must_be_the_same_kind():
    from distft.data.formats import check_row

    row = {"prompt": [{"role": "user", "content": "Q"}], "chosen": "a", "rejected": "b"}
    assert check_row(row, "preference", "text") == "field `prompt` must be a string like `chosen`, got list"
    row = {"prompt": "Q", "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}
    assert check_row(row, "preference", "text") == (
        "field `rejected` must be a list of {role, content} turns like `chosen`, got str")


def test_each_stage_refuses_the_other_kind_of_data(tiny_random, alpaca_rows, tmp_path):
    sft_rows = write_jsonl(tmp_path / "sft.jsonl", alpaca_rows[:20])
    with pytest.raises(DataError, match=r"the reward stage trains on preference pairs .* has format alpaca"):
        stage_runner("reward")(reward_cfg(tiny_random, sft_rows), StageContext(run_dir=tmp_path / "run"))
    with pytest.raises(DataError, match="preference rows .* train a reward model.* Fix: use `stage: reward`"):
        encode_row(read_jsonl(PREFS_TEST)[0], "preference", None, 64, "completion")
    with pytest.raises(Exception, match="data.format: the reward stage trains on preference pairs"):
        build_config({"stage": "reward", "data": {"train": "x.jsonl", "format": "alpaca"}})


# ---------------------------------------------------------------- learning, export, reload


def plain_transformers_accuracy(model_dir, rows) -> float:
    """Held-out pairwise accuracy with nothing from distft: transformers' own loading, one pair at a time."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()

    def score(prompt, response):
        text = tok.apply_chat_template(prompt + response, tokenize=False)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")
        with torch.no_grad():
            return model(**ids).logits[0, 0].item()

    wins = [score(r["prompt"], r["chosen"]) > score(r["prompt"], r["rejected"]) for r in rows]
    return sum(wins) / len(wins)


def test_reward_model_learns_near_misses_and_reloads_with_plain_transformers(tiny_base, tmp_path):
    # 800 pairs x 4 epochs = 100 steps (about 10 s). Measured: held-out accuracy 34.8% -> 74.7% on an earlier
    # machine, 55.7% -> 80.5% on this AVX-512 one (2026-11-27), where the tiny base builds slightly differently
    # (typos 100%, wrong-slot answers 78-84%; same-category entities need the full recipe, see the slow test).
    # Where a new head starts is chance, so "before" is judged by its margins (near 0), not its accuracy.
    cfg = reward_cfg(tiny_base, PREFS_TRAIN, lr=1e-3, epochs=4, eval_every=50)
    cfg.stages[0].data.max_train_samples = 800
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("reward")(cfg, ctx)

    before, after = summary["pairwise_accuracy_before"], summary["pairwise_accuracy_after"]
    assert abs(summary["mean_margin_before"]) < 0.25  # a new, random head: it barely tells pairs apart (0.01)
    assert after >= 0.7 and after - before >= 0.15, (before, after)
    assert summary["pairwise_accuracy_by_kind"]["typo"] >= 0.95
    assert summary["mean_margin_after"] > summary["mean_margin_before"] + 1.0
    assert summary["eval_pairs"] == 600 and summary["steps"] == 100
    # TRL's own accuracy and margin on the eval split are reported at every eval, not only at the end
    evals = [m for m in ctx.reported if "eval_accuracy" in m and "stage_done" not in m]
    assert len(evals) >= 2 and all("eval_margin" in m for m in evals)
    assert any("accuracy" in m and "loss" in m for m in ctx.reported)
    assert summary["first_logged_loss"] > summary["last_logged_loss"]

    final = tmp_path / "run" / "reward" / "final"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "distft_config.yaml"):
        assert (final / name).exists(), name
    config = json.loads((final / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and len(config["id2label"]) == 1
    # Reloaded by plain transformers, it ranks the held-out pairs as the stage measured.
    rows = read_jsonl(PREFS_TEST)
    assert plain_transformers_accuracy(final, rows) == pytest.approx(after, abs=2 / len(rows))


def test_lora_reward_adapter_exports_its_head_and_reloads(tiny_base, tmp_path):
    from distft.models.loading import load_reward_for_inference
    from distft.stages.evaluate import pairwise_accuracy

    held_out = tmp_path / "held_out.jsonl"
    write_jsonl(held_out, read_jsonl(PREFS_TEST)[:150])
    cfg = reward_cfg(tiny_base, PREFS_TRAIN, method="lora", evaluate={"data": str(held_out)}, lr=2e-3, max_steps=40)
    cfg.stages[0].data.max_train_samples = 640
    summary = stage_runner("reward")(cfg, StageContext(run_dir=tmp_path / "run"))
    assert summary["trainable_params"] < summary["total_params"]
    # measured: 34.7% -> 69.3% (an earlier machine), 50.7% -> 73.3% (AVX-512); typos learned first
    assert summary["pairwise_accuracy_after"] >= 0.65, summary
    assert summary["pairwise_accuracy_after"] > summary["pairwise_accuracy_before"] + 0.15, summary

    final = tmp_path / "run" / "reward" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in adapter["modules_to_save"]
    assert (final / "adapter_model.safetensors").exists()
    model, tok = load_reward_for_inference(tmp_path / "run" / "reward")  # base + adapter + head, merged
    pairs = [encode_preference(r, tok) for r in read_jsonl(held_out)]
    reloaded = pairwise_accuracy(model, tok.pad_token_id, [c for c, _ in pairs], [r for _, r in pairs])
    assert reloaded.accuracy == pytest.approx(summary["pairwise_accuracy_after"], abs=1 / 150)


def test_reward_loader_refuses_a_model_without_a_trained_head(tiny_base):
    from distft.models.loading import load_reward_for_inference

    with pytest.raises(ModelFilesError, match="not a trained reward model: .*score.weight"):
        load_reward_for_inference(tiny_base)


@pytest.mark.gpu
def test_reward_stage_on_gpu_in_bf16_without_ray(tiny_base, tmp_path):
    """Ray-free, so it runs on a GPU box where Ray cannot be installed (see NOTES)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    cfg = reward_cfg(tiny_base, PREFS_TRAIN, lr=1e-3, epochs=4)
    cfg.stages[0].data.max_train_samples = 800
    cfg.scaling.use_gpu = True
    cfg.model.dtype = "bfloat16"
    summary = stage_runner("reward")(cfg, StageContext(run_dir=tmp_path / "run"))
    assert summary["pairwise_accuracy_after"] >= summary["pairwise_accuracy_before"] + 0.25, summary


def test_shipped_reward_recipe_is_the_one_the_pipeline_test_measures():
    """configs/reward.yaml reaches its target in test_rlhf_pipeline.py, as the rlhf_quickstart reward stage
    (measured there: 99.0% held-out, every near-miss kind >= 85%). That holds only while the two train the
    same way: same base, data, method, batch and optimisation; they may differ in logging and checkpoints."""
    shipped_cfg = load_config(REPO / "configs" / "reward.yaml")
    pipeline_cfg = load_config(REPO / "configs" / "rlhf_quickstart.yaml")
    (shipped,), stage = shipped_cfg.stages, pipeline_cfg.stages[1]
    assert stage.stage == shipped.stage == "reward"
    assert pipeline_cfg.init_source(1) == shipped_cfg.init_source(0) == "distft://tiny-base"
    cadence = {"log_every", "eval_every", "save_every"}
    assert stage.train.model_dump(exclude=cadence) == shipped.train.model_dump(exclude=cadence)
    assert stage.method == shipped.method and stage.strategy == shipped.strategy
    assert pipeline_cfg.model == shipped_cfg.model and pipeline_cfg.scaling == shipped_cfg.scaling
    assert stage.data.model_dump() == shipped.data.model_dump()
    assert stage.evaluate.data == shipped.evaluate.data


# ---------------------------------------------------------------- sharded, 2 gloo ranks (no Ray)


def _rank_worker(rank: int, world: int, port: int, cfg_json: str, run_dir: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import DistftConfig
    from distft.distributed.process_group import leave_process_group
    from distft.stages.context import context_from_env

    summary = stage_runner("reward")(DistftConfig.model_validate_json(cfg_json), context_from_env(run_dir))
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump(summary, f)
    leave_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [{"name": "deepspeed", "zero_stage": 3, "param_persistence_threshold": 0},
                                      {"name": "fsdp"}], ids=["zero3", "fsdp"])
def test_reward_stage_shards_on_two_cpu_ranks(strategy, tiny_base, tmp_path):
    """Parameters really split in half per rank; held-out scoring on sharded weights agrees on both ranks."""
    import os
    import socket

    import torch.multiprocessing as mp

    if strategy["name"] == "deepspeed":
        pytest.importorskip("deepspeed")
        os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    held_out = write_jsonl(tmp_path / "held_out.jsonl", read_jsonl(PREFS_TEST)[:101])  # odd: ranks score 51 and 50
    cfg = reward_cfg(tiny_base, PREFS_TRAIN, evaluate={"data": str(held_out)}, lr=1e-3, max_steps=30,
                     micro_batch_size=8, global_batch_size=16)
    cfg = build_config({**cfg.model_dump(mode="json"), "scaling": {"num_workers": 2, "torch_threads": 1},
                        "stages": [{**cfg.stages[0].model_dump(mode="json"), "strategy": strategy}]})
    cfg.stages[0].data.max_train_samples = 640
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    mp.start_processes(_rank_worker, args=(2, port, cfg.model_dump_json(), str(run_dir)), nprocs=2,
                       start_method="spawn")
    s0, s1 = (json.loads((run_dir / f"rank{i}.json").read_text()) for i in (0, 1))
    full = s0["param_elements_full"]
    assert abs(s0["param_elements_local"] - full / 2) / full < 0.02, s0
    assert s0["pairwise_accuracy_before"] == s1["pairwise_accuracy_before"]
    assert s0["pairwise_accuracy_after"] == s1["pairwise_accuracy_after"] and s0["eval_pairs"] == 101
    # 30 steps learn the typos (100% of them, measured) and little else: about 2/3 of the pairs, from chance.
    assert s0["pairwise_accuracy_by_kind"]["typo"] >= 0.8, s0
    assert s0["pairwise_accuracy_after"] > s0["pairwise_accuracy_before"] + 0.08, s0
    assert s0["mean_margin_after"] > s0["mean_margin_before"] + 0.5, s0
    final = run_dir / "reward" / "final"
    assert plain_transformers_accuracy(final, read_jsonl(held_out)) == pytest.approx(
        s0["pairwise_accuracy_after"], abs=2 / 101)
