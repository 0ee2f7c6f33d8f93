"""Regenerate the README's learning figures: each shipped recipe, over several seeds, on the shipped base.

    make figures                                    # everything (about an hour on 2 cores)
    python benchmarks/figures.py --only quickstart qlora --seeds 0 1 2
    python benchmarks/figures.py --render           # rewrite the README from the saved results only

Each experiment runs as users run it (`distft train CONFIG`, a private Ray cluster, the config's own
workers), once per seed (`train.seed`), and its run summary is saved in
`benchmarks/results/figures.json` with the date, the machine, the commit and the seed. A result saved
for the same experiment, seed and commit is reused (`--fresh` measures again), so an interrupted
`make figures` continues where it stopped.

The README holds each table between `<!-- figures:NAME -->` and `<!-- /figures:NAME -->`: this script
writes what is between them, from the saved results, so every figure there has this script behind
it. A learning result is a range over seeds (min-max, and the mean), never one run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "figures.json"
README = REPO / "README.md"

# name -> (config, overrides, what it shows). Overrides only where the comparison needs them.
EXPERIMENTS = {
    "quickstart": ("configs/quickstart.yaml", [], "LoRA SFT, the quickstart as shipped"),
    "qlora": ("configs/qlora.yaml", [], "QLoRA SFT, configs/qlora.yaml as shipped (200 held-out items)"),
    "quickstart-qlora": ("configs/quickstart.yaml", ["method.name=qlora"],
                         "the quickstart with only the method swapped to QLoRA"),
    "classify_minilm": ("configs/classify_minilm.yaml", [], "MiniLM-L6 topic classification, as shipped"),
    "reward": ("configs/reward.yaml", [], "the reward model, as shipped"),
    "rlhf": ("configs/rlhf_quickstart.yaml", [], "distft pipeline: SFT -> reward model -> PPO, as shipped"),
}
PIPELINES = {"rlhf"}  # run with `distft pipeline`
DEFAULT_SEEDS = (0, 1, 2)
# Another machine, simulated: the quickstart at seed 0 with other CPU kernels (ATEN_CPU_CAPABILITY: the
# vector width torch's CPU kernels use, so the order of floating-point sums changes) and with 2 torch
# threads per worker. name -> (environment, overrides).
MACHINES = {
    "machine-avx2": ({"ATEN_CPU_CAPABILITY": "avx2"}, []),
    "machine-default": ({"ATEN_CPU_CAPABILITY": "default"}, []),
    "machine-2-threads": ({}, ["scaling.torch_threads=2"]),
}


# What the figures depend on: a commit that changes none of these (the README, tests) keeps them valid.
CODE = ["distft", "configs", "pyproject.toml"]


def commit() -> str:
    """The last commit that changed the code the figures measure (+changes: uncommitted edits to it)."""
    r = subprocess.run(["git", "log", "-1", "--format=%h", "--", *CODE], cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "--", *CODE], cwd=REPO,
                           capture_output=True, text=True).stdout.strip()
    return r.stdout.strip() + ("+changes" if dirty else "")


def machine() -> str:
    try:
        model = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                     if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{os.cpu_count()} cores ({model}), {mem:.0f} GiB"


def load_results() -> dict:
    return json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}


def save_results(results: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, RESULTS)


# benchmarks/methods.py's runs (one process, 2 threads, Ray-free, each method's own learning rate), per seed.
METHOD_RUNS = {f"methods-sft-{n}": ("sft", n) for n in (
    "full", "freeze", "lora", "dora", "rslora", "qlora", "ia3", "prompt_tuning", "prefix_tuning")}
METHOD_RUNS.update({f"methods-classify-{n}": ("classify", n) for n in ("full", "freeze", "bitfit", "lora", "dora")})


def run_method(name: str, seed: int, work: Path) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import methods

    kind, method = METHOD_RUNS[name]
    started = time.time()
    r = methods.run_method(kind, method, seed, work / f"{name}-seed{seed}")
    if "error" in r:
        raise SystemExit(f"{name} seed {seed} failed: {r['error']}")
    return {**r, "wall_s": round(time.time() - started, 1)}


def run_experiment(name: str, seed: int, work: Path) -> dict:
    if name in METHOD_RUNS:
        return run_method(name, seed, work)
    env = dict(os.environ)
    if name in MACHINES:
        extra_env, extra = MACHINES[name]
        env.update(extra_env)
        config, overrides, _ = EXPERIMENTS["quickstart"]
        overrides = [*overrides, *extra]
    else:
        config, overrides, _ = EXPERIMENTS[name]
    run_name = f"{name}-seed{seed}"
    command = "pipeline" if name in PIPELINES else "train"
    seeds = [f"stages.{i}.train.seed={seed}" for i in range(3)] if name in PIPELINES else [f"train.seed={seed}"]
    cmd = [sys.executable, "-m", "distft.cli", command, config, *overrides, *seeds,
           f"run.output_dir={work}", f"run.name={run_name}"]
    started = time.time()
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"{name} seed {seed} failed (exit {r.returncode}):\n{r.stderr[-3000:]}")
    stages = json.loads((work / run_name / "summary.json").read_text())
    metrics = [json.loads(x) for x in (work / run_name / stages[-1]["stage"] / "metrics.jsonl").read_text().splitlines()]
    losses = {str(m["step"]): m["loss"] for m in metrics if "loss" in m and "event" not in m}
    return {"summary": stages[-1], "stages": stages, "wall_s": round(time.time() - started, 1), "losses": losses}


def spread(values: list[float], pct: bool = True) -> str:
    """min-max (mean) over seeds."""
    fmt = (lambda v: f"{100 * v:.1f}%") if pct else (lambda v: f"{v:.3f}")
    lo, hi, mean = min(values), max(values), statistics.fmean(values)
    if len(values) == 1 or fmt(lo) == fmt(hi):
        return fmt(lo) + (" (every seed)" if len(values) > 1 else "")
    return f"{fmt(lo)}-{fmt(hi)} (mean {fmt(mean)})"


def provenance(runs: list[dict]) -> str:
    seeds = ", ".join(str(x) for x in sorted({r["seed"] for r in runs}))
    dates = sorted({r["date"] for r in runs})
    commits = sorted({r["commit"] for r in runs})
    machines = sorted({r["machine"] for r in runs})
    return (f"*Measured {', '.join(dates)} on {'; '.join(machines)}, commit {', '.join(commits)}, "
            f"seeds {seeds}, by `python benchmarks/figures.py` (`make figures`).*")


def render_sft(name: str, runs: list[dict]) -> list[str]:
    s = [r["summary"] for r in runs]
    return [f"| {name} | {EXPERIMENTS[name][2]} | {s[0]['eval_items']} | "
            f"{spread([x['exact_match_before'] for x in s])} | {spread([x['exact_match_after'] for x in s])} | "
            f"{spread([x['first_logged_loss'] for x in s], pct=False)} -> "
            f"{spread([x['last_logged_loss'] for x in s], pct=False)} | "
            f"{statistics.fmean(r['wall_s'] for r in runs):.0f} s |"]


def one_row(name: str, runs: list[dict], count_header: str, count_key: str,
            columns: list[tuple[str, str, bool]]) -> str:
    """A one-experiment table: its summary's `columns` (header, key, as a percentage) as ranges over seeds."""
    s = [r["summary"] for r in runs]
    head = ["experiment", count_header, *(h for h, _, _ in columns), "wall time per run"]
    row = [name, str(s[0].get(count_key, "?")), *(spread([x[k] for x in s], pct=p) for _, k, p in columns),
           f"{statistics.fmean(r['wall_s'] for r in runs):.0f} s"]
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head), "| " + " | ".join(row) + " |", "",
                      provenance(runs)])


def render_tables(results: dict) -> dict[str, str]:
    """README section name -> markdown."""
    out = {}
    sft = [n for n in ("quickstart", "qlora", "quickstart-qlora") if results.get(n)]
    if sft:
        runs = [r for n in sft for r in results[n].values()]
        lines = ["| experiment | what | held-out items | exact match before | exact match after | "
                 "train loss first -> last log | wall time per run |", "|---|---|---|---|---|---|---|"]
        for n in sft:
            lines += render_sft(n, list(results[n].values()))
        quick = results.get("quickstart", {}).values()
        swap = results.get("quickstart-qlora", {}).values()
        if quick and swap:
            q = statistics.fmean(r["summary"]["exact_match_after"] for r in quick)
            w = statistics.fmean(r["summary"]["exact_match_after"] for r in swap)
            lines.append(f"\nQLoRA / LoRA, same steps and seeds: {w / q:.2f} of the quickstart's mean exact match.")
        lines.append("\n" + provenance(runs))
        out["sft"] = "\n".join(lines)
    if results.get("classify_minilm"):
        out["classify"] = one_row("classify_minilm", list(results["classify_minilm"].values()), "held-out rows",
                                  "heldout_rows", [("accuracy before", "accuracy_before", True),
                                                   ("accuracy after", "accuracy_after", True),
                                                   ("macro F1 after", "f1_macro_after", False)])
    if results.get("reward"):
        out["reward"] = one_row("reward.yaml", list(results["reward"].values()), "held-out pairs", "eval_pairs",
                                [("pairwise accuracy before", "pairwise_accuracy_before", True),
                                 ("after", "pairwise_accuracy_after", True),
                                 ("mean margin after", "mean_margin_after", False)])
    if results.get("rlhf"):
        runs = list(results["rlhf"].values())
        sft, reward, ppo = ([r["stages"][i] for r in runs] for i in range(3))
        out["rlhf"] = "\n".join([
            "| stage | held-out result | wall time per pipeline |", "|---|---|---|",
            f"| sft (20 steps, under-trained on purpose) | exact match {spread([x['exact_match_after'] for x in sft])} | |",
            f"| reward | pairwise accuracy {spread([x['pairwise_accuracy_after'] for x in reward])} | |",
            f"| ppo | exact match {spread([x['exact_match_before'] for x in ppo])} -> "
            f"{spread([x['exact_match_after'] for x in ppo])} | "
            f"{statistics.fmean(r['wall_s'] for r in runs):.0f} s |", "", provenance(runs)])
    variants = [n for n in MACHINES if results.get(n, {}).get("0")]
    base = results.get("quickstart", {})
    if variants and base.get("0"):
        ref = base["0"]
        logged = sorted(int(k) for k in ref["losses"])
        step = logged[len(logged) // 2]  # a logged step mid-run: the loss has moved away from the start
        em = [r["summary"]["exact_match_after"] for r in base.values()]
        lines = ["| quickstart, seed 0 | train loss at step %d | last logged loss | exact match after | "
                 "within the 3 seeds' range |" % step, "|---|---|---|---|---|",
                 f"| as measured above | {ref['losses'][str(step)]:.5f} | {ref['summary']['last_logged_loss']:.4f} | "
                 f"{100 * ref['summary']['exact_match_after']:.1f}% | - |"]
        for n in variants:
            v = results[n]["0"]
            after = v["summary"]["exact_match_after"]
            lines.append(f"| {n} ({', '.join(f'{k}={x}' for k, x in MACHINES[n][0].items()) or ' '.join(MACHINES[n][1])}) | "
                         f"{v['losses'][str(step)]:.5f} | {v['summary']['last_logged_loss']:.4f} | {100 * after:.1f}% | "
                         f"{'yes' if min(em) <= after <= max(em) else 'no'} |")
        lines.append("\n" + provenance([ref, *(results[n]["0"] for n in variants)]))
        out["machines"] = "\n".join(lines)
    for kind, metric, key in (("sft", "held-out exact match", "exact_match_after"),
                              ("classify", "held-out accuracy", "accuracy_after")):
        names = [n for n in METHOD_RUNS if METHOD_RUNS[n][0] == kind and results.get(n)]
        if not names:
            continue
        lines = [f"| method | trainable params | {metric} | of full fine-tuning's | step time | "
                 "peak RSS above baseline |", "|---|---|---|---|---|---|"]
        full = results.get(f"methods-{kind}-full")
        full_mean = statistics.fmean(r["summary"][key] for r in full.values()) if full else None
        for n in names:
            runs = list(results[n].values())
            s = runs[0]["summary"]
            mean = statistics.fmean(r["summary"][key] for r in runs)
            share = 100 * s["trainable_params"] / s["total_params"]
            ratio = f"{mean / full_mean:.2f}" if full_mean else "-"
            lines.append(f"| {METHOD_RUNS[n][1]} | {s['trainable_params']:,} ({share:.2f}%) | "
                         f"{spread([r['summary'][key] for r in runs])} | {ratio} | "
                         f"{1000 * statistics.fmean(r['step_s'] for r in runs):.0f} ms | "
                         f"{statistics.fmean(r['peak_above_baseline'] for r in runs) / 2**20:.0f} MiB |")
        lines.append("\n" + provenance([r for n in names for r in results[n].values()]))
        out[f"methods-{kind}"] = "\n".join(lines)
    return out


def write_readme(tables: dict[str, str], path: Path = README) -> list[str]:
    text = path.read_text()
    written = []
    for name, body in tables.items():
        pattern = re.compile(rf"(<!-- figures:{re.escape(name)} -->\n).*?(\n<!-- /figures:{re.escape(name)} -->)",
                             re.S)
        if pattern.search(text):
            text = pattern.sub(lambda m: m.group(1) + body + m.group(2), text)
            written.append(name)
    path.write_text(text)
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=sorted([*EXPERIMENTS, *METHOD_RUNS, *MACHINES, "methods"]),
                   help="run only these experiments (methods: every methods-* run)")
    p.add_argument("--seeds", nargs="*", type=int, default=list(DEFAULT_SEEDS))
    p.add_argument("--fresh", action="store_true", help="measure again what was saved for this commit")
    p.add_argument("--render", action="store_true", help="only rewrite the README from the saved results")
    p.add_argument("--work", help="where the runs go (default: a temporary directory)")
    args = p.parse_args()
    results = load_results()
    if not args.render:
        work = Path(args.work or tempfile.mkdtemp(prefix="distft-figures-"))
        here, today, now = commit(), time.strftime("%Y-%m-%d"), machine()
        names = args.only or [*EXPERIMENTS, *MACHINES, *METHOD_RUNS]
        names = [m for n in names for m in ([k for k in METHOD_RUNS] if n == "methods" else [n])]
        for name in names:
            for seed in ([0] if name in MACHINES else args.seeds):
                saved = results.get(name, {}).get(str(seed))
                if saved and saved["commit"] == here and not args.fresh:
                    print(f"{name} seed {seed}: saved for {here}", flush=True)
                    continue
                print(f"{name} seed {seed}: running", flush=True)
                r = run_experiment(name, seed, work)
                results.setdefault(name, {})[str(seed)] = {**r, "seed": seed, "date": today, "machine": now,
                                                            "commit": here}
                save_results(results)
                s = r["summary"]
                got = s.get("exact_match_after", s.get("accuracy_after"))
                print(f"{name} seed {seed}: {got} in {r['wall_s']:.0f} s", flush=True)
    written = write_readme(render_tables(results))
    print(f"README sections rewritten: {', '.join(written) or 'none'}")


if __name__ == "__main__":
    main()
