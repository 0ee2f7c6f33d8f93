"""Forgetting: retain sets scored before and after a stage, the flag, replay, early stopping on a retain
metric. Through the SFT stage in this process; the config errors also through the `distft` command.

The settings are measured (2026-12-06, the shipped tiny base, the facts task, 40 steps of 16 rows,
seed 0; the base's held-out perplexity is 1.907 before):
- full fine-tuning at lr 2e-4: the task loss falls 12.5 -> 2.8 and the perplexity rises 3.9% (kept);
- full fine-tuning at lr 1e-3: the loss falls to 0.95 and the perplexity rises 273% (forgetting);
- the same with half the rows replayed from the base's pretraining corpus: loss 0.72, perplexity +1.6%.
"""

from __future__ import annotations

import json
import math

import pytest

from distft.config import build_config
from distft.config.load import ConfigError
from distft.stages import StageContext, stage_runner

REPLAY = {"source": "distft://tiny-base/corpus", "fraction": 0.5}


def sft(run_dir, lr: float, replay: dict | None = None, steps: int = 40, **sections) -> dict:
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    raw = {"model": {"name_or_path": "distft://tiny-base", "max_seq_len": 128},
           "scaling": {"num_workers": 1, "torch_threads": 2}, "stage": "sft",
           "data": {"train": str(repo / "configs/data/facts_train.jsonl"), "max_eval_samples": 16,
                    **({"replay": replay} if replay else {})},
           "method": {"name": "full"}, "evaluate": {"before": False, **sections.pop("evaluate", {})},
           "train": {"lr": lr, "max_steps": steps, "global_batch_size": 16, "micro_batch_size": 16, "log_every": 10,
                     "seed": 0, **sections.pop("train", {})}}
    return stage_runner("sft")(build_config(raw), StageContext(run_dir=run_dir))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retain")
    return {"normal": (sft(root / "normal", 2e-4), root / "normal"),
            "destructive": (sft(root / "destructive", 1e-3), root / "destructive"),
            "replayed": (sft(root / "replayed", 1e-3, replay=REPLAY), root / "replayed")}


def test_the_default_retain_set_is_the_base_held_out_corpus_at_its_recorded_loss(runs):
    from distft.models.bundled import read_manifest

    summary, run_dir = runs["normal"]
    (row,) = summary["retain"]
    assert (row["name"], row["kind"], row["source"], row["items"]) == ("base", "perplexity",
                                                                       "distft://tiny-base/heldout", 240)
    # Scored as the base's own build scored it (BOS, text, EOS; 128 tokens): the loss its manifest records.
    assert math.log(row["before"]) == pytest.approx(read_manifest()["heldout"]["loss"], rel=1e-5)
    assert row["worse_by"] == pytest.approx(row["after"] / row["before"] - 1, rel=1e-4)
    assert summary["forgetting_tolerance"] == 0.10
    # The scores land in metrics.jsonl at step 0 and at the last step, and the first are kept for a resume.
    rows = [json.loads(line) for line in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    scored = {r["step"]: r["retain_base_perplexity"] for r in rows if "retain_base_perplexity" in r}
    assert scored == {0: pytest.approx(row["before"]), 40: pytest.approx(row["after"])}
    assert json.loads((run_dir / "sft" / "retain_before.json").read_text()) == {
        "retain_base_perplexity": pytest.approx(row["before"])}


def test_a_destructive_learning_rate_raises_the_flag_and_a_normal_one_does_not(runs):
    normal, destructive = runs["normal"][0], runs["destructive"][0]
    assert normal["last_logged_loss"] < 0.5 * normal["first_logged_loss"]  # the normal run learns the task
    assert not normal["forgetting"] and normal["retain"][0]["worse_by"] < 0.10
    assert destructive["forgetting"] and destructive["retain"][0]["worse_by"] > 0.10
    assert destructive["retain"][0]["forgot"]


def test_replay_keeps_forgetting_within_the_tolerance_the_same_run_without_it_exceeds(runs):
    destructive, replayed = runs["destructive"][0], runs["replayed"][0]
    assert destructive["retain"][0]["worse_by"] > 0.10
    assert not replayed["forgetting"] and replayed["retain"][0]["worse_by"] < 0.10
    # 3800 task rows and as many replayed: the same steps, half of each batch general text.
    assert replayed["train_rows"] == 3800
    assert replayed["last_logged_loss"] < 0.5 * replayed["first_logged_loss"]


def test_the_summary_and_runs_show_print_the_retain_line(runs):
    from distft.launch.runs import key_metrics, render_summary

    destructive, run_dir = runs["destructive"]
    text = render_summary(run_dir, [destructive], 1.0)
    line = next(ln for ln in text.splitlines() if ln.lstrip().startswith("retain"))
    assert "base perplexity 1.907 ->" in line and "FORGETTING" in line
    assert any(m.startswith("retain base perplexity") and "FORGETTING" in m for m in key_metrics(destructive))
    normal = runs["normal"][0]
    assert "no forgetting beyond 10%" in render_summary(run_dir, [normal], 1.0)


def test_an_instruction_retain_set_scores_by_exact_match_or_by_a_reward_function(tmp_path):
    """The same 32 held-out instructions as two retain sets: the built-in exact_match reward's mean is the
    exact match, before and after; a reward function from a module (pkg.mod:fn) is imported by name."""
    from pathlib import Path

    held = str(Path(__file__).resolve().parents[1] / "configs/data/facts_test.jsonl")
    sets = [{"data": held, "name": "em", "max_samples": 32},
            {"data": held, "name": "rw", "max_samples": 32, "reward_fn": "exact_match"},
            {"data": held, "name": "len", "max_samples": 32, "reward_fn": "test_retain:answer_length"}]
    summary = sft(tmp_path / "r", 1e-3, steps=30, evaluate={"retain": sets, "max_new_tokens": 8})
    em, rw, length = summary["retain"]
    assert (em["kind"], rw["kind"], length["kind"]) == ("exact_match", "reward", "reward")
    assert rw["before"] == em["before"] and rw["after"] == em["after"] and em["after"] > em["before"]
    assert length["before"] > 0 and length["after"] > 0


def answer_length(prompts, completions, references) -> list[float]:
    """A reward function for the test above: the answer's length in characters."""
    return [float(len(c)) for c in completions]


def test_early_stopping_on_a_retain_metric_stops_before_forgetting_grows(tmp_path):
    summary = sft(tmp_path / "es", 1e-3, evaluate={"retain_every_eval": True},
                  train={"eval_every": 10, "save_every": 10,
                         "early_stopping": {"metric": "eval_retain_base_perplexity", "patience": 1}})
    rows = [json.loads(line) for line in (tmp_path / "es" / "sft" / "metrics.jsonl").read_text().splitlines()]
    at_evals = {}  # the evals during training: the stage's evaluate() of the best model logs step 20 again
    for r in rows:
        if "eval_retain_base_perplexity" in r:
            at_evals.setdefault(r["step"], r["eval_retain_base_perplexity"])
    assert at_evals[10] < at_evals[20]  # forgetting grew between the first two evals: stop at the second
    assert summary["early_stopped_at"] == 20 and summary["best_step"] == 10
    # The export is the best checkpoint: its retain score is the first eval's, far below the full run's.
    assert summary["retain"][0]["after"] == pytest.approx(at_evals[10], rel=1e-5)


@pytest.mark.parametrize("kind, expected", [("sft", ["base"]), ("pretrain", ["base"]), ("dpo", ["base"]),
                                            ("grpo", ["base"]), ("ppo", ["base"]), ("reward", []), ("classify", [])])
def test_the_default_retain_set_goes_to_the_stages_that_can_score_it(kind, expected):
    """On the shipped base: every language-model stage gets its held-out documents; a reward model or a
    classifier has no next-token loss to score them by (a reward stage given it failed in a reshape)."""
    raw = {"model": {"name_or_path": "distft://tiny-base"}, "stage": kind, "data": {"train": "t.jsonl"}}
    if kind in ("grpo", "ppo"):
        raw["reward"] = {"functions": {"exact_match": 1.0}}
    cfg = build_config(raw)
    assert [r.label() for r in cfg.retain_for(cfg.stages[0])] == expected


@pytest.mark.parametrize("raw_extra, phrase", [
    ({"stage": "reward", "evaluate": {"retain": [{"data": "x.jsonl"}]}}, "the reward stage cannot score retain sets"),
    ({"stage": "classify", "evaluate": {"retain": [{"data": "x.jsonl", "kind": "perplexity"}]}},
     "the classify stage scores retain sets by accuracy, not perplexity"),
    ({"data": {"replay": {"source": "distft://tiny-base/heldout", "fraction": 0.1}}}, "is also a retain set"),
    ({"data": {"replay": {"source": "distft://tiny-base/corpus", "fraction": 0.1}, "streaming": True}},
     "a stream is read once"),
    ({"train": {"early_stopping": {"metric": "eval_retain_base_perplexity"}}}, "retain_every_eval=true"),
    ({"evaluate": {"retain": [{"data": "a/x.jsonl"}, {"data": "b/x.jsonl"}]}}, "two retain sets are named x"),
    ({"evaluate": {"retain": [{"data": "x.jsonl", "kind": "reward"}]}}, "kind reward scores answers with reward_fn"),
])
def test_config_refuses_what_would_hide_or_cannot_score_forgetting(raw_extra, phrase):
    raw = {"stage": "sft", "data": {"train": "t.jsonl"}}
    for key, value in raw_extra.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    with pytest.raises(ConfigError, match=phrase):
        build_config(raw)


def test_validate_refuses_replay_rows_that_are_in_a_retain_set_before_any_cluster(tmp_path):
    """As a user meets it: `distft validate` with a replay file holding the retain set's documents."""
    from faults import check_failure, run_distft, snapshot

    from distft.models.bundled import heldout_rows

    mine = tmp_path / "general.jsonl"
    mine.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["A fresh story.", *heldout_rows()[:3]]))
    before = snapshot(tmp_path)
    r = run_distft("validate", "configs/quickstart.yaml", f"data.replay.source={mine}", "data.replay.fraction=0.1",
                   timeout=300)
    check_failure(r, 2, ("data.replay.source: 3 of the 240 rows of the retain set base", "Fix: replay text"),
                  max_lines=3)
    assert snapshot(tmp_path) == before


@pytest.mark.slow
def test_flag_replay_and_early_stopping_on_retain_through_ray_train(ray_cluster, tmp_path):
    """One Ray Train launch, two stages on the shipped base (the default retain set): a destructive run that
    stops early on the retain metric and is flagged, then the same run with replay, which is not."""
    from pathlib import Path

    from distft.launch.train import launch

    repo = Path(__file__).resolve().parents[1]
    common = {"method": {"name": "full"}, "evaluate": {"before": False, "retain_every_eval": True},
              "train": {"lr": 1e-3, "max_steps": 40, "global_batch_size": 16, "micro_batch_size": 16,
                        "log_every": 10, "eval_every": 10, "save_every": 10, "seed": 0}}
    stopping = {"early_stopping": {"metric": "eval_retain_base_perplexity", "patience": 1}}
    cfg = build_config({
        "model": {"name_or_path": "distft://tiny-base", "max_seq_len": 128},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2},
        "data": {"train": str(repo / "configs/data/facts_train.jsonl"), "max_eval_samples": 16},
        "stages": [{"stage": "sft", "name": "plain", **common, "train": {**common["train"], **stopping}},
                   {"stage": "sft", "name": "replayed", **common, "data": {"replay": REPLAY}}],
    })
    plain, replayed = launch(cfg, tmp_path / "run", log=lambda m: None)
    assert plain["early_stopped_at"] == 20 and plain["best_step"] == 10
    assert plain["forgetting"] and plain["retain"][0]["worse_by"] > 0.10
    assert not replayed["forgetting"] and replayed["retain"][0]["worse_by"] < 0.10
    for label in ("plain", "replayed"):  # the scores at every eval, written by the worker
        rows = [json.loads(x) for x in (tmp_path / "run" / label / "metrics.jsonl").read_text().splitlines()]
        assert sum("eval_retain_base_perplexity" in r for r in rows) >= 2
