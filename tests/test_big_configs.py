"""The shipped configs for real models (configs/llama8b/) validate, and run end to end with the model made tiny.

There is no GPU and no hub access here, so the run swaps what cannot travel (the 8B model,
the hub datasets, the GPUs) for the tiny base, the bundled task and CPU workers, and makes
the steps few. Everything else comes from the shipped YAML: the stages and how they chain,
ZeRO-3 with gradient checkpointing, the methods, and every PPO setting but the sizes.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

BIG = REPO / "configs" / "llama8b" / "rlhf.yaml"
DATA = REPO / "configs" / "data"

TINY = [
    "model.name_or_path=distft://tiny-base", "model.dtype=float32", "model.max_seq_len=64",
    "scaling.use_gpu=false", "scaling.num_workers=2", "scaling.cpus_per_worker=1", "strategy.precision=fp32",
    "strategy.param_persistence_threshold=0",
    f"stages.0.data.train={DATA / 'facts_train.jsonl'}", "stages.0.data.split=train", "stages.0.data.format=auto",
    "stages.0.train.max_steps=3", "stages.0.train.global_batch_size=16",
    f"stages.1.data.train={DATA / 'facts_prefs_train.jsonl'}", "stages.1.train.max_steps=3",
    "stages.1.train.global_batch_size=8",
    f"stages.2.data.train={DATA / 'facts_train.jsonl'}", "stages.2.data.split=train", "stages.2.data.format=auto",
    "stages.2.ppo.rollout_batch_size=16", "stages.2.ppo.max_new_tokens=6", "stages.2.train.max_steps=2",
    "stages.2.train.global_batch_size=8", "stages.2.train.micro_batch_size=4",
    f"stages.2.evaluate.data={DATA / 'facts_test.jsonl'}", "stages.2.evaluate.max_samples=16",
]


def test_the_8b_pipeline_config_is_valid_and_chains_sft_reward_ppo():
    from distft.config import load_config
    from distft.launch.preflight import check_data, check_sources

    cfg = load_config(BIG)
    assert [st.stage for st in cfg.stages] == ["sft", "reward", "ppo"]
    assert cfg.init_source(2) == "sft" and cfg.reward_source(2) == "reward" and cfg.critic_source(2) == "reward"
    for st in cfg.stages:
        assert st.strategy.label() == "deepspeed-zero3" and st.strategy.resolved_precision(cfg.model.dtype) == "bf16"
        assert st.train.global_batch_size % (st.train.micro_batch_size * cfg.scaling.num_workers) == 0
    assert cfg.stages[2].method.uses_adapter()  # the PPO reference is the policy with adapters off
    assert not cfg.model.trust_remote_code
    problems, notes = check_data(cfg)
    assert problems == [] and all("datasets name" in n for n in notes)
    assert check_sources(cfg) == []
    # The offload options named in the file's comments are valid settings of it.
    load_config(BIG, ["strategy.offload_optimizer=cpu", "strategy.offload_params=cpu"])


# make test-slow: the full tier validates and plans this GPU config (test_shipped_configs.py); running its
# three stages made tiny took 2.4 minutes there, past the full tier's budget.
@pytest.mark.slowest
def test_the_8b_pipeline_yaml_runs_with_the_model_made_tiny(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "distft.cli", "pipeline", str(BIG), f"run.output_dir={tmp_path}", *TINY],
        cwd=REPO, capture_output=True, text=True, timeout=1200,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    sft, reward, ppo = json.loads((tmp_path / "rlhf" / "summary.json").read_text())
    assert [s["strategy"] for s in (sft, reward, ppo)] == ["deepspeed-zero3"] * 3
    assert ppo["param_elements_local"] < ppo["param_elements_full"]  # ZeRO-3 really partitioned the policy
    assert ppo["method"] == "lora" and ppo["steps"] == 2
    assert (tmp_path / "rlhf" / "ppo" / "final" / "adapter_model.safetensors").is_file()
