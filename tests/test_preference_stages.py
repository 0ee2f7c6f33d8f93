"""The DPO and GRPO stages in-process (no Ray): prompts and rewards, errors, learning, export and reload.

The learning tests start from a briefly SFT-trained LoRA policy (about 40% held-out exact
match), as a real pipeline would: the stages merge that adapter and train their own on top.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO, write_jsonl
from distft.config import build_config
from distft.data.formats import DataError
from distft.models.verify import ModelFilesError
from distft.stages import StageContext, stage_runner

FACTS_TRAIN = REPO / "configs" / "data" / "facts_train.jsonl"
FACTS_TEST = REPO / "configs" / "data" / "facts_test.jsonl"
PREFS_TRAIN = REPO / "configs" / "data" / "facts_prefs_train.jsonl"
PREFS_TEST = REPO / "configs" / "data" / "facts_prefs_test.jsonl"


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def stage_cfg(kind, model_dir, train_file, init_from=None, method="lora", **sections):
    """One dpo/grpo stage on the tiny model; `sections` update the stage's sections (train=..., grpo=...)."""
    stage = {
        "stage": kind,
        "data": {"train": str(train_file), "eval_fraction": 0.05, "max_eval_samples": 32},
        "method": {"name": method, "lora": {"r": 16, "alpha": 32}},
        "train": {"lr": 1e-3, "global_batch_size": 16, "micro_batch_size": 16, "log_every": 1, "save_every": 10_000},
        "evaluate": {"data": str(FACTS_TEST), "max_new_tokens": 8, "max_samples": 200},
    }
    if init_from:
        stage["init_from"] = str(init_from)
    for key, value in sections.items():
        stage[key] = {**stage.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config({"model": {"name_or_path": str(model_dir), "max_seq_len": 64},
                         "scaling": {"num_workers": 1, "torch_threads": 2}, **stage})


def logged(ctx, key):
    return [m[key] for m in ctx.reported if key in m and "stage_done" not in m]


# ---------------------------------------------------------------- prompts and reward functions


def test_grpo_prompts_are_what_the_evaluation_generates_from(tiny_random):
    from transformers import AutoTokenizer

    from distft.data.formats import generation_prompt, policy_prompt, reference_answer
    from distft.stages.grpo import prompt_dataset

    tok = AutoTokenizer.from_pretrained(tiny_random)
    alpaca = {"instruction": "Which city?", "input": "A fox went to Lima.", "output": "Lima"}
    chat = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                         {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"},
                         {"role": "assistant", "content": "4"}]}
    plain = {"prompt": "Q: 2+2?\nA:", "completion": " 4"}
    assert policy_prompt(alpaca, "alpaca", tok) == [{"role": "user", "content": "Which city?\n\nA fox went to Lima."}]
    assert policy_prompt(chat, "messages", tok) == chat["messages"][:4]  # everything before the last answer
    assert policy_prompt(plain, "prompt_completion", tok) == "Q: 2+2?\nA:"  # SFT trained it raw, no template
    assert [reference_answer(r, f) for r, f in ((alpaca, "alpaca"), (chat, "messages"), (plain, "prompt_completion"))] \
        == ["Lima", "4", " 4"]
    # TRL renders chat prompts with the template and a generation prompt: exactly the exact-match eval's text
    for row, fmt in ((alpaca, "alpaca"), (chat, "messages")):
        rendered = tok.apply_chat_template(policy_prompt(row, fmt, tok), tokenize=False, add_generation_prompt=True)
        assert rendered == generation_prompt(row, fmt, tok)

    import datasets

    ds = prompt_dataset(datasets.Dataset.from_list([alpaca, {**alpaca, "output": "Quito"}]), "alpaca", tok)
    assert ds.column_names == ["prompt", "reference"] and ds["reference"] == ["Lima", "Quito"]
    tok.chat_template = None
    with pytest.raises(DataError, match="no chat template, so alpaca rows cannot be turned into prompts"):
        policy_prompt(alpaca, "alpaca", tok)


def first_word_length(prompts, completions, references):
    return [len(c.split()[0]) if c.split() else 0 for c in completions]


def one_score_too_few(prompts, completions, references):
    return [1.0] * (len(completions) - 1)


SEEN: dict = {}


def spy_reward(prompts, completions, references):
    SEEN.update(prompts=prompts, completions=completions, references=references)
    return [0.5] * len(completions)


def test_reward_functions_take_trl_completions_and_the_reference_column(tiny_random):
    from transformers import AutoTokenizer

    from distft.rl.rewards import RewardFunctionError
    from distft.stages.grpo import trl_reward_function

    tok = AutoTokenizer.from_pretrained(tiny_random)
    prompt = [{"role": "user", "content": "Which city?"}]
    exact = trl_reward_function("exact_match", tok)
    assert exact.__name__ == "exact_match"  # TRL logs rewards/exact_match/mean
    chat = [[{"role": "assistant", "content": " Lima"}], [{"role": "assistant", "content": "Quito"}]]
    assert exact(prompts=[prompt, prompt], completions=chat, reference=["lima", "lima"], trainer_state=None) \
        == [1.0, 0.0]
    assert exact(prompts=["Q:", "Q:"], completions=["Lima ", "Rome"], reference=["Lima", "Lima"]) == [1.0, 0.0]

    SEEN.clear()
    assert trl_reward_function(f"{__name__}:spy_reward", tok)(prompts=[prompt], completions=chat[:1],
                                                              reference=["Lima"]) == [0.5]
    # distft functions get the prompt text the policy saw, the answer text and the reference
    assert SEEN == {"prompts": [tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)],
                    "completions": [" Lima"], "references": ["Lima"]}
    with pytest.raises(RewardFunctionError, match="returned 1 scores for 2 completions"):
        trl_reward_function(f"{__name__}:one_score_too_few", tok)(prompts=["a", "b"], completions=["x", "y"],
                                                                  reference=["x", "y"])


def test_grpo_batches_must_hold_whole_groups():
    from distft.config.load import ConfigError
    from distft.stages.grpo import check_groups

    def cfg(global_batch, micro, n, workers=2):
        return build_config({"scaling": {"num_workers": workers}, "stage": "grpo", "data": {"train": "x.jsonl"},
                             "reward": {"functions": {"exact_match": 1.0}}, "grpo": {"num_generations": n},
                             "train": {"global_batch_size": global_batch, "micro_batch_size": micro}})

    check_groups(cfg(32, 4, 8), 0, world_size=2)  # 32 samples per step = 4 groups; eval batch 4 x 2 = 8
    with pytest.raises(ConfigError) as e:  # found by `distft validate`, before launch
        cfg(24, 4, 16)
    first, second = str(e.value).splitlines()[1:]
    assert first == ("  - train.global_batch_size: 24 samples per step is not a multiple of "
                     "grpo.num_generations=16 (each prompt's 16 samples must fall in one step). Fix: "
                     "train.global_batch_size=16 (or 32), or grpo.num_generations=12.")
    assert second.startswith("  - train.micro_batch_size: the eval batch, train.micro_batch_size x workers = "
                             "4 x 2 = 8, is not a multiple of grpo.num_generations=16")


# ---------------------------------------------------------------- errors


def test_stages_refuse_the_wrong_data_and_a_missing_reward(tiny_base, tmp_path):
    ctx = StageContext(run_dir=tmp_path / "run")
    with pytest.raises(DataError, match=r"the dpo stage trains on preference pairs .* has format alpaca"):
        stage_runner("dpo")(stage_cfg("dpo", tiny_base, FACTS_TRAIN), ctx)
    grpo = {"reward": {"functions": {"exact_match": 1.0}}, "grpo": {"num_generations": 4}}
    with pytest.raises(DataError, match=r"the grpo stage samples answers to prompts .* has format preference"):
        stage_runner("grpo")(stage_cfg("grpo", tiny_base, PREFS_TRAIN, **grpo), ctx)
    # exact match needs prompt/answer rows; a DPO user may point evaluate.data at held-out pairs by mistake
    cfg = stage_cfg("dpo", tiny_base, PREFS_TRAIN, evaluate={"data": str(PREFS_TEST)})
    with pytest.raises(DataError, match=r"evaluate.data: exact match generates answers to prompts .* format preference"):
        stage_runner("dpo")(cfg, ctx)

    with pytest.raises(Exception, match=r"stage grpo needs something to score responses.*reward.functions="):
        stage_cfg("grpo", tiny_base, FACTS_TRAIN, grpo={"num_generations": 4})
    # a reward model that is a language model (no trained score head) is refused, not scored with a random head
    cfg = stage_cfg("grpo", tiny_base, FACTS_TRAIN, reward={"model": str(tiny_base)}, grpo={"num_generations": 4})
    with pytest.raises(ModelFilesError, match="is not a trained reward model: .*score.weight"):
        stage_runner("grpo")(cfg, ctx)
    cfg = stage_cfg("grpo", tiny_base, FACTS_TRAIN, reward={"model": str(tmp_path / "nowhere")},
                    grpo={"num_generations": 4})
    with pytest.raises(FileNotFoundError, match="no reward model at"):
        stage_runner("grpo")(cfg, ctx)
    cfg = stage_cfg("grpo", tiny_base, FACTS_TRAIN, reward={"functions": {"no_such_reward": 1.0}},
                    grpo={"num_generations": 4})
    with pytest.raises(ValueError, match="'no_such_reward' is neither a built-in"):
        stage_runner("grpo")(cfg, ctx)


# ---------------------------------------------------------------- GRPO wiring: reward model + weighted functions


def test_grpo_weighs_a_reward_model_and_functions_as_configured(tiny_random, tmp_path):
    """Full fine-tuning, so TRL's frozen reference copy is in play (beta > 0): the KL is logged."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"  # a reward model with an (untrained) score head: only the wiring is under test
    AutoModelForSequenceClassification.from_pretrained(tiny_random, num_labels=1).save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tiny_random).save_pretrained(rm_dir)
    rows = write_jsonl(tmp_path / "train.jsonl", read_jsonl(FACTS_TRAIN)[:64])
    cfg = stage_cfg(
        "grpo", tiny_random, rows, method="full", evaluate={"data": None},
        train={"max_steps": 3, "global_batch_size": 8, "micro_batch_size": 8, "lr": 1e-4},
        reward={"model": str(rm_dir), "model_weight": 0.5,
                "functions": {"exact_match": 2.0, f"{__name__}:first_word_length": -0.25}},
        grpo={"num_generations": 4, "max_new_tokens": 6, "beta": 0.04},
    )
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("grpo")(cfg, ctx)

    logs = [m for m in ctx.reported if "reward" in m and "stage_done" not in m]
    assert len(logs) >= 3
    for m in logs:
        per_func = {k.split("/")[1]: v for k, v in m.items() if k.startswith("rewards/") and k.endswith("/mean")}
        (rm_name,) = set(per_func) - {"exact_match", f"{__name__}:first_word_length"}
        assert m["reward"] == pytest.approx(0.5 * per_func[rm_name] + 2.0 * per_func["exact_match"]
                                            - 0.25 * per_func[f"{__name__}:first_word_length"], abs=1e-4)
        assert per_func[f"{__name__}:first_word_length"] > 0  # the function saw decoded answers
    assert summary["kl_last"] is not None and summary["kl_last"] >= 0
    assert summary["exact_match_before"] is None and summary["steps"] == 3
    assert (tmp_path / "run" / "grpo" / "final" / "model.safetensors").exists()


# ---------------------------------------------------------------- learning, export, reload


def response_logps(model, tok, conversations) -> list[float]:
    """log p(response | prompt) for each (prompt turns, response turns), chat-rendered, in one padded batch."""
    import torch

    seqs, starts = [], []
    for prompt, response in conversations:
        context = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        seqs.append(tok(tok.apply_chat_template(prompt + response, tokenize=False), add_special_tokens=False).input_ids)
        starts.append(len(tok(context, add_special_tokens=False).input_ids))
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    with torch.no_grad():
        logps = model(input_ids=ids, attention_mask=mask).logits[:, :-1].log_softmax(-1)
    token_logps = logps.gather(-1, ids[:, 1:, None])[..., 0]
    return [token_logps[i, start - 1:len(s) - 1].sum().item() for i, (s, start) in enumerate(zip(seqs, starts))]


def test_dpo_lora_ranks_held_out_pairs_and_exports_a_reloadable_adapter(tiny_base, tmp_path):
    # Measured (about 15 s): implicit reward accuracy 0 -> 72% on the eval split in 40 steps, 75% on unseen pairs.
    cfg = stage_cfg("dpo", tiny_base, PREFS_TRAIN, data={"max_eval_samples": 64},
                    train={"max_steps": 40, "eval_every": 20}, evaluate={"max_samples": 100}, dpo={"beta": 0.1})
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("dpo")(cfg, ctx)

    # Policy and reference start equal, so every implicit reward starts at 0 (accuracy 0: no strict wins)
    assert logged(ctx, "rewards/margins")[0] == pytest.approx(0.0, abs=1e-6)
    evals = logged(ctx, "eval_rewards/accuracies")
    assert len(evals) >= 2 and all("eval_rewards/margins" in m for m in ctx.reported if "eval_rewards/accuracies" in m)
    assert summary["eval_reward_accuracy"] > 0.55 and summary["eval_reward_margin"] > 0.1, summary
    assert summary["first_logged_loss"] == pytest.approx(0.6931, abs=1e-3)  # log 2: no preference yet
    assert summary["last_logged_loss"] < 0.65
    assert summary["exact_match_before"] is not None and summary["eval_items"] == 100
    assert summary["train_pairs"] == 2850 and summary["dropped_pairs"] == 0

    final = tmp_path / "run" / "dpo" / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(tiny_base)
    assert not (final / "ref").exists()  # no reference adapter: the base with adapters disabled is the reference

    # Reloaded, on unseen pairs: the policy raised log p(chosen) relative to log p(rejected) against its start.
    from distft.models.loading import load_for_inference

    model, tok = load_for_inference(tmp_path / "run" / "dpo")
    rows = read_jsonl(PREFS_TEST)[::5]  # 120 pairs, 40 of each near-miss kind
    conversations = [(r["prompt"], r[side]) for r in rows for side in ("chosen", "rejected")]
    policy = response_logps(model, tok, conversations)
    with model.disable_adapter():
        reference = response_logps(model, tok, conversations)
    implicit = [p - r for p, r in zip(policy, reference)]
    wins = [implicit[2 * i] > implicit[2 * i + 1] for i in range(len(rows))]
    assert sum(wins) / len(wins) >= 0.65, sum(wins) / len(wins)


@pytest.mark.slow
def test_grpo_with_exact_match_raises_the_reward_and_the_held_out_score(sft_policy, tiny_base, tmp_path):
    # Measured: mean sampled reward 0.29 (steps 1-10) -> 0.40 (steps 41-80), held-out exact match 42% -> 46.5%
    # on an earlier machine; 0.16 -> 0.19 and 15.5% -> 24% on this AVX-512 one (2026-11-27), where the tiny base builds
    # slightly differently and the SFT policy is weaker. Each reward mean is over 640-2560 samples of 0/1 (std ~0.015).
    cfg = stage_cfg("grpo", tiny_base, FACTS_TRAIN, init_from=sft_policy,
                    data={"max_eval_samples": 16},
                    train={"max_steps": 80, "global_batch_size": 64},
                    reward={"functions": {"exact_match": 1.0}},
                    grpo={"num_generations": 8, "max_new_tokens": 8, "temperature": 0.7, "beta": 0.04})
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("grpo")(cfg, ctx)

    rewards = logged(ctx, "reward")[:80]
    early, late = sum(rewards[:10]) / 10, sum(rewards[40:]) / len(rewards[40:])
    # A loose check that the training reward moves (about 1.2 sigma at 0.02); the held-out exact match
    # below, on greedy answers to unseen prompts, is the real test that GRPO learned.
    assert late > early + 0.02, (early, late)
    assert logged(ctx, "rewards/exact_match/mean") == pytest.approx(logged(ctx, "reward"))  # one function, weight 1
    assert summary["exact_match_after"] > summary["exact_match_before"] + 0.02, summary
    assert summary["kl_last"] > 0 and summary["mean_reward_first"] is not None

    final = tmp_path / "run" / "grpo" / "final"
    assert (final / "adapter_model.safetensors").exists() and not (final / "ref").exists()
    from distft.models.loading import load_for_inference
    from distft.stages.evaluate import exact_match

    model, tok = load_for_inference(tmp_path / "run" / "grpo")
    rows = read_jsonl(FACTS_TEST)[:200]
    assert exact_match(model, tok, rows, "alpaca", 8).accuracy == pytest.approx(summary["exact_match_after"],
                                                                                abs=1 / 200)


def test_dpo_and_grpo_data_and_batch_problems_are_config_errors():
    """Caught by `distft validate`, before any worker starts."""
    from distft.config import build_config
    from distft.config.load import ConfigError

    with pytest.raises(ConfigError, match="data.format: the dpo stage trains on preference pairs"):
        build_config({"stage": "dpo", "data": {"train": "x.jsonl", "format": "alpaca"}})
    with pytest.raises(ConfigError, match="evaluate.metric: the grpo stage scores held-out prompts by exact_match"):
        build_config({"stage": "grpo", "data": {"train": "x.jsonl"}, "reward": {"functions": {"exact_match": 1}},
                      "evaluate": {"metric": "pairwise_accuracy"}})
    with pytest.raises(ConfigError, match="is not a multiple of grpo.num_generations=8"):
        build_config({"stage": "grpo", "data": {"train": "x.jsonl"}, "reward": {"functions": {"exact_match": 1}},
                      "scaling": {"num_workers": 2}, "train": {"global_batch_size": 36, "micro_batch_size": 6}})


def test_grpo_scores_with_the_reward_model_exactly_what_it_was_trained_on(tiny_random):
    """TRL decodes " bear" with its leading space; rendered as is, the chat template would write two spaces."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distft.data.formats import encode_preference
    from distft.stages.evaluate import reward_scores
    from distft.stages.grpo import reward_model_function

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_random, num_labels=1)
    tok = AutoTokenizer.from_pretrained(tiny_random)
    rm.config.pad_token_id = tok.pad_token_id
    pair = read_jsonl(PREFS_TEST)[0]
    chosen_ids, rejected_ids = encode_preference(pair, tok)  # what the reward stage trains on
    expected = reward_scores(rm, [chosen_ids, rejected_ids], tok.pad_token_id).tolist()
    completions = [[{"role": "assistant", "content": " " + pair[k][0]["content"]}] for k in ("chosen", "rejected")]
    got = reward_model_function(rm, tok, 8)([pair["prompt"]] * 2, completions)
    assert got == pytest.approx(expected, abs=1e-5)
