"""Every fine-tuning method on the same task and budget, side by side in one run.

    python benchmarks/methods.py [--epochs 3] [--heldout 200] [--only lora full] [--out DIR]

Two tasks, each from a pretrained model:
- the bundled "story facts" SFT task from the pretrained tiny base (configs/quickstart.yaml's
  data, batch and schedule; held-out exact match on unseen sentences);
- topic classification on the real MiniLM-L6 (configs/classify_minilm.yaml; held-out accuracy
  and macro F1 on topic words never seen in training).

Each method runs in a fresh child process (one process, 2 torch threads, Ray-free, so the
numbers are the method's own), which reports: trainable parameters, the held-out metric, the
mean training step time (the Trainer's train_runtime over its steps), and the peak RSS above the
child's baseline after its imports (so it holds the model as loaded, 4-bit for QLoRA, plus what
training adds: gradients, optimizer states, activations).
Learning rates differ by method family (what each needs, written below); everything else is equal.
The last lines give each method's quality as a fraction of full fine-tuning's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# (name, method section, learning rate): adapters with few parameters need larger steps.
SFT_METHODS = [
    ("full", {"name": "full"}, 1e-3),
    ("freeze", {"name": "freeze", "freeze": {"trainable_layers": 2}}, 1e-3),
    ("bitfit", {"name": "bitfit"}, 1e-2),
    ("lora", {"name": "lora", "lora": {"r": 16, "alpha": 32}}, 3e-3),
    ("dora", {"name": "dora", "lora": {"r": 16, "alpha": 32}}, 3e-3),
    ("rslora", {"name": "rslora", "lora": {"r": 16, "alpha": 8}}, 3e-3),  # alpha/sqrt(r) = 2, as LoRA's 32/16
    ("qlora", {"name": "qlora", "lora": {"r": 16, "alpha": 32}}, 3e-3),
    ("ia3", {"name": "ia3"}, 3e-2),
    ("prompt_tuning", {"name": "prompt_tuning", "prompt": {"num_virtual_tokens": 20}}, 3e-2),
    ("prefix_tuning", {"name": "prefix_tuning", "prompt": {"num_virtual_tokens": 20}}, 1e-2),
]
CLASSIFY_METHODS = [
    ("full", {"name": "full"}, 5e-5),
    ("freeze", {"name": "freeze", "freeze": {"trainable_layers": 2}}, 2e-4),
    ("bitfit", {"name": "bitfit"}, 1e-3),
    ("lora", {"name": "lora", "lora": {"r": 16, "alpha": 32}}, 5e-4),
    ("dora", {"name": "dora", "lora": {"r": 16, "alpha": 32}}, 5e-4),
]

CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from distft.config import load_config
from distft.launch.preflight import absolutize_paths
from distft.stages import StageContext, stage_runner
from distft.models.bundled import tiny_base_dir

config, overrides, run_dir, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
cfg = absolutize_paths(load_config(config, overrides), Path(config).resolve().parents[1])
if cfg.model.name_or_path == "distft://tiny-base":
    cfg.model.name_or_path = str(tiny_base_dir())
import psutil
import peft, torch, transformers, trl  # noqa: E401,F401  (before the baseline: every method pays for them alike)
baseline = psutil.Process().memory_info().rss
ctx = StageContext(run_dir=Path(run_dir))
try:
    summary = stage_runner(cfg.stages[0].stage)(cfg, ctx)
except Exception as e:
    Path(out).write_text(json.dumps({"error": f"{type(e).__name__}: {str(e).splitlines()[0]}"}))
    sys.exit(0)
runtime = next(m["train_runtime"] for m in ctx.reported if "train_runtime" in m)
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
Path(out).write_text(json.dumps({"summary": summary, "step_s": runtime / max(summary["steps"], 1),
                                 "peak_above_baseline": peak - baseline}))
"""


def run_one(config: Path, overrides: list[str], work: Path, name: str) -> dict:
    out = work / f"{name}.json"
    subprocess.run([sys.executable, "-c", CHILD, str(config), json.dumps(overrides), str(work / name), str(out)],
                   check=True, cwd=REPO)
    return json.loads(out.read_text())


SFT_HELDOUT = 200  # held-out items scored per SFT method
EPOCHS = 5  # the quickstart's recipe


def run_method(kind: str, name: str, seed: int, work: Path, epochs: float = EPOCHS,
               heldout: int = SFT_HELDOUT) -> dict:
    """One method on one task ("sft": the story facts, "classify": MiniLM topics) with `train.seed=seed`,
    in a fresh process; adds `value`, the held-out metric."""
    one_process = ["scaling.num_workers=1", "scaling.torch_threads=2", f"train.epochs={epochs}",
                   f"train.seed={seed}", "evaluate.before=false"]
    work.mkdir(parents=True, exist_ok=True)
    if kind == "sft":
        method, lr = next((m, lr) for n, m, lr in SFT_METHODS if n == name)
        r = run_one(REPO / "configs" / "quickstart.yaml",
                    [*one_process, f"method={json.dumps(method)}", f"train.lr={lr}",
                     f"evaluate.max_samples={heldout}"], work, f"sft-{name}")
        key = "exact_match_after"
    else:
        method, lr = next((m, lr) for n, m, lr in CLASSIFY_METHODS if n == name)
        r = run_one(REPO / "configs" / "classify_minilm.yaml",
                    [*one_process, f"method={json.dumps(method)}", f"train.lr={lr}", "train.early_stopping=null"],
                    work, f"classify-{name}")
        key = "accuracy_after"
    if "summary" in r:
        r["value"] = r["summary"][key]
    return r


def table(title: str, metric: str, rows: list[tuple[str, dict]]) -> list[str]:
    lines = [f"\n{title}", f"| method | trainable params | {metric} | step time | peak RSS above baseline |",
             "|---|---|---|---|---|"]
    for name, r in rows:
        if "error" in r:
            lines.append(f"| {name} | - | refused: {r['error'][:90]} | - | - |")
            continue
        s = r["summary"]
        share = 100 * s["trainable_params"] / s["total_params"]
        lines.append(f"| {name} | {s['trainable_params']:,} ({share:.2f}%) | {r['value']:.1%} | "
                     f"{1000 * r['step_s']:.0f} ms | {r['peak_above_baseline'] / 2**20:.0f} MiB |")
    full = next((r["value"] for n, r in rows if n == "full" and "error" not in r), None)
    if full:
        ratios = ", ".join(f"{n} {r['value'] / full:.2f}" for n, r in rows if "error" not in r and n != "full")
        lines.append(f"\nquality as a fraction of full fine-tuning: {ratios}")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--heldout", type=int, default=SFT_HELDOUT, help="held-out items scored per SFT method")
    p.add_argument("--seed", type=int, default=0, help="train.seed of every run (make figures runs 3 seeds)")
    p.add_argument("--only", nargs="*", help="run only these methods")
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    args = p.parse_args()
    work = Path(args.out or tempfile.mkdtemp(prefix="distft-methods-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = (lambda n: n in args.only) if args.only else (lambda n: True)

    sft_rows = []
    for name, _, _ in SFT_METHODS:
        if keep(name):
            r = run_method("sft", name, args.seed, work, args.epochs, args.heldout)
            sft_rows.append((name, r))
            print(f"sft {name}: {r.get('value', r.get('error'))}", flush=True)
    cls_rows = []
    for name, _, _ in CLASSIFY_METHODS:
        if keep(name):
            r = run_method("classify", name, args.seed, work, args.epochs)
            cls_rows.append((name, r))
            print(f"classify {name}: {r.get('value', r.get('error'))}", flush=True)

    lines = table(f"Story facts SFT from the pretrained tiny base ({args.epochs:g} epochs, held-out exact match on "
                  f"{args.heldout} unseen sentences)", "held-out exact match", sft_rows)
    lines += table(f"Topic classification on MiniLM-L6 ({args.epochs:g} epochs, 400 held-out rows, topic words "
                   "unseen in training)", "held-out accuracy", cls_rows)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
