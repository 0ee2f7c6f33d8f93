"""Every file under configs/ runs: trained for a few steps through `distft train` on Ray, or, where it
needs GPUs, validated and planned.

The full tier trains the configs no other test runs end to end; `make test-slow` trains every one.
They share one `distft cluster up` cluster (2 CPUs on one worker raylet), as a user's local cluster
would run them (`--address`). Overrides only shorten a run: steps, held-out items, training rows.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from faults import REPO

pytestmark = pytest.mark.slow

CONFIGS = REPO / "configs"
# Configs another full-tier test already trains end to end through Ray: the test that does.
ELSEWHERE = {
    "quickstart.yaml": "test_fault_tolerance.py, test_checkpoints.py",
    "fsdp.yaml": "test_ray_launch.py::test_fsdp2_on_ray_shards_parameters",
    "zero3.yaml": "test_ray_launch.py::test_deepspeed_zero3_on_ray_shards_parameters",
    "reward.yaml": "test_reward_stage.py",
    "tune_quickstart.yaml": "test_tune.py (distft tune)",
}
# Configs that need GPUs: validated and planned instead.
GPU_ONLY = {"llama8b/rlhf.yaml"}
# A search config runs by its own command in the test named above.
NOT_TRAIN = {"tune_quickstart.yaml"}
SHORT = ["train.max_steps=2", "train.log_every=1", "evaluate.max_samples=4", "data.max_train_samples=96"]


def stage_count(config: str) -> int | None:
    """How many stages a multi-stage config has (None: a single-stage one)."""
    import yaml

    stages = yaml.safe_load((CONFIGS / config).read_text()).get("stages")
    return len(stages) if stages else None


def shipped() -> list[str]:
    return sorted(str(p.relative_to(CONFIGS)) for p in CONFIGS.rglob("*.yaml")
                  if not p.relative_to(CONFIGS).parts[0] in ("data", "models"))


def test_every_shipped_config_is_covered_here_or_by_a_named_test():
    names = shipped()
    assert "quickstart.yaml" in names and "methods/dora.yaml" in names
    for name in ELSEWHERE:
        assert (CONFIGS / name).is_file(), f"{name} is listed but not shipped"
    # A new config lands in the full tier below unless it is listed: nothing ships untried.
    assert set(GPU_ONLY) <= set(names)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    from test_cluster import one_raylet_cluster

    with one_raylet_cluster(tmp_path_factory.mktemp("configs-cluster")) as info:
        yield info


@pytest.fixture(scope="module")
def pipelines_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipelines")


def train(cluster: dict, config: str, tmp_path: Path, pipelines_dir: Path | None = None) -> list[dict]:
    name = Path(config).stem
    stages = stage_count(config)  # a multi-stage config runs with `distft pipeline`, each stage shortened alike
    command, short = ("pipeline", [f"stages.{i}.{o}" for i in range(stages) for o in SHORT]) if stages else \
        ("train", SHORT)
    # The multi-stage configs share one run directory, as a user rerunning `distft pipeline` there would:
    # the recipes and the RLHF quickstart start with the same SFT stage (and grpo with the quickstart's
    # reward stage), trained once and reused by the others, each of which trains its own stages.
    where = (pipelines_dir, "pipelines") if stages and pipelines_dir else (tmp_path, name)
    r = subprocess.run([sys.executable, "-m", "distft.cli", command, str(CONFIGS / config), *short,
                        f"run.output_dir={where[0]}", f"run.name={where[1]}", "--address", cluster["address"]],
                       cwd=REPO, env=cluster["env"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr[-3000:]}"
    run = where[0] / where[1]
    summaries = json.loads((run / "summary.json").read_text())
    final = run / summaries[-1]["stage"] / "final"
    assert summaries[-1]["steps"] == 2
    assert any(final.glob("*.safetensors")) and (final / "distft_manifest.json").is_file(), sorted(final.iterdir())
    assert (run / "final").resolve() == final.resolve()  # the run's link names this config's last stage
    return summaries


RUN_HERE = [c for c in shipped() if c not in ELSEWHERE and c not in GPU_ONLY] if CONFIGS.is_dir() else []
RUN_SLOWEST = [c for c in ELSEWHERE if c not in NOT_TRAIN]


@pytest.mark.parametrize("config", RUN_HERE)
def test_shipped_config_trains_and_exports(cluster, config, tmp_path, pipelines_dir):
    train(cluster, config, tmp_path, pipelines_dir)


@pytest.mark.slowest
@pytest.mark.parametrize("config", RUN_SLOWEST)
def test_shipped_config_also_run_elsewhere_trains_and_exports(cluster, config, tmp_path):
    train(cluster, config, tmp_path)


# What a GPU config may be refused for on this CPU machine: the machine, never the config itself.
MACHINE_ONLY = ("scaling: ", "scaling.use_gpu: ", "model.name_or_path: 'meta-llama/")


@pytest.mark.parametrize("config", sorted(GPU_ONLY))
def test_gpu_config_validates_and_plans(config):
    plan = subprocess.run([sys.executable, "-m", "distft.cli", "plan", str(CONFIGS / config)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert plan.returncode == 0 and "headroom" in plan.stdout, (plan.stdout[-2000:], plan.stderr[-2000:])
    check = subprocess.run([sys.executable, "-m", "distft.cli", "validate", str(CONFIGS / config)], cwd=REPO,
                           capture_output=True, text=True, timeout=300)
    problems = [line[4:] for line in check.stderr.splitlines() if line.startswith("  - ")]
    assert "error: cannot run" in check.stderr and problems, check.stderr[-2000:]  # no GPU here: refused ...
    assert all(p.startswith(MACHINE_ONLY) for p in problems), problems  # ... for this machine's sake only
