"""What each way of fine-tuning costs in forgetting: the task gained against what the base forgot.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/forgetting.py            # 3 seeds (~15 min)
    .venv/bin/python benchmarks/forgetting.py --seeds 0 --only "full lr 1e-3" lora-r8   # a quick look

The task is the quickstart's (the story facts, from the shipped tiny base: its data, batch, schedule
and held-out sentences), trained for `--epochs` in one process with 2 torch threads, Ray-free (each
run in a fresh child process, benchmarks/methods.py's harness). Every method sees the same rows, in
the same order per seed, for the same number of steps (replay puts general text in 10% of the
rows, so that run sees fewer task rows in those steps: the price of replay at a fixed budget).
- gain: held-out exact match after training minus before (the base scores 0%: it has never seen
  the instruction format);
- forgetting: the relative rise of the base's perplexity on its own held-out pretraining documents
  (the default retain set, `distft://tiny-base/heldout`, 240 documents), before -> after; distft
  flags a stage above `evaluate.forgetting_tolerance` (10%).
One row per method: the mean over seeds and the range (min-max). `--plot` draws gain against
forgetting, one point per method and seed.

The claims this tests (from the articles the project grew from): PEFT forgets less than full
fine-tuning, a lower learning rate forgets less, and replaying general text forgets less.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from methods import run_one  # noqa: E402  (the child-process harness every method benchmark shares)

EPOCHS = 2.0  # of the task's rows, as optimizer steps: 2 x 3800 / 32 = 238
TASK_ROWS, BATCH = 3800, 32  # configs/quickstart.yaml: facts_train.jsonl less its 5% eval split; global batch
HELDOUT = 200
RETAIN = {"data": "distft://tiny-base/heldout", "name": "base"}  # the default, named: the child loads the base by path
REPLAY = {"source": "distft://tiny-base/corpus", "fraction": 0.1}
# (name, method section, learning rate, replay): the quickstart's LoRA rate for adapters and full alike, so the
# learning rate is the only difference between the two full rows.
METHODS = [
    ("full lr 1e-3", {"name": "full"}, 1e-3, None),
    ("full lr 1e-4", {"name": "full"}, 1e-4, None),
    ("full lr 1e-3, 10% replay", {"name": "full"}, 1e-3, REPLAY),
    ("freeze (top block + head)", {"name": "freeze", "freeze": {"trainable_layers": 1}}, 1e-3, None),
    # The tiny base has 2 blocks: the head first, then one block more every 80 steps (a third of the run).
    ("gradual unfreezing", {"name": "freeze", "freeze": {"trainable_layers": 0, "unfreeze_every": 80}}, 1e-3, None),
    ("lora r8", {"name": "lora", "lora": {"r": 8, "alpha": 16}}, 1e-3, None),
    ("lora r64", {"name": "lora", "lora": {"r": 64, "alpha": 128}}, 1e-3, None),
    ("qlora r16", {"name": "qlora", "lora": {"r": 16, "alpha": 32}}, 1e-3, None),
]


def run_method(name: str, seed: int, epochs: float, heldout: int, work: Path) -> dict:
    method, lr, replay = next((m, lr, rp) for n, m, lr, rp in METHODS if n == name)
    # Steps, not epochs: replay adds rows, and every method gets the same number of optimizer steps.
    steps = round(epochs * TASK_ROWS / BATCH)
    overrides = ["scaling.num_workers=1", "scaling.torch_threads=2", f"train.max_steps={steps}", f"train.seed={seed}",
                 f"method={json.dumps(method)}", f"train.lr={lr}", f"evaluate.max_samples={heldout}",
                 f"evaluate.retain={json.dumps([RETAIN])}"]
    if replay:
        overrides.append(f"data.replay={json.dumps(replay)}")
    slug = name.replace(" ", "-").replace(",", "").replace("%", "pct").replace("(", "").replace(")", "")
    r = run_one(REPO / "configs" / "quickstart.yaml", overrides, work, f"{slug}-s{seed}")
    if "summary" not in r:
        return r
    s = r["summary"]
    (retain,) = s["retain"]
    return {"gain": s["exact_match_after"] - s["exact_match_before"], "after": s["exact_match_after"],
            "forgetting": retain["after"] / retain["before"] - 1, "ppl_before": retain["before"],
            "ppl_after": retain["after"], "flagged": s["forgetting"], "steps": s["steps"],
            "trainable": s["trainable_params"] / s["total_params"], "rows": s.get("train_rows")}


def spread(values: list[float], fmt: str) -> str:
    mean = statistics.mean(values)
    return format(mean, fmt) + (f" ({format(min(values), fmt)} to {format(max(values), fmt)})" if len(values) > 1 else "")


def table(results: dict[str, list[dict]], seeds: list[int]) -> list[str]:
    lines = ["| method | trainable | held-out exact match after | gain | base perplexity, relative change | "
             "flagged (of seeds) |", "|---|---|---|---|---|---|"]
    for name, runs in results.items():
        ok = [r for r in runs if "gain" in r]
        if not ok:
            lines.append(f"| {name} | - | failed: {runs[0].get('error', '?')[:80]} | - | - | - |")
            continue
        lines.append(f"| {name} | {ok[0]['trainable']:.1%} | {spread([r['after'] for r in ok], '.1%')} | "
                     f"{spread([r['gain'] for r in ok], '+.1%')} | {spread([r['forgetting'] for r in ok], '+.1%')} | "
                     f"{sum(r['flagged'] for r in ok)} of {len(ok)} |")
    return lines


def plot(results: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.5))
    for name, runs in results.items():
        ok = [r for r in runs if "gain" in r]
        if ok:
            ax.scatter([100 * r["forgetting"] for r in ok], [100 * r["gain"] for r in ok], label=name, s=28)
    ax.axvline(10, color="grey", linestyle="--", linewidth=1)
    ax.set_xscale("symlog", linthresh=10)
    ax.set_xlim(left=0)
    ax.text(11, ax.get_ylim()[0] + 1, "the forgetting flag (10%)", color="grey", fontsize=8)
    ax.set_xlabel("base perplexity on its held-out text, % change (symlog)")
    ax.set_ylabel("held-out exact match gained, points")
    ax.set_title("Task gained against forgetting, tiny base, one point per seed")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=float, default=EPOCHS)
    p.add_argument("--heldout", type=int, default=HELDOUT)
    p.add_argument("--only", nargs="*", help="run only these methods (names as in the table)")
    p.add_argument("--plot", help="write the gain-against-forgetting plot here (PNG)")
    p.add_argument("--json", help="also write every run's figures here")
    p.add_argument("--out", help="where the runs go (default: a temporary directory)")
    p.add_argument("--from-json", help="print the table and draw the plot from an earlier run's --json, training nothing")
    args = p.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        print("\n".join(table(results, args.seeds)))
        if args.plot:
            plot(results, Path(args.plot))
        return
    work = Path(args.out or tempfile.mkdtemp(prefix="distft-forgetting-"))
    work.mkdir(parents=True, exist_ok=True)
    names = [n for n, *_ in METHODS if not args.only or n in args.only]
    results: dict[str, list[dict]] = {n: [] for n in names}
    for seed in args.seeds:  # seeds outermost: an interrupted run still has every method at the first seeds
        for name in names:
            r = run_method(name, seed, args.epochs, args.heldout, work)
            results[name].append(r)
            shown = (f"gain {r['gain']:+.1%}, base perplexity {r['ppl_before']:.3f} -> {r['ppl_after']:.3f} "
                     f"({r['forgetting']:+.1%})") if "gain" in r else r.get("error")
            print(f"seed {seed} {name}: {shown}", flush=True)
    print(f"\n{datetime.date.today()}, {platform.node() or 'this machine'} ({platform.machine()}, "
          f"{len(__import__('os').sched_getaffinity(0))} cores); seeds {', '.join(map(str, args.seeds))}; "
          f"{args.epochs:g} epochs of the quickstart's task, {args.heldout} held-out items; mean (min to max)\n")
    print("\n".join(table(results, args.seeds)))
    if args.plot:
        plot(results, Path(args.plot))
        print(f"\nplot: {args.plot}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
