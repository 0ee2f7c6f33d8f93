"""ASHA vs no early stopping, same search, same trial budget, side by side in one process.

    python benchmarks/tune_asha.py                 # 16 samples x 3 seeds, about 30 min on 2 cores
    python benchmarks/tune_asha.py --samples 8 --seeds 1   # a quick look

The search is configs/tune_quickstart.yaml's (learning rate x LoRA rank on the bundled task),
shortened to 40 steps with an eval every 5; ASHA judges at every eval from step 5 with the
default reduction factor 4 (rungs at steps 5 and 20). For each seed both schedulers get the same
16 sampled configs (the random search is seeded), run 2 at a time on one shared Ray cluster;
the order alternates per seed so drift on this noisy machine does not favour either.

Printed per seed and overall: the best final eval loss of each, the total optimizer steps
trained, the wall time, and the ratios ASHA / none. Target: ASHA's best within 2% of the
no-stopping best, at 40% or less of its steps. Wall time is reported as measured: each trial
here pays a fixed Ray Train start (about 15-20 s) that early stopping cannot save.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from distft.config.search import load_search  # noqa: E402

SHORT = ["train.max_steps=40", "train.eval_every=5", "train.save_every=40", "train.log_every=5",
         "evaluate.data=null", "tune.asha.grace_period=5", "tune.asha.reduction_factor=4"]


def run(scheduler: str, seed: int, samples: int, out: Path) -> dict:
    from distft.launch.tune import search

    raw, tune_cfg, cfg = load_search(str(REPO / "configs" / "tune_quickstart.yaml"),
                                     [*SHORT, f"tune.scheduler={scheduler}", f"tune.seed={seed}",
                                      f"tune.num_samples={samples}"])
    base = {k: copy.deepcopy(v) for k, v in raw.items() if k != "tune"}
    run_dir = out / f"seed{seed}-{scheduler}"
    run_dir.mkdir(parents=True)
    started = time.time()
    result = search(base, tune_cfg, cfg, run_dir, str(REPO), log=lambda *_: None)
    wall = time.time() - started
    rows = [r for r in result["rows"] if r["status"] in ("completed", "stopped")]
    if len(rows) != samples:
        raise SystemExit(f"{run_dir}: only {len(rows)} of {samples} trials finished: {result['rows']}")
    return {"best": min(r["final"] for r in rows), "steps": sum(int(r["steps"]) for r in rows),
            "stopped": sum(r["status"] == "stopped" for r in rows), "wall": wall}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--out", help="where the searches go (default: a temporary directory)")
    args = p.parse_args()

    import ray

    from distft.launch.session import start_private_ray
    from distft.models.bundled import tiny_base_dir

    tiny_base_dir()
    out = Path(args.out or tempfile.mkdtemp(prefix="tune-asha-"))
    # One cluster for every search, as `distft tune` builds it: a spare logical CPU for trial actors.
    start_private_ray((os.cpu_count() or 1) + 1, log_to_driver=False, logging_level="error")
    results = []
    for seed in range(args.seeds):
        order = ("asha", "none") if seed % 2 == 0 else ("none", "asha")
        got = {s: run(s, seed, args.samples, out) for s in order}
        results.append((seed, got["asha"], got["none"]))
        print(f"seed {seed}: asha {got['asha']}  none {got['none']}", flush=True)
    ray.shutdown()

    print(f"\n{args.samples} samples per search (train.lr x method.lora.r), 40 steps per trial, "
          f"2 trials at a time, {os.cpu_count()} cores; outputs in {out}\n")
    print("| seed | best eval_loss ASHA | best eval_loss none | ratio | steps ASHA | steps none | ratio "
          "| trials stopped | wall s ASHA | wall s none | ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    ratios = {"best": [], "steps": [], "wall": []}
    for seed, a, n in results:
        r = {k: a[k] / n[k] for k in ratios}
        for k in ratios:
            ratios[k].append(r[k])
        print(f"| {seed} | {a['best']:.4f} | {n['best']:.4f} | {r['best']:.3f} | {a['steps']} | {n['steps']} "
              f"| {r['steps']:.2f} | {a['stopped']}/{args.samples} | {a['wall']:.0f} | {n['wall']:.0f} "
              f"| {r['wall']:.2f} |")
    med = {k: statistics.median(v) for k, v in ratios.items()}
    print(f"| median | | | {med['best']:.3f} | | | {med['steps']:.2f} | | | | {med['wall']:.2f} |")
    ok = med["best"] <= 1.02 and med["steps"] <= 0.40
    print(f"\ntarget (best within 2%, steps <= 40%): {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
