"""How long training stands still per checkpoint: everything inline, against distft's background seal and upload.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/checkpoint_cost.py           # 3 alternating reps (~6 min)
    .venv/bin/python benchmarks/checkpoint_cost.py --reps 1 --hidden 256                 # a quick look

Every run is a real `distft train` (Ray Train, 1 CPU worker, full fine-tuning with AdamW, so
a checkpoint holds weights, optimizer moments and RNG state) of a randomly initialised Llama
built from a config, saving every `--save-every` steps to a `run.storage_path` on another filesystem (/dev/shm), so
Ray copies each checkpoint as it would to shared storage (on the run's own filesystem its copy is
hard links to the sealed checkpoint, and costs milliseconds).

Three modes, alternating within each repetition:

- `inline`: the seal (sha256 of every file into the manifest, fsync, rename) runs on the
  training thread (DISTFT_SYNC_HASH_MAX_BYTES=<huge>) and Ray copies the checkpoint to storage
  before `report` returns (DISTFT_SYNC_UPLOAD=1);
- `default`: what distft does unless told otherwise: the seal inline for checkpoints up to
  1 GiB (DISTFT_SYNC_HASH_MAX_BYTES), in the background above; the upload in the background;
- `background`: the seal runs on a background thread and registers at the next save
  (DISTFT_SYNC_HASH_MAX_BYTES=0) and Ray uploads a hard-linked snapshot while training goes on
  (CheckpointUploadMode.ASYNC), distft's path for large checkpoints.

The blocked time is what each run's summary records as `checkpoint_blocked_s`: from the last
training event before a save (step end, log or eval) until the save's report has returned. The
Trainer's own write of the files (torch.save / safetensors) is in both modes: nothing can
overlap it without copying the state first.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

BIN = Path(sys.executable).parent
MODES = {
    "inline": {"DISTFT_SYNC_HASH_MAX_BYTES": str(1 << 50), "DISTFT_SYNC_UPLOAD": "1"},
    "default": {"DISTFT_SYNC_UPLOAD": "0"},
    "background": {"DISTFT_SYNC_HASH_MAX_BYTES": "0", "DISTFT_SYNC_UPLOAD": "0"},
}


def clean_env() -> dict:
    """This environment without the two switches: each mode sets what it needs, `default` neither."""
    return {k: v for k, v in os.environ.items() if k not in ("DISTFT_SYNC_HASH_MAX_BYTES", "DISTFT_SYNC_UPLOAD")}


def write_config(path: Path, model: Path, storage: Path, a) -> None:
    import yaml

    cfg = {
        "model": {"name_or_path": str(model), "max_seq_len": 64},
        "scaling": {"num_workers": 1, "cpus_per_worker": 2, "torch_threads": 2},
        "stage": "pretrain",
        "data": {"train": str(REPO / "configs/data/stories.jsonl"), "eval_fraction": 0.02},
        "method": {"name": "full"},
        "train": {"lr": 1e-4, "max_steps": a.steps, "global_batch_size": 4, "micro_batch_size": 4,
                  "log_every": a.save_every, "save_every": a.save_every, "eval_every": 10 * a.steps},
        "run": {"storage_path": str(storage), "keep_checkpoints": 2},
    }
    path.write_text(yaml.safe_dump(cfg))


def run(config: Path, work: Path, name: str, mode: str) -> dict:
    shutil.rmtree(work / "runs" / name, ignore_errors=True)
    proc = subprocess.run([str(BIN / "distft"), "train", str(config), f"run.output_dir={work / 'runs'}",
                           f"run.name={name}"], env={**clean_env(), **MODES[mode]},
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode:
        sys.exit(f"distft train failed ({name}):\n{proc.stdout[-3000:]}")
    summary = json.loads((work / "runs" / name / "pretrain" / "summary.json").read_text())
    ckpt = max((work / "runs" / name / "pretrain" / "checkpoints").glob("checkpoint-*"),
               key=lambda p: int(p.name.split("-")[1]))
    size = sum(f.stat().st_size for f in ckpt.rglob("*") if f.is_file())
    return {"blocked": summary["checkpoint_blocked_s"], "bytes": size, "wall": summary["wall_seconds"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--save-every", type=int, default=4)
    a = p.parse_args()

    from distft.models.tiny import save_random_init

    work = Path(tempfile.mkdtemp(prefix="distft-ckpt-cost-"))
    model, config = work / "model", work / "ckpt.yaml"
    # Storage on another filesystem, as shared storage is: on the run's own filesystem Ray's copy is
    # hard links to the sealed checkpoint (milliseconds, nothing copied), and there is nothing to compare.
    shm = Path("/dev/shm")
    if shm.is_dir() and os.stat(shm).st_dev != os.stat(work).st_dev:
        storage_root = Path(tempfile.mkdtemp(prefix="distft-ckpt-cost-storage-", dir=shm))
    else:
        storage_root = work
        print("warning: no second filesystem (/dev/shm) here: Ray's copies will be hard links", flush=True)
    storage = storage_root / "storage"
    save_random_init(model, hidden=a.hidden, layers=a.layers)
    write_config(config, model, storage, a)
    results: dict[str, list[dict]] = {m: [] for m in MODES}
    try:
        for rep in range(a.reps):
            for mode in list(MODES)[rep % len(MODES):] + list(MODES)[:rep % len(MODES)]:
                r = run(config, work, f"{mode}-{rep}", mode)
                results[mode].append(r)
                print(f"rep {rep + 1}/{a.reps} {mode:10s}: blocked per checkpoint {r['blocked']} s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if storage_root != work:
            shutil.rmtree(storage_root, ignore_errors=True)

    size_mb = results["inline"][0]["bytes"] / 2**20
    per_mode = {m: [b for r in rs for b in r["blocked"]] for m, rs in results.items()}
    print("\n## Training blocked per checkpoint: inline seal + upload vs background\n")
    print(f"{platform.node()}, {os.cpu_count()} CPUs, {datetime.date.today()}; checkpoint {size_mb:.0f} MiB "
          f"(hidden {a.hidden}, {a.layers} layers, AdamW), {a.reps} alternating reps x "
          f"{a.steps // a.save_every} saves. Median (min-max) over all saves.\n")
    print("| mode | blocked s per checkpoint | ratio vs inline |")
    print("|---|---|---|")
    base = statistics.median(per_mode["inline"])
    for mode, values in per_mode.items():
        med = statistics.median(values)
        print(f"| {mode} | {med:.2f} ({min(values):.2f}-{max(values):.2f}) | {med / base:.2f} |")


if __name__ == "__main__":
    main()
