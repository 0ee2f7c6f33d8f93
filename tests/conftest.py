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
    """The pretrained tiny base, built once (about a minute) and cached like users get it."""
    from distft.stages.tiny_base import ensure_tiny_base

    return ensure_tiny_base()


@pytest.fixture()
def alpaca_rows() -> list[dict]:
    from distft.data.task import make_splits

    train, _ = make_splits(n_train=200, n_test=10, seed=3)
    return train


@pytest.fixture(scope="session")
def ray_cluster():
    """One private local Ray cluster for every Ray test: each start costs seconds here."""
    ray = pytest.importorskip("ray")
    from distft.launch.train import start_private_ray

    start_private_ray(os.cpu_count())
    yield ray
    ray.shutdown()
