"""`distft plan`: counts from config.json alone, formulas per strategy, the fit check, and accuracy vs measured shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from distft.config import build_config, load_config
from distft.config.schema import LoraSettings, MethodConfig, StrategyConfig
from distft.distributed import plan

LLAMA8B = "meta-llama/Llama-3.1-8B-Instruct"
GiB = 2**30


def test_parameters_are_counted_from_config_json_on_the_meta_device(tiny_base):
    from distft.models.loading import load_for_inference
    from distft.models.shapes import model_shape

    shape = model_shape(LLAMA8B)  # shipped in configs/models/: works offline, reads no weights
    assert shape.params == 8_030_261_248 and shape.layers == 32 and shape.kv_heads == 8
    assert shape.lora_params(LoraSettings(r=64)) == 167_772_160  # r x (in + out) over q,k,v,o,gate,up,down
    model, _ = load_for_inference(tiny_base)
    assert model_shape(str(tiny_base)).params == sum(p.numel() for p in model.parameters())  # tied once


def test_model_state_formulas_per_strategy():
    from distft.models.shapes import model_shape

    shape = model_shape(LLAMA8B)
    psi = shape.params
    full = MethodConfig(name="full")
    zero3 = plan.model_states(shape, full, StrategyConfig(name="deepspeed", zero_stage=3,
                                                          param_persistence_threshold=0), "bfloat16", 8)
    assert (zero3.params, zero3.grads, zero3.optimizer) == pytest.approx((2 * psi / 8, 2 * psi / 8, 12 * psi / 8))
    zero2 = plan.model_states(shape, full, StrategyConfig(name="deepspeed", zero_stage=2), "bfloat16", 8)
    assert (zero2.params, zero2.grads, zero2.optimizer) == pytest.approx((2 * psi, 2 * psi / 8, 12 * psi / 8))
    ddp = plan.model_states(shape, full, StrategyConfig(name="ddp"), "float32", 4)
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.buffers) == (4 * psi, 4 * psi, 8 * psi, 4 * psi)
    offload = plan.model_states(shape, full, StrategyConfig(name="deepspeed", zero_stage=3, offload_optimizer="cpu"),
                                "bfloat16", 8)
    assert offload.optimizer == 0 and offload.cpu == pytest.approx(12 * psi / 8)
    qlora = plan.model_states(shape, MethodConfig(name="qlora"), StrategyConfig(name="ddp"), "bfloat16", 1)
    assert 4.5 * GiB < qlora.params < 6.5 * GiB  # 7B linear weights in ~4.1 bits + 1B embeddings/head in bf16
    frozen = plan.model_states(shape, full, StrategyConfig(name="ddp"), "bfloat16", 8, trainable=False)
    assert frozen.grads == frozen.optimizer == 0 and frozen.params == 2 * psi


def test_ppo_counts_every_model_and_the_generation_cache():
    cfg = load_config(REPO / "configs" / "llama8b" / "rlhf.yaml")
    from distft.launch.sizing import stage_shapes

    shapes = stage_shapes(cfg, 2, {})
    models = {k: v for k, v in shapes.items() if k != "shape"}
    lora = plan.stage_memory(cfg, 2, shapes["shape"], 8, **models)
    assert any("adapters disabled" in n for n in lora.notes) and any("KV cache" in n for n in lora.notes)
    full_cfg = load_config(REPO / "configs" / "llama8b" / "rlhf.yaml", ["stages.2.method.name=full"])
    full = plan.stage_memory(full_cfg, 2, shapes["shape"], 8, **models)
    # Full PPO trains the whole policy and critic (+14 bytes/param each: 16-bit grads, fp32 master and
    # moments) and adds a frozen reference copy (+2), over 8 ranks.
    assert full.model_states - lora.model_states == pytest.approx(30 * shapes["shape"].params / 8, rel=0.05)
    kv = plan.kv_cache_bytes(shapes["shape"], 512 // 8, 2048)
    assert kv == 2 * 32 * 8 * 128 * 2048 * 64 * 2


def test_plan_prints_every_shipped_config_quickly(capsys):
    import time

    from distft.cli import main

    for path in sorted((REPO / "configs").glob("**/*.yaml")):
        started = time.time()
        assert main(["plan", str(path)]) == 0
        out = capsys.readouterr().out
        assert "fewest 80 GiB GPUs that fit" in out and "per rank" in out, path
        assert time.time() - started < 10, path


def test_validate_warns_when_a_stage_does_not_fit_and_names_the_fix():
    from distft.launch.sizing import fit_warnings

    cfg = load_config(REPO / "configs" / "llama8b" / "rlhf.yaml", ["scaling.num_workers=1",
                                                                  "strategy.gradient_checkpointing=false"])
    warnings = fit_warnings(cfg)
    assert len(warnings) == 3
    assert warnings[0].startswith("stage sft: about ") and "over scaling.gpu_memory_gib=80" in warnings[0]
    assert "Fix: scaling.num_workers=" in warnings[0]
    assert fit_warnings(load_config(REPO / "configs" / "llama8b" / "rlhf.yaml")) == []  # as shipped: fits


@pytest.mark.slow
def test_plan_is_within_10_percent_of_measured_shards(tmp_path):
    """benchmarks/memory.py measures each rank's parameter, gradient and optimizer bytes on live shards."""
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(REPO / ".cache" / "torch_extensions"))}
    out = tmp_path / "memory.json"
    r = subprocess.run([sys.executable, "benchmarks/memory.py", "--hidden", "512", "--layers", "4", "--json",
                        str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    measured = json.loads(out.read_text())
    from distft.models.loading import cache_dir
    from distft.models.shapes import model_shape

    sys.path.insert(0, str(REPO / "benchmarks"))
    from memory import STRATEGIES

    shape = model_shape(str(cache_dir() / "bench-llama-h512-l4"))
    for name, ranks in measured.items():
        strategy = StrategyConfig(**STRATEGIES[name][0])
        predicted = plan.model_states(shape, MethodConfig(name="full"), strategy, "float32", 2)
        for rank in ranks:
            got = rank["states"]
            pairs = {"params": (predicted.params, got["params"]), "grads": (predicted.grads, got["grads"]),
                     "optimizer": (predicted.optimizer, got["optimizer"] + got["master"])}
            for kind, (want, have) in pairs.items():
                assert want == pytest.approx(have, rel=0.10), (name, kind, want, have)
    cfg = build_config({"model": {"name_or_path": str(cache_dir() / "bench-llama-h512-l4")}, "stage": "sft",
                        "data": {"train": "x.jsonl"}})
    assert cfg.stages[0].strategy.name == "ddp"


def test_validate_prints_the_memory_warning_even_where_the_run_cannot_start():
    proc = subprocess.run([sys.executable, "-m", "distft.cli", "validate", str(REPO / "configs/llama8b/rlhf.yaml"),
                           "scaling.num_workers=1"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "warning stage sft: about " in proc.stderr and "Fix: scaling.num_workers=" in proc.stderr
    assert proc.returncode != 0  # this machine has no GPU: preflight still refuses to launch here
