"""The PPO stage without Ray: rollout bookkeeping, the reference and critic it builds, and training that works.

The pure math (GAE, whitening, KL estimators, clipped losses) is in test_rl_math.py.
"""

from __future__ import annotations

import json

import pytest

from conftest import REPO
from distft.config import build_config
from distft.config.load import ConfigError
from distft.data.formats import DataError
from distft.stages import StageContext, stage_runner

FACTS_TRAIN = REPO / "configs" / "data" / "facts_train.jsonl"
FACTS_TEST = REPO / "configs" / "data" / "facts_test.jsonl"
PREFS_TEST = REPO / "configs" / "data" / "facts_prefs_test.jsonl"


def ppo_cfg(policy, reward=None, method="full", ppo=None, train=None, evaluate=None, workers=1, strategy=None):
    raw = {
        "model": {"name_or_path": str(policy), "max_seq_len": 64},
        "scaling": {"num_workers": workers, "torch_threads": 2 if workers == 1 else 1},
        "stage": "ppo",
        "data": {"train": str(FACTS_TRAIN)},
        "method": {"name": method, "lora": {"r": 8, "alpha": 16}},
        "reward": reward or {"functions": {"exact_match": 1.0}},
        "ppo": {"rollout_batch_size": 32, "max_new_tokens": 6, **(ppo or {})},
        "train": {"lr": 1e-4, "scheduler": "constant", "max_steps": 4, "global_batch_size": 16,
                  "micro_batch_size": 16 // workers, "log_every": 1, "save_every": 1000, **(train or {})},
        "evaluate": evaluate or {"data": None},
    }
    if strategy:
        raw["strategy"] = strategy
    return build_config(raw)


@pytest.fixture(scope="module")
def undertrained_sft(tiny_base, tmp_path_factory):
    """A policy that answers about a third of held-out items right: 20 full-SFT steps from the base."""
    run_dir = tmp_path_factory.mktemp("sft-policy")
    cfg = build_config({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(FACTS_TRAIN), "max_eval_samples": 16},
        "method": {"name": "full"},
        "train": {"lr": 1e-3, "scheduler": "constant", "max_steps": 20, "global_batch_size": 32,
                  "micro_batch_size": 32, "log_every": 10, "save_every": 1000},
        "evaluate": {"data": None},
    })
    stage_runner("sft")(cfg, StageContext(run_dir=run_dir))
    return run_dir / "sft" / "final"


# ---------------------------------------------------------------- rollout bookkeeping


def test_training_forward_reproduces_the_log_probs_of_generation(tiny_base):
    """Left-padded prompts of different lengths: the positions PPO recomputes log-probs with must be
    generation's, or the ratio is off from the first minibatch."""
    import torch

    from distft.config.schema import PPOSettings
    from distft.models.loading import load_for_inference
    from distft.stages.ppo import Prompt, hf_generate, make_rollout, policy_forward

    model, tok = load_for_inference(tiny_base)
    prompts = ["The red fox walked to Oslo with two friends. Q: what kind of animal? A:",
               "In Rome, a blue owl met five friends. Q: where did they go? A:",
               "Q: how many friends? A:"]
    settings = PPOSettings(max_new_tokens=5)
    batch = [Prompt(p, p, None) for p in prompts]
    rollout = make_rollout(model, hf_generate, tok, batch, settings, sample=False)
    assert rollout.prompt_mask[:, 0].tolist().count(0) >= 1  # padding really is on the left
    ids, attention, positions = rollout.sequences()
    start = rollout.prompt_ids.shape[1]
    logprobs, _ = policy_forward(model, ids, attention, positions, rollout.response_ids, start, 1.0)
    # Reference: each prompt alone (no padding at all), scored token by token.
    for i, text in enumerate(prompts):
        alone = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        n = int(rollout.mask[i].sum())
        full = torch.cat([alone, rollout.response_ids[i : i + 1, :n]], dim=1)
        with torch.no_grad():
            logits = model(input_ids=full).logits[0, alone.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits.float(), -1).gather(-1, full[0, alone.shape[1]:, None])[:, 0]
        assert torch.allclose(logprobs[i, :n], expected, atol=1e-4)


def test_response_tokens_after_eos_are_masked_and_padded(tiny_base):
    import torch

    from distft.models.loading import load_for_inference
    from distft.stages.ppo import Prompt, make_rollout

    model, tok = load_for_inference(tiny_base)
    eos, pad = tok.eos_token_id, tok.pad_token_id

    def scripted(model, tokenizer, texts, settings, sample):
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        resp = torch.tensor([[10, eos, 11, 12], [10, 11, 12, 13]])  # the second never ends
        return enc["input_ids"], enc["attention_mask"], resp

    rollout = make_rollout(model, scripted, tok, [Prompt("a", "a", None), Prompt("b", "b", None)], None, sample=True)
    assert rollout.mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1]]
    assert rollout.finished.tolist() == [True, False]
    assert rollout.response_ids[0].tolist() == [10, eos, pad, pad]


def test_each_rollout_is_split_across_ranks_and_an_epoch_repeats_no_prompt():
    from distft.stages.ppo import Prompt, rank_batch

    prompts = [Prompt(str(i), str(i), None) for i in range(40)]
    seen = []
    for step in range(5):  # 5 rollouts of 8 = one pass over 40 prompts
        r0 = rank_batch(prompts, step, 8, 0, 2, seed=1)
        r1 = rank_batch(prompts, step, 8, 1, 2, seed=1)
        assert len(r0) == len(r1) == 4 and not {p.text for p in r0} & {p.text for p in r1}
        seen += [p.text for p in r0 + r1]
    assert sorted(seen, key=int) == [str(i) for i in range(40)]
    assert rank_batch(prompts, 5, 8, 0, 2, seed=1) != rank_batch(prompts, 0, 8, 0, 2, seed=1)  # reshuffled


def test_prompts_keep_their_answer_and_chat_turns_and_preference_rows_are_refused(tiny_base, tmp_path):
    from distft.config.schema import DataConfig
    from distft.models.loading import load_for_inference
    from distft.stages.ppo import load_prompts

    _, tok = load_for_inference(tiny_base)
    data = DataConfig(train=str(FACTS_TEST))
    prompts = load_prompts(str(FACTS_TEST), data, tok, 64, "data.train", 5)
    row = json.loads(FACTS_TEST.read_text().splitlines()[0])
    assert prompts[0].reference == row["output"]
    assert prompts[0].scored == [{"role": "user", "content": f"{row['instruction']}\n\n{row['input']}"}]
    assert prompts[0].text.endswith("<|assistant|>")
    with pytest.raises(DataError, match="alpaca, messages or prompt_completion"):
        load_prompts(str(PREFS_TEST), data, tok, 64, "data.train", None)
    with pytest.raises(DataError, match="raise model.max_seq_len"):
        load_prompts(str(FACTS_TEST), data, tok, 4, "data.train", None)


def test_the_critic_reads_the_reward_head_at_every_position(tiny_random):
    import torch
    from transformers import AutoModelForSequenceClassification

    from distft.stages.ppo import ValueReader

    critic = AutoModelForSequenceClassification.from_pretrained(tiny_random, num_labels=1)
    critic.config.pad_token_id = 3
    reader = ValueReader(critic)
    ids = torch.tensor([[5, 6, 7, 8, 9], [5, 6, 7, 8, 9]])
    attention = torch.ones_like(ids)
    positions = torch.arange(5).expand(2, 5)
    values = reader(critic, ids, attention, positions, start=2)  # states before response tokens 2, 3, 4
    assert values.shape == (2, 3)
    # The value before the last token is the reward model's score of the sequence without it.
    with torch.no_grad():
        pooled = critic(input_ids=ids[:, :4]).logits[:, 0]
    assert torch.allclose(values[:, -1], pooled, atol=1e-5)


def test_lora_reference_is_the_policy_with_adapters_disabled(tiny_base):
    """No second copy of the model: at step 0 (LoRA B = 0) the KL is exactly 0, and after the adapters
    move, the reference still equals the untouched base."""
    import torch

    from distft.config.schema import MethodConfig, ModelConfig
    from distft.models.loading import load_for_inference, load_model

    policy = load_model(ModelConfig(name_or_path=str(tiny_base)), MethodConfig(name="lora"), log=lambda m: None)
    base, _ = load_for_inference(tiny_base)
    ids = torch.tensor([[1, 20, 30, 40, 50, 60]])
    with torch.no_grad():
        assert torch.equal(policy(input_ids=ids).logits, base(input_ids=ids).logits)
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.add_(0.05)
        moved = policy(input_ids=ids).logits
        with policy.disable_adapter():
            reference = policy(input_ids=ids).logits
    assert not torch.allclose(moved, reference)
    assert torch.allclose(reference, base(input_ids=ids).logits, atol=1e-6)


# ---------------------------------------------------------------- config and input errors


def test_ppo_config_errors_name_the_field_and_the_fix(tiny_base):
    with pytest.raises(ConfigError) as e:
        ppo_cfg(tiny_base, reward={"model_weight": 1.0}, ppo={"rollout_batch_size": 40}, strategy={"name": "fsdp"})
    text = str(e.value)
    assert "reward: stage ppo needs something to score responses" in text and "reward.functions" in text
    assert "ppo.rollout_batch_size: 40 must be a multiple of train.global_batch_size (16" in text
    assert "strategy.name: the ppo stage runs under ddp or deepspeed" in text
    with pytest.raises(ConfigError, match="does not support qlora. Fix: method.name=lora"):
        ppo_cfg(tiny_base, method="qlora")


def test_a_missing_reward_function_is_refused_before_launch(tiny_base):
    from distft.launch.preflight import PreflightError, preflight

    cfg = ppo_cfg(tiny_base, reward={"functions": {"mypkg.scores:nope": 1.0, "exact_macth": 1.0}})
    with pytest.raises(PreflightError) as e:
        preflight(cfg, None)
    assert "cannot import 'mypkg.scores:nope'" in str(e.value)
    assert "'exact_macth' is neither a built-in (exact_match)" in str(e.value)


def test_reward_functions_combine_by_weight_and_bad_returns_are_named():
    from distft.rl.rewards import RewardFunctionError, weighted_scores

    scores = weighted_scores({"exact_match": 2.0, "tests.test_ppo_stage:length_reward": 0.5},
                             ["p", "p"], ["bear", "a wolf"], ["Bear", "wolf"])
    assert scores == [2.0 + 0.5 * 4, 0.5 * 6]
    with pytest.raises(RewardFunctionError, match="returned 1 scores for 2 completions"):
        weighted_scores({"tests.test_ppo_stage:one_score": 1.0}, ["p", "p"], ["a", "b"], [None, None])


def length_reward(prompts, completions, references):
    return [len(c) for c in completions]


def one_score(prompts, completions, references):
    return [1.0]


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_ppo_with_a_verifiable_reward_raises_held_out_accuracy(undertrained_sft, tmp_path):
    cfg = ppo_cfg(undertrained_sft, ppo={"rollout_batch_size": 64, "whiten_rewards": True},
                  train={"max_steps": 40, "global_batch_size": 32, "micro_batch_size": 32, "save_every": 20},
                  evaluate={"data": str(FACTS_TEST), "max_samples": 200, "max_new_tokens": 6})
    summary = stage_runner("ppo")(cfg, StageContext(run_dir=tmp_path))
    assert summary["exact_match_after"] >= summary["exact_match_before"] + 0.08, summary
    rows = [json.loads(line) for line in (tmp_path / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 41))
    for key in ("score", "score_std", "kl", "kl_coef", "entropy", "policy_clipfrac", "value_loss", "approx_kl",
                "response_length", "time_generate", "time_train"):
        assert key in rows[-1], key
    first, last = sum(r["score"] for r in rows[:10]) / 10, sum(r["score"] for r in rows[-10:]) / 10
    assert last > first + 0.05
    # The export reloads as a plain HF model and answers like the trained policy did.
    from distft.models.loading import load_for_inference
    from distft.stages.evaluate import exact_match

    model, tok = load_for_inference(tmp_path / "ppo" / "final")
    rows_test = [json.loads(line) for line in FACTS_TEST.read_text().splitlines()[:200]]
    assert exact_match(model, tok, rows_test, "alpaca", 6).accuracy == pytest.approx(summary["exact_match_after"])
    assert (tmp_path / "ppo" / "final" / "model.safetensors").exists()
    assert [p.name for p in (tmp_path / "ppo" / "checkpoints").iterdir() if not p.name.startswith(".")] == [
        "checkpoint-20", "checkpoint-40"]


@pytest.mark.slow
def test_resumed_ppo_matches_the_uninterrupted_run(undertrained_sft, tmp_path):
    """Actor, critic, optimizers, KL coefficient, prompt order and sampling RNG all come back."""
    settings = dict(ppo={"kl_target": 0.5, "kl_horizon": 100},
                    train={"max_steps": 6, "save_every": 3}, method="lora")
    full = stage_runner("ppo")(ppo_cfg(undertrained_sft, **settings), StageContext(run_dir=tmp_path / "a"))
    ckpt = tmp_path / "a" / "ppo" / "checkpoints" / "checkpoint-3"
    ctx = StageContext(run_dir=tmp_path / "b", resume_from=str(ckpt))
    resumed = stage_runner("ppo")(ppo_cfg(undertrained_sft, **settings), ctx)
    a = [json.loads(line) for line in (tmp_path / "a" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line) for line in (tmp_path / "b" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in b] == [4, 5, 6]
    for x, y in zip(a[3:], b):
        for key in ("score", "kl", "kl_coef", "policy_loss", "value_loss"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), key
    assert resumed["kl_coef_last"] == pytest.approx(full["kl_coef_last"])


@pytest.mark.slow
def test_ppo_from_a_reward_model_critic_and_lora_policy(undertrained_sft, tmp_path):
    """The critic starts as the reward model (same weights, its head reads every position)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from distft.models.tiny import save_random_init

    rm_dir = tmp_path / "rm"
    save_random_init(tmp_path / "rm-base", hidden=64, layers=2)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-base", num_labels=1)
    rm.save_pretrained(rm_dir)
    AutoTokenizer.from_pretrained(tmp_path / "rm-base").save_pretrained(rm_dir)
    cfg = ppo_cfg(undertrained_sft, reward={"model": str(rm_dir), "functions": {"exact_match": 1.0}},
                  method="lora", train={"max_steps": 2})
    summary = stage_runner("ppo")(cfg, StageContext(run_dir=tmp_path / "run"))
    assert summary["critic_from"] == str(rm_dir) and summary["reward_from"] == str(rm_dir)
    assert (tmp_path / "run" / "ppo" / "final" / "adapter_model.safetensors").exists()
    rows = [json.loads(line) for line in (tmp_path / "run" / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # LoRA at init: policy == reference
    assert "reward_model" in rows[0] and "reward_functions" in rows[0]


# ---------------------------------------------------------------- two ranks: DDP and ZeRO-3


def _ppo_rank(rank: int, world: int, port: int, cfg_json: str, run_dir: str) -> None:
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from distft.config import DistftConfig
    from distft.distributed.process_group import leave_process_group
    from distft.stages.context import context_from_env

    cfg = DistftConfig.model_validate_json(cfg_json)
    ctx = context_from_env(run_dir)
    summary = stage_runner("ppo")(cfg, ctx)
    with open(os.path.join(run_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"summary": summary, "reported": [m for m in ctx.reported if "stage_done" not in m]}, f)
    leave_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", [{"name": "ddp"}, {"name": "deepspeed", "zero_stage": 2},
                                      {"name": "deepspeed", "zero_stage": 3, "param_persistence_threshold": 0}],
                         ids=["ddp", "zero2", "zero3"])
def test_two_ranks_share_each_rollout_and_stay_in_step(undertrained_sft, tmp_path, strategy):
    import torch.multiprocessing as mp

    from test_distributed_stage import free_port

    cfg = ppo_cfg(undertrained_sft, workers=2, strategy=strategy, train={"max_steps": 3, "log_every": 1},
                  evaluate={"data": str(FACTS_TEST), "max_samples": 21, "max_new_tokens": 6})
    mp.start_processes(_ppo_rank, args=(2, free_port(), cfg.model_dump_json(), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    r0, r1 = (json.loads((tmp_path / f"rank{i}.json").read_text()) for i in (0, 1))
    # Metrics are means over both ranks' rollouts: every rank logs the same numbers.
    assert [m["score"] for m in r0["reported"]] == pytest.approx([m["score"] for m in r1["reported"]])
    assert [m["step"] for m in r0["reported"]] == [1, 2, 3]
    s = r0["summary"]
    assert s["world_size"] == 2 and s["eval_items"] == 21  # 11 + 10 held-out prompts, padding not counted
    assert s["exact_match_after"] == r1["summary"]["exact_match_after"]
    if strategy.get("zero_stage") == 3:
        assert s["param_elements_local"] <= 0.55 * s["param_elements_full"]  # ZeRO-3: half the policy per rank
    if strategy.get("zero_stage") == 2:  # ZeRO-2: the whole policy, half of its fp32 optimizer partition
        assert s["param_elements_local"] == s["param_elements_full"]
        assert s["optimizer_fp32_elements_local"] <= 0.55 * s["param_elements_full"]
    from distft.models.loading import load_for_inference

    model, _ = load_for_inference(tmp_path / "ppo" / "final")  # one consolidated model
    assert sum(p.numel() for p in model.parameters()) == s["param_elements_full"]


def test_a_generation_engine_plugs_in_by_import_path():
    from distft.stages.ppo import hf_generate, resolve_generator

    assert resolve_generator("hf") is hf_generate
    assert resolve_generator("tests.test_ppo_stage:length_reward").__qualname__ == "length_reward"
    with pytest.raises(ValueError, match="ppo.generation: cannot use 'nosuch_engine'"):
        resolve_generator("nosuch_engine")
