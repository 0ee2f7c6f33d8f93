"""Tokens/s and MFU of full fine-tuning on one GPU: distft's SFT stage against a bare transformers Trainer.

    .venv/bin/python benchmarks/mfu.py --out mfu.json                              # GPU: ~0.85B Llama, seq 2048, bf16
    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/mfu.py --smoke --out /tmp/mfu-smoke.json   # CPU, < 2 min

The model is a Llama-architecture decoder built from a config (random init, nothing
downloaded): hidden 2048, 16 layers, 32 heads with 8 KV heads (GQA), MLP 5632, vocab 32000,
untied LM head, about 0.85B parameters. It is saved once in HF safetensors format
(`save_pretrained`, bf16) under the distft cache, and both runners load it from there with
sdpa attention in bf16 (`bf16=True`, pure bf16 weights and AdamW states, as `model.dtype:
bfloat16` gives in distft).

Two runners, each in a fresh process, Ray-free (the script never imports Ray and checks that
nothing it ran did):
- distft: the real SFT stage (`distft.stages.sft.run`) with a config pointing at the saved
  model, full fine-tuning, text rows that tokenize past seq and are truncated to it, so every
  row is exactly seq tokens and nothing is padded or packed;
- bare: a plain `transformers.Trainer` on the same model with the arguments a user would
  write for the same job (same batch, AdamW torch, cosine schedule, grad clipping at 1.0,
  bf16, gradient checkpointing on or off), fed fixed-length random token ids.
Each of {bare, distft} x {gradient checkpointing off, on} runs --reps times, alternating.

A step's time is the wall time between consecutive optimizer steps, with a CUDA synchronize at
each step end; the first --warmup steps of a run are left out and the median of the rest is the
run's step time. tokens/s = batch x seq / step time. Over repetitions the table shows the median
and the min-max range.

MFU = flops per token x tokens/s / peak, with the PaLM (appendix B) / nanoGPT count:
    flops per token = 6 N + 12 n_layers hidden seq
N: the parameters that take part in a matmul per token, i.e. every parameter except the input
embedding table (the untied LM head is counted; norms too, negligibly). 6 N is the forward (2 N)
and backward (4 N) of the weight matmuls; 12 n_layers hidden seq is the attention scores and
weighted sum (QK^T and AV, forward and backward), counted over the full seq x seq square as the
convention does, although a causal kernel skips half of it. Recomputation under gradient
checkpointing is not counted (model FLOPs, not hardware FLOPs), so checkpointing lowers MFU.
Peak: dense bf16 tensor-core FLOP/s by card name (PEAKS below), or --peak-tflops.
Targets: distft >= 0.98 x the bare Trainer's tokens/s (its step at most 1.02x, issue 21), and MFU >= 40%.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import ClassVar

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

SPEED_TARGET, MFU_TARGET = 0.98, 0.40
# Dense bf16 tensor-core peaks from the vendors' data sheets (no sparsity); first match wins.
PEAKS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12),
         ("L40S", 362e12), ("A10G", 125e12), ("L4", 121e12)]
FULL = {"hidden": 2048, "layers": 16, "heads": 32, "kv_heads": 8, "mlp": 5632, "vocab": 32000, "seq": 2048,
        "batch": 8, "steps": 30, "warmup": 10, "reps": 3, "dtype": "bfloat16", "threads": 8}
# --smoke: proves the whole path on a CPU in under 2 minutes; two repetitions (both runner orders),
# since each run's fresh process spends ~8 s importing torch, transformers and TRL here.
SMOKE = {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 4, "mlp": 172, "vocab": 1024, "seq": 128,
         "batch": 2, "steps": 6, "warmup": 2, "reps": 2, "dtype": "float32", "threads": 2}
RUNNERS = ("bare", "distft")


class MeasurementDone(Exception):
    """Raised after the last measured step: neither runner's evaluation or save is timed."""


class Clock:
    """Per-step wall times of the run in this process."""

    steps: ClassVar[list[float]] = []
    last: ClassVar[float | None] = None  # when the previous step ended (the first: when it began)
    max_steps: ClassVar[int] = 0


def clocked(base):
    """`base` (a TrainerCallback class) plus a clock at every optimizer step, stopping the run after the last."""
    import torch

    def now() -> float:
        if torch.cuda.is_available():
            torch.cuda.synchronize()  # the step's kernels have run, not only been queued
        return time.perf_counter()

    class Clocked(base):
        def on_step_begin(self, args, state, control, **kwargs):
            if Clock.last is None:
                Clock.last = now()
            return super().on_step_begin(args, state, control, **kwargs)

        def on_step_end(self, args, state, control, **kwargs):
            result = super().on_step_end(args, state, control, **kwargs)
            t = now()
            Clock.steps.append(t - Clock.last)
            Clock.last = t
            if state.global_step >= Clock.max_steps:
                raise MeasurementDone
            return result

    return Clocked


def build_model(shape: dict) -> Path:
    """A random-init Llama plus distft's small BPE tokenizer, saved once per shape under the distft cache."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from distft.models.loading import cache_dir
    from distft.models.tiny import generic_corpus, train_tokenizer

    name = "bench-mfu-h{hidden}-l{layers}-a{heads}-kv{kv_heads}-m{mlp}-v{vocab}-s{seq}-{dtype}".format(**shape)
    out = cache_dir() / name
    if (out / "config.json").exists():
        return out
    tokenizer = train_tokenizer(generic_corpus(1000))
    if len(tokenizer) > shape["vocab"]:
        raise ValueError(f"vocab {shape['vocab']} is smaller than the tokenizer's {len(tokenizer)} tokens")
    config = LlamaConfig(
        vocab_size=shape["vocab"], hidden_size=shape["hidden"], intermediate_size=shape["mlp"],
        num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
        max_position_embeddings=shape["seq"], tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, shape["dtype"]))
    cache_dir().mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir(), prefix=".bench-"))
    model.save_pretrained(tmp)  # safetensors
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # atomic: a half-written model is never picked up
    return out


def flops_per_token(shape: dict, matmul_params: int) -> float:
    return 6 * matmul_params + 12 * shape["layers"] * shape["hidden"] * shape["seq"]


def count_matmul_params(model_dir: Path) -> tuple[int, int]:
    """(all parameters, all but the input embedding table), counted on the meta device (no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    total = sum(p.numel() for p in model.parameters())
    return total, total - model.get_input_embeddings().weight.numel()


def text_rows(n: int, words_per_row: int, seed: int) -> list[dict]:
    """Rows of corpus words; every word is at least one token, so each row tokenizes past words_per_row."""
    from distft.models.tiny import generic_corpus

    rng = random.Random(seed)
    words = " ".join(generic_corpus(500, seed=seed)).split()
    return [{"text": " ".join(rng.choice(words) for _ in range(words_per_row))} for _ in range(n)]


def _bare(spec: dict) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments, default_data_collator

    shape, gpu = spec["shape"], spec["gpu"]
    torch.set_num_threads(shape["threads"])
    model = AutoModelForCausalLM.from_pretrained(spec["model_dir"], dtype=getattr(torch, shape["dtype"]),
                                                 attn_implementation="sdpa")
    rng = random.Random(0)
    rows = shape["batch"] * shape["steps"]
    ids = [[rng.randrange(model.config.vocab_size) for _ in range(shape["seq"])] for _ in range(rows)]
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(
        output_dir=spec["run_dir"], per_device_train_batch_size=shape["batch"], max_steps=shape["steps"],
        learning_rate=1e-5, optim="adamw_torch", lr_scheduler_type="cosine", max_grad_norm=1.0,
        bf16=shape["dtype"] == "bfloat16", gradient_checkpointing=spec["ckpt"], use_cpu=not gpu,
        logging_steps=10_000, save_strategy="no", report_to="none", disable_tqdm=True, seed=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator,
                      callbacks=[clocked(TrainerCallback)()])
    try:
        trainer.train()
    except MeasurementDone:
        pass


def _distft(spec: dict) -> None:
    from distft.config import build_config
    from distft.stages import sft
    from distft.stages import trainer_setup as setup
    from distft.stages.context import StageContext

    shape = spec["shape"]
    cfg = build_config({
        "model": {"name_or_path": spec["model_dir"], "max_seq_len": shape["seq"], "dtype": shape["dtype"],
                  "attn_implementation": "sdpa"},
        "scaling": {"num_workers": 1, "use_gpu": spec["gpu"], "torch_threads": shape["threads"]},
        "stage": "sft",
        "method": {"name": "full"},
        "data": {"train": spec["data"], "format": "text", "max_eval_samples": 2},
        "evaluate": {"data": None},
        "strategy": {"gradient_checkpointing": spec["ckpt"]},
        "train": {"max_steps": shape["steps"], "global_batch_size": shape["batch"], "micro_batch_size": shape["batch"],
                  "lr": 1e-5, "log_every": 10_000, "save_every": 10_000, "eval_every": 10_000, "seed": 0},
    })
    # trainer_setup.stage_callbacks looks this name up when the stage builds its callbacks.
    setup.ReportCallback = clocked(setup.ReportCallback)
    try:
        sft.run(cfg, StageContext(run_dir=Path(spec["run_dir"])))
    except MeasurementDone:
        pass


def _child(spec_json: str, out: str) -> None:
    spec = json.loads(spec_json)
    Clock.steps, Clock.last, Clock.max_steps = [], None, spec["shape"]["steps"]
    (_bare if spec["runner"] == "bare" else _distft)(spec)
    import torch

    peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    Path(out).write_text(json.dumps({"step_s": Clock.steps, "ray_imported": "ray" in sys.modules,
                                     "peak_gpu_bytes": peak}))


def run_once(spec: dict, work: Path, name: str) -> dict:
    """One runner in a fresh process: a clean CUDA context and allocator for every run."""
    out = work / f"{name}.json"
    spec = {**spec, "run_dir": str(work / name)}
    proc = mp.get_context("spawn").Process(target=_child, args=(json.dumps(spec), str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"run {name} failed (exit code {proc.exitcode}); its output is above")
    return json.loads(out.read_text())


def device_name(gpu: bool) -> str:
    import torch

    if gpu:
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores (CPU)"


def peak_flops(name: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    return next((peak for key, peak in PEAKS if key in name), None)


def spread(values: list[float], fmt: str) -> str:
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def summarize(results: dict, shape: dict, fpt: float, peak: float | None) -> list[dict]:
    rows = []
    tokens_per_step = shape["batch"] * shape["seq"]
    for ckpt in (False, True):
        per_runner = {}
        for runner in RUNNERS:
            runs = results[(runner, ckpt)]
            step_s = [statistics.median(r["step_s"][shape["warmup"]:]) for r in runs]
            tps = [tokens_per_step / s for s in step_s]
            per_runner[runner] = tps
            rows.append({"runner": runner, "grad_ckpt": ckpt, "step_s": step_s, "tokens_per_s": tps,
                         "mfu": [fpt * t / peak for t in tps] if peak else None,
                         "peak_gpu_bytes": [r["peak_gpu_bytes"] for r in runs]})
        # Paired by repetition: the two runners ran back to back.
        rows[-1]["vs_bare"] = [d / b for b, d in zip(per_runner["bare"], per_runner["distft"])]
    return rows


def report(rows: list[dict], shape: dict, card: str, peak: float | None, params: tuple[int, int],
           fpt: float) -> str:
    lines = [
        f"card: {card}   date: {datetime.date.today().isoformat()}   peak: "
        + (f"{peak / 1e12:.0f} TFLOP/s bf16 dense" if peak else "unknown (MFU n/a; pass --peak-tflops)"),
        f"model: Llama, hidden {shape['hidden']}, {shape['layers']} layers, {shape['heads']} heads "
        f"({shape['kv_heads']} KV), MLP {shape['mlp']}, vocab {shape['vocab']}; {params[0] / 1e6:,.1f}M parameters, "
        f"N = {params[1] / 1e6:,.1f}M without the input embedding",
        f"seq {shape['seq']}, batch {shape['batch']} ({shape['batch'] * shape['seq']:,} tokens/step), "
        f"{shape['dtype']}, sdpa; {shape['steps']} steps per run, first {shape['warmup']} left out; "
        f"{shape['reps']} alternating repetitions; median (min-max)",
        f"flops/token = 6N + 12 L h s = {fpt / 1e9:.3f} GFLOP",
        "",
        "| runner | grad ckpt | step time | tokens/s | MFU | distft / bare |",
        "|---|---|---|---|---|---|",
    ]
    checks = []
    for r in rows:
        mfu = spread([100 * m for m in r["mfu"]], "{:.1f}") + " %" if r["mfu"] else "n/a"
        ratio = spread(r["vs_bare"], "{:.3f}") if "vs_bare" in r else ""
        lines.append(f"| {r['runner']} | {'on' if r['grad_ckpt'] else 'off'} "
                     f"| {spread([1000 * s for s in r['step_s']], '{:,.0f}')} ms "
                     f"| {spread(r['tokens_per_s'], '{:,.0f}')} | {mfu} | {ratio} |")
        if r["runner"] == "distft":
            ckpt = "on" if r["grad_ckpt"] else "off"
            speed = statistics.median(r["vs_bare"])
            checks.append(f"grad ckpt {ckpt}: distft / bare = {speed:.3f} (target >= {SPEED_TARGET}: "
                          f"{'met' if speed >= SPEED_TARGET else 'MISSED'})")
            if r["mfu"]:
                mfu_v = statistics.median(r["mfu"])
                checks.append(f"grad ckpt {ckpt}: distft MFU = {100 * mfu_v:.1f}% (target >= {100 * MFU_TARGET:.0f}%: "
                              f"{'met' if mfu_v >= MFU_TARGET else 'MISSED'})")
    return "\n".join(lines + [""] + checks)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, tiny model (hidden 64, 2 layers, seq 128, fp32, 6 steps)")
    for key in ("batch", "steps", "warmup", "reps", "seq", "threads"):
        p.add_argument(f"--{key}", type=int, help=f"override the preset's {key}")
    p.add_argument("--peak-tflops", type=float, help="the card's peak dense bf16 TFLOP/s, when its name is not known")
    p.add_argument("--out", type=Path, help="write the table's numbers and every run's step times here (JSON)")
    args = p.parse_args()
    shape = dict(SMOKE if args.smoke else FULL)
    shape.update({k: getattr(args, k) for k in ("batch", "steps", "warmup", "reps", "seq", "threads")
                  if getattr(args, k) is not None})
    if shape["steps"] - shape["warmup"] < 2:
        p.error("--steps must exceed --warmup by at least 2")

    import torch

    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        p.error("no CUDA device: the full benchmark needs a GPU (use --smoke to check the script on a CPU)")
    started = time.time()
    model_dir = build_model(shape)
    params = count_matmul_params(model_dir)
    fpt = flops_per_token(shape, params[1])
    card = device_name(gpu)
    peak = peak_flops(card, args.peak_tflops) if gpu or args.peak_tflops else None
    print(f"model: {model_dir} ({time.time() - started:.0f}s)", flush=True)

    results: dict = {(runner, ckpt): [] for runner in RUNNERS for ckpt in (False, True)}
    with tempfile.TemporaryDirectory(prefix="distft-mfu-") as tmp:
        work = Path(tmp)
        data = work / "train.jsonl"
        rows = text_rows(shape["batch"] * shape["steps"] + 16, shape["seq"], seed=0)  # + the 5% eval split
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        base = {"model_dir": str(model_dir), "data": str(data), "shape": shape, "gpu": gpu}
        for rep in range(shape["reps"]):
            for ckpt in (False, True):
                # Alternate which runner goes first, so a drift of the machine does not favour one.
                for runner in RUNNERS if rep % 2 == 0 else RUNNERS[::-1]:
                    t0 = time.time()
                    r = run_once({**base, "runner": runner, "ckpt": ckpt}, work, f"{runner}-{ckpt}-{rep}")
                    if r["ray_imported"]:
                        raise RuntimeError(f"the {runner} run imported ray; this benchmark must run Ray-free")
                    results[(runner, ckpt)].append(r)
                    step = statistics.median(r["step_s"][shape["warmup"]:])
                    print(f"[rep {rep + 1}/{shape['reps']}] {runner}, grad ckpt {'on' if ckpt else 'off'}: "
                          f"{1000 * step:,.0f} ms/step, {shape['batch'] * shape['seq'] / step:,.0f} tokens/s "
                          f"({time.time() - t0:.0f}s)", flush=True)

    if "ray" in sys.modules:
        raise RuntimeError("this process imported ray; the benchmark must run Ray-free")
    summary = summarize(results, shape, fpt, peak)
    import transformers
    import trl

    print()
    print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"trl {trl.__version__}; ray imported by any run: no")
    print(report(summary, shape, card, peak, params, fpt))
    print(f"benchmark wall time: {time.time() - started:.0f}s")
    if args.out:
        args.out.write_text(json.dumps({
            "card": card, "date": datetime.date.today().isoformat(), "shape": shape, "params": params[0],
            "matmul_params": params[1], "flops_per_token": fpt, "peak_flops": peak,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
            "rows": summary,
            "runs": {f"{runner}-ckpt_{'on' if ckpt else 'off'}": runs for (runner, ckpt), runs in results.items()},
        }, indent=2))


if __name__ == "__main__":
    main()
