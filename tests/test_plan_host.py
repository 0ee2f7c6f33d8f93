"""Issue 20: DeepSpeed's buffers sized from the model, the plan of a CPU config in host RAM, and validate
refusing CPU runs that cannot fit this machine (or offload that can only cost memory), as users run it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import psutil
import pytest

from conftest import REPO
from distft.config import load_config
from distft.config.schema import MethodConfig, StrategyConfig, TrainConfig
from distft.distributed import plan
from distft.distributed.deepspeed import build_deepspeed_config
from faults import assert_unchanged, check_failure, run_distft, snapshot

GiB = 2**30
TINYLLAMA = dict(hidden_size=2048, num_hidden_layers=22, intermediate_size=5632, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, tie_word_embeddings=False)


def shaped_like(tmp_path, tiny_base, **config) -> str:
    """The shipped tiny base's files with a bigger config.json: planning reads only the config."""
    out = tmp_path / "model"
    shutil.copytree(tiny_base, out)
    data = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**data, **config}))
    return str(out)


def test_zero_buffers_follow_the_hidden_size_and_a_user_json_wins(tmp_path):
    zero3 = StrategyConfig(name="deepspeed", zero_stage=3)
    zero = build_deepspeed_config(zero3, TrainConfig(), "fp32", 2, hidden=1024)["zero_optimization"]
    assert zero["reduce_bucket_size"] == 1024**2 and "stage3_prefetch_bucket_size" not in zero  # DeepSpeed's
    assert zero["stage3_param_persistence_threshold"] == 10_240
    assert "stage3_max_live_parameters" not in zero and "stage3_max_reuse_distance" not in zero  # DeepSpeed's
    # Without a hidden size DeepSpeed's defaults stay (nothing set), and an explicit threshold always wins.
    bare = build_deepspeed_config(zero3, TrainConfig(), "fp32", 2)["zero_optimization"]
    assert "reduce_bucket_size" not in bare and bare["stage3_param_persistence_threshold"] == 100_000
    explicit = zero3.model_copy(update={"param_persistence_threshold": 0})
    assert build_deepspeed_config(explicit, TrainConfig(), "fp32", 2, 1024)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 0

    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"stage3_max_live_parameters": 1e8,
                                                      "stage3_prefetch_bucket_size": "auto"}}))
    mine = zero3.model_copy(update={"deepspeed_config": str(user)})
    from distft.models.shapes import model_shape

    shape = model_shape("meta-llama/Llama-3.1-8B-Instruct")
    settings = plan.zero_settings(mine, shape)
    assert settings["stage3_max_live_parameters"] == 1e8  # the plan sees what the run will use
    assert settings["stage3_prefetch_bucket_size"] == int(0.9 * shape.hidden ** 2)  # "auto" as HF fills it
    ours = plan.model_states(shape, MethodConfig(name="full"), zero3, "bfloat16", 8)
    theirs = plan.model_states(shape, MethodConfig(name="full"), mine, "bfloat16", 8)
    # Gathered at once under ZeRO-3: the live limit (DeepSpeed's 1e9 by default) plus a prefetch bucket, at
    # least the largest layer, never more than the model; in 16 bits.
    gathered = lambda live, prefetch: min(shape.params, max(live + prefetch, shape.largest_layer))  # noqa: E731
    assert theirs.buffers - ours.buffers == pytest.approx(
        (gathered(1e8, int(0.9 * shape.hidden ** 2)) - gathered(1e9, 50_000_000)) * 2, rel=1e-6)


def test_the_plan_of_a_cpu_config_speaks_of_host_ram():
    r = run_distft("plan", REPO / "configs/quickstart.yaml", timeout=120)
    assert r.returncode == 0, r.stderr
    assert "on 2 CPU worker(s)" in r.stdout and "on 2 GPU(s)" not in r.stdout
    assert "host RAM per worker" in r.stdout and "process baseline" in r.stdout
    total = psutil.virtual_memory().total / GiB
    line = next(x for x in r.stdout.splitlines() if x.strip().startswith("this machine:"))
    assert "Ray's processes" in line and f"of {total:.1f} GiB RAM: headroom" in line, line
    assert "on GPUs instead (scaling.use_gpu=true), fewest 80 GiB GPUs that fit" in r.stdout


def test_validate_refuses_a_cpu_run_over_this_machines_ram_and_names_what_fits(tmp_path, tiny_base):
    if psutil.virtual_memory().total > 40 * GiB:
        pytest.skip("this machine has the RAM for a 1.1B full fine-tune on 2 CPU workers")
    model = shaped_like(tmp_path, tiny_base, **TINYLLAMA)
    config = tmp_path / "job.yaml"
    config.write_bytes((REPO / "configs/quickstart.yaml").read_bytes())
    before = snapshot(tmp_path)
    args = ("validate", config, f"model.name_or_path={model}", "method.name=full", "strategy.name=deepspeed",
            "strategy.zero_stage=3", f"run.output_dir={tmp_path / 'runs'}")
    r = run_distft(*args, timeout=120)
    check_failure(r, 2, ("stage sft: about ", "GiB per CPU worker x 2 worker(s)", "this machine's",
                         "Fix: method.name=lora"))
    assert_unchanged(before, snapshot(tmp_path))
    # `distft train` refuses the same way, before any cluster starts (no Ray address printed, no run dir).
    r = run_distft("train", *args[1:], timeout=120)
    check_failure(r, 2, "GiB per CPU worker x 2 worker(s)")
    assert not (tmp_path / "runs").exists()
    # What the message names does fit (the same check, in-process: a third CLI start costs CI seconds).
    from distft.launch.sizing import host_problems

    overrides = [str(a) for a in args[2:]]
    assert host_problems(load_config(config, overrides)) != []
    assert host_problems(load_config(config, overrides + ["method.name=lora"])) == []


def test_offload_on_cpu_workers_is_refused_with_the_reason(tmp_path):
    r = run_distft("validate", REPO / "configs/zero3.yaml", "strategy.offload_optimizer=cpu",
                   f"run.output_dir={tmp_path}", timeout=120)
    check_failure(r, 2, ("strategy.offload_optimizer=cpu on CPU workers", "frees none of it", "async_io",
                         "Fix: strategy.offload_optimizer=none"))


@pytest.mark.slow
def test_a_zero3_full_fine_tune_of_0_1b_peaks_where_the_plan_says(tmp_path):
    """A ~110M-parameter Llama, ZeRO-3, full fine-tuning, 2 ranks: each rank's peak RSS (VmHWM) over the plan's
    host total. The benchmark holds the 15% over more shapes; this guards against the plan drifting."""
    out = tmp_path / "peaks.jsonl"
    env = {**os.environ, "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                                 str(REPO / ".cache" / "torch_extensions"))}
    r = subprocess.run([sys.executable, "benchmarks/plan_accuracy.py", "--cases", "0.1b:full:zero3", "--steps", "2",
                        "--json", str(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert "ratio" in row, row.get("error")
    assert 0.1e9 < row["plan"]["params"] < 0.12e9
    assert 0.85 <= row["ratio"] <= 1.3, (row["ratio"], row["measured"] / GiB, row["plan"]["host"] / GiB)
    assert "| 0.1b:full:zero3 |" in r.stdout  # the table a user reads


def test_cpu_workers_get_the_fixed_mmap_threshold_only_for_models_with_layer_sized_blocks(monkeypatch):
    """glibc's fixed 4 MB mmap threshold returns freed layer-sized blocks (issue 20's peaks), and costs step
    time where no block reaches it (benchmarks/step.py): the shipped tiny base gets glibc's default."""
    from distft.config import load_config
    from distft.launch.worker_env import MALLOC_MMAP_THRESHOLD, _worker_env
    from distft.models.bundled import tiny_base_dir
    from distft.models.shapes import largest_matrix

    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    big = "meta-llama/Llama-3.1-8B-Instruct"  # config.json shipped in configs/models
    assert largest_matrix(big) == 4096 * 128256 and largest_matrix(str(tiny_base_dir())) * 4 < MALLOC_MMAP_THRESHOLD

    def env(model: str, *overrides: str) -> dict:
        return _worker_env(load_config(REPO / "configs/quickstart.yaml", [f"model.name_or_path={model}", *overrides]))

    assert "MALLOC_MMAP_THRESHOLD_" not in env(str(tiny_base_dir()))
    assert env(big)["MALLOC_MMAP_THRESHOLD_"] == str(MALLOC_MMAP_THRESHOLD)
    assert "MALLOC_MMAP_THRESHOLD_" not in env(big, "scaling.use_gpu=true")  # GPU workers: host RAM is not the limit
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert env(big)["MALLOC_MMAP_THRESHOLD_"] == "65536"  # the user's own setting wins
