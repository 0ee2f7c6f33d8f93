"""Experiment tracking (run.report_to: MLflow, W&B) and publishing (distft export --push-to-hub, run.push_to_hub).

Against real components: an `mlflow server` on 127.0.0.1 (sqlite backend, local artifact store: the
session's `mlflow_server` fixture), W&B in offline mode (its files in the run directory, read back with
W&B's own record reader), and local HTTP endpoints that refuse or never answer. The Ray tests run
`distft` as users do; a 6-trial search's runs are checked in tests/test_tune.py's ASHA search.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from conftest import FACTS_TRAIN, REPO

FACTS_TEST = REPO / "configs" / "data" / "facts_test.jsonl"
SECRET = "mlf-secret-" + "7c1e9a44d2"  # token values that must never reach a file, a log or the server
HF_SECRET = "hf_" + "q8ZkTt3v9WmN2"


def distft(*args, env=None, timeout=600, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env, **kw)


def client(server):
    from mlflow import MlflowClient

    return MlflowClient(server["uri"])


def runs_of(server, experiment: str) -> list:
    c = client(server)
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id], max_results=500) if exp else []


def _wandb_records(path: Path) -> list[bytes]:
    """The records of a W&B offline file: a 7-byte header (":W&B", magic, version), then LevelDB-style log
    blocks of 32 KiB (crc32, length, type; records split across blocks as FIRST/MIDDLE/LAST). wandb 0.31 has
    no Python reader left (its core is Go), so the test reads the documented framing itself."""
    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, records, pending = 7, 32768, [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            records.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            records.append(pending + chunk)
        elif kind == 0:
            pos += left - 7 - length
    return records


def wandb_history(run_dir: Path) -> list[dict]:
    """Every history row W&B wrote to its offline files under `run_dir`, parsed with W&B's own protobufs."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for path in sorted(run_dir.rglob("offline-run-*/run-*.wandb")):
        for data in _wandb_records(path):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(data)
            if rec.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                             for item in rec.history.item})
    return rows


def sft_raw(tiny_base, **run) -> dict:
    return {
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 2},
        "stage": "sft",
        "data": {"train": str(FACTS_TRAIN), "max_eval_samples": 16, "eval_fraction": 0.05},
        "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}},
        "train": {"lr": 3e-3, "scheduler": "constant", "max_steps": 6, "global_batch_size": 16,
                  "micro_batch_size": 16, "log_every": 2, "eval_every": 3, "save_every": 1000},
        "evaluate": {"data": str(FACTS_TEST), "max_samples": 16, "max_new_tokens": 6},
        "run": run,
    }


# -- fast: the pieces --------------------------------------------------------------------------------------

def test_summary_figures_become_flat_metric_names():
    from distft.stages.tracking import numeric_items

    got = numeric_items({"steps": 6, "forgetting": False, "exact_match_after": 0.5, "model_dir": "/x",
                         "startup_s": {"ray": 3.2, "workers": 1.0},
                         "retain": [{"name": "base", "kind": "perplexity", "before": 3.2, "after": 3.4}],
                         "loss (smoothed)": 1.5, "nan": float("nan"), "checkpoint_blocked_s": [0.5, 0.25]})
    assert got == {"steps": 6.0, "forgetting": 0.0, "exact_match_after": 0.5, "startup_s/ray": 3.2,
                   "startup_s/workers": 1.0, "retain/base/before": 3.2, "retain/base/after": 3.4,
                   "loss _smoothed_": 1.5, "checkpoint_blocked_s/0": 0.5, "checkpoint_blocked_s/1": 0.25}


def test_the_model_card_says_base_method_data_metrics_and_provenance_and_nothing_private(tmp_path):
    from distft.models.publish import model_card

    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name_or_path": "Qwen/Qwen2.5-0.5B"},
        "stages": [{"stage": "sft", "method": {"name": "lora"}, "data": {"train": "/home/me/data/facts.jsonl"}},
                   {"stage": "ppo", "method": {"name": "lora"}, "data": {"train": "/home/me/data/prompts.jsonl"}}]}))
    (run / "summary.json").write_text(json.dumps([
        {"stage": "sft", "strategy": "ddp", "steps": 90, "world_size": 2, "exact_match_before": 0.0,
         "exact_match_after": 0.62, "eval_loss": 0.8123},
        {"stage": "ppo", "strategy": "zero3", "steps": 100, "world_size": 2, "exact_match_before": 0.62,
         "exact_match_after": 0.71, "retain": [{"name": "base", "kind": "perplexity", "before": 3.2, "after": 3.3}]}]))
    (run / "provenance.json").write_text(json.dumps({
        "distft": "0.1.0", "hostname": "secret-host", "cwd": "/home/me/work", "argv": ["distft", "train", "x.yaml"],
        "git": {"sha": "0123456789abcdef0123", "dirty": False}, "versions": {"torch": "2.13.0", "trl": "1.16.0"},
        "started_at": "2026-12-07T09:00:00+00:00"}))
    (run / "final" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA",
                                                                   "base_model_name_or_path": "Qwen/Qwen2.5-0.5B"}))
    card = model_card("acme/facts-0.5b", run, run / "final")
    meta = yaml.safe_load(card.split("---")[1])
    assert meta["base_model"] == "Qwen/Qwen2.5-0.5B" and meta["library_name"] == "peft"
    assert {"distft", "sft", "ppo", "lora"} <= set(meta["tags"])
    assert "# facts-0.5b" in card and "sft -> ppo" in card
    assert "| sft | sft | lora | ddp | 90 | 2 | `facts.jsonl` |" in card
    assert "| ppo | held-out exact match | 62.0% | 71.0% |" in card and "| sft | eval loss | - | 0.8123 |" in card
    assert "retain base perplexity | 3.2 | 3.3" in card
    assert "distft 0.1.0, commit `0123456789ab`" in card and "torch 2.13.0, trl 1.16.0" in card
    assert "2026-12-07" in card
    for private in ("secret-host", "/home/me", "x.yaml"):  # the card is public: no host, paths or command line
        assert private not in card


def test_what_is_pushed_leaves_out_the_files_that_name_local_paths(tmp_path):
    from distft.models.publish import files_to_push

    for name in ("config.json", "model.safetensors", "tokenizer.json", "distft_manifest.json", "distft_export.json",
                 "distft_config.yaml", "README.md", ".distft-owned"):
        (tmp_path / name).write_text("{}")
    assert [p.name for p in files_to_push(tmp_path)] == ["config.json", "distft_manifest.json", "model.safetensors",
                                                         "tokenizer.json"]


@pytest.mark.parametrize("setting, env, expected", [
    # Checked before launch (preflight): every problem on its own line, in one message.
    (["run.report_to=[mlflow, wandb]", "run.push_to_hub=acme/model"], {},
     ["run.report_to has mlflow, but no tracking server is named. Fix: run.mlflow.tracking_uri=http://HOST:5000",
      "Fix: export WANDB_API_KEY=... and run.forward_env=[WANDB_API_KEY], or run.wandb.mode=offline",
      "run.push_to_hub=acme/model needs HF_TOKEN"]),
    (["run.report_to=[mlflow]", "run.mlflow.tracking_uri=http://bob:hunter2@mlflow.example:5000"],
     {"MLFLOW_TRACKING_TOKEN": SECRET},
     ["holds a password", "MLFLOW_TRACKING_TOKEN is set here but not in run.forward_env, so the workers would "
                          "log to MLflow without it. Fix: run.forward_env=[MLFLOW_TRACKING_TOKEN]"]),
    # Checked by the config itself.
    (["run.report_to=[mlflow, mlflow]", "run.push_to_hub=not a repo"], {},
     ["names a logger twice", "run.push_to_hub: 'not a repo' is not a Hub repository id"]),
])
def test_tracking_settings_that_cannot_work_are_refused_by_validate_in_one_message(tiny_base, tmp_path, setting,
                                                                                    env, expected):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(sft_raw(tiny_base)))
    clean = {k: v for k, v in os.environ.items()
             if k not in ("MLFLOW_TRACKING_URI", "HF_TOKEN", "WANDB_API_KEY", "MLFLOW_TRACKING_TOKEN")}
    r = distft("validate", str(config), *setting, env={**clean, **env}, timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    for text in expected:
        assert text in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == len(expected) + 1, r.stderr  # the heading, one line each
    assert "Traceback" not in r.stderr and "hunter2" not in r.stderr and SECRET not in r.stdout + r.stderr


class _Refusing(http.server.BaseHTTPRequestHandler):
    """A Hub endpoint that refuses every request (as a Hub does for a read-only token)."""

    seen_auth: list = []

    def _refuse(self):
        self.seen_auth.append(self.headers.get("authorization"))
        body = json.dumps({"error": "You don't have the rights to create a model under this namespace"}).encode()
        self.send_response(403)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_HEAD = _refuse

    def log_message(self, *args):
        pass


def _digest(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_a_failed_push_says_why_and_leaves_the_export_as_it_was(tiny_random, tmp_path):
    """distft export --push-to-hub against an endpoint that refuses, one that is not there, and with no token."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    out = tmp_path / "export"
    base = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    base.update(HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf-home"))
    try:
        # No token: refused before anything is written.
        r = distft("export", str(tiny_random), "--out", str(out), "--push-to-hub", "acme/tiny", env=base)
        assert r.returncode == 2 and "no token (HF_TOKEN is not set)" in r.stderr, r.stderr
        assert not out.exists()

        refusing = {**base, "HF_TOKEN": SECRET, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        r = distft("export", str(tiny_random), "--out", str(out), "--push-to-hub", "acme/tiny", env=refusing)
        assert r.returncode == 2, r.stdout + r.stderr
        assert "refused it (HTTP 403: the token may not write there" in r.stderr, r.stderr
        assert f"The local export is intact: {out}" in r.stderr and "Traceback" not in r.stderr
        said = [ln for ln in r.stderr.splitlines() if ln.strip() and "it/s]" not in ln]  # not the export's progress
        assert len(said) == 1 and "the server said: You don't have the rights" in said[0], r.stderr
        assert {a for a in _Refusing.seen_auth if a} == {f"Bearer {SECRET}"}  # HF_TOKEN's, no stored login
        before = _digest(out)
        assert "config.json" in before and "README.md" not in before  # the card went up from memory, not into it

        # A retry pushes the same export; nothing listens on this port now.
        gone = {**refusing, "HF_ENDPOINT": f"http://127.0.0.1:{server.server_address[1]}"}
        server.shutdown()
        server.server_close()
        r = distft("export", str(tiny_random), "--out", str(out), "--push-to-hub", "acme/tiny", env=gone)
        assert r.returncode == 2 and "pushing the existing export" in r.stdout, r.stdout + r.stderr
        assert "cannot reach http://127.0.0.1" in r.stderr and "Fix: check the network" in r.stderr, r.stderr
        assert _digest(out) == before
        assert SECRET not in r.stdout + r.stderr
    finally:
        server.server_close()


def _black_hole() -> tuple[socket.socket, int]:
    """A server that accepts connections and never answers: a tracking server hung or behind a dead proxy."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    held: list = []

    def accept():
        while True:
            try:
                held.append(sock.accept())
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    return sock, sock.getsockname()[1]


@pytest.mark.slow
def test_a_tracking_server_that_never_answers_costs_one_timeout_and_one_warning(tiny_base, tmp_path, capsys):
    """The stage's own logging path (in-process): the first request times out, one warning, training goes on."""
    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    sock, port = _black_hole()
    try:
        cfg = build_config(sft_raw(tiny_base, report_to=["mlflow"],
                                   mlflow={"tracking_uri": f"http://127.0.0.1:{port}", "timeout_s": 2}))
        spec = {"mlflow": {"uri": f"http://127.0.0.1:{port}", "run_id": "0" * 32, "timeout_s": 2}}
        started = time.time()
        stage_runner("sft")(cfg, StageContext(run_dir=tmp_path, tracking=spec))
        took = time.time() - started
    finally:
        sock.close()
    out = capsys.readouterr().out
    warnings = [ln for ln in out.splitlines() if ln.startswith("[tracking]")]
    assert len(warnings) == 1 and "mlflow: logging metrics failed" in warnings[0], out
    assert "goes on without mlflow (metrics.jsonl keeps every metric)" in warnings[0]
    summary = json.loads((tmp_path / "sft" / "summary.json").read_text())
    assert summary["steps"] == 6
    assert not (tmp_path / "sft" / "tensorboard").exists()  # run.report_to=[mlflow]: no event files
    rows = [json.loads(ln) for ln in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in r for r in rows) and any("eval_loss" in r for r in rows)
    assert took < 90, took  # one 2 s timeout, not one per log (6 steps log 6+ times)


class _Slow(http.server.BaseHTTPRequestHandler):
    """An MLflow server that answers every request, correctly but 3 s late (under the client's timeout)."""

    requests = 0

    def do_POST(self):
        type(self).requests += 1
        self.rfile.read(int(self.headers.get("content-length") or 0))
        time.sleep(3)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_slow_tracking_server_never_holds_a_step_and_the_stage_end_waits_at_most_the_timeout():
    from distft.stages.tracking import Trackers

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    lines: list[str] = []
    try:
        trackers = Trackers({"mlflow": {"uri": f"http://127.0.0.1:{server.server_address[1]}", "run_id": "0" * 32,
                                        "timeout_s": 4}}, lines.append)
        trackers.log_metrics({"step": 1, "loss": 1.0}, 1)
        deadline = time.time() + 30
        while _Slow.requests == 0 and time.time() < deadline:  # the first row is on its way (3 s)
            time.sleep(0.05)
        started = time.time()
        for step in range(2, 21):  # queued behind it, then sent in one request
            trackers.log_metrics({"step": step, "loss": 1.0 / step}, step)
        logging_took = time.time() - started
        trackers.close(ok=True)
        closing_took = time.time() - started - logging_took
    finally:
        server.shutdown()
        server.server_close()
    assert logging_took < 1.0, logging_took  # the training thread only queued the rows
    assert _Slow.requests == 2  # the second still in flight at the end's deadline (4 s < 3 s + 3 s)
    assert closing_took < 4 + 2, closing_took
    assert len(lines) == 1 and "rows still unsent after 4 s at the end of the stage" in lines[0], lines


@pytest.mark.slow
def test_the_launcher_gives_up_an_unreachable_server_once_and_the_stage_runs_without_it(tmp_path, tiny_base):
    from distft.config import build_config
    from distft.launch.tracking import RunTracking

    sock, port = _black_hole()
    lines: list[str] = []
    try:
        cfg = build_config(sft_raw(tiny_base, report_to=["tensorboard", "mlflow"],
                                   mlflow={"tracking_uri": f"http://127.0.0.1:{port}", "timeout_s": 1}))
        tracking = RunTracking(cfg, tmp_path, lines.append)
        started = time.time()
        assert tracking.stage(0, resumed=False) is None  # no tracker left for the workers
        tracking.finish("FINISHED", [])
        took = time.time() - started
    finally:
        sock.close()
    assert len(lines) == 1 and "mlflow: starting the parent run" in lines[0] and "failed" in lines[0], lines
    assert "goes on without MLflow, logging to metrics.jsonl and TensorBoard" in lines[0]
    assert took < 10, took


# -- through Ray, as users run it ----------------------------------------------------------------------------

def _pipeline_config(tiny_base, tmp_path, server) -> Path:
    raw = {
        "model": {"name_or_path": str(tiny_base), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "cpus_per_worker": 1, "torch_threads": 2},
        "stages": [
            {"stage": "sft", "data": {"train": str(FACTS_TRAIN), "max_eval_samples": 16},
             "method": {"name": "full"},
             "train": {"lr": 1e-3, "scheduler": "constant", "max_steps": 12, "global_batch_size": 16,
                       "micro_batch_size": 16, "log_every": 2, "eval_every": 4, "save_every": 4},
             "evaluate": {"data": str(FACTS_TEST), "max_samples": 32, "max_new_tokens": 6}},
            {"stage": "ppo", "data": {"train": str(FACTS_TRAIN)}, "method": {"name": "full"},
             "reward": {"functions": {"exact_match": 1.0}},
             "ppo": {"rollout_batch_size": 16, "max_new_tokens": 6},
             "train": {"lr": 1e-4, "scheduler": "constant", "max_steps": 2, "global_batch_size": 16,
                       "micro_batch_size": 16, "log_every": 1, "save_every": 1000},
             "evaluate": {"data": str(FACTS_TEST), "max_samples": 32, "max_new_tokens": 6}},
        ],
        "run": {"output_dir": str(tmp_path / "runs"), "name": "tracked",
                "report_to": ["tensorboard", "mlflow", "wandb"],
                "mlflow": {"tracking_uri": server["uri"], "experiment": "pipeline-test", "log_model": True},
                "wandb": {"mode": "offline", "project": "distft-test"},
                "forward_env": ["MLFLOW_TRACKING_TOKEN"], "push_to_hub": "acme/tracked"},
    }
    path = tmp_path / "tracked.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.slow
def test_a_pipeline_interrupted_and_resumed_logs_one_parent_run_with_a_child_per_stage(tiny_base, tmp_path,
                                                                                       mlflow_server):
    """`distft train` of SFT -> PPO on Ray Train: SIGTERM once SFT has a checkpoint, then `distft resume`.
    MLflow holds one parent with one child per stage (the SFT child continued, not doubled), their curves,
    summary figures and files; W&B's offline files hold the history; run.push_to_hub, refused by the
    endpoint, fails the command after the run finished and leaves the export; no token is anywhere."""
    config = _pipeline_config(tiny_base, tmp_path, mlflow_server)
    run_dir = tmp_path / "runs" / "tracked"
    hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refusing)
    threading.Thread(target=hub.serve_forever, daemon=True).start()
    env = {**os.environ, "MLFLOW_TRACKING_TOKEN": SECRET, "HF_TOKEN": HF_SECRET, "HF_HUB_OFFLINE": "0",
           "HF_ENDPOINT": f"http://127.0.0.1:{hub.server_address[1]}"}
    env.pop("MLFLOW_TRACKING_URI", None)
    proc = subprocess.Popen([sys.executable, "-m", "distft.cli", "train", str(config)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list((run_dir / "sft" / "checkpoints").glob("checkpoint-*")):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("no SFT checkpoint: " + proc.communicate()[1][-3000:])
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    out1, err1 = proc.communicate(timeout=120)
    assert proc.returncode == 143, err1[-3000:]
    first = json.loads((run_dir / "tracking.json").read_text())
    parent_id, sft_id = first["mlflow"]["run_id"], first["mlflow"]["stages"]["sft"]
    # The interrupt ended both runs as KILLED (the SFT worker died without ending its own).
    c = client(mlflow_server)
    assert c.get_run(parent_id).info.status == "KILLED" and c.get_run(sft_id).info.status == "KILLED"

    resumed = distft("resume", str(run_dir), env=env)
    hub.shutdown()
    hub.server_close()
    # The run finished; the push at its end was refused: exit 2, one line, the export kept for a retry.
    assert resumed.returncode == 2, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert (run_dir / "summary.json").is_file() and (run_dir / "export" / "config.json").is_file()
    error = [ln for ln in resumed.stderr.splitlines() if ln.startswith("error:")]
    assert len(error) == 1 and f"the run finished ({run_dir}), but push to acme/tracked:" in error[0], resumed.stderr
    assert "refused it (HTTP 403" in error[0] and f"distft export {run_dir} --push-to-hub acme/tracked" in error[0]
    assert "[tracking]" not in resumed.stdout.replace("[tracking] mlflow: run tracked", "")  # no warnings
    state = json.loads((run_dir / "tracking.json").read_text())
    assert state["mlflow"]["run_id"] == parent_id and state["mlflow"]["stages"]["sft"] == sft_id

    runs = {r.info.run_id: r for r in runs_of(mlflow_server, "pipeline-test")}
    assert set(runs) == {parent_id, sft_id, state["mlflow"]["stages"]["ppo"]}, [r.info.run_name for r in runs.values()]
    parent, sft, ppo = runs[parent_id], runs[sft_id], runs[state["mlflow"]["stages"]["ppo"]]
    assert parent.info.run_name == "tracked" and parent.info.status == "FINISHED"
    assert parent.data.params["stages.0.train.lr"] == "0.001" and parent.data.params["stages.1.stage"] == "ppo"
    assert {sft.data.tags["mlflow.parentRunId"], ppo.data.tags["mlflow.parentRunId"]} == {parent_id}
    assert sft.info.run_name == "sft" and ppo.info.run_name == "ppo"
    assert sft.info.status == ppo.info.status == "FINISHED"
    assert sft.data.params["train.max_steps"] == "12"
    # SFT's curve: before the interrupt and after the resume, in one run.
    loss_steps = sorted({m.step for m in c.get_metric_history(sft_id, "loss")})
    assert loss_steps[0] <= 4 and loss_steps[-1] >= 10, loss_steps
    assert [m.step for m in c.get_metric_history(sft_id, "eval_loss")]
    # distft's own figures: exact match before/after, memory, the checkpoint stalls.
    assert "summary/exact_match_after" in sft.data.metrics and "summary/peak_rss_mib" in sft.data.metrics
    assert any(k.startswith("summary/checkpoint_blocked") for k in sft.data.metrics), sorted(sft.data.metrics)
    assert ppo.data.metrics.get("summary/steps") == 2 and "summary/exact_match_after" in ppo.data.metrics
    assert len(c.get_metric_history(ppo.info.run_id, "score")) == 2, sorted(ppo.data.metrics)
    assert {f.path for f in c.list_artifacts(sft_id)} >= {"summary.json", "config.yaml", "model"}
    assert {"model/config.json", "model/model.safetensors"} <= {f.path for f in c.list_artifacts(sft_id, "model")}
    assert {f.path for f in c.list_artifacts(parent_id)} >= {"config.yaml", "provenance.json", "summary.json"}

    shown = distft("runs", "show", str(run_dir), env=env, timeout=120).stdout
    assert f"mlflow      {mlflow_server['uri']} experiment pipeline-test: run {parent_id} (sft {sft_id}, ppo" in shown

    # W&B, offline: one run per stage in the run directory (SFT's continued under its id), with the history.
    # (What the interrupted SFT worker had not yet written out is lost to W&B; metrics.jsonl has it.)
    ids = {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")}
    assert ids == {state["wandb"]["stages"]["sft"], state["wandb"]["stages"]["ppo"]}, ids
    assert list((run_dir / "wandb").glob("offline-run-*/files/summary.json"))  # the stage's summary went along
    history = wandb_history(run_dir)
    assert 12 in {row["step"] for row in history if "loss" in row}, history
    assert sorted(row["step"] for row in history if "score" in row) == [1, 2], history

    # The token: in the workers' environment only; nowhere on disk, in the server or in the output.
    places = [run_dir, mlflow_server["root"]]
    for place in places:
        for f in place.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert SECRET.encode() not in f.read_bytes(), f
    for place in places:
        for f in place.rglob("*"):
            if f.is_file() and f.stat().st_size < 50_000_000:
                assert HF_SECRET.encode() not in f.read_bytes(), f
    for text in (out1, err1, resumed.stdout, resumed.stderr):
        assert SECRET not in text and HF_SECRET not in text


def test_deepspeed_no_longer_pulls_mlflow_into_every_stage_process():
    """DeepSpeed's autotuner imports MLflow at DeepSpeed's import (113 MB, 0.8 s per worker here) whenever it
    is installed; stage processes keep it out, and MLflow still imports for distft's own tracker."""
    pytest.importorskip("deepspeed")
    pytest.importorskip("mlflow")
    plain = subprocess.run([sys.executable, "-c", "import sys, deepspeed; print('mlflow' in sys.modules)"],
                           capture_output=True, text=True, timeout=300)
    assert plain.stdout.strip().splitlines()[-1] == "True", plain.stdout + plain.stderr  # the cost, without distft
    code = ("import sys; from distft.stages import stage_runner; stage_runner('sft'); import deepspeed; "
            "print('mlflow' in sys.modules); import mlflow; print(mlflow.__version__)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-2:] == ["False", "3.17.2"], r.stdout
