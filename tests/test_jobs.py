"""`distft submit` and `distft jobs`, without a job server: what a job carries, secrets, errors.

The end-to-end job tests (a real head over HTTP with token auth) share the cluster of
tests/test_cluster.py and live there.
"""

from __future__ import annotations

import json
import os
import runpy
import stat
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, write_jsonl
from distft.config import ConfigError, build_config, load_config
from distft.launch import jobs
from distft.launch.errors import ClusterError

FAKE = "hf_FAKEtoken0123456789abcdefSECRET"


def job_config(tmp_path, rows, **run) -> tuple:
    data = write_jsonl(tmp_path / "data" / "train.jsonl", rows[:16])
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    cfg = build_config({
        "model": {"name_or_path": "my-model"},
        "stage": "sft",
        "data": {"train": "data/train.jsonl"},
        "run": {"name": "r1", **run},
    })
    return cfg, data, model


def test_a_job_carries_its_config_and_its_local_files(tmp_path, alpaca_rows):
    cfg, data, model = job_config(tmp_path, alpaca_rows, output_dir="out")
    staging = tmp_path / "staging"
    staging.mkdir()
    job_cfg, shipped = jobs.stage_job(cfg, tmp_path, staging, secrets={})
    # Relative paths meant the submitter's directory; inside the job they point at the shipped copies.
    assert job_cfg.model.name_or_path == "files/0-my-model" and (staging / "files/0-my-model/config.json").is_file()
    assert job_cfg.stages[0].data.train == "files/1-train.jsonl"
    assert (staging / "files/1-train.jsonl").read_bytes() == data.read_bytes()
    assert [p for p, _ in shipped] == ["my-model", "data/train.jsonl"]
    # Outputs land where the submitter would look (on `distft cluster up`, this machine).
    assert job_cfg.run.output_dir == str(tmp_path / "out") and job_cfg.run.address is None
    assert load_config(staging / "config.yaml") == job_cfg
    assert sorted(p.name for p in staging.iterdir()) == ["config.yaml", "files"]  # nothing forwarded: no secrets file


def test_a_deepspeed_json_and_a_saved_dataset_directory_travel_and_cluster_paths_stay(tmp_path, alpaca_rows):
    cfg, _, _ = job_config(tmp_path, alpaca_rows)
    (tmp_path / "ds.json").write_text("{}")
    (tmp_path / "saved_ds").mkdir()  # a save_to_disk directory, named without ./
    (tmp_path / "saved_ds" / "state.json").write_text("{}")
    cfg.stages[0].strategy.name = "deepspeed"
    cfg.stages[0].strategy.deepspeed_config = "ds.json"
    cfg.stages[0].data.eval = "saved_ds"
    cfg.stages[0].evaluate.data = "/mnt/shared/held_out.jsonl"  # exists only on the cluster
    (tmp_path / "s").mkdir()
    job_cfg, shipped = jobs.stage_job(cfg, tmp_path, tmp_path / "s", secrets={})
    st = job_cfg.stages[0]
    assert (tmp_path / "s" / st.strategy.deepspeed_config).read_text() == "{}"
    assert (tmp_path / "s" / st.data.eval / "state.json").is_file()
    assert st.evaluate.data == "/mnt/shared/held_out.jsonl"
    assert "/mnt/shared/held_out.jsonl" not in [p for p, _ in shipped]


def test_submit_checks_paths_that_exist_only_on_the_cluster_there(tmp_path, alpaca_rows):
    from distft.launch.preflight import cluster_only_paths, preflight

    cfg, _, _ = job_config(tmp_path, alpaca_rows)
    cfg.model.name_or_path = "/mnt/shared/models/llama"
    cfg.stages[0].data.train = "/mnt/shared/data/train.jsonl"
    elsewhere = cluster_only_paths(cfg)
    assert elsewhere == {"/mnt/shared/models/llama", "/mnt/shared/data/train.jsonl"}
    notes = preflight(cfg, "auto", elsewhere=elsewhere)
    assert any("/mnt/shared/data/train.jsonl is not on this machine; the job checks it on the cluster" in n
               for n in notes)


def test_hub_ids_and_the_tiny_base_stay_names(tmp_path, alpaca_rows):
    cfg, _, _ = job_config(tmp_path, alpaca_rows)
    cfg.model.name_or_path = "Qwen/Qwen2.5-0.5B"
    (tmp_path / "s").mkdir()
    job_cfg, shipped = jobs.stage_job(cfg, tmp_path, tmp_path / "s", secrets={})
    assert job_cfg.model.name_or_path == "Qwen/Qwen2.5-0.5B" and [p for p, _ in shipped] == ["data/train.jsonl"]


def test_reward_functions_and_rollout_engines_from_the_submitting_directory_travel(tmp_path, alpaca_rows):
    """`package.module:function` names: code under the submitting directory goes to the job's root (on every
    worker's sys.path); installed packages and distft itself stay the cluster's."""
    (tmp_path / "myrewards.py").write_text("def score(prompts, completions, references):\n    return [0.0]\n")
    (tmp_path / "mypkg" / "gen").mkdir(parents=True)
    (tmp_path / "mypkg" / "__init__.py").write_text("")
    (tmp_path / "mypkg" / "gen" / "__init__.py").write_text("def fast(*args):\n    pass\n")
    (tmp_path / "mypkg" / "__pycache__").mkdir()
    (tmp_path / "mypkg" / "__pycache__" / "x.pyc").write_bytes(b"stale")
    # Not on sys.path: the `distft` command does not put the directory it runs in there.
    assert str(tmp_path) not in sys.path
    write_jsonl(tmp_path / "data" / "train.jsonl", alpaca_rows[:16])
    cfg = build_config({
        "run": {"name": "r1"},
        "stages": [
            {"stage": "grpo", "data": {"train": "data/train.jsonl"},
             "reward": {"functions": {"exact_match": 1.0, "myrewards:score": 0.5, "yaml:safe_load": 0.1}}},
            {"stage": "ppo", "data": {"train": "data/train.jsonl"}, "train": {"global_batch_size": 16},
             "ppo": {"rollout_batch_size": 16, "generation": "mypkg.gen:fast"},
             "reward": {"functions": {"myrewards:score": 1.0, "distft.rl.rewards:exact_match": 1.0}}},
        ],
    })
    staging = tmp_path / "s"
    staging.mkdir()
    _, shipped = jobs.stage_job(cfg, tmp_path, staging, secrets={})
    assert sorted(p for p, _ in shipped if not p.startswith("data")) == ["mypkg", "myrewards.py"]
    assert (staging / "myrewards.py").read_text().startswith("def score")
    assert (staging / "mypkg" / "gen" / "__init__.py").is_file() and not (staging / "mypkg" / "__pycache__").exists()
    assert not (staging / "yaml").exists() and not (staging / "distft").exists()


def test_secrets_go_in_a_private_file_never_in_the_config(tmp_path, alpaca_rows):
    cfg, _, _ = job_config(tmp_path, alpaca_rows, forward_env=["HF_TOKEN"])
    staging = tmp_path / "staging"
    staging.mkdir()
    jobs.stage_job(cfg, tmp_path, staging, secrets={"HF_TOKEN": FAKE})
    secrets = staging / jobs.SECRETS_FILE
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600 and json.loads(secrets.read_text()) == {"HF_TOKEN": FAKE}
    config_text = (staging / "config.yaml").read_text()
    assert FAKE not in config_text and yaml.safe_load(config_text)["run"]["forward_env"] == ["HF_TOKEN"]


def test_the_entrypoint_takes_the_secrets_out_of_the_package_first(tmp_path, monkeypatch):
    from distft.launch import job_package

    (tmp_path / jobs.SECRETS_FILE).write_text(json.dumps({"HF_TOKEN": FAKE}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert job_package.take_secrets() == ["HF_TOKEN"]
    assert os.environ["HF_TOKEN"] == FAKE and not (tmp_path / jobs.SECRETS_FILE).exists()


def test_a_worker_deletes_the_copy_ray_unpacked_on_its_node(tmp_path, monkeypatch):
    from distft.launch import job_package

    unpacked = tmp_path / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    unpacked.mkdir(parents=True)
    (unpacked / jobs.SECRETS_FILE).write_text("{}")
    monkeypatch.chdir(tmp_path)  # a Ray Train worker runs elsewhere; the package is on sys.path
    monkeypatch.setattr("sys.path", [*__import__("sys").path, str(unpacked)])
    job_package.scrub_unpacked_secrets()
    assert not (unpacked / jobs.SECRETS_FILE).exists()


def test_the_shim_for_ray_job_submit_runs_the_same_entrypoint():
    entry = runpy.run_path(str(REPO / "jobs" / "entrypoint.py"))  # not as __main__: the CLI does not run
    from distft import job_entrypoint

    assert entry["main"] is job_entrypoint.main


def test_the_entrypoint_works_from_a_copy_next_to_the_outputs(tmp_path, alpaca_rows, monkeypatch):
    """Ray's unpacked copy can be replaced under a running driver (several raylets on one machine)."""
    cfg, _, _ = job_config(tmp_path, alpaca_rows, output_dir=str(tmp_path / "out"))
    staging = tmp_path / "staging"
    staging.mkdir()
    jobs.stage_job(cfg, tmp_path, staging, secrets={"HF_TOKEN": FAKE})
    monkeypatch.chdir(staging)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    from distft.launch import job_package

    job_package.take_secrets()
    home = job_package.settle(staging / "config.yaml", "distft-r1-abc123")
    assert home == tmp_path / "out" / ".jobs" / "r1-distft-r1-abc123" and os.getcwd() == str(home)
    assert (home / "files" / "1-train.jsonl").is_file() and (home / "config.yaml").is_file()
    assert not (home / jobs.SECRETS_FILE).exists()


def test_a_job_over_rays_package_limit_is_refused_before_upload(tmp_path, alpaca_rows, monkeypatch):
    cfg, _, _ = job_config(tmp_path, alpaca_rows)
    (tmp_path / "my-model" / "model.safetensors").write_bytes(b"\0" * 4096)
    monkeypatch.setattr(jobs, "PACKAGE_LIMIT", 2048)
    (tmp_path / "s").mkdir()
    with pytest.raises(ClusterError, match=r"largest: my-model.*Ray.s limit for a job.s files is 0 MiB.*a hub model or dataset id"):
        jobs.stage_job(cfg, tmp_path, tmp_path / "s", secrets={})


def test_forward_env_takes_names_and_never_echoes_a_value():
    with pytest.raises(ConfigError) as e:
        build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "run": {"forward_env": [f"HF_TOKEN={FAKE}"]}})
    assert "run.forward_env: item 0 is not an environment variable name" in str(e.value)
    assert FAKE not in str(e.value)


def test_the_job_server_address_comes_from_the_flag_then_ray_address_then_the_cluster(monkeypatch, tmp_path):
    from distft.launch import cluster

    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://api:8265")  # Ray's own variable: after RAY_ADDRESS
    assert jobs.job_server_url(None) == "http://api:8265"
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS")
    assert jobs.job_server_url(None) == "http://127.0.0.1:8265"
    cluster._write_state({"address": "127.0.0.1:7000", "port": 7000, "dashboard_url": "http://127.0.0.1:9265",
                          "processes": []})
    assert jobs.job_server_url(None) == "http://127.0.0.1:9265"
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")  # a GCS address is not the job server: ignored
    assert jobs.job_server_url(None) == "http://127.0.0.1:9265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert jobs.job_server_url(None) == "http://head:8265"
    assert jobs.job_server_url("10.0.0.5:8265") == "http://10.0.0.5:8265"


@pytest.mark.parametrize("error, expected", [
    (RuntimeError("Authentication required: Missing authentication token"), "no token was sent"),
    (RuntimeError("Authentication failed: Invalid authentication token"), "the token was refused"),
    (ConnectionError("Failed to connect to Ray at address: http://127.0.0.1:1."), "cannot reach a Ray job server"),
])
def test_job_server_errors_say_what_to_do(error, expected):
    text = jobs.explain(error, "http://127.0.0.1:1")
    assert expected in text and "Fix:" in text


def distft(*args, env=None, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distft.cli", *map(str, args)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_submit_refuses_bad_input_before_contacting_any_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    dead = "http://127.0.0.1:9"  # nothing listens there: reaching it would be a connection error
    r = distft("submit", REPO / "configs" / "quickstart.yaml", "run.forward_env=[HF_TOKEN]", "--address", dead,
               env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "run.forward_env: HF_TOKEN is not set in this environment" in r.stderr
    r = distft("submit", REPO / "configs" / "quickstart.yaml", "data.train=nope.jsonl", "--address", dead, env=env)
    assert r.returncode == 2 and "nope.jsonl" in r.stderr and "cannot reach" not in r.stderr
    r = distft("submit", REPO / "configs" / "quickstart.yaml", "--address", dead, env=env)
    assert r.returncode == 2 and "cannot reach a Ray job server at http://127.0.0.1:9" in r.stderr
    r = distft("jobs", "logs", env=env)
    assert r.returncode == 2 and "distft jobs logs needs a job id" in r.stderr


def test_the_address_given_wins_over_ray_api_server_address(monkeypatch):
    """Ray's clients let RAY_API_SERVER_ADDRESS override the address they are given; ours do not."""
    from ray.job_submission import JobSubmissionClient

    seen = []
    monkeypatch.setattr(JobSubmissionClient, "__init__", lambda self, url: seen.append(
        (url, __import__("os").environ.get("RAY_API_SERVER_ADDRESS"))))
    monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:1")
    jobs.connect("http://head:8265")
    assert seen == [("http://head:8265", None)]
    assert __import__("os").environ["RAY_API_SERVER_ADDRESS"] == "http://127.0.0.1:1"  # put back
