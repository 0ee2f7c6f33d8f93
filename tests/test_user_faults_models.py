"""Models that cannot load (issue 18, items 5 and 6): refused on the driver, before Ray starts.

Each case spawns the real `distft` command (tests/faults.py) on a model fault made for real: a
hub id that is neither a directory nor cached while the hub is offline or unreachable, a
safetensors file cut short, a directory holding only config.json, an architecture without the
configured attention implementation. Every case proves first that its fault is in effect, then
asserts exit 2, at most 5 stderr lines naming the file or field and the fix, no traceback, every
file present before byte-identical after, and (for `train`) no run directory left behind. No
Ray: all of this is found before any cluster is asked for. Below the table, function-level tests
of the checks and of QLoRA's "quantize or refuse".
"""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pytest
from faults import assert_unchanged, check_failure, run_distft, snapshot, user_env

HUB_MISS = "is not a local directory, not in the Hugging Face cache, and the hub is unreachable"


def _closed_port() -> int:
    """A local port nothing listens on: the 'hub' there refuses every connection at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_random) -> Path:
    """A config, its data, a run directory, an empty HF cache, and broken copies of a tiny model."""
    from distft.data.task import make_splits

    root = tmp_path_factory.mktemp("models")
    train, _ = make_splits(n_train=16, n_test=2, seed=3)
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (root / "c.yaml").write_text(
        f"model:\n  name_or_path: {tiny_random}\n  max_seq_len: 64\nscaling:\n  num_workers: 1\n"
        f"stage: sft\ndata:\n  train: {root / 'train.jsonl'}\n"
        "train:\n  epochs: 1\n  global_batch_size: 8\n  micro_batch_size: 8\n")
    (root / "runs").mkdir()
    (root / "hf-home").mkdir()  # the user's cache, empty: nothing the hub would serve is here
    shutil.copytree(tiny_random, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    shutil.copytree(tiny_random, root / "bad-tokenizer")
    tok = root / "bad-tokenizer" / "tokenizer.json"
    tok.write_bytes(tok.read_bytes()[: tok.stat().st_size // 2])
    (root / "config-only").mkdir()
    shutil.copy(tiny_random / "config.json", root / "config-only" / "config.json")
    _tiny_granite_swa(root / "granite-swa", tiny_random)
    return root


def _tiny_granite_swa(out: Path, tokenizer_dir: Path) -> None:
    """A Granite-SWA (a Llama-family decoder that transformers 5.19 runs only with eager attention), tiny."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GraniteSWAConfig

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    config = GraniteSWAConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=2, pad_token_id=tok.pad_token_id,
                              bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(out))
    tok.save_pretrained(str(out))


# --- proofs that each fault is in effect -------------------------------------------------------------

def _not_cached_and_offline(w: Path, env: dict) -> None:
    from huggingface_hub import try_to_load_from_cache

    assert env["HF_HUB_OFFLINE"] == "1" and not (w / "tiny-bas").exists()
    assert try_to_load_from_cache("tiny-bas", "config.json", cache_dir=Path(env["HF_HOME"]) / "hub") is None


def _hub_refuses(w: Path, env: dict) -> None:
    port = int(env["HF_ENDPOINT"].rsplit(":", 1)[1])
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    assert env["HF_HUB_OFFLINE"] == "0"


def _truncated(w: Path, env: dict) -> None:
    from safetensors import safe_open

    # safetensors' own reader refuses the file
    with pytest.raises(Exception), safe_open(str(w / "truncated" / "model.safetensors"), "pt") as f:  # noqa: B017
        [f.get_tensor(k) for k in f.keys()]  # noqa: SIM118


def _config_only(w: Path, env: dict) -> None:
    assert sorted(p.name for p in (w / "config-only").iterdir()) == ["config.json"]


def _tokenizer_cut(w: Path, env: dict) -> None:
    from tokenizers import Tokenizer

    with pytest.raises(Exception):  # noqa: B017 - the tokenizers library refuses the file
        Tokenizer.from_file(str(w / "bad-tokenizer" / "tokenizer.json"))


def _no_sdpa(w: Path, env: dict) -> None:
    from transformers import GraniteSWAForCausalLM

    assert GraniteSWAForCausalLM._supports_sdpa is False
    assert json.loads((w / "granite-swa" / "config.json").read_text())["model_type"] == "granite_swa"


OFFLINE = {"HF_HUB_OFFLINE": "1"}
UNREACHABLE = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "closed"}

# (id, argv with $W for the scratch directory, extra environment, proof, phrases)
CASES = [
    ("validate-mistyped-hub-id", "validate $W/c.yaml model.name_or_path=tiny-bas", OFFLINE, _not_cached_and_offline,
     ("model.name_or_path: 'tiny-bas' " + HUB_MISS, "(offline", "Fix: a local path, or a hub id that exists")),
    ("train-mistyped-hub-id", "train $W/c.yaml model.name_or_path=tiny-bas", OFFLINE, _not_cached_and_offline,
     ("model.name_or_path: 'tiny-bas' " + HUB_MISS, "Fix: ")),
    ("validate-hub-unreachable", "validate $W/c.yaml model.name_or_path=owner/tiny-bas", UNREACHABLE, _hub_refuses,
     ("model.name_or_path: 'owner/tiny-bas' " + HUB_MISS, "Fix: ")),
    ("validate-truncated-weights", "validate $W/c.yaml model.name_or_path=$W/truncated", OFFLINE, _truncated,
     ("model.name_or_path: $W/truncated/model.safetensors is truncated (", "header says", "Fix: ")),
    ("train-truncated-weights", "train $W/c.yaml model.name_or_path=$W/truncated", OFFLINE, _truncated,
     ("model.name_or_path: $W/truncated/model.safetensors is truncated (", "Fix: ")),
    ("validate-config-json-only", "validate $W/c.yaml model.name_or_path=$W/config-only", OFFLINE, _config_only,
     ("model.name_or_path: $W/config-only has a config.json but no weights", "Fix: ")),
    ("train-config-json-only", "train $W/c.yaml model.name_or_path=$W/config-only", OFFLINE, _config_only,
     ("model.name_or_path: $W/config-only has a config.json but no weights", "Fix: ")),
    ("validate-tokenizer-cut-short", "validate $W/c.yaml model.name_or_path=$W/bad-tokenizer", OFFLINE, _tokenizer_cut,
     ("model.name_or_path: $W/bad-tokenizer: its tokenizer does not load (", "Fix: ")),
    ("validate-attention-unsupported", "validate $W/c.yaml model.name_or_path=$W/granite-swa", OFFLINE, _no_sdpa,
     ("model.attn_implementation=sdpa: GraniteSWAForCausalLM", "Fix: model.attn_implementation=eager")),
    ("train-attention-unsupported", "train $W/c.yaml model.name_or_path=$W/granite-swa", OFFLINE, _no_sdpa,
     ("model.attn_implementation=sdpa: GraniteSWAForCausalLM", "Fix: model.attn_implementation=eager")),
    ("generate-truncated-weights", "generate $W/truncated --prompt hello", OFFLINE, _truncated,
     ("$W/truncated/model.safetensors is truncated (", "Fix: ")),
    ("eval-truncated-weights", "eval $W/truncated --data $W/train.jsonl", OFFLINE, _truncated,
     ("$W/truncated/model.safetensors is truncated (", "Fix: ")),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_a_model_that_cannot_load_is_refused_before_ray_in_one_line(case, world):
    _, argv, extra, proof, phrases = case
    env = user_env(HF_HOME=world / "hf-home", **extra)
    if env.get("HF_ENDPOINT") == "closed":
        env["HF_ENDPOINT"] = f"http://127.0.0.1:{_closed_port()}"
    proof(world, env)
    args = argv.replace("$W", str(world)).split()
    if args[0] == "train":
        args.append(f"run.output_dir={world / 'runs'}")
    before = snapshot(world)
    r = run_distft(*args, env=env, cwd=world, timeout=120)
    check_failure(r, 2, tuple(p.replace("$W", str(world)) for p in phrases))
    assert_unchanged(before, snapshot(world), allow_new=(world / "hf-home" / "datasets",))  # datasets' own cache
    assert list((world / "runs").iterdir()) == []  # no run directory blocks the name afterwards
    assert "config OK" not in r.stdout


# --- function level ---------------------------------------------------------------------------------

def test_the_header_check_finds_cut_padded_and_missing_shards(tmp_path, tiny_random):
    from transformers import AutoModelForCausalLM

    from distft.models.verify import model_dir_problem, safetensors_problem

    assert model_dir_problem(tiny_random) is None
    padded = tmp_path / "padded.safetensors"
    padded.write_bytes((tiny_random / "model.safetensors").read_bytes() + b"\0" * 7)
    assert "is damaged (" in safetensors_problem(padded)
    stub = tmp_path / "stub.safetensors"
    stub.write_bytes(b"\x10\0\0")
    assert "its header is cut off" in safetensors_problem(stub)
    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(str(tiny_random)).save_pretrained(str(sharded), max_shard_size="200KB")
    shards = sorted(sharded.glob("model-*.safetensors"))
    assert len(shards) > 1 and model_dir_problem(sharded) is None
    shards[-1].unlink()
    assert f"{shards[-1]} is missing (1 of the {len(shards)} shards" in model_dir_problem(sharded)


def test_attention_names_the_setting_that_works():
    from distft.models.verify import attention_problem

    assert attention_problem({"model_type": "llama"}, "sdpa", use_gpu=False) is None
    assert "Fix: model.attn_implementation=eager" in attention_problem({"model_type": "gpt_neo"}, "sdpa", False)
    assert "runs only on GPUs" in attention_problem({"model_type": "llama"}, "flash_attention_2", use_gpu=False)
    assert attention_problem({"model_type": "gemma2"}, "eager", use_gpu=False) is None
    # Remote code is not run on the driver: such a model is left to the workers.
    assert attention_problem({"model_type": "custom", "auto_map": {}}, "sdpa", False, trust_remote_code=True) is None


def test_the_bundled_tiny_base_is_checked_without_importing_transformers(tmp_path, tiny_base):
    """The quickstart's model: the shipped files are checked against their manifest's hashes, and validate
    pays no import of transformers for it. A copy stands in for the installed package's directory, so the
    damage lands on the copy."""
    import subprocess
    import sys

    shutil.copytree(tiny_base, tmp_path / "tiny_base")
    code = ("import sys; from pathlib import Path; import distft.models.bundled as b; "
            f"b.TINY_BASE_DIR = Path({str(tmp_path / 'tiny_base')!r}); "
            "from distft.config import load_config; from distft.launch.preflight import check_model; "
            "print(check_model(load_config('configs/quickstart.yaml', [])), 'transformers' in sys.modules)")

    def check() -> list[str]:
        r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1], text=True,
                           capture_output=True, env=user_env(), timeout=120, check=False)
        assert r.returncode == 0, r.stderr[-2000:]
        return r.stdout.rsplit("]", 1)

    problems, imported = check()
    assert problems == "[" and imported.strip() == "False"
    weights = tmp_path / "tiny_base" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    problems, _ = check()
    assert f"model.name_or_path: distft://tiny-base: {weights} does not match the sha256 its manifest" in problems


def test_qlora_quantizes_a_llama(tiny_random):
    pytest.importorskip("bitsandbytes")
    import bitsandbytes as bnb

    from distft.config.schema import MethodConfig, ModelConfig
    from distft.models.loading import load_model

    said = []
    net = load_model(ModelConfig(name_or_path=str(tiny_random)), MethodConfig(name="qlora"), log=said.append)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in net.modules())
    assert any(s.startswith("qlora: 14 of 15 linear layers stored in 4 bits") for s in said), said


def test_qlora_refuses_when_transformers_replaces_no_layer(tiny_random, monkeypatch):
    """What transformers 5.23 did to an architecture with fused linear layers, faked on a Llama: the
    bitsandbytes quantizer ran and replaced nothing."""
    pytest.importorskip("bitsandbytes")
    import transformers.integrations

    from distft.config.schema import MethodConfig, ModelConfig
    from distft.models.loading import load_model
    from distft.models.methods import MethodError

    monkeypatch.setattr(transformers.integrations, "replace_with_bnb_linear", lambda model, *a, **k: model)
    with pytest.raises(MethodError, match=r"no layer of LlamaForCausalLM \(model type llama\) was quantized to 4 bits"
                                          r" \(0 of its 15 nn.Linear"):
        load_model(ModelConfig(name_or_path=str(tiny_random)), MethodConfig(name="qlora"))


def test_export_of_a_model_directory_with_truncated_weights_is_one_line(tiny_random, tmp_path):
    """A plain model directory (no manifest) is checked like preflight checks it, before anything is built."""
    import shutil

    from faults import assert_unchanged, check_failure, run_distft, snapshot

    model = tmp_path / "model"
    shutil.copytree(tiny_random, model)
    weights = model / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    before = snapshot(tmp_path)
    r = run_distft("export", model, "--out", tmp_path / "out")
    check_failure(r, 2, (f"error: {weights} is truncated", "Fix: download or export the model again"))
    assert_unchanged(before, snapshot(tmp_path))
