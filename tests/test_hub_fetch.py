"""Hub downloads on a multi-node run: each cache's leader downloads first, the other ranks wait (2 gloo
ranks, no Ray, no network: the download is a stand-in that records who ran it and when)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch.multiprocessing as mp

from distft.config import build_config
from test_distributed_stage import free_port
from distft.models.hub import hub_sources, leads_download


def cfg_with(**sections):
    return build_config({"stage": "sft", "data": {"train": "tatsu-lab/alpaca"}, **sections})


def test_hub_sources_are_the_hub_models_and_datasets_only(tmp_path):
    local = tmp_path / "model"
    local.mkdir()
    cfg = cfg_with(model={"name_or_path": "Qwen/Qwen2.5-0.5B", "revision": "main"},
                   evaluate={"data": "configs/data/facts_test.jsonl"})
    assert hub_sources(cfg, 0) == [("model", "Qwen/Qwen2.5-0.5B", "main"), ("dataset", "tatsu-lab/alpaca", None)]
    assert hub_sources(cfg_with(model={"name_or_path": str(local)}), 0) == [("dataset", "tatsu-lab/alpaca", None)]
    assert hub_sources(build_config({"stage": "sft", "data": {"train": "x.jsonl"}}), 0) == []  # tiny base, local data
    # Bundled models resolve on each machine to installed files: no worker asks the hub for distft://minilm-l6.
    minilm = build_config({"stage": "classify", "model": {"name_or_path": "distft://minilm-l6"}, "data": {"train": "x.jsonl"}})
    assert hub_sources(minilm, 0) == []


@pytest.mark.parametrize("shared, leaders", [(False, {(0, 0), (2, 0)}), (True, {(0, 0)})])
def test_who_downloads(shared, leaders):
    # 2 nodes x 2 ranks: (global rank, local rank); each node's local rank 0 leads, or rank 0 alone.
    ranks = [(0, 0), (1, 1), (2, 0), (3, 1)]
    got = {(r, lr) for r, lr in ranks if leads_download(r, lr, shared)}
    assert got == leaders


def _rank(rank: int, world: int, port: int, cfg_json: str, out: str, local_rank: int, fail: bool,
          offline: bool = False) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), HF_HUB_OFFLINE="1" if offline else "0")
    import torch.distributed as dist

    from distft.config import DistftConfig
    from distft.models.hub import fetch_first
    from distft.stages.context import StageContext

    dist.init_process_group("gloo")
    cfg = DistftConfig.model_validate_json(cfg_json)
    ctx = StageContext(run_dir=Path(out), rank=rank, world_size=world, local_rank=local_rank)
    log = Path(out) / f"rank{rank}.jsonl"

    def slow_fetch(kind, name, revision):
        time.sleep(1.0)  # a download: the other rank must not load before it ends
        if fail:
            raise OSError("401 Client Error: gated repo")
        with log.open("a") as f:
            f.write(json.dumps({"fetched": name, "at": time.time()}) + "\n")

    try:
        fetch_first(cfg, ctx, fetch_fn=slow_fetch)
        outcome = "ok"
    except RuntimeError as e:
        outcome = str(e)
    with log.open("a") as f:
        f.write(json.dumps({"loads_at": time.time(), "outcome": outcome}) + "\n")
    dist.destroy_process_group()


def run_two(tmp_path, cfg, local_ranks, fail=False, offline=False) -> list[list[dict]]:
    port, spawn = free_port(), mp.get_context("spawn")
    procs = [spawn.Process(target=_rank, args=(r, 2, port, cfg.model_dump_json(), str(tmp_path), local_ranks[r], fail,
                                               offline))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    return [[json.loads(x) for x in (tmp_path / f"rank{r}.jsonl").read_text().splitlines()] for r in range(2)]


def test_one_node_the_first_rank_downloads_and_the_other_waits(tmp_path):
    cfg = cfg_with(model={"name_or_path": "org/model"})
    rank0, rank1 = run_two(tmp_path, cfg, local_ranks=[0, 1])
    assert [r["fetched"] for r in rank0 if "fetched" in r] == ["org/model", "tatsu-lab/alpaca"]
    assert not [r for r in rank1 if "fetched" in r]
    done = max(r["at"] for r in rank0 if "fetched" in r)
    assert rank1[-1]["loads_at"] >= done and rank1[-1]["outcome"] == "ok"  # waited for the download


def test_two_nodes_each_node_downloads_into_its_own_cache_unless_it_is_shared(tmp_path):
    cfg = cfg_with(model={"name_or_path": "org/model"})
    (tmp_path / "own").mkdir()
    a, b = run_two(tmp_path / "own", cfg, local_ranks=[0, 0])  # local rank 0 twice: two nodes
    assert [r["fetched"] for r in a if "fetched" in r] == [r["fetched"] for r in b if "fetched" in r] != []
    shared = cfg_with(model={"name_or_path": "org/model"}, run={"shared_hf_home": True})
    (tmp_path / "shared").mkdir()
    a, b = run_two(tmp_path / "shared", shared, local_ranks=[0, 0])
    assert [r for r in a if "fetched" in r] and not [r for r in b if "fetched" in r]


def test_offline_nothing_is_fetched(tmp_path):
    rank0, rank1 = run_two(tmp_path, cfg_with(model={"name_or_path": "org/model"}), local_ranks=[0, 1], offline=True)
    assert not [r for r in rank0 + rank1 if "fetched" in r] and rank1[-1]["outcome"] == "ok"


def test_a_failed_download_fails_every_rank_instead_of_hanging(tmp_path):
    cfg = cfg_with(model={"name_or_path": "org/gated"})
    rank0, rank1 = run_two(tmp_path, cfg, local_ranks=[0, 1], fail=True)
    for rows in (rank0, rank1):
        outcome = rows[-1]["outcome"]
        assert "downloading model org/gated failed on rank 0: OSError: 401 Client Error" in outcome
        assert "run.forward_env=[HF_TOKEN]" in outcome
