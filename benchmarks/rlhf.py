"""PPO vs GRPO vs DPO from the same under-trained SFT policy, on the bundled task, side by side in one run.

    python benchmarks/rlhf.py [--seeds 1 2] [--out /tmp/distft-rlhf-bench]

Ray-free (each stage in this process, 2 torch threads), so the numbers are the methods' own.
Steps, once: SFT for 20 steps (configs/rlhf_quickstart.yaml's stage 1) and the reward model
(its stage 2). Then for each seed: PPO with the quickstart's settings, GRPO (TRL) and DPO (TRL),
all starting from that SFT output. PPO and GRPO are rewarded by the reward model only; DPO
trains on the same preference pairs the reward model learned from. Every final policy is
scored the same way: greedy answers to the 600 held-out prompts, exact match against the
right answer (no method sees it), and the reward model's mean score.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "configs" / "data"


def quickstart() -> dict:
    raw = yaml.safe_load((REPO / "configs" / "rlhf_quickstart.yaml").read_text())
    raw["scaling"] = {"num_workers": 1, "torch_threads": 2}
    for st in raw["stages"]:
        for key in ("train", "data"):
            for field, value in list(st.get(key, {}).items()):
                if isinstance(value, str) and value.startswith("configs/"):
                    st[key][field] = str(REPO / value)
        if "evaluate" in st and st["evaluate"].get("data"):
            st["evaluate"]["data"] = str(REPO / st["evaluate"]["data"])
        st["train"]["micro_batch_size"] = st["train"]["global_batch_size"]
    return raw


def grpo_stage(seed: int) -> dict:
    return {
        "stage": "grpo",
        "data": {"train": str(DATA / "facts_train.jsonl"), "max_eval_samples": 32},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32}},
        "reward": {"model": "reward"},
        "grpo": {"num_generations": 8, "max_new_tokens": 8, "temperature": 0.7, "beta": 0.04},
        "train": {"lr": 1e-3, "warmup_ratio": 0.05, "max_steps": 300, "global_batch_size": 64,
                  "micro_batch_size": 16, "log_every": 50, "save_every": 100_000, "seed": seed},
        "evaluate": {"data": None},
    }


def dpo_stage(seed: int) -> dict:
    return {
        "stage": "dpo",
        "data": {"train": str(DATA / "facts_prefs_train.jsonl"), "eval_fraction": 0.05},
        "method": {"name": "lora", "lora": {"r": 16, "alpha": 32}},
        "dpo": {"beta": 0.1},
        "train": {"lr": 5e-4, "warmup_ratio": 0.05, "epochs": 1, "global_batch_size": 32, "micro_batch_size": 16,
                  "log_every": 30, "eval_every": 1000, "save_every": 100_000, "seed": seed},
        "evaluate": {"data": None},
    }


def run_stages(raw: dict, run_dir: Path, indices: list[int]) -> list[dict]:
    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    cfg = build_config(raw)
    out = []
    for i in indices:
        started = time.time()
        summary = stage_runner(cfg.stages[i].stage)(cfg, StageContext(run_dir=run_dir, stage_index=i))
        summary["bench_seconds"] = round(time.time() - started, 1)
        out.append(summary)
    return out


def score_policy(model_dir: Path, reward_dir: Path) -> dict:
    """Greedy answers to the held-out prompts: exact match, and the reward model's mean score."""
    from distft.config.schema import DataConfig, PPOSettings, RewardSpec
    from distft.models.loading import load_for_inference, load_reward_for_inference
    from distft.rl.rewards import normalize_answer
    from distft.stages.ppo import Scorer, hf_generate, load_prompts, make_rollout

    model, tok = load_for_inference(model_dir)
    rm, rm_tok = load_reward_for_inference(reward_dir)
    test = str(DATA / "facts_test.jsonl")
    prompts = load_prompts(test, DataConfig(train=test), tok, 56, "evaluate.data", None, log=lambda m: None)
    scorer = Scorer(RewardSpec(), rm, rm_tok, 64)
    settings = PPOSettings(max_new_tokens=8)
    correct, reward = 0, 0.0
    for i in range(0, len(prompts), 64):
        batch = prompts[i : i + 64]
        rollout = make_rollout(model, hf_generate, tok, batch, settings, sample=False)
        correct += sum(normalize_answer(t) == normalize_answer(p.reference) for p, t in zip(batch, rollout.texts))
        reward += float(scorer.score(batch, rollout)[0].sum())
    return {"exact_match": correct / len(prompts), "reward": reward / len(prompts), "items": len(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--out", default="/tmp/distft-rlhf-bench")
    args = ap.parse_args()
    out = Path(args.out)

    from distft.models.bundled import tiny_base_dir

    base = quickstart()
    base["model"]["name_or_path"] = str(tiny_base_dir())
    shared = out / "shared"
    if not (shared / "reward" / "summary.json").is_file():
        print("training the shared SFT policy and reward model...", flush=True)
        run_stages(base, shared, [0, 1])
    reward_dir = shared / "reward" / "final"
    start = score_policy(shared / "sft" / "final", reward_dir)
    print(f"SFT policy: exact match {start['exact_match']:.1%}, reward {start['reward']:.3f}", flush=True)

    results: dict[str, list[dict]] = {"ppo": [], "grpo": [], "dpo": []}
    for seed in args.seeds:
        for method in results:
            raw = copy.deepcopy(base)
            if method == "ppo":
                stage = raw["stages"][2]
                stage["train"]["seed"] = seed
                stage["evaluate"] = {"data": None}
            else:
                stage = grpo_stage(seed) if method == "grpo" else dpo_stage(seed)
            raw["stages"] = raw["stages"][:2] + [{**stage, "init_from": str(shared / "sft" / "final")}]
            if method in ("ppo", "grpo"):
                raw["stages"][2]["reward"] = {"model": str(reward_dir)}
            run_dir = out / f"{method}-seed{seed}"
            (summary,) = run_stages(raw, run_dir, [2])
            scored = score_policy(run_dir / method / "final", reward_dir)
            kl = summary.get("kl_last")
            results[method].append({**scored, "kl": kl, "seconds": summary["bench_seconds"]})
            print(f"{method} seed {seed}: exact match {scored['exact_match']:.1%}, reward {scored['reward']:.3f}, "
                  f"{summary['bench_seconds']:.0f}s", flush=True)

    def mean(rows, key):
        values = [r[key] for r in rows if r[key] is not None]
        return sum(values) / len(values) if values else None

    print()
    print(f"from the SFT policy (exact match {start['exact_match']:.1%}, reward-model score {start['reward']:.2f}); "
          f"{start['items']} held-out prompts; mean of seeds {args.seeds}")
    print("| method | exact match | gain (points) | reward-model score | final KL | wall time per run |")
    print("|---|---|---|---|---|---|")
    for method, rows in results.items():
        em, rw, kl, secs = (mean(rows, k) for k in ("exact_match", "reward", "kl", "seconds"))
        per_seed = ", ".join(f"{r['exact_match']:.1%}" for r in rows)
        print(f"| {method.upper()} | {em:.1%} ({per_seed}) | {100 * (em - start['exact_match']):+.1f} | "
              f"{start['reward']:.2f} -> {rw:.2f} | {'-' if kl is None else f'{kl:.2f}'} | {secs:.0f} s |")
    (out / "results.json").write_text(json.dumps({"start": start, "results": results}, indent=2))


if __name__ == "__main__":
    main()
