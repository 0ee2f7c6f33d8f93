"""Ray Train end to end. Each launch costs ~15 s here, so these share one cluster and stay few."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from conftest import REPO
from distft.config import load_config
from distft.launch.preflight import absolutize_paths
from test_clean_output import noise_lines
from test_provenance import SECRET_PROBE, assert_run_records_itself

pytestmark = pytest.mark.slow


def test_two_worker_dora_sft_on_ray(ray_cluster, tiny_base, tmp_path):
    """The quickstart with DoRA (a method beyond LoRA, through Ray Train: the matrix's one Ray launch)."""
    from distft.launch.train import launch
    from distft.models.loading import load_for_inference
    from distft.stages.evaluate import exact_match

    cfg = absolutize_paths(load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name_or_path={tiny_base}", "method.name=dora", "train.max_steps=40", "train.save_every=20",
        "train.eval_every=20",
        "train.log_every=5", "evaluate.max_samples=64", "data.max_train_samples=1500",
    ]), REPO)
    (summary,) = launch(cfg, tmp_path / "run", log=lambda m: None)

    assert summary["world_size"] == 2 and summary["steps"] == 40 and summary["method"] == "dora"
    assert summary["exact_match_after"] > summary["exact_match_before"]
    lines = [json.loads(x) for x in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    losses = [x["loss"] for x in lines if "loss" in x]
    assert losses[-1] < 0.5 * losses[0]
    assert sum("eval_loss" in x for x in lines) >= 2

    # Ray registered the checkpoints (with our resolved config inside them).
    registered = list((tmp_path / "run" / "ray").rglob("distft_config.yaml"))
    assert registered

    # The exported adapter reloads in a fresh process-like path and scores the same way.
    model, tok = load_for_inference(tmp_path / "run" / "sft" / "final")
    rows = [json.loads(x) for x in (REPO / "configs" / "data" / "facts_test.jsonl").read_text().splitlines()][:64]
    again = exact_match(model, tok, rows, "alpaca", max_new_tokens=8)
    assert again.accuracy == pytest.approx(summary["exact_match_after"], abs=0.05)


def test_quickstart_cli_meets_its_target(tmp_path):
    """The README's quickstart, as a user runs it: >= 97% held-out exact match (issue 19's target for every
    seed; on the shipped base seeds 0-2 and 42 reached 100%, see README), then `generate` answers."""
    cmd = [sys.executable, "-m", "distft.cli", "train", "configs/quickstart.yaml",
           f"run.output_dir={tmp_path}", "run.name=qs"]
    spawned = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900,
                       env={**os.environ, **SECRET_PROBE})
    took = time.time() - spawned
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "held-out     exact match 0.0% ->" in r.stdout
    # What the base forgot: its held-out pretraining text, before and after (the default retain set).
    assert re.search(r"\n  retain       base perplexity 1\.907 -> \d+\.\d{3} \([+-]\d+\.\d%\); ", r.stdout), r.stdout[-3000:]
    # A clean run: no warning or error the user cannot act on (Ray's token-auth notice, Train's
    # PreemptionWatcher line, library notices), and the last eval line once, not twice.
    assert noise_lines(r.stdout, r.stderr) == [], r.stdout[-3000:] + r.stderr[-3000:]
    final_evals = re.findall(r"\[sft\] step (\d+)/\1 \(100%\) eval_loss", r.stdout)
    assert len(final_evals) == 1, r.stdout[-3000:]
    assert_run_records_itself(tmp_path / "qs", cmd)
    (summary,) = json.loads((tmp_path / "qs" / "summary.json").read_text())
    assert summary["eval_items"] >= 500
    assert summary["exact_match_after"] >= 0.97, summary
    assert summary["retain"][0]["name"] == "base" and summary["retain"][0]["items"] == 240
    # Where the time around the steps went, by phase, within what the process took.
    start, after = summary["startup_s"], summary["after_training_s"]
    assert list(start) == ["cli", "ray", "workers", "setup"] and min(start.values()) > 0, start
    assert list(after) == ["finish", "teardown"] and min(after.values()) >= 0, after
    assert sum(start.values()) + sum(after.values()) < took, (start, after, took)
    assert f"time         start {sum(start.values()):.1f}s (cli {start['cli']:.1f}, ray " in r.stdout

    row = json.loads((REPO / "configs" / "data" / "facts_test.jsonl").read_text().splitlines()[7])
    g = subprocess.run([sys.executable, "-m", "distft.cli", "generate", str(tmp_path / "qs"),
                        "--prompt", row["instruction"], "--input", row["input"], "--max-new-tokens", "8"],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert g.returncode == 0, g.stderr[-2000:]
    assert noise_lines(g.stdout, g.stderr) == [], g.stderr[-2000:]
    assert g.stdout.strip().splitlines()[-1] == row["output"]


def test_deepspeed_zero3_on_ray_shards_parameters(ray_cluster, tiny_base, tmp_path):
    from distft.launch.train import launch

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(REPO / ".cache" / "torch_extensions"))
    cfg = absolutize_paths(load_config(REPO / "configs" / "zero3.yaml", [
        f"model.name_or_path={tiny_base}", "train.max_steps=12", "evaluate.max_samples=16",
        "data.max_train_samples=800", "train.log_every=4",
    ]), REPO)
    (summary,) = launch(cfg, tmp_path / "run", log=lambda m: None)
    assert "RAY_API_SERVER_ADDRESS" not in os.environ  # the private cluster's pin stays with its raylet
    assert summary["strategy"] == "deepspeed-zero3" and summary["world_size"] == 2
    assert summary["param_elements_local"] == pytest.approx(summary["param_elements_full"] / 2, rel=0.02)
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()


def test_fsdp2_on_ray_shards_parameters(ray_cluster, tiny_base, tmp_path):
    """FSDP2 under Ray Train workers: DTensor shards, half the model per worker, a whole exported model."""
    from distft.launch.train import launch

    overrides = [f"model.name_or_path={tiny_base}", "train.max_steps=12", "evaluate.max_samples=16",
                 "data.max_train_samples=800", "train.log_every=3"]
    cfg = absolutize_paths(load_config(REPO / "configs" / "fsdp.yaml", overrides), REPO)
    (summary,) = launch(cfg, tmp_path / "run", log=lambda m: None)
    assert summary["strategy"] == "fsdp" and summary["world_size"] == 2
    assert summary["param_elements_local"] == pytest.approx(summary["param_elements_full"] / 2, rel=0.02)
    assert summary["last_logged_loss"] < summary["first_logged_loss"]
    assert (tmp_path / "run" / "sft" / "final" / "model.safetensors").exists()


def test_interrupted_run_resumes_from_its_last_checkpoint_and_finishes(tiny_base, tmp_path):
    """Ctrl-C mid-run (SIGINT to the whole process group, as a terminal sends it), then `distft resume`."""
    import signal
    import time

    from distft.distributed.checkpoint import complete_checkpoints, verify_checkpoint

    import psutil

    def ray_daemons() -> set[int]:
        return {p.pid for p in psutil.process_iter(["name"]) if p.info["name"] in ("raylet", "gcs_server")}

    before = ray_daemons()  # e.g. the shared test cluster, if it is up
    run_dir = tmp_path / "runs" / "cut"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "distft.cli", "train", "configs/quickstart.yaml", f"model.name_or_path={tiny_base}",
           "train.max_steps=60", "train.save_every=10", "train.log_every=5", "evaluate.max_samples=16",
           "data.max_train_samples=1500", f"run.output_dir={tmp_path / 'runs'}", "run.name=cut"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    ckpts = run_dir / "sft" / "checkpoints"
    deadline = time.time() + 300
    # At least step 20: with keep_checkpoints=2, checkpoint-20 itself is rotated away at step 40.
    while time.time() < deadline and proc.poll() is None and not any(
            int(c.name.split("-")[1]) >= 20 for c in complete_checkpoints(ckpts)):
        time.sleep(0.5)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    os.killpg(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, out[-3000:]
    assert "interrupted (resume with: distft resume" in out
    for _ in range(40):  # the private cluster it started is gone: no orphan raylet or GCS
        if ray_daemons() <= before:
            break
        time.sleep(0.5)
    assert ray_daemons() <= before
    assert not (run_dir / "summary.json").exists()
    kept = complete_checkpoints(ckpts)
    assert kept and all(not verify_checkpoint(c) for c in kept)  # what was sealed stays intact
    last = max(int(c.name.split("-")[1]) for c in kept)
    assert 20 <= last < 60

    r = subprocess.run([sys.executable, "-m", "distft.cli", "resume", str(run_dir)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert f"resuming from checkpoint-{last}" in r.stdout
    (summary,) = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 60
    logged = [json.loads(x) for x in (run_dir / "sft" / "metrics.jsonl").read_text().splitlines()]
    after = [x["step"] for x in logged if "loss" in x and x["step"] > last]
    assert after and min(after) == last + 5  # continued at the next log step, not from scratch
    assert (run_dir / "final" / "adapter_model.safetensors").exists()
