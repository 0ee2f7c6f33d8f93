"""`distft tune`: the search space checked up front, the cooperative early stop, the outputs, and real searches.

The slow tests run the CLI as users do, each search on its own private Ray cluster, under a
timeout: a search that stalls (trials waiting for workers a stopped trial still holds,
ray-project/ray issue 54305) fails the test instead of hanging it.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO, write_jsonl
from distft.config import ConfigError, build_config, load_config
from distft.config.search import load_search, trial_config

QUICKSTART = REPO / "configs" / "tune_quickstart.yaml"


def write_search(tmp_path, tune: dict, **sections) -> Path:
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["tune"] = tune
    for key, value in sections.items():
        raw[key] = value
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def problems(tmp_path, tune: dict, **sections) -> str:
    with pytest.raises(ConfigError) as e:
        load_search(str(write_search(tmp_path, tune, **sections)))
    return str(e.value)


def test_shipped_search_loads_and_every_trial_config_is_the_base_with_its_values():
    raw, tune, cfg = load_search(str(QUICKSTART))
    assert set(tune.space) == {"train.lr", "method.lora.r"} and tune.trial_count() == 8
    trial = trial_config(raw, {"train.lr": 1e-3, "method.lora.r": 4})
    assert trial.stages[0].train.lr == 1e-3 and trial.stages[0].method.lora.r == 4
    assert trial.stages[0].train.max_steps == cfg.stages[0].train.max_steps  # the rest is the base
    # `distft train` runs the same file, ignoring the tune section.
    assert load_config(QUICKSTART).stages[0].train.lr == cfg.stages[0].train.lr


@pytest.mark.parametrize("space, expected", [
    ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "did you mean `lr`?"),
    ({"method.lora.rank": {"choice": [4, 8]}}, "did you mean `r`?"),
    ({"method.lora.r": {"uniform": [2, 9]}}, "tune.space.method.lora.r = 5.5"),
    # Whole ends with a whole middle (8) still sample fractions: refused, with the integer domains.
    ({"method.lora.r": {"uniform": [4, 12]}}, "uniform samples fractions; for a whole number use {randint: [4, 13]}"),
    ({"method.lora.r": {"loguniform": [4, 16]}}, "loguniform samples fractions"),
    ({"train.lr": {"uniform": [-1.0, 1.0]}}, "tune.space.train.lr = -1.0"),
    ({"train.lr": {"loguniform": [0.0, 1.0]}}, "both ends must be > 0"),
    ({"train.lr": {"loguniform": [1e-2, 1e-4]}}, "low end must be below the high end"),
    ({"train.lr": {"logunifrom": [1e-4, 1e-2]}}, "did you mean `loguniform`?"),
    ({"train.lr": {"choice": [1e-3], "grid": [1e-3]}}, "give exactly one of"),
    ({"train.lr": 0.001}, "tune.space.train.lr: must be a mapping"),
    ({"strategy.name": {"choice": ["ddp", "zero9"]}}, "tune.space.strategy.name = 'zero9'"),
    ({"tune.num_samples": {"choice": [2, 4]}}, "cannot change its own settings"),
])
def test_a_bad_search_space_is_refused_naming_the_path(tmp_path, space, expected):
    text = problems(tmp_path, {"space": space})
    assert expected in text, text


@pytest.mark.parametrize("tune, sections, expected", [
    ({"space": {}}, {}, "tune.space: nothing to search"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "mode": "minimize"}, {}, "tune.mode: Input should be 'min' or 'max'"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "num_sample": 4}, {}, "did you mean `num_samples`?"),
    ({"space": {"train.lr": {"grid": [1e-3, 1e-2]}}, "search": "optuna"}, {}, "grid is not supported with tune.search=optuna"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "asha": {"grace_period": 15}}, {}, "not a multiple of train.eval_every=10"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "asha": {"grace_period": 90}}, {}, "ASHA could never stop a trial"),
    ({"space": {"train.lr": {"choice": [1e-3]}}}, {"train": {"max_steps": 40}}, "train.eval_every is unset"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "asha": {"max_t": 10}}, {}, "tune.asha.max_t: 10 steps is not above"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "asha": {"max_t": 200}}, {}, "tune.asha.max_t=90, or unset it"),
    ({"space": {"train.lr": {"choice": [1e-3]}}, "metric": "loss"}, {}, "Fix: tune.metric=eval_loss"),
])
def test_bad_tune_settings_are_refused_with_the_fix(tmp_path, tune, sections, expected):
    text = problems(tmp_path, tune, **sections)
    assert expected in text, text


def test_a_config_without_a_tune_section_says_how_to_add_one(tmp_path):
    with pytest.raises(ConfigError, match="tune: missing. Fix: add a `tune:` section"):
        load_search(str(REPO / "configs" / "quickstart.yaml"))


def test_pipelines_and_ppo_are_refused(tmp_path):
    raw = yaml.safe_load((REPO / "configs" / "rlhf_quickstart.yaml").read_text())
    raw["tune"] = {"space": {"stages.0.train.lr": {"choice": [1e-3, 1e-4]}}}
    path = tmp_path / "rlhf.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError) as e:
        load_search(str(path))
    assert "tune searches one stage, this config has 3" in str(e.value)


def test_concurrency_is_what_the_cluster_hosts_and_a_trial_that_never_fits_is_an_error():
    from distft.launch.errors import ClusterError
    from distft.launch.tune import concurrency

    _, tune, cfg = load_search(str(QUICKSTART))  # 1 worker x 1 CPU per trial, 2 at a time
    assert concurrency(cfg, tune, [{"CPU": 3.0}]) == 2
    assert concurrency(cfg, tune, [{"CPU": 1.5}]) == 1  # queued, not stalled
    cfg.scaling.num_workers = 4
    with pytest.raises(ClusterError, match=r"one trial needs 4.01 CPU .* the cluster has 3"):
        concurrency(cfg, tune, [{"CPU": 3.0}])
    cfg.scaling.num_workers, cfg.scaling.use_gpu = 2, True
    with pytest.raises(ClusterError, match=r"one trial needs 2 GPU \(2 workers x 1\), but the cluster has 1. "
                                           r"Fix: fewer scaling.num_workers or a smaller scaling.gpus_per_worker"):
        concurrency(cfg, tune, [{"CPU": 8.0, "GPU": 1.0}])


def test_concurrency_places_whole_workers_on_nodes_not_cluster_totals():
    from distft.launch.errors import ClusterError
    from distft.launch.tune import concurrency

    _, tune, cfg = load_search(str(QUICKSTART), ["tune.max_concurrent_trials=8", "scaling.num_workers=2",
                                                 "scaling.cpus_per_worker=3"])
    # 18 CPUs in all would be 3 trials of 6, but a 3-CPU worker fits 3 times per 9-CPU node, and
    # each trial's actor takes a sliver too: 2 trials.
    assert concurrency(cfg, tune, [{"CPU": 9.0}, {"CPU": 9.0}]) == 2
    assert concurrency(cfg, tune, [{"CPU": 9.0}, {"CPU": 9.0}, {"CPU": 0.5}]) == 3  # the actors go on the small node
    with pytest.raises(ClusterError, match=r"a worker needs 3 CPU and the largest node has 2 .* Fix: "
                                           r"scaling.cpus_per_worker=2 or less"):
        concurrency(cfg, tune, [{"CPU": 2.0}] * 4)


def test_concurrency_follows_the_strict_placement_strategies():
    """STRICT_PACK wants a trial's workers on one node and STRICT_SPREAD each on its own: counted the
    PACK way, such a search would start more trials than fit, and they would wait forever."""
    from distft.launch.errors import ClusterError
    from distft.launch.tune import concurrency

    nodes = [{"CPU": 4.0}, {"CPU": 4.0}, {"CPU": 4.0}]
    args = ["tune.max_concurrent_trials=8", "scaling.num_workers=3", "scaling.cpus_per_worker=1",
            "train.global_batch_size=48"]
    _, tune, cfg = load_search(str(QUICKSTART), args)
    assert concurrency(cfg, tune, nodes) == 3  # 9 of the 12 CPUs; the actors' slivers fit beside them
    _, tune, cfg = load_search(str(QUICKSTART), [*args, "scaling.placement_strategy=STRICT_PACK"])
    assert concurrency(cfg, tune, nodes) == 3  # one trial per node
    _, tune, cfg = load_search(str(QUICKSTART), [*args, "scaling.placement_strategy=STRICT_SPREAD"])
    assert concurrency(cfg, tune, nodes) == 3  # one worker of each trial on every node
    _, tune, cfg = load_search(str(QUICKSTART), ["tune.max_concurrent_trials=8", "scaling.num_workers=2",
                                                 "scaling.cpus_per_worker=2",
                                                 "scaling.placement_strategy=STRICT_PACK"])
    # 2 x 2 CPUs on one 4-CPU node leaves no room for the trial actor there; it takes a sliver elsewhere.
    assert concurrency(cfg, tune, nodes) == 2
    _, tune, cfg = load_search(str(QUICKSTART), [*args, "scaling.placement_strategy=STRICT_SPREAD"])
    with pytest.raises(ClusterError, match=r"STRICT_SPREAD puts each of the 3 workers .* only 2 of the cluster's "
                                           r"2 nodes .* Fix: scaling.placement_strategy=SPREAD"):
        concurrency(cfg, tune, [{"CPU": 8.0}, {"CPU": 8.0}])
    _, tune, cfg = load_search(str(QUICKSTART), [*args, "scaling.placement_strategy=STRICT_PACK"])
    with pytest.raises(ClusterError, match=r"STRICT_PACK puts all 3 workers \(1 CPU each\) on one node, .* Fix: "
                                           r"scaling.placement_strategy=PACK"):
        concurrency(cfg, tune, [{"CPU": 2.0}, {"CPU": 2.0}])


def test_place_workers_takes_whole_bundles_and_leaves_the_nodes_untouched_when_they_do_not_fit():
    from distft.launch.placement import place_workers

    free = [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0}]
    assert not place_workers(free, {"CPU": 1.0, "GPU": 1.0}, 3, "PACK")
    assert free == [{"CPU": 3.0, "GPU": 2.0}, {"CPU": 8.0, "GPU": 0.0}]
    assert place_workers(free, {"CPU": 1.0, "GPU": 1.0}, 2, "STRICT_PACK")
    assert free == [{"CPU": 1.0, "GPU": 0.0}, {"CPU": 8.0, "GPU": 0.0}]
    assert place_workers(free, {"CPU": 4.0}, 2, "PACK") and free[1]["CPU"] == 0.0


def test_a_resumed_search_on_a_smaller_cluster_is_refused(tmp_path):
    from distft.launch.errors import ClusterError
    from distft.launch.tune import keep_concurrency

    (tmp_path / "search.json").write_text(json.dumps({"cwd": "/x"}))
    keep_concurrency(tmp_path, 2, restore=False)
    keep_concurrency(tmp_path, 3, restore=True)  # more room is fine: Tune keeps the search's 2
    assert json.loads((tmp_path / "search.json").read_text()) == {"cwd": "/x", "trials_at_once": 2}
    with pytest.raises(ClusterError, match="runs 2 trials at once, and the cluster now hosts only 1"):
        keep_concurrency(tmp_path, 1, restore=True)


def test_optuna_tpe_learns_from_evals_and_ignores_the_loss_only_logs():
    pytest.importorskip("optuna")
    from distft.launch.tune import domain, optuna_search

    _, tune, _ = load_search(str(QUICKSTART), ["tune.search=optuna"])
    searcher = optuna_search(tune)
    assert searcher.set_search_properties(tune.metric, tune.mode, {p: domain(d) for p, d in tune.space.items()})
    first = searcher.suggest("t0")
    assert 1e-4 <= first["train.lr"] <= 1e-2 and first["method.lora.r"] in (4, 8, 16, 32)
    searcher.on_trial_result("t0", {"step": 5, "loss": 3.0, "training_iteration": 1})  # a log: no metric
    searcher.on_trial_result("t0", {"step": 10, "eval_loss": 1.5, "training_iteration": 2})
    # The last report is the final checkpoint's, without the metric: the trial still counts with 1.5.
    searcher.on_trial_complete("t0", {"step": 10, "checkpoint_step": 10, "training_iteration": 3})
    [done] = searcher._ot_study.trials
    assert done.state.name == "COMPLETE" and done.value == 1.5
    assert searcher.suggest("t1") != first


def test_an_eval_without_the_searched_metric_fails_the_trial_naming_the_reported_ones():
    from distft.launch.tune import is_judged

    assert not is_judged("eval_accuracy", {"step": 5, "loss": 2.0})  # a log: nothing to judge
    assert is_judged("eval_accuracy", {"step": 10, "eval_accuracy": 0.7})
    with pytest.raises(ValueError, match="tune.metric=eval_acc is not reported .* report eval_accuracy, eval_loss"):
        is_judged("eval_acc", {"step": 10, "eval_loss": 1.0, "eval_accuracy": 0.7, "eval_runtime": 3.0})


class Board:
    def __init__(self):
        self.posted = []
        self.post = SimpleNamespace(remote=lambda *a: self.posted.append(a))


def test_asha_decisions_reach_the_trial_and_tune_is_never_told_to_stop():
    """ASHA's stop becomes a posted decision; Tune itself always hears CONTINUE (it would kill the trial)."""
    from ray.tune.schedulers import TrialScheduler

    from distft.launch.tune import CooperativeASHA

    sched = CooperativeASHA("board", "/nonexistent", time_attr="step", max_t=40, grace_period=10,
                            reduction_factor=2)
    sched.set_search_properties("eval_loss", "min")
    sched._board = board = Board()
    good, bad, late = (SimpleNamespace(trial_id=t) for t in ("good", "bad", "late"))
    for t in (good, bad, late):
        sched.on_trial_add(None, t)
    assert sched.on_trial_result(None, good, {"step": 10, "eval_loss": 1.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, bad, {"step": 10, "eval_loss": 5.0}) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, good, {"step": 40, "eval_loss": 0.5}) == TrialScheduler.CONTINUE
    sched.on_trial_result(None, late, {"step": 5, "loss": 3.0})  # a training log: no decision asked
    assert board.posted == [("good", 10, False), ("bad", 10, True), ("good", 40, False)]  # max_t is no early stop


def test_the_first_decision_on_a_step_stands():
    from distft.launch.tune import DecisionBoard

    board = DecisionBoard()
    board.post("t", 10, True)
    board.post("t", 10, False)  # the same step again (a later report): not a new eval
    assert board.decision("t", 10) is True and board.decision("t", 20) is None


def test_stage_stops_at_the_eval_the_scheduler_stopped_and_still_exports(tiny_base, alpaca_rows, tmp_path):
    from distft.stages import StageContext, stage_runner

    cfg = build_config({
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(write_jsonl(tmp_path / "train.jsonl", alpaca_rows)), "eval_fraction": 0.1},
        "method": {"name": "lora", "lora": {"r": 4}},
        "train": {"lr": 3e-3, "global_batch_size": 8, "micro_batch_size": 8, "max_steps": 40, "eval_every": 5,
                  "log_every": 5},
    })
    asked = []

    def stop_fn(metrics):
        asked.append(metrics["step"]) if "eval_loss" in metrics else None
        return "eval_loss" in metrics and metrics["step"] == 15

    ctx = StageContext(run_dir=tmp_path / "run", stop_fn=stop_fn)
    summary = stage_runner("sft")(cfg, ctx)
    assert asked == [5, 10, 15]  # asked at each eval, never after the stop
    assert summary["steps"] == 15 and summary["stopped_early_at"] == 15
    assert (tmp_path / "run" / "sft" / "final" / "adapter_model.safetensors").is_file()


def test_a_resumed_search_judges_new_trials_against_the_finished_ones(tmp_path):
    """Tune does not save the scheduler's rungs; they are rebuilt from finished trials' metrics."""
    from distft.launch.tune import CooperativeASHA

    for trial, losses in {"old_good": [1.0, 0.8], "old_bad": [5.0]}.items():
        stage = tmp_path / trial / "sft"
        stage.mkdir(parents=True)
        rows = [{"step": 1, "loss": 9.0}] + [{"step": 10 * (i + 1), "eval_loss": v} for i, v in enumerate(losses)]
        (stage / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (stage / "summary.json").write_text("{}")
    sched = CooperativeASHA("board", str(tmp_path), time_attr="step", max_t=40, grace_period=10, reduction_factor=2)
    sched.set_search_properties("eval_loss", "min")
    sched._board = board = Board()
    new = SimpleNamespace(trial_id="new")
    sched.on_trial_add(None, new)  # the first trial of the resumed session: the past is replayed first
    sched.on_trial_result(None, new, {"step": 10, "eval_loss": 4.0})
    assert board.posted == [("new", 10, True)]  # worse than the median of what finished trials recorded


def fake_rows():
    rows = []
    for i, (lr, final, status) in enumerate([(1e-3, 0.9, "completed"), (3e-3, 0.5, "completed"),
                                             (1e-4, 4.0, "stopped"), (1e-2, None, "failed")]):
        curve = [] if final is None else [(10, final + 1.0), (20, final)]
        rows.append({"trial": f"t{i}", "params": {"train.lr": lr, "method.lora.r": 8}, "final": final,
                     "best": final, "steps": 20 if status != "stopped" else 10, "status": status,
                     "stop_reason": {"stopped": "stopped early by ASHA at step 10",
                                     "failed": "failed: ValueError: boom"}.get(status, "completed"),
                     "wall_seconds": 30.0, "exact_match": None, "curve": curve, "model_dir": None})
    return rows


def test_outputs_table_best_config_and_curves(tmp_path):
    from distft.launch.tune import markdown_table, write_outputs

    raw, tune, _ = load_search(str(QUICKSTART))
    base = {k: v for k, v in raw.items() if k != "tune"}
    (tmp_path / "trials" / "t1").mkdir(parents=True)
    rows = fake_rows()
    best = write_outputs(rows, base, str(REPO), tune, tmp_path)
    assert best["trial"] == "t1"  # lowest final eval_loss; the failed trial is never best
    with (tmp_path / "trials.csv").open() as f:
        table = list(csv.DictReader(f))
    assert [r["trial"] for r in table] == ["t0", "t1", "t2", "t3"]
    assert table[3]["status"] == "failed" and "ValueError: boom" in table[3]["stop_reason"]
    rerun = load_config(tmp_path / "best.yaml")  # ready to run: the base config with the best values
    assert rerun.stages[0].train.lr == 3e-3 and rerun.stages[0].method.lora.r == 8 and rerun.run.name is None
    assert Path(rerun.stages[0].data.train).is_absolute()
    assert (tmp_path / "best").resolve() == (tmp_path / "trials" / "t1").resolve()
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = markdown_table(rows, "eval_loss", best)
    assert "| t1 **best** |" in md and "stopped early by ASHA at step 10" in md


def test_result_rows_have_one_curve_point_per_step_and_the_stage_summary_decides_how_a_trial_ended(tmp_path):
    import pandas as pd

    from distft.launch.tune import result_rows

    _, tune, _ = load_search(str(QUICKSTART))
    (tmp_path / "trials" / "a1" / "sft").mkdir(parents=True)
    (tmp_path / "trials" / "a1" / "sft" / "summary.json").write_text(json.dumps(
        {"stage": "sft", "steps": 10, "stopped_early_at": 10, "wall_seconds": 12.5}))
    # Tune's rows: loss-only logs, two evals, then the checkpoint's and the stage's reports repeating step 10's.
    df = pd.DataFrame({"step": [5, 5, 8, 10, 10, 10],
                       "loss": [3.0, None, 2.5, None, None, None],
                       "eval_loss": [None, 2.9, None, 2.4, 2.4, 2.4]})
    result = SimpleNamespace(path=str(tmp_path / "tune" / "a1"), metrics_dataframe=df,
                             metrics={"eval_loss": 2.4, "time_total_s": 20.0}, error=None, config={"train.lr": 1e-3})
    (row,) = result_rows([result], tmp_path, tune)
    assert row["curve"] == [(5, 2.9), (10, 2.4)]
    assert (row["final"], row["best"], row["steps"], row["status"]) == (2.4, 2.4, 10, "stopped")
    assert row["stop_reason"] == "stopped early by ASHA at step 10" and row["wall_seconds"] == 20.0


# ---- real searches (Ray) -------------------------------------------------------------------------

SMALL = ["train.max_steps=40", "train.eval_every=5", "train.save_every=20", "train.log_every=5",
         "tune.asha.grace_period=5", "tune.asha.reduction_factor=2", "evaluate.max_samples=40"]


def distft(*args, timeout: int, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, **kw)


def rows_of(run_dir: Path) -> list[dict]:
    with (run_dir / "trials.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.slow
def test_asha_search_finishes_stops_trials_resumes_and_its_best_config_reruns(tmp_path, mlflow_server):
    """Optuna TPE with ASHA, interrupted, moved to another directory, resumed there; tracked in MLflow
    (the server named by MLFLOW_TRACKING_URI, as a team sets it) as one parent run with a child per trial."""
    pytest.importorskip("optuna")
    run_dir = tmp_path / "asha"
    cmd = [sys.executable, "-m", "distft.cli", "tune", str(QUICKSTART), *SMALL, "tune.num_samples=6",
           "tune.search=optuna", f"run.output_dir={tmp_path}", "run.name=asha", "run.report_to=[mlflow]",
           "run.mlflow.experiment=asha-search"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server["uri"]}
    # Interrupt once two trials have finished; Tune saves the search state.
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    deadline = time.time() + 420
    while len(list(run_dir.glob("trials/*/sft/summary.json"))) < 2:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        if time.time() > deadline:
            proc.kill()
            pytest.fail("the search stalled: fewer than 2 trials finished in 420 s")
        time.sleep(1)
    first_done = {p.parent.parent.name: p.stat().st_mtime_ns for p in run_dir.glob("trials/*/sft/summary.json")}
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert f"distft tune --resume {run_dir}" in out
    unfinished = {p.parents[2].name for p in run_dir.glob("trials/*/sft/checkpoints/checkpoint-*")} - set(first_done)

    moved = tmp_path / "moved" / "asha"
    moved.parent.mkdir()
    run_dir = run_dir.rename(moved)
    resumed = distft("tune", "--resume", str(run_dir), timeout=900, env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "[tracking]" not in resumed.stdout.replace("[tracking] mlflow: run asha", "")  # no tracker gave up
    rows = rows_of(run_dir)
    check_search_runs(mlflow_server, "asha-search", rows, resumed.stdout)
    assert len(rows) == 6 and {r["status"] for r in rows} <= {"completed", "stopped"}, rows
    assert any(r["status"] == "stopped" for r in rows), rows  # ASHA stopped at least one, and the search went on
    stopped = [r for r in rows if r["status"] == "stopped"]
    assert all(int(r["steps"]) < 40 for r in stopped) and any(int(r["steps"]) == 40 for r in rows)
    for trial, mtime in first_done.items():  # finished before the interruption: not rerun
        assert (run_dir / "trials" / trial / "sft" / "summary.json").stat().st_mtime_ns == mtime
    for trial in unfinished:  # interrupted with a checkpoint: continued from it, not from step 0
        rows = [json.loads(ln) for ln in (run_dir / "trials" / trial / "sft" / "metrics.jsonl").open()]
        steps = [r["step"] for r in rows if "event" not in r]  # a resume writes an event line, not a step
        assert steps.count(5) == 1, (trial, steps)
    assert "| trial |" in resumed.stdout and "best    trial" in resumed.stdout
    assert (run_dir / "curves.png").stat().st_size > 10_000

    # The best config is a normal config: it reruns as it is (shortened here).
    again = distft("train", str(run_dir / "best.yaml"), "stages.0.train.max_steps=5", "stages.0.evaluate.data=null",
                   f"run.output_dir={tmp_path}", "run.name=rerun", timeout=600, env=env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert json.loads((tmp_path / "rerun" / "sft" / "summary.json").read_text())["steps"] == 5


def check_search_runs(server, experiment: str, rows: list[dict], out: str) -> None:
    """MLflow holds the search as one parent run and one child per trial (a trial continued after the
    interruption keeps its run): its hyperparameters, its curve, how it ended; the best one tagged."""
    from mlflow import MlflowClient

    from distft.launch.tracking import run_tree

    c = MlflowClient(server["uri"])
    exp = c.get_experiment_by_name(experiment)
    runs = c.search_runs([exp.experiment_id], max_results=100)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_name == "asha", [r.info.run_name for r in runs]
    parent = parents[0]
    assert parent.info.status == "FINISHED" and parent.data.params["tune.metric"] == "eval_loss"
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(trials) == {row["trial"] for row in rows} and len(runs) == 7, sorted(trials)
    best = next(line.split()[2].rstrip(":") for line in out.splitlines() if line.startswith("best    trial"))
    assert parent.data.tags["distft.best_trial"] == best
    for row in rows:
        run = trials[row["trial"]]
        assert run.info.status == "FINISHED", (row, run.info.status)
        assert {"train.lr", "method.lora.r"} <= set(run.data.params)
        assert float(run.data.params["train.lr"]) == pytest.approx(float(row["train.lr"]))
        assert run.data.tags["distft.stop_reason"] == {"stopped": "asha", "completed": "completed"}[row["status"]]
        assert (run.data.tags.get("distft.best") == "true") == (row["trial"] == best)
        curve = c.get_metric_history(run.info.run_id, "eval_loss")
        assert max(m.step for m in curve) == int(row["steps"]), (row, [m.step for m in curve])
    tree = run_tree(c, experiment)
    assert tree.splitlines()[0].startswith("asha  [FINISHED") and tree.count("\n  ") == 6 and "BEST" in tree


@pytest.mark.slow
def test_two_workers_per_trial_and_a_crashing_trial_is_recorded_while_the_search_goes_on(tmp_path):
    run_dir = tmp_path / "two"
    r = distft("tune", str(QUICKSTART), *SMALL, "train.max_steps=20", "tune.num_samples=1", "tune.scheduler=none",
               "scaling.num_workers=2", "scaling.cpus_per_worker=0.5", "scaling.torch_threads=1",
               "tune.space={method.lora.target_modules: {grid: [all-linear, [no_such_proj]]}}",
               f"run.output_dir={tmp_path}", "run.name=two", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = rows_of(run_dir)
    assert sorted(row["status"] for row in rows) == ["completed", "failed"], rows
    failed = next(row for row in rows if row["status"] == "failed")
    assert "no_such_proj" in failed["stop_reason"], failed
    done = next(row for row in rows if row["status"] == "completed")
    summary = json.loads((run_dir / "trials" / done["trial"] / "sft" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 20
    assert "2 at a time" in r.stdout  # both trials ran side by side: 2 x (2 workers x 0.5 CPU) fits


def test_a_run_whose_workers_fit_the_totals_but_no_node_is_refused(monkeypatch):
    """`distft train` on an existing cluster: 2 workers of 3 CPUs on two 2-CPU nodes would wait forever."""
    import ray

    from distft.config import load_config
    from distft.launch.errors import ClusterError
    from distft.launch.placement import check_cluster_resources

    nodes = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 2.0}},
             {"Alive": False, "Resources": {"CPU": 8.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 4.0})
    monkeypatch.setattr(ray, "nodes", lambda: nodes)
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["scaling.num_workers=1", "scaling.cpus_per_worker=2"])
    check_cluster_resources(cfg)  # fits one node
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["scaling.num_workers=1", "scaling.cpus_per_worker=3"])
    with pytest.raises(ClusterError, match=r"a worker needs 3 CPU and the largest node has 2 \(a worker cannot span "
                                           r"nodes\). Fix: scaling.cpus_per_worker=2 or less"):
        check_cluster_resources(cfg)
    # The totals fit, each worker fits a node, but not all of them together.
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["scaling.num_workers=2", "scaling.cpus_per_worker=1.5",
                                                              "train.global_batch_size=32"])
    nodes[:] = [{"Alive": True, "Resources": {"CPU": 2.0}}, {"Alive": True, "Resources": {"CPU": 1.0}}]
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 3.0})
    with pytest.raises(ClusterError, match=r"2 workers \(1.5 CPU each\) fit the cluster's totals but not its nodes "
                                           r"together: .* the nodes have 2, 1 CPU. Fix: fewer scaling.num_workers"):
        check_cluster_resources(cfg)
    # A GPU bundle names the GPU field.
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["scaling.num_workers=1", "scaling.use_gpu=true",
                                                              "scaling.gpus_per_worker=2"])
    nodes[:] = [{"Alive": True, "Resources": {"CPU": 8.0, "GPU": 1.0}}] * 2
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 16.0, "GPU": 2.0})
    with pytest.raises(ClusterError, match=r"a worker needs 2 GPU and the largest node has 1 .* Fix: "
                                           r"scaling.gpus_per_worker=1 or less, or larger nodes"):
        check_cluster_resources(cfg)
