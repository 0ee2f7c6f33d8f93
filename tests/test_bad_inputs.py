"""Bad input, command by command: one clear line naming the field (or argument) and the fix.

Each row is the arguments of one `distft` command and a fragment its error must contain. Every
row must also fail with exit code 2, print no traceback, start no Ray process and create no run
directory: a mistake costs nothing, and nothing already written is touched. The rows run
in-process through `distft.cli.main` (a subprocess each would cost seconds of imports).
"""

from __future__ import annotations

import psutil
import pytest
import yaml

from conftest import REPO, write_jsonl
from distft.cli import main

RLHF = str(REPO / "configs" / "rlhf_quickstart.yaml")
BIG = str(REPO / "configs" / "llama8b" / "rlhf.yaml")
LLAMA8B = str(REPO / "configs" / "models" / "meta-llama" / "Llama-3.1-8B-Instruct")  # config.json only

# (arguments, fragment). $C: a valid one-stage SFT config, $T: a scratch directory holding the files below.
ROWS = [
    # config: keys, types, ranges, combinations
    ("validate $C train.lrr=1", "train.lrr: unknown key; did you mean `lr`?"),
    ("validate $C train.lr=fast", "train.lr: Input should be a valid number"),
    ("validate $C train.lr=-1", "train.lr: Input should be greater than 0 (got -1)"),
    ("validate $C train.max_steps=0", "train.max_steps: Input should be greater than or equal to 1"),
    ("validate $C train.warmup_ratio=1", "train.warmup_ratio: Input should be less than 1 (got 1)"),
    ("validate $C train.optimizer=adam", "(got 'adam')"),
    ("validate $C train.global_batch_size=10 train.micro_batch_size=4",
     "train.global_batch_size: 10 is not a multiple of train.micro_batch_size x scaling.num_workers"),
    ("validate $C scaling.num_workers=0", "scaling.num_workers: Input should be greater than or equal to 1"),
    ("validate $C scaling.num_workers=[2,1]", "scaling.num_workers: [min, max] needs 1 <= min <= max (got [2, 1])"),
    ("validate $C scaling.cpus_per_worker=0", "scaling.cpus_per_worker: Input should be greater than 0"),
    ("validate $C model.dtype=float8", "model.dtype: Input should be"),
    ("validate $C model.max_seq_len=0", "model.max_seq_len: Input should be greater than or equal to 8"),
    ("validate $C method.name=lorra", "(got 'lorra')"),
    ("validate $C method.lora.r=0", "method.lora.r: Input should be greater than or equal to 1 (got 0)"),
    ("validate $C method.lora.target_modules=everything",
     "method.lora.target_modules: 'all-linear' or a list of module names"),
    ("validate $C strategy.name=deepspeed strategy.zero_stage=4", "strategy.zero_stage: Input should be 0, 1, 2 or 3"),
    ("validate $C strategy.name=fsdp method.name=qlora", "strategy.name: fsdp with method.name=qlora"),
    ("validate $C strategy.name=fsdp method.name=prompt_tuning",
     "strategy: method.name=prompt_tuning is not supported under fsdp by distft (supported: ddp, deepspeed-zero0"),
    ("validate $C stage=reward data.format=preference method.name=ia3", "ia3 is supported by distft in stage(s) sft"),
    ("validate $C method.name=freeze method.freeze.unfreeze_every=10 strategy.name=deepspeed",
     "gradual unfreezing (method.freeze.unfreeze_every) masks gradients itself"),
    (f"validate $C model.name_or_path={LLAMA8B} method.name=bitfit",
     "method.name=bitfit trains only bias terms, and LlamaForCausalLM has none"),
    (f"validate $C model.name_or_path={LLAMA8B} method.name=freeze method.freeze.trainable_layers=40",
     "method.freeze.trainable_layers=40, but LlamaForCausalLM has 32 blocks"),
    ("validate $C method.name=qlora method.quantization.bits=8",
     "method.quantization.bits: 8-bit (LLM.int8) weights need bitsandbytes' CUDA kernels"),
    ("validate $C train.optimizer=paged_adamw_8bit", "paged_adamw_8bit (bitsandbytes) pages or quantizes"),
    ("validate $C run.keep_checkpoints=0", "run.keep_checkpoints: Input should be greater than or equal to 1"),
    ("validate $C train.early_stopping.patience=2 train.eval_every=10",
     "train.early_stopping keeps the best checkpoint, so every eval needs one"),
    ("validate $C train.early_stopping.metric=loss", "train.early_stopping.metric: 'loss' is not an eval metric"),
    ("validate $C run.name=../../etc", "run.name: '../../etc' is not a plain directory name"),
    ("validate $C run.forward_env=[hf_abc=1]", "run.forward_env: item 0 is not an environment variable name"),
    ("validate $C run.forward_env=[DISTFT_NOT_SET_XYZ]", "run.forward_env: DISTFT_NOT_SET_XYZ is not set in this"),
    ("validate $C noequals", "override 'noequals' is not of the form a.b=value"),
    (f"validate {RLHF} stages.2.strategy.name=fsdp", "stages.2.strategy.name: the ppo stage runs under ddp or deepspeed"),
    # config files
    ("validate $T/missing.yaml", "config file not found: "),
    ("validate $T/tab.yaml", "malformed YAML at line 3"),
    ("validate $T/list.yaml", "the top level must be a mapping of sections, got list"),
    # data: missing, corrupt, empty, wrong kind, a row without its field
    ("validate $C data.train=./missing.jsonl", "data.train: file not found: "),
    ("validate $C evaluate.data=$T/missing.jsonl", "evaluate.data: file not found: "),
    ("validate $C data.train=$T/corrupt.jsonl", "data.train: $T/corrupt.jsonl line 2 is not valid JSON"),
    ("validate $C data.train=$T/empty.jsonl", "data.train: $T/empty.jsonl is empty"),
    ("validate $C data.train=$T/c.yaml", "has an unsupported extension"),
    ("validate $C data.train=$T/holed.jsonl", "data.train: $T/holed.jsonl row 42: field `instruction` is missing"),
    ("validate $C data.format=preference", "row 1: field `chosen` is missing (format preference)"),
    ("validate $C stage=dpo", "has format alpaca, but stage dpo trains on preference pairs"),
    ("validate $C stage=classify", "row 1: field `label` is missing (format classification)"),
    ("validate $C stage=classify data.format=auto", "has format alpaca, but stage classify trains on text + label"),
    (f"validate $C data.train={REPO}/configs/data/topics_train.jsonl",
     "holds text + label rows for classification, which stage sft cannot train on"),
    # resources and the model
    ("validate $C scaling.num_workers=64 train.global_batch_size=512",
     "scaling: 64 workers x 1 CPUs = 64 CPUs, but this machine has"),
    ("validate $C model.name_or_path=/nonexistent/model", "model.name_or_path: /nonexistent/model does not exist"),
    ("validate $C model.name_or_path=$T/pickled", "has its weights only as pickle (pytorch_model.bin), which can run"),
    ("train $C --address 127.0.0.1:1 run.output_dir=$T/runs", "run.address: nothing answers at 127.0.0.1:1"),
    ("train $C train.lrr=1 run.output_dir=$T/runs", "train.lrr: unknown key"),
    # commands and their arguments
    ("train", "distft train needs a config"),
    ("train $C --resume $T", "give a config (distft train CONFIG) or --resume RUN_DIR, not both"),
    ("resume $T/nope", "$T/nope is not a distft run directory (no config.yaml)"),
    (f"pipeline {RLHF} --force nosuch", "--force nosuch: no such stage; this config has sft, reward, ppo"),
    ("tune $C", "tune: missing. Fix: add a `tune:` section"),
    ("tune $T/tune.yaml", "tune.space.train.lr"),
    ("tune --resume $T/nope", "$T/nope is not a search directory (no search.json)"),
    (f"plan {BIG} --gpu-memory lots", "argument --gpu-memory: 'lots' is not a memory size like 80GiB"),
    (f"plan {BIG} --gpus 0", "argument --gpus: '0' is not a whole number of at least 1"),
    ("submit $C --address http://127.0.0.1:1", "cannot reach a Ray job server at http://127.0.0.1:1"),
    ("jobs status", "distft jobs status needs a job id"),
    ("jobs logs some-id --address http://127.0.0.1:1", "cannot reach a Ray job server at http://127.0.0.1:1"),
    ("cluster up --workers 0", "--workers and --cpus-per-worker must be at least 1"),
    ("cluster status", "no distft cluster is up"),
    ("runs show $T/absent", "no run directory at $T/absent"),
    ("runs show $T/nope", "$T/nope is not a distft run directory (no config.yaml)"),
    ("generate $T/absent --prompt hi", "no model at $T/absent"),
    ("generate $T/nope --prompt hi", "$T/nope is not a model directory (no config.json or adapter_config.json)"),
    ("eval $T/absent --data $T/train.jsonl", "no model at $T/absent"),
    ("generate $T/nope --adapter oops --prompt hi", "--adapter 'oops' is not NAME=PATH"),
    ("export $T/absent", "no model at $T/absent"),
    ("export $T/nope --merge", "no model at $T/nope"),
    ("eval $T --data $T/missing.jsonl", "--data: file not found: $T/missing.jsonl"),
]


@pytest.fixture()
def scratch(tmp_path, alpaca_rows, monkeypatch):
    monkeypatch.setenv("DISTFT_CACHE", str(tmp_path / "cache"))  # no cluster state, no tiny base
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.delenv("DISTFT_NOT_SET_XYZ", raising=False)
    write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    holed = [dict(r) for r in alpaca_rows]
    del holed[41]["instruction"]
    write_jsonl(tmp_path / "holed.jsonl", holed)
    (tmp_path / "corrupt.jsonl").write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c", "outp\n')
    (tmp_path / "empty.jsonl").write_text("")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "tab.yaml").write_text("stage: sft\ndata:\n\ttrain: x\n")
    base = {"scaling": {"num_workers": 1}, "stage": "sft", "data": {"train": str(tmp_path / "train.jsonl")}}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(base))
    (tmp_path / "tune.yaml").write_text(yaml.safe_dump({**base, "tune": {"space": {"train.lr": {"logunifrom": [1, 2]}}}}))
    (tmp_path / "nope").mkdir()
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not loaded")
    return tmp_path


def ray_processes() -> set[int]:
    """Ray daemons this process started (a private cluster is its child; other tests' clusters are not)."""
    return {p.pid for p in psutil.Process().children(recursive=True) if p.name() in ("raylet", "gcs_server")}


@pytest.mark.parametrize("args, fragment", ROWS, ids=[r[0].split()[0] + ":" + r[1][:40] for r in ROWS])
def test_bad_input_gets_one_clear_message(args, fragment, scratch, capsys):
    if "use_gpu" in args:
        pytest.importorskip("torch").cuda.is_available() and pytest.skip("a GPU is here")
    before = {p.name for p in scratch.iterdir()}
    ray_before = ray_processes()
    argv = [a.replace("$C", str(scratch / "c.yaml")).replace("$T", str(scratch)) for a in args.split()]
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    out, err = capsys.readouterr()
    assert code == 2, (code, out[-2000:], err[-2000:])
    assert fragment.replace("$T", str(scratch)) in err, err
    assert "Traceback" not in out + err
    assert {p.name for p in scratch.iterdir()} == before  # no run directory, nothing else written
    assert ray_processes() <= ray_before  # no cluster was started for it


def test_there_is_a_row_for_every_command():
    from distft.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices) - {"tiny-model"}
    assert commands <= {r[0].split()[0] for r in ROWS}
    assert len(ROWS) >= 30


def test_trust_remote_code_is_announced_by_model(scratch, capsys):
    assert main(["validate", str(scratch / "c.yaml")]) == 0
    assert "trust_remote_code" not in capsys.readouterr().err
    assert main(["validate", str(scratch / "c.yaml"), "model.trust_remote_code=true"]) == 0
    err = capsys.readouterr().err
    assert "warning: model.trust_remote_code is on: Python code shipped with distft://tiny-base runs on every" in err
