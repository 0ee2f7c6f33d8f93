"""Strategy config and the pure DeepSpeed builder: dicts compared, combinations refused before launch."""

from __future__ import annotations

import json

import pytest

from distft.config import ConfigError, build_config
from distft.distributed.deepspeed import build_deepspeed_config


def stage(strategy: dict, **train):
    cfg = build_config({"stage": "sft", "data": {"train": "x"}, "strategy": strategy,
                        "train": {"global_batch_size": 32, "micro_batch_size": 4, "max_grad_norm": 0.5, **train}})
    return cfg.stages[0]


def test_zero3_with_offload_builds_the_expected_dict():
    st = stage({"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu",
                "param_persistence_threshold": 0})
    assert build_deepspeed_config(st.strategy, st.train, "bfloat16", world_size=4) == {
        "train_batch_size": 32,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 2,
        "gradient_clipping": 0.5,
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "stage3_param_persistence_threshold": 0,
            "stage3_gather_16bit_weights_on_model_save": True,
            "offload_optimizer": {"device": "cpu", "pin_memory": True},
            "offload_param": {"device": "cpu", "pin_memory": True},
        },
        "bf16": {"enabled": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def test_accumulation_follows_world_size_and_nvme_needs_a_path():
    st = stage({"name": "deepspeed", "zero_stage": 1})
    assert [build_deepspeed_config(st.strategy, st.train, "float32", n)["gradient_accumulation_steps"]
            for n in (1, 2, 8)] == [8, 4, 1]
    assert build_deepspeed_config(st.strategy, st.train, "float32", 1)["zero_optimization"] == {"stage": 1}
    st = stage({"name": "deepspeed", "zero_stage": 3, "offload_params": "nvme", "nvme_path": "/nvme"})
    zero = build_deepspeed_config(st.strategy, st.train, "float16", 2)["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}


def test_user_json_is_merged_over_the_defaults(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}))
    st = stage({"name": "deepspeed", "zero_stage": 2, "deepspeed_config": str(user)})
    cfg = build_deepspeed_config(st.strategy, st.train, "float32", 2)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e7}
    assert cfg["wall_clock_breakdown"] is True


@pytest.mark.parametrize("strategy, fragment", [
    ({"name": "fsdp"}, "strategy.name=fsdp is not available yet"),
    ({"name": "ddp", "offload_optimizer": "cpu"}, "strategy.offload_optimizer needs strategy.name=deepspeed"),
    ({"name": "deepspeed", "zero_stage": 2, "offload_params": "cpu"}, "needs strategy.zero_stage=3"),
    ({"name": "deepspeed", "zero_stage": 3, "offload_params": "nvme"}, "needs strategy.nvme_path"),
    ({"name": "deepspeed", "zero_stage": 0, "offload_optimizer": "cpu"}, "needs strategy.zero_stage >= 1"),
    ({"name": "deepspeed", "zero_stage": 4}, "strategy.zero_stage:"),
])
def test_bad_combinations_are_refused_with_the_fix(strategy, fragment):
    with pytest.raises(ConfigError) as e:
        stage(strategy)
    assert any(fragment in p for p in e.value.problems), e.value.problems


def test_top_level_strategy_is_a_default_for_every_stage():
    cfg = build_config({"strategy": {"name": "deepspeed", "zero_stage": 3},
                        "stages": [{"stage": "pretrain", "data": {"train": "a"}},
                                   {"stage": "sft", "data": {"train": "b"}, "strategy": {"zero_stage": 2}}]})
    assert [(s.strategy.name, s.strategy.zero_stage) for s in cfg.stages] == [("deepspeed", 3), ("deepspeed", 2)]
