"""Peak memory is recorded as peak (issue 20, item 3): the kernel's high-water mark (VmHWM), which counts a
spike allocated and freed inside a step, where RSS read at the step's end does not. Ray-free and in-process,
as in test_tensorboard.py."""

from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from distft.distributed.memory import peak_rss_bytes, reset_peak_rss, rss_bytes

SPIKE_MIB = 256


def spike(mib: int = SPIKE_MIB) -> None:
    """Allocate and write `mib` MiB, then free it: large enough that glibc serves it by mmap and returns it at once."""
    import torch

    t = torch.ones(mib * 2**20 // 4)  # ones: every page written, so resident
    del t


@pytest.fixture()
def fresh_peak():
    if not reset_peak_rss():
        pytest.skip("the kernel's peak-RSS counter cannot be reset here (/proc/self/clear_refs)")


def test_the_peak_counts_a_spike_already_freed(fresh_peak):
    spike(1)  # torch's libraries loaded before the baseline
    before = rss_bytes()
    spike()
    after = rss_bytes()
    assert after < before + SPIKE_MIB * 2**20 // 4  # freed: RSS read now misses it ...
    assert peak_rss_bytes() >= before + 0.9 * SPIKE_MIB * 2**20  # ... the high-water mark does not


def test_a_spike_inside_a_step_lands_in_metrics_and_the_summary(tiny_random, alpaca_rows, tmp_path, monkeypatch,
                                                               fresh_peak):
    import transformers

    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    seen = []
    original = transformers.Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step == 2:  # inside step 3, after step 2 was logged
            spike()
            seen.append(self.state.global_step)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(transformers.Trainer, "training_step", training_step)
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    cfg = build_config({
        "model": {"name_or_path": str(tiny_random), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(train), "eval_fraction": 0.1, "max_eval_samples": 8},
        "method": {"name": "full"},
        "train": {"lr": 1e-3, "global_batch_size": 4, "micro_batch_size": 4, "max_steps": 4, "log_every": 1,
                  "eval_every": 1000, "save_every": 1000},
    })
    stage_runner("sft")(cfg, StageContext(run_dir=tmp_path / "run"))
    assert seen == [2]

    stage_dir = tmp_path / "run" / "sft"
    rows = {r["step"]: r for r in map(json.loads, (stage_dir / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
    assert sorted(rows) == [1, 2, 3, 4]
    before, during = rows[2], rows[3]
    assert during["peak_rss_mib"] >= before["rss_mib"] + 0.8 * SPIKE_MIB, (before, during)
    assert during["rss_mib"] < during["peak_rss_mib"] - 0.5 * SPIKE_MIB, during  # the step-end RSS missed it
    assert all(rows[s]["peak_rss_mib"] <= rows[s + 1]["peak_rss_mib"] for s in (1, 2, 3))  # a high-water mark

    summary = json.loads((stage_dir / "summary.json").read_text())
    assert summary["peak_rss_mib_per_rank"] == [summary["peak_rss_mib"]]  # one rank
    assert summary["peak_rss_mib"] >= during["peak_rss_mib"]
