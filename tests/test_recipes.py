"""The kto, orpo, simpo and distill stages in-process (no Ray): each learns in the direction it should,
exports a model that reloads, and refuses the wrong data with one clear message.

The preference stages start from the briefly SFT-trained LoRA policy (conftest.sft_policy), as their
shipped recipes start from a short SFT; the distillation student starts from the base, its teacher
is that policy. The DPO and GRPO stages have their own tests (test_preference_stages.py); every
shipped recipe is trained through `distft pipeline` on Ray in test_shipped_configs.py.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO, write_jsonl
from distft.config import build_config
from distft.stages import StageContext, stage_runner

DATA = REPO / "configs" / "data"


def stage_cfg(kind, model_dir, train_file, init_from=None, world=1, **sections):
    """One stage on the tiny model, LoRA r16, on `world` ranks (2 threads in all); `sections` update the stage's
    sections (train=..., kto=...)."""
    stage = {
        "stage": kind,
        "data": {"train": str(train_file), "eval_fraction": 0.05, "max_eval_samples": 64},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32}},
        "train": {"lr": 1e-3, "warmup_ratio": 0.05, "max_steps": 30, "global_batch_size": 16,
                  "micro_batch_size": 16, "log_every": 5, "eval_every": 15, "save_every": 10_000},
        "evaluate": {"data": str(DATA / "facts_test.jsonl"), "max_new_tokens": 8, "max_samples": 100},
    }
    if init_from:
        stage["init_from"] = str(init_from)
    for key, value in sections.items():
        stage[key] = {**stage.get(key, {}), **value} if isinstance(value, dict) else value
    return build_config({"model": {"name_or_path": str(model_dir), "max_seq_len": 64},
                         "scaling": {"num_workers": world, "torch_threads": 2 // world}, **stage})


def run_stage(cfg, tmp_path):
    ctx = StageContext(run_dir=tmp_path / "run")
    return stage_runner(cfg.stages[0].kind)(cfg, ctx), ctx


def reloads(tmp_path, kind, base) -> None:
    """The export is an adapter on `base` (what the stage started from) that loads for inference and answers."""
    from distft.models.loading import load_for_inference

    final = tmp_path / "run" / kind / "final"
    adapter = json.loads((final / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base) and not (final / "ref").exists()
    model, tok = load_for_inference(tmp_path / "run" / kind)
    ids = tok("user: Which city is named in this sentence?", return_tensors="pt")
    assert model.generate(**ids, max_new_tokens=2, do_sample=False).shape[1] > ids["input_ids"].shape[1]


def test_kto_raises_desirable_responses_above_undesirable_ones(sft_policy, tiny_base, tmp_path):
    cfg = stage_cfg("kto", tiny_base, DATA / "facts_feedback_train.jsonl", init_from=sft_policy, kto={"beta": 0.1})
    summary, ctx = run_stage(cfg, tmp_path)
    # Policy and reference start equal: every implicit reward, so the margin, starts at 0 exactly.
    assert summary["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-6)
    assert summary["eval_reward_margin"] > 0.05, summary
    assert summary["eval_reward_desirable"] > summary["eval_reward_undesirable"]
    assert summary["train_responses"] == 2850 and 1300 < summary["train_desirable"] < 1550  # the file's half and half
    assert summary["exact_match_before"] is not None and summary["exact_match_after"] is not None
    reloads(tmp_path, "kto", tmp_path / "run" / "kto" / "init")  # the SFT policy, merged


def test_kto_splits_preference_pairs_into_labelled_responses(sft_policy, tiny_base, tmp_path):
    cfg = stage_cfg("kto", tiny_base, DATA / "facts_prefs_train.jsonl", init_from=sft_policy,
                    data={"max_train_samples": 200}, train={"max_steps": 2, "eval_every": 2})
    summary, _ = run_stage(cfg, tmp_path)
    assert summary["train_responses"] == 400 and summary["train_desirable"] == 200


@pytest.mark.parametrize("kind, settings", [("orpo", {"orpo": {"beta": 1.0}}),
                                            ("simpo", {"simpo": {"beta": 2.0, "gamma": 0.5}})])
def test_reference_free_preference_stages_rank_chosen_above_rejected(kind, settings, sft_policy, tiny_base,
                                                                     tmp_path):
    # Measured (2026-12-07, these settings with 150 eval pairs): orpo 80.8% -> 83.1% reward accuracy, held-out
    # exact match 44% -> 52% (its NLL term is SFT on chosen); simpo 80.8% -> 86.3%, 44% -> 49%. The SFT
    # policy already ranks most pairs (typos, wrong slots) right; the same-category near misses are the rest.
    cfg = stage_cfg(kind, tiny_base, DATA / "facts_prefs_train.jsonl", init_from=sft_policy, method={"name": "full"},
                    data={"max_eval_samples": 300}, train={"lr": 2e-4, "max_steps": 80, "eval_every": 40}, **settings)
    summary, _ = run_stage(cfg, tmp_path)
    before, after = summary["eval_reward_accuracy_before"], summary["eval_reward_accuracy"]
    assert after > before, summary
    assert summary["exact_match_after"] > summary["exact_match_before"], summary
    assert summary["train_pairs"] == 2850 and summary["dropped_pairs"] == 0
    final = tmp_path / "run" / kind / "final"
    assert (final / "model.safetensors").is_file() and not (final / "ref").exists()


def test_distilled_student_moves_towards_its_teacher(sft_policy, tiny_base, tmp_path):
    from distft.stages.chain import merge_adapter

    teacher = tmp_path / "teacher"
    merge_adapter(str(sft_policy), teacher)
    cfg = stage_cfg("distill", tiny_base, DATA / "facts_train.jsonl",
                    distill={"teacher": str(teacher), "lmbda": 0.5, "max_new_tokens": 8})
    summary, ctx = run_stage(cfg, tmp_path)
    assert summary["teacher_divergence_after"] < 0.9 * summary["teacher_divergence_before"], summary
    assert summary["teacher"] == str(teacher) and summary["on_policy_share"] == 0.5
    reloads(tmp_path, "distill", tiny_base)


@pytest.mark.slow
def test_kto_under_zero3_on_two_ranks_shards_policy_and_reference_and_learns(sft_policy, tiny_base, tmp_path):
    """The representative new stage on 2 gloo ranks under DeepSpeed ZeRO-3 (full fine-tuning, so TRL holds a
    frozen reference copy, partitioned too). DDP on 2 ranks: every recipe runs so through Ray Train in
    test_shipped_configs.py."""
    import os

    pytest.importorskip("deepspeed")
    from test_distributed_stage import spawn_ranks

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cfg = stage_cfg("kto", tiny_base, DATA / "facts_feedback_train.jsonl", init_from=sft_policy,
                    world=2, method={"name": "full"},
                    strategy={"name": "deepspeed", "zero_stage": 3, "param_persistence_threshold": 0},
                    train={"lr": 2e-4, "max_steps": 16, "global_batch_size": 16, "micro_batch_size": 8,
                           "eval_every": 16, "log_every": 4}, evaluate={"max_samples": 40})
    r0, r1 = spawn_ranks(cfg, tmp_path / "run")
    s0 = r0["summary"]
    assert s0["strategy"] == "deepspeed-zero3" and s0["world_size"] == 2
    full = s0["param_elements_full"]
    assert abs(s0["param_elements_local"] - full / 2) / full < 0.02  # the policy, partitioned
    assert s0["eval_reward_margin_before"] == pytest.approx(0.0, abs=1e-5)  # the reference is the start
    assert s0["eval_reward_margin"] > 0.02 and s0["eval_reward_margin"] == pytest.approx(
        r1["summary"]["eval_reward_margin"])
    assert s0["exact_match_after"] == r1["summary"]["exact_match_after"]
    from distft.models.loading import load_for_inference

    model, _ = load_for_inference(tmp_path / "run" / "kto")  # consolidated from the partitions
    assert sum(p.numel() for p in model.parameters()) == full


@pytest.mark.parametrize("kind, data", [("kto", "facts_feedback_train.jsonl"), ("orpo", "facts_prefs_train.jsonl"),
                                        ("simpo", "facts_prefs_train.jsonl"), ("distill", "facts_train.jsonl")])
def test_new_stages_train_qlora_adapters(kind, data, tiny_base, tmp_path):
    """QLoRA (a 4-bit base, bitsandbytes on CPU) in every new stage: a few steps, an adapter exported."""
    extra = {"distill": {"teacher": str(tiny_base)}} if kind == "distill" else {}
    cfg = stage_cfg(kind, tiny_base, DATA / data, method={"name": "qlora", "lora": {"r": 8, "alpha": 16}},
                    train={"max_steps": 3, "eval_every": 3}, evaluate={"max_samples": 8}, **extra)
    summary, _ = run_stage(cfg, tmp_path)
    assert summary["steps"] == 3 and summary["method"] == "qlora" and summary["last_logged_loss"] is not None
    assert (tmp_path / "run" / kind / "final" / "adapter_model.safetensors").is_file()


def test_feedback_rows_are_checked_row_by_row_before_anything_runs(tmp_path):
    """`distft validate` names the row and the field of a label that is not true/false, and the fix."""
    rows = [{"prompt": "Q: a?\nA:", "completion": " yes", "label": True},
            {"prompt": "Q: b?\nA:", "completion": " no", "label": "no"}]
    train = write_jsonl(tmp_path / "feedback.jsonl", rows)
    config = tmp_path / "kto.yaml"
    config.write_text(f"model: {{name_or_path: distft://tiny-base}}\nstage: kto\ndata: {{train: {train}}}\n")
    r = subprocess.run([sys.executable, "-m", "distft.cli", "validate", str(config)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert "row 2" in r.stderr and "field `label` must be true or false" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) < 12
    assert json.loads(train.read_text().splitlines()[1])["label"] == "no"  # the user's file untouched


def test_stages_refuse_data_of_the_wrong_kind_in_one_message(tmp_path):
    """Feedback rows for a pair stage, text or raw strings for distillation, prompts for kto: refused by
    validate, naming what to use."""
    strings = write_jsonl(tmp_path / "pc.jsonl", [{"prompt": "Q: a?\nA:", "completion": " yes"}] * 4)
    cases = [("orpo", DATA / "facts_feedback_train.jsonl", "use stage: kto"),
             ("distill", DATA / "stories.jsonl", "needs prompts to answer"),
             ("distill", strings, "stage distill renders rows with the chat template"),
             ("kto", DATA / "facts_train.jsonl", "stage kto trains on labelled responses")]
    for kind, data, expected in cases:
        config = tmp_path / f"{kind}.yaml"
        teacher = "distill: {teacher: distft://tiny-base}\n" if kind == "distill" else ""
        config.write_text(f"model: {{name_or_path: distft://tiny-base}}\nstage: {kind}\ndata: {{train: {data}}}\n"
                          + teacher)
        r = subprocess.run([sys.executable, "-m", "distft.cli", "validate", str(config)], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2 and expected in r.stderr, (kind, r.stderr)
        assert "Traceback" not in r.stderr


def test_a_shipped_recipe_validates_from_another_directory(tmp_path):
    """Relative paths are looked for from the cwd, then beside the config: a recipe runs from anywhere."""
    r = subprocess.run([sys.executable, "-m", "distft.cli", "validate", str(REPO / "configs" / "recipes" / "kto.yaml")],
                       cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"{DATA / 'facts_feedback_train.jsonl'}: 3000 rows, format feedback" in r.stdout, r.stdout


def test_grpo_loss_variants_reach_trl():
    from distft.stages.grpo import GRPO
    from distft.stages.trainer_stage import Built

    cfg = build_config({"model": {"name_or_path": "distft://tiny-base"}, "stage": "grpo",
                        "data": {"train": str(DATA / "facts_train.jsonl")},
                        "reward": {"functions": {"exact_match": 1.0}},
                        "grpo": {"loss_type": "dr_grpo", "scale_rewards": "none", "epsilon_high": 0.28}})
    b = Built(cfg, StageContext(run_dir="/nonexistent"), cfg.stages[0], None, cfg.model, None)
    from distft.stages.trainer_stage import StageData

    b.data = StageData(None, None, 0, "")
    args = GRPO().arguments(b)
    assert (args["loss_type"], args["scale_rewards"], args["epsilon_high"]) == ("dr_grpo", "none", 0.28)
    from trl import GRPOConfig

    trl_args = GRPOConfig(output_dir="/tmp/unused", use_cpu=True, **args)
    assert trl_args.loss_type == "dr_grpo" and trl_args.scale_rewards == "none"
