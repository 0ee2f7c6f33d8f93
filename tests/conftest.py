"""Shared fixtures: tiny models built offline, tiny datasets written per test, one Ray cluster."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="session")
def tiny_random(tmp_path_factory) -> Path:
    """A randomly initialised tiny Llama with the bundled tokenizer (fast: no pretraining)."""
    from distft.models.tiny import save_random_init

    out = tmp_path_factory.mktemp("tiny-random")
    save_random_init(out, hidden=64, layers=2)
    return out


@pytest.fixture(scope="session")
def tiny_base() -> Path:
    """The pretrained tiny base distft ships (package data, checked against its manifest): the same weights
    on every machine, so a learning test means the same everywhere."""
    from distft.models.bundled import tiny_base_dir

    return tiny_base_dir()


@pytest.fixture()
def alpaca_rows() -> list[dict]:
    from distft.data.task import make_splits

    train, _ = make_splits(n_train=200, n_test=10, seed=3)
    return train


@pytest.fixture(scope="session")
def _ray_session():
    ray = pytest.importorskip("ray")
    state = {"ray": ray, "starts": 0}
    yield state
    ray.shutdown()


@pytest.fixture
def ray_cluster(_ray_session):
    """One private local Ray cluster for every Ray test: each start costs seconds here.

    Started at first use and checked before each test: in one CI run the connection was gone 40 minutes
    in (cause not seen), and Ray's auto-init then dialled the address a `distft cluster up` test had
    left in /tmp/ray/ray_current_cluster. A lost cluster is started again, with a warning, instead."""
    import warnings

    from distft.launch.session import start_private_ray

    ray = _ray_session["ray"]
    if not ray.is_initialized():
        if _ray_session["starts"]:
            warnings.warn("the shared test Ray cluster was gone; starting it again", stacklevel=1)
        start_private_ray(os.cpu_count())
        _ray_session["starts"] += 1
    yield ray


FACTS_TRAIN = REPO / "configs" / "data" / "facts_train.jsonl"


@pytest.fixture(scope="session")
def sft_policy(tiny_base, tmp_path_factory):
    """An under-trained LoRA SFT policy of the bundled task: 60 steps of 16 rows, 15-42% held-out exact match
    (by the machine's floating point: see the GRPO test)."""
    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    cfg = build_config({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(FACTS_TRAIN), "eval_fraction": 0.05, "max_eval_samples": 16},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32}},
        "train": {"lr": 3e-3, "warmup_ratio": 0.05, "global_batch_size": 16, "micro_batch_size": 16,
                  "max_steps": 60, "log_every": 20, "save_every": 10_000},
    })
    run_dir = tmp_path_factory.mktemp("sft-policy")
    stage_runner("sft")(cfg, StageContext(run_dir=run_dir))
    return run_dir / "sft" / "final"



@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real MLflow tracking server for the session (tests/servers.py). Yields its URI and its files."""
    pytest.importorskip("mlflow")
    from servers import running_mlflow_server

    root = tmp_path_factory.mktemp("mlflow-server")
    try:
        with running_mlflow_server(root) as uri:
            yield {"uri": uri, "root": root}
    except RuntimeError as e:
        pytest.fail(str(e))
