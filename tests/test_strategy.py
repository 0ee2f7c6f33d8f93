"""Strategy config and the pure DeepSpeed builder: dicts compared, combinations refused before launch."""

from __future__ import annotations

import json

import pytest

from distft.config import ConfigError, build_config
from distft.distributed.deepspeed import build_deepspeed_config
from distft.distributed.fsdp import build_fsdp_kwargs
from distft.distributed.strategy import trainer_strategy_kwargs


def stage(strategy: dict, workers: int = 2, gpu: bool = False, **train):
    cfg = build_config({"stage": "sft", "data": {"train": "x"}, "strategy": strategy,
                        "scaling": {"num_workers": workers, "use_gpu": gpu},
                        "train": {"global_batch_size": 32, "micro_batch_size": 4, "max_grad_norm": 0.5, **train}})
    return cfg.stages[0]


def test_zero3_with_offload_builds_the_expected_dict():
    st = stage({"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu", "offload_params": "cpu",
                "param_persistence_threshold": 0}, gpu=True)
    assert build_deepspeed_config(st.strategy, st.train, "bf16", world_size=4) == {
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
    assert [build_deepspeed_config(st.strategy, st.train, "fp32", n)["gradient_accumulation_steps"]
            for n in (1, 2, 8)] == [8, 4, 1]
    assert build_deepspeed_config(st.strategy, st.train, "fp32", 1)["zero_optimization"] == {"stage": 1}
    st = stage({"name": "deepspeed", "zero_stage": 3, "offload_params": "nvme", "nvme_path": "/nvme"}, gpu=True)
    zero = build_deepspeed_config(st.strategy, st.train, "fp16", 2)["zero_optimization"]
    assert zero["offload_param"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}


def test_user_json_is_merged_over_the_defaults(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 5e7}, "wall_clock_breakdown": True}))
    st = stage({"name": "deepspeed", "zero_stage": 2, "deepspeed_config": str(user)})
    cfg = build_deepspeed_config(st.strategy, st.train, "fp32", 2)
    assert cfg["zero_optimization"] == {"stage": 2, "overlap_comm": True, "contiguous_gradients": True,
                                        "reduce_bucket_size": 5e7}
    assert cfg["wall_clock_breakdown"] is True


@pytest.mark.parametrize("strategy, fragment", [
    ({"name": "fsdp", "offload_optimizer": "cpu"}, "FSDP2 has strategy.fsdp_offload=true"),
    ({"name": "ddp", "fsdp_offload": True}, "strategy.fsdp_offload needs strategy.name=fsdp"),
    ({"name": "fsdp", "fsdp_sharding": "hybrid"}, "hybrid needs strategy.fsdp_shard_size"),
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


def test_fsdp2_builder_full_and_hybrid_dicts():
    st = stage({"name": "fsdp"})
    assert build_fsdp_kwargs(st.strategy, world_size=4) == {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "reshard_after_forward": True,
            "cpu_offload": False,
            "state_dict_type": "SHARDED_STATE_DICT",
            "cpu_ram_efficient_loading": True,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        },
        "parallelism": {"dp_replicate_size": 1, "dp_shard_size": 4},
    }
    st = stage({"name": "fsdp", "fsdp_sharding": "hybrid", "fsdp_shard_size": 8, "fsdp_offload": True,
                "fsdp_state_dict": "full", "reshard_after_forward": False}, workers=16, gpu=True, global_batch_size=64)
    built = build_fsdp_kwargs(st.strategy, world_size=32)  # hybrid across 4 nodes of 8 GPUs
    assert built["parallelism"] == {"dp_replicate_size": 4, "dp_shard_size": 8}
    assert {k: built["fsdp_config"][k] for k in ("reshard_after_forward", "cpu_offload", "state_dict_type")} == {
        "reshard_after_forward": False, "cpu_offload": True, "state_dict_type": "FULL_STATE_DICT"}


def test_strategy_to_trainer_kwargs_precision_and_engines():
    st = stage({"name": "deepspeed", "zero_stage": 2})
    kw = trainer_strategy_kwargs(st.strategy, st.train, "bfloat16", 2)
    assert (kw["bf16"], kw["fp16"], kw["deepspeed"]["bf16"]) == (True, False, {"enabled": True})
    assert "fsdp" not in kw
    st = stage({"name": "fsdp", "precision": "bf16"})  # bf16 autocast over fp32 weights
    kw = trainer_strategy_kwargs(st.strategy, st.train, "float32", 2)
    assert (kw["bf16"], kw["fsdp"], kw["fsdp_config"]["version"]) == (True, True, 2)
    assert "deepspeed" not in kw and "parallelism_config" not in kw
    st = stage({"name": "ddp"})
    kw = trainer_strategy_kwargs(st.strategy, st.train, "float32", 2)
    assert kw == {"bf16": False, "fp16": False, "gradient_checkpointing": False, "ddp_find_unused_parameters": False}


def test_hybrid_fsdp_parallelism_config_is_built():
    st = stage({"name": "fsdp", "fsdp_sharding": "hybrid", "fsdp_shard_size": 2}, workers=4, gpu=True)
    pc = trainer_strategy_kwargs(st.strategy, st.train, "float32", 4)["parallelism_config"]
    assert (pc.dp_replicate_size, pc.dp_shard_size) == (2, 2)


@pytest.mark.parametrize("overrides, fragment", [
    ({"strategy": {"name": "fsdp", "fsdp_sharding": "hybrid", "fsdp_shard_size": 3}, "scaling": {"num_workers": 4}},
     "fsdp_shard_size: 3 must divide scaling.num_workers=4"),
    ({"strategy": {"name": "fsdp", "fsdp_offload": True}}, "nothing to offload"),
    ({"strategy": {"name": "fsdp", "fsdp_sharding": "hybrid", "fsdp_shard_size": 1}}, "hybrid needs scaling.use_gpu"),
    ({"strategy": {"name": "ddp", "precision": "fp16"}}, "fp16 needs GPUs"),
    ({"strategy": {"name": "fsdp"}, "method": {"name": "qlora"}}, "fsdp with method.name=qlora"),
])
def test_strategy_checks_that_need_the_cluster(overrides, fragment):
    with pytest.raises(ConfigError) as e:
        build_config({"stage": "sft", "data": {"train": "x"}, "train": {"global_batch_size": 32, "micro_batch_size": 4},
                      **overrides})
    assert any(fragment in p for p in e.value.problems), e.value.problems
