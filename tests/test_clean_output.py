"""A clean successful run: no WARNING- or ERROR-level line the user cannot act on (issue 18, "Also").

The known-harmless notices (distft/stages/quiet.py) are dropped by their logger or warning category
and their text; everything else at those levels still shows. `noise_lines` is the one definition of
"noise", shared with the quickstart's end-to-end test (tests/test_ray_launch.py).
"""

from __future__ import annotations

import json
import re

from conftest import write_jsonl
from faults import assert_unchanged, run_distft, snapshot

# What a user reads as "something went wrong": log levels, Python warnings, absl/glog crash dumps and
# C++ log lines (glog's `E1206 05:37:14.817 ...` and Ray's `[2026-12-06 05:37:14,817 E 12624 12673]`).
NOISE = re.compile(
    r"WARNING|ERROR|Warning:|^\s*\*\*\* |\b[EF]\d{4} \d\d:\d\d|,\d{3} [EF] \d+ \d+\]|FutureWarning|UserWarning"
    r"|(?i:deprecat)"
)


def noise_lines(*texts: str) -> list[str]:
    """Every line of `texts` a user would read as a warning or an error."""
    return [line for text in texts for line in text.splitlines() if NOISE.search(line)]


def test_noise_pattern_catches_what_runs_used_to_print():
    seen_before = [
        "2026-12-06 05:36:50,592\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled",
        "(TrainController pid=12624) [2026-12-06 05:37:14,817 E 12624 12673] core_worker.cc:2465: Actor with "
        "class name: 'PreemptionWatcher'",
        "/x/torch/distributed/c10d_logger.py:83: FutureWarning: `torch.distributed.all_gather_into_tensor` is "
        "deprecated.",
        "[2026-12-06 05:34:47,838] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU.",
        "*** SIGTERM received at time=1765000000 on cpu 1 ***",
        "E1206 05:37:14.817000 12624 core_worker.cc:2465] something",
        "/x/transformers/modeling_utils.py:3303: FutureWarning: `is_gradient_checkpointing` is deprecated",
    ]
    assert noise_lines("\n".join(seen_before)) == seen_before
    assert noise_lines("[sft] step 20/20 (100%) eval_loss 1.537 | 2s elapsed\nexact match: 11.2% (67/600)") == []


def test_known_notices_are_dropped_and_the_rest_still_shows(caplog):
    """By logger and text: a different message from the same logger, or the same text elsewhere, shows."""
    import logging
    import warnings

    from distft.stages.quiet import quiet_notices

    quiet_notices(driver=True)
    cases = [
        ("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward from kernels-community: %s."),
        ("DeepSpeed", "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it."),
        ("ray._private.authentication.authentication_token_setup",
         "Token authentication is enabled for this Ray cluster. Set RAY_AUTH_MODE=disabled to opt out."),
    ]
    with caplog.at_level(logging.WARNING):
        for name, msg in cases:
            logging.getLogger(name).warning(msg, "x") if "%s" in msg else logging.getLogger(name).warning(msg)
            logging.getLogger(name).warning("something the user must see")
        logging.getLogger("distft.elsewhere").warning("Setting accelerator to CPU.")
    assert [r.getMessage() for r in caplog.records] == ["something the user must see"] * 3 + [
        "Setting accelerator to CPU."]

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        quiet_notices()  # re-installs its filters over the catch_warnings reset
        warnings.warn("`torch.distributed.all_gather_into_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.reduce_scatter_tensor` is deprecated. Please use ...", FutureWarning)
        warnings.warn("`torch.distributed.all_reduce` is deprecated. Please use ...", FutureWarning)
    assert [str(w.message) for w in seen] == ["`torch.distributed.all_reduce` is deprecated. Please use ..."]


def test_the_final_eval_line_is_printed_once(tmp_path):
    """The stage's evaluate() after a run that ended on an eval scores the same weights: one line, not two.
    A different value at the same step (the best checkpoint restored) still shows."""
    from types import SimpleNamespace

    from distft.stages.reporting import ReportCallback

    lines: list[str] = []
    cb = ReportCallback.__new__(ReportCallback)  # only what on_log reads: no checkpoints, no Ray
    cb.ctx = SimpleNamespace(is_main=True, log=lines.append, report=lambda *a, **k: None, stop_fn=None)
    cb.label, cb.training_over, cb.started, cb.start_step, cb.total_steps = "sft", False, 0.0, 0, 20
    cb.metrics = SimpleNamespace(write=lambda m: None, close=lambda: None)
    cb._last_shown = None
    state, control = SimpleNamespace(global_step=20, max_steps=20, epoch=1.0), SimpleNamespace()
    cb.on_log(None, state, control, logs={"loss": 2.8})
    cb.on_log(None, state, control, logs={"eval_loss": 1.537, "eval_runtime": 0.4})
    cb.on_log(None, state, control, logs={"train_loss": 3.1, "train_runtime": 9.0})  # the Trainer's summary
    cb.training_over = True
    cb.on_log(None, state, control, logs={"eval_loss": 1.537, "eval_runtime": 0.5})
    assert sum("eval_loss 1.537" in line for line in lines) == 1, lines
    cb.on_log(None, state, control, logs={"eval_loss": 1.2})  # another model evaluated at the same step
    assert sum("eval_loss 1.2" in line for line in lines) == 1, lines


def test_generate_eval_and_export_print_no_warnings(tiny_random, tmp_path):
    """The inference commands as users run them, on a model and a LoRA adapter of it: only their output.
    Each used to print bitsandbytes' `kernels-community` notice, transformers' `is_gradient_checkpointing`
    FutureWarning (peft's probe) and, when saving, DeepSpeed's `Setting accelerator to CPU` WARNING."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter = tmp_path / "adapter"
    net = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_random),
                         LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    net.save_pretrained(adapter)
    AutoTokenizer.from_pretrained(tiny_random).save_pretrained(adapter)
    data = write_jsonl(tmp_path / "held_out.jsonl", [
        {"instruction": "What is the capital of Ruritania?", "input": "", "output": "Strelsau"},
        {"instruction": "What colour is the sky?", "input": "", "output": "blue"},
    ])
    before = snapshot(tiny_random, adapter, data)

    runs = {
        "generate": run_distft("generate", adapter, "--prompt", "hello", "--max-new-tokens", "2"),
        "eval": run_distft("eval", tiny_random, "--data", data, "--max-new-tokens", "2"),
        "export": run_distft("export", adapter, "--merge", "--out", tmp_path / "merged"),
    }
    for name, r in runs.items():
        assert r.returncode == 0, f"{name}: exit {r.returncode}\n{r.stderr[-3000:]}"
        assert noise_lines(r.stdout, r.stderr) == [], f"{name} printed:\n{r.stderr[-3000:]}\n{r.stdout[-1000:]}"
    assert runs["generate"].stdout.splitlines()[0] == "> hello"
    assert "exact match:" in runs["eval"].stdout
    assert json.loads((tmp_path / "merged" / "config.json").read_text())["model_type"] == "llama"
    assert_unchanged(before, snapshot(tiny_random, adapter, data))


def test_a_new_classifier_head_is_said_once_and_a_damaged_body_still_reported(tmp_path):
    """classify: transformers' LOAD REPORT of the new head (a WARNING from every rank) becomes part of
    distft's own line on rank 0; body weights missing from the checkpoint still get transformers' report."""
    import logging

    from safetensors.torch import load_file, save_file
    from transformers import BertConfig, BertModel

    from distft.config.schema import MethodConfig, ModelConfig
    from distft.models.loading import load_classifier
    from distft.stages.quiet import quiet_libraries

    quiet_libraries()
    encoder = tmp_path / "encoder"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=100)).save_pretrained(encoder)

    class Shown(logging.Handler):  # what reaches transformers' handlers (its own stream is not pytest's)
        def emit(self, record):
            reports.append(record.getMessage())

    reports: list[str] = []
    said: list[str] = []
    shown, transformers_log = Shown(), logging.getLogger("transformers.modeling_utils")
    transformers_log.addHandler(shown)
    try:
        load_classifier(ModelConfig(name_or_path=str(encoder)), MethodConfig(name="full"), ["a", "b"],
                        log=said.append)
        assert not any("LOAD REPORT" in r for r in reports), reports
        assert "new head classifier.bias, classifier.weight" in said[-1], said

        weights = load_file(encoder / "model.safetensors")
        del weights["encoder.layer.0.output.dense.bias"]
        save_file(weights, encoder / "model.safetensors", metadata={"format": "pt"})
        load_classifier(ModelConfig(name_or_path=str(encoder)), MethodConfig(name="full"), ["a", "b"],
                        log=said.append)
    finally:
        transformers_log.removeHandler(shown)
    assert any("LOAD REPORT" in r and "bert.encoder.layer.0.output.dense.bias" in r for r in reports), reports
