"""`distft export` (merged or not, in the dtype asked for) and `distft generate --adapter` (several adapters
on one base). Ray-free: the runs are the SFT stage in this process, a few steps each."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import write_jsonl
from distft.cli import main
from distft.config import build_config
from distft.distributed.checkpoint import verify_checkpoint
from distft.models.loading import load_for_inference
from distft.stages import StageContext, stage_runner


def train_run(base, rows, run_dir, method: dict, seed: int = 0, lr: float = 3e-3):
    raw = {"model": {"name_or_path": str(base), "max_seq_len": 64},
           "scaling": {"num_workers": 1, "torch_threads": 2}, "stage": "sft",
           "data": {"train": str(write_jsonl(run_dir.parent / f"{run_dir.name}.jsonl", rows)), "max_eval_samples": 8},
           "method": method, "evaluate": {"before": False},
           "train": {"lr": lr, "max_steps": 8, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 4,
                     "seed": seed}}
    stage_runner("sft")(build_config(raw), StageContext(run_dir=run_dir))
    (run_dir / "config.yaml").write_text("stage: sft\n")  # the run directory, as `distft train` leaves it
    (run_dir / "final").symlink_to("sft/final")
    return run_dir


@pytest.fixture(scope="module")
def lora_runs(tiny_base, tmp_path_factory):
    from distft.data.task import make_splits

    rows, _ = make_splits(n_train=64, n_test=2, seed=3)
    root = tmp_path_factory.mktemp("runs")
    method = {"name": "lora", "lora": {"r": 8, "alpha": 16}}
    return {"a": train_run(tiny_base, rows, root / "a", method, seed=0, lr=3e-3),
            "b": train_run(tiny_base, rows[::-1], root / "b", method, seed=1, lr=1e-2), "rows": rows, "root": root}


def logits(model, tok, text="Which animal is in this sentence? The red fox ran."):
    ids = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits.float()


def test_a_merged_export_is_a_plain_model_that_matches_the_adapter(lora_runs, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = lora_runs["a"]
    out32 = tmp_path / "merged32"
    assert main(["export", str(run), "--merge", "--dtype", "float32", "--out", str(out32)]) == 0
    assert f"exported merged model in float32: {out32}" in capsys.readouterr().out
    adapter_model, tok = load_for_inference(run / "sft")
    plain = AutoModelForCausalLM.from_pretrained(out32)  # plain transformers, no peft
    assert not hasattr(plain, "peft_config") and not (out32 / "adapter_config.json").exists()
    torch.testing.assert_close(logits(plain, AutoTokenizer.from_pretrained(out32)), logits(adapter_model, tok),
                               rtol=1e-4, atol=1e-4)
    assert not verify_checkpoint(out32) and (out32 / "generation_config.json").is_file()

    # The default dtype is bf16, and the default place is beside the run's final model.
    assert main(["export", str(run), "--merge"]) == 0
    bf16 = run / "export-merged"
    model = AutoModelForCausalLM.from_pretrained(bf16, dtype="auto")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert json.loads((bf16 / "distft_export.json").read_text())["merged"] is True
    torch.testing.assert_close(logits(model, tok), logits(plain, tok), rtol=0.05, atol=0.1)


def test_an_unmerged_export_is_the_adapter(lora_runs, tmp_path):
    out = tmp_path / "adapter"
    assert main(["export", str(lora_runs["a"]), "--out", str(out)]) == 0
    assert (out / "adapter_model.safetensors").is_file() and not (out / "model.safetensors").exists()
    assert not verify_checkpoint(out)


def test_export_refuses_a_damaged_model_an_existing_target_and_merging_virtual_tokens(lora_runs, tiny_base,
                                                                                      tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(lora_runs["a"], damaged, symlinks=True, ignore=shutil.ignore_patterns("export*"))
    weights = damaged / "sft" / "final" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-16])
    assert main(["export", str(damaged), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "does not match its manifest, so it is not exported" in err and "adapter_model.safetensors" in err
    assert not (damaged / "export-merged").exists()

    assert main(["export", str(lora_runs["a"]), "--out", str(lora_runs["root"])]) == 2
    assert "already exists" in capsys.readouterr().err

    prompt = train_run(tiny_base, lora_runs["rows"], tmp_path / "prompt",
                       {"name": "prompt_tuning", "prompt": {"num_virtual_tokens": 4}}, lr=3e-2)
    assert main(["export", str(prompt), "--merge"]) == 2
    assert "is a prompt_tuning adapter: its virtual tokens are an input" in capsys.readouterr().err


def test_qlora_merges_into_the_dequantized_base(tiny_base, lora_runs, tmp_path):
    pytest.importorskip("bitsandbytes")
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    run = train_run(tiny_base, lora_runs["rows"], tmp_path / "q", {"name": "qlora", "lora": {"r": 8, "alpha": 16}})
    out = tmp_path / "merged"
    assert main(["export", str(run), "--merge", "--dtype", "float32", "--out", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out)
    assert not any(p.__class__.__name__ == "Params4bit" for p in merged.parameters())
    # the adapter on the full-precision base: what the merge folded together
    unmerged = AutoPeftModelForCausalLM.from_pretrained(run / "sft" / "final", dtype=torch.float32)
    _, tok = load_for_inference(out)
    torch.testing.assert_close(logits(merged, tok), logits(unmerged, tok), rtol=1e-4, atol=1e-4)


def test_generate_switches_between_adapters_on_one_base(lora_runs, tiny_base, capsys):
    from distft.models.loading import load_with_adapters
    from distft.stages.evaluate import generate

    a, b = lora_runs["a"] / "sft" / "final", lora_runs["b"] / "sft" / "final"
    model, tok = load_with_adapters(tiny_base, {"a": str(a), "b": str(b)})
    prompt = ["Which animal is in this sentence? With seven friends, the orange duck reached Lima."]
    answers = {}
    for name, path in (("a", a), ("b", b)):
        model.set_adapter(name)
        alone, alone_tok = load_for_inference(path)
        torch.testing.assert_close(logits(model, tok), logits(alone, alone_tok), rtol=1e-5, atol=1e-5)
        answers[name] = generate(model, tok, prompt, max_new_tokens=4)[0].strip()
    assert main(["generate", str(tiny_base), "--adapter", f"a={a}", "--adapter", f"b={b}",
                 "--prompt", prompt[0], "--raw", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert out.index("[adapter a]") < out.index("[adapter b]")
    assert main(["generate", str(tiny_base), "--adapter", f"a{a}", "--prompt", "x"]) == 2
    assert "is not NAME=PATH" in capsys.readouterr().err


def test_generate_refuses_an_adapter_as_the_base_in_one_line(lora_runs):
    """As a user meets it: the `distft` command, exit 2, one line naming the fix, no traceback."""
    from faults import check_failure, run_distft

    a, b = lora_runs["a"] / "sft" / "final", lora_runs["b"] / "sft" / "final"
    r = run_distft("generate", a, "--adapter", f"b={b}", "--prompt", "x", timeout=300)
    # transformers' "Loading weights" progress (two lines) comes before the one error line
    check_failure(r, 2, ("is itself an adapter", "Fix: pass its base model"), max_lines=3)
    assert [ln for ln in r.stderr.splitlines() if ln.startswith("error:")] == [r.stderr.strip().splitlines()[-1]]
