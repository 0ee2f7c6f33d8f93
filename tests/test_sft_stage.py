"""The SFT and pretrain stages, run in-process without Ray: learning, reporting, export, resume."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from conftest import write_jsonl
from distft.config import build_config
from distft.models.loading import load_for_inference
from distft.stages import StageContext, stage_runner
from distft.stages.evaluate import generate


def make_cfg(model_dir, train_file, stage="sft", **train):
    return build_config(
        {
            "model": {"name_or_path": str(model_dir), "max_seq_len": 64},
            "scaling": {"num_workers": 1, "torch_threads": 2},
            "stage": stage,
            "data": {"train": str(train_file), "eval_fraction": 0.1, "max_eval_samples": 16},
            "method": {"name": "lora", "lora": {"r": 8, "alpha": 16}} if stage == "sft" else {"name": "full"},
            "train": {"lr": 3e-3, "global_batch_size": 8, "micro_batch_size": 8, "log_every": 5, **train},
        }
    )


def logged(ctx, key):
    return [m[key] for m in ctx.reported if key in m and "stage_done" not in m]


def test_lora_sft_learns_reports_and_exports_an_adapter(tiny_base, alpaca_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    cfg = make_cfg(tiny_base, train, max_steps=40, eval_every=20)
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("sft")(cfg, ctx)

    losses = logged(ctx, "loss")
    assert losses[-1] < 0.6 * losses[0], losses
    assert len(logged(ctx, "eval_loss")) >= 2  # reported at every eval, not only at checkpoints
    assert summary["steps"] == 40 and summary["trainable_params"] < summary["total_params"]

    final = tmp_path / "run" / "sft" / "final"
    assert (final / "adapter_model.safetensors").exists() and (final / "adapter_config.json").exists()
    saved = yaml.safe_load((final / "distft_config.yaml").read_text())
    assert saved["stages"][0]["train"]["max_steps"] == 40
    lines = [json.loads(line) for line in (tmp_path / "run" / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval_loss" in line for line in lines)

    model, tok = load_for_inference(tmp_path / "run" / "sft")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Which animal is in this sentence?"}],
                                     tokenize=False, add_generation_prompt=True)
    (answer,) = generate(model, tok, [prompt], max_new_tokens=4)
    assert answer.strip()


def test_pretrain_full_finetune_on_text(tiny_random, tmp_path):
    from distft.models.tiny import generic_corpus

    corpus = write_jsonl(tmp_path / "c.jsonl", [{"text": t} for t in generic_corpus(200, seed=5)])
    cfg = make_cfg(tiny_random, corpus, stage="pretrain", max_steps=30)
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("pretrain")(cfg, ctx)
    losses = logged(ctx, "loss")
    assert losses[-1] < 0.7 * losses[0]
    assert summary["method"] == "full" and summary["trainable_params"] == summary["total_params"]
    assert (tmp_path / "run" / "pretrain" / "final" / "model.safetensors").exists()


def test_resume_continues_at_the_next_step_with_the_same_losses(tiny_random, alpaca_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    cfg = make_cfg(tiny_random, train, max_steps=20, save_every=10, log_every=1)
    full = StageContext(run_dir=tmp_path / "full")
    stage_runner("sft")(cfg, full)

    ckpt = tmp_path / "full" / "sft" / "checkpoints" / "checkpoint-10"
    assert (ckpt / "distft_config.yaml").exists()
    resumed = StageContext(run_dir=tmp_path / "resumed", resume_from=str(ckpt))
    stage_runner("sft")(cfg, resumed)

    steps = [m["step"] for m in resumed.reported if "loss" in m]
    assert steps[0] == 11 and steps[-1] == 20
    want = {m["step"]: m["loss"] for m in full.reported if "loss" in m}
    for m in resumed.reported:
        if "loss" in m:
            assert m["loss"] == pytest.approx(want[m["step"]], rel=1e-4)

    lr_full = {m["step"]: m["learning_rate"] for m in full.reported if "learning_rate" in m}
    lr_resumed = {m["step"]: m["learning_rate"] for m in resumed.reported if "learning_rate" in m}
    assert all(lr_resumed[s] == pytest.approx(lr_full[s]) for s in lr_resumed)


@pytest.mark.gpu
def test_lora_sft_on_gpu_in_bf16_without_ray(tiny_base, alpaca_rows, tmp_path):
    """Ray-free, so it runs on a GPU box where Ray cannot be installed (see NOTES)."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    cfg = make_cfg(tiny_base, train, max_steps=30)
    cfg.scaling.use_gpu = True
    cfg.model.dtype = "bfloat16"
    ctx = StageContext(run_dir=tmp_path / "run")
    stage_runner("sft")(cfg, ctx)
    losses = logged(ctx, "loss")
    assert losses[-1] < 0.6 * losses[0]


@pytest.mark.parametrize("method, lr, export", [
    ({"name": "freeze", "freeze": {"trainable_layers": 1}}, 1e-3, "model.safetensors"),
    ({"name": "dora", "lora": {"r": 8, "alpha": 16}}, 3e-3, "adapter_model.safetensors"),
    ({"name": "ia3"}, 3e-2, "adapter_model.safetensors"),
    ({"name": "prompt_tuning", "prompt": {"num_virtual_tokens": 8}}, 3e-2, "adapter_model.safetensors"),
    ({"name": "prefix_tuning", "prompt": {"num_virtual_tokens": 8}}, 1e-2, "adapter_model.safetensors"),
], ids=lambda v: v["name"] if isinstance(v, dict) else None)
def test_each_method_trains_exports_and_reloads_through_the_sft_stage(method, lr, export, tiny_base, alpaca_rows,
                                                                     tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    raw = make_cfg(tiny_base, train, max_steps=20).model_dump(mode="json")
    raw["stages"][0]["method"] = method
    raw["stages"][0]["train"]["lr"] = lr
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("sft")(build_config(raw), ctx)
    losses = logged(ctx, "loss")
    assert losses[-1] < losses[0], losses
    assert summary["method"] == method["name"] and 0 < summary["trainable_params"] < summary["total_params"]
    final = tmp_path / "run" / "sft" / "final"
    assert (final / export).exists()
    model, tok = load_for_inference(tmp_path / "run" / "sft")
    (answer,) = generate(model, tok, ["Which animal is in this sentence? The red fox ran."], max_new_tokens=4)
    assert isinstance(answer, str)


def test_early_stopping_exports_the_best_checkpoint_and_the_summary_flags_overfitting(tiny_random, alpaca_rows,
                                                                                     tmp_path):
    """Full fine-tuning of a random model on 24 rows overfits fast: eval loss turns up, training stops after
    `patience` evals without improvement, and the exported model is the best checkpoint's, kept through
    rotation (keep_checkpoints=1) while later ones came and went."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows[:24])
    held = write_jsonl(tmp_path / "held.jsonl", alpaca_rows[100:140])
    raw = make_cfg(tiny_random, train, max_steps=80, eval_every=3, save_every=3).model_dump(mode="json")
    st = raw["stages"][0]
    st["data"].update(eval=str(held), max_eval_samples=40)
    st["method"] = {"name": "full"}
    st["train"].update(lr=3e-3, early_stopping={"metric": "eval_loss", "patience": 2}, overfit_gap=0.3)
    raw["run"] = {"keep_checkpoints": 1}
    ctx = StageContext(run_dir=tmp_path / "run")
    summary = stage_runner("sft")(build_config(raw), ctx)

    evals = [(m["step"], m["eval_loss"]) for m in ctx.reported if "eval_loss" in m and "stage_done" not in m]
    best_step, best = min(evals[:-1], key=lambda e: e[1])  # the last entry is the evaluation after training
    assert summary["early_stopped_at"] is not None and summary["steps"] == summary["early_stopped_at"] < 80
    assert summary["best_step"] == best_step and summary["best_metric"] == pytest.approx(best)
    assert summary["early_stopped_at"] == best_step + 2 * 3  # two evals without improvement
    assert summary["eval_loss"] == pytest.approx(best, rel=1e-4)  # evaluated after the best was loaded back
    assert summary["overfitting"] is True and summary["loss_gap"] > summary["loss_gap_smallest"] + 0.3

    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    kept = sorted(p.name for p in ckpts.glob("checkpoint-*"))
    assert f"checkpoint-{best_step}" in kept and f"checkpoint-{summary['steps']}" in kept
    exported = load_file(tmp_path / "run" / "sft" / "final" / "model.safetensors")
    best_weights = load_file(ckpts / f"checkpoint-{best_step}" / "model.safetensors")
    assert exported.keys() == best_weights.keys()
    assert all(torch.equal(exported[k], best_weights[k]) for k in exported)


def test_gradual_unfreezing_trains_blocks_top_down_on_its_schedule(tiny_random, alpaca_rows, tmp_path):
    """Head only for steps 1-2, then the top block too for 3-4, then both blocks: checked on the checkpoints
    of every phase, with weight decay on (still blocks must not even decay)."""
    from safetensors.torch import load_file

    train = write_jsonl(tmp_path / "train.jsonl", alpaca_rows)
    raw = make_cfg(tiny_random, train, max_steps=6, save_every=2, eval_every=100).model_dump(mode="json")
    st = raw["stages"][0]
    st["method"] = {"name": "freeze", "freeze": {"trainable_layers": 0, "unfreeze_every": 2}}
    st["train"].update(weight_decay=0.1, lr=1e-3)
    raw["run"] = {"keep_checkpoints": 5}
    ctx = StageContext(run_dir=tmp_path / "run")
    stage_runner("sft")(build_config(raw), ctx)

    ckpts = tmp_path / "run" / "sft" / "checkpoints"
    states = [load_file(tiny_random / "model.safetensors")] + [
        load_file(ckpts / f"checkpoint-{s}" / "model.safetensors") for s in (2, 4, 6)]

    def changed(a, b):
        return {".".join(k.split(".")[:3]) if k.startswith("model.layers.") else k.removesuffix(".weight")
                for k in a if not torch.equal(a[k], b[k])}

    head = "model.embed_tokens"  # the tiny model ties its head to the input embeddings
    assert changed(states[0], states[1]) == {head}
    assert changed(states[1], states[2]) == {head, "model.layers.1"}
    assert changed(states[2], states[3]) == {head, "model.layers.1", "model.layers.0"}
    assert torch.equal(states[0]["model.norm.weight"], states[3]["model.norm.weight"])  # never scheduled


def test_known_library_notices_stay_out_of_the_logs_and_other_warnings_do_not(caplog):
    """bitsandbytes' optional-kernel notice and peft's probe of a deprecated transformers name repeat in every
    worker of every run; anything else from those libraries still shows."""
    import logging
    import warnings

    from distft.stages.quiet import quiet_libraries

    quiet_libraries()
    bnb = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        bnb.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please ...", "no kernels")
        bnb.warning("something else went wrong")
    assert [r.getMessage() for r in caplog.records] == ["something else went wrong"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_libraries()  # re-installs its filters over the catch_warnings reset
        warnings.warn("`is_gradient_checkpointing` is deprecated and will be removed in v6.", FutureWarning)
        warnings.warn("`other_name` is deprecated", FutureWarning)
    assert [str(w.message) for w in seen] == ["`other_name` is deprecated"]
