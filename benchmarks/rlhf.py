"""Every preference, RL and distillation algorithm from the same SFT policy, on the bundled task, side by side.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/rlhf.py                 # 3 seeds, every algorithm
    .venv/bin/python benchmarks/rlhf.py --seeds 0 --only grpo,dpo                   # a quick look
    .venv/bin/python benchmarks/rlhf.py --from-json /tmp/distft-rlhf-bench/results.json   # the table again

Ray-free (each stage in this process, 2 torch threads), so the numbers are the algorithms' own.
Trained once: the under-trained SFT policy and the reward model (configs/rlhf_quickstart.yaml's
stages 1 and 2), and for distillation a teacher (configs/recipes/distill.yaml's SFT stage, 200
steps). Then, for each seed, each algorithm's stage exactly as its shipped config sets it (PPO:
rlhf_quickstart.yaml; the others: configs/recipes/<name>.yaml; the variants add one override),
started from that SFT policy. PPO and GRPO are rewarded by the reward model alone; DPO, ORPO and
SimPO train on the pairs the reward model learned from; KTO on the same task's unpaired
feedback file; distillation matches the teacher. No algorithm sees the held-out answers.

Every final policy is scored the same way:
- exact match: greedy answers to the 600 held-out prompts against the right answers;
- reward: the reward model's mean score of those answers;
- KL to the reference (the SFT policy), one estimate for every algorithm: for 256 held-out prompts
  the policy samples an answer (temperature 1, at most 8 tokens, EOS included), and the sum over its
  tokens of log pi(token) - log pi_ref(token) is averaged (the k1 estimator; unbiased for
  KL(pi || pi_ref) because the answers are pi's own samples); fixed sampling seed;
- forgetting: the base's held-out perplexity after the stage against before (the stage's own retain
  score, distft://tiny-base/heldout);
- wall time of the stage (load, train, evaluate, export) in this process;
- memory: `distft plan`'s per-GPU total for the stage as its recipe ships it, at Llama-3.1-8B (bf16,
  2048 tokens, micro-batch 1, ZeRO-3 and gradient checkpointing on 8 GPUs): the models it holds.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
DATA = CONFIGS / "data"

# name -> (config file, index of the algorithm's stage, overrides of that stage as {"section.field": value})
ALGORITHMS = {
    "ppo": ("rlhf_quickstart.yaml", 2, {}),
    "ppo (vllm)": ("rlhf_quickstart.yaml", 2, {"ppo.generation": "vllm"}),
    "grpo (dapo)": ("recipes/grpo.yaml", 2, {}),
    "grpo (grpo loss)": ("recipes/grpo.yaml", 2, {"grpo.loss_type": "grpo"}),
    "grpo (dr_grpo)": ("recipes/grpo.yaml", 2, {"grpo.loss_type": "dr_grpo", "grpo.scale_rewards": "none"}),
    "grpo (vllm)": ("recipes/grpo.yaml", 2, {"grpo.generation": "vllm"}),
    "dpo (sigmoid)": ("recipes/dpo.yaml", 1, {}),
    "dpo (ipo)": ("recipes/dpo.yaml", 1, {"dpo.loss_type": "ipo"}),
    "kto": ("recipes/kto.yaml", 1, {}),
    "orpo": ("recipes/orpo.yaml", 1, {}),
    "simpo": ("recipes/simpo.yaml", 1, {}),
    "distill": ("recipes/distill.yaml", 1, {}),
}


def load_yaml(name: str) -> dict:
    """A shipped config with its relative paths made absolute (from the repository root, else beside it)."""
    path = CONFIGS / name
    raw = yaml.safe_load(path.read_text())

    def fix(value):
        if isinstance(value, str) and value.endswith((".jsonl", ".json")):
            for base in (REPO, path.parent):
                if (base / value).exists():
                    return str((base / value).resolve())
        return value

    for st in raw["stages"]:
        for key in ("data", "evaluate"):
            st[key] = {k: fix(v) for k, v in (st.get(key) or {}).items()}
    return raw


def in_process(raw: dict) -> dict:
    """One process, 2 torch threads; each micro-batch is the global batch (no accumulation)."""
    raw = copy.deepcopy(raw)
    raw["scaling"] = {"num_workers": 1, "torch_threads": 2}
    for st in raw["stages"]:
        st["train"]["micro_batch_size"] = st["train"]["global_batch_size"]
    return raw


def run_stages(raw: dict, run_dir: Path, indices: list[int]) -> list[dict]:
    from distft.config import build_config
    from distft.stages import StageContext, stage_runner

    cfg = build_config(raw)
    out = []
    for i in indices:
        started = time.time()
        summary = stage_runner(cfg.stages[i].kind)(cfg, StageContext(run_dir=run_dir, stage_index=i))
        summary["bench_seconds"] = round(time.time() - started, 1)
        out.append(summary)
    return out


def held_out_prompts(tok):
    from distft.config.schema import DataConfig
    from distft.stages.ppo import load_prompts

    test = str(DATA / "facts_test.jsonl")
    return load_prompts(test, DataConfig(train=test), tok, 56, "evaluate.data", None, log=lambda m: None)


def score_policy(model_dir: Path, reward_dir: Path, reference_dir: Path, kl_prompts: int = 256) -> dict:
    """Exact match and reward-model score of greedy answers to the held-out prompts; KL to the reference."""
    import torch

    from distft.config.schema import PPOSettings, RewardSpec
    from distft.models.loading import load_for_inference, load_reward_for_inference
    from distft.rl.rewards import normalize_answer
    from distft.stages.ppo import Scorer, hf_generate, make_rollout

    model, tok = load_for_inference(model_dir)
    rm, rm_tok = load_reward_for_inference(reward_dir)
    prompts = held_out_prompts(tok)
    scorer = Scorer(RewardSpec(), rm, rm_tok, 64)
    settings = PPOSettings(max_new_tokens=8)
    correct, reward = 0, 0.0
    for i in range(0, len(prompts), 64):
        batch = prompts[i : i + 64]
        rollout = make_rollout(model, hf_generate, tok, batch, settings, sample=False)
        correct += sum(normalize_answer(t) == normalize_answer(p.reference) for p, t in zip(batch, rollout.texts))
        reward += float(scorer.score(batch, rollout)[0].sum())
    reference, _ = load_for_inference(reference_dir)
    torch.manual_seed(0)
    total, count = 0.0, 0
    for i in range(0, kl_prompts, 64):
        batch = prompts[i : min(i + 64, kl_prompts)]
        rollout = make_rollout(model, hf_generate, tok, batch, PPOSettings(max_new_tokens=8, temperature=1.0),
                               sample=True)
        log_ratio = response_logprobs(model, rollout) - response_logprobs(reference, rollout)
        total += float(log_ratio.mul(rollout.mask).sum())
        count += len(batch)
    return {"exact_match": correct / len(prompts), "reward": reward / len(prompts), "kl": total / count if count else 0.0,
            "items": len(prompts)}


def response_logprobs(model, rollout):
    """Per-token log-probabilities of the rollout's response tokens under `model` [B, R]."""
    import torch

    from distft.rl.ppo import logprobs_from_logits

    ids, attention, positions = rollout.sequences()
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    prompt_len = rollout.prompt_ids.shape[1]
    return logprobs_from_logits(logits[:, prompt_len - 1 : -1].float(), rollout.response_ids)


def algorithm_config(name: str, seed: int, shared: Path) -> dict:
    """The algorithm's shipped stage, from the shared SFT policy (and reward model, teacher), with a seed."""
    config, index, overrides = ALGORITHMS[name]
    raw = in_process(load_yaml(config))
    stage = raw["stages"][index]
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        stage.setdefault(section, {})[field] = value
    stage["init_from"] = str(shared / "sft" / "final")
    stage["train"]["seed"] = seed
    stage["evaluate"] = {**stage.get("evaluate", {}), "data": None}  # scored below, the same way for all
    stage.pop("name", None)
    if stage["stage"] in ("ppo", "grpo"):
        stage["reward"] = {"model": str(shared / "reward" / "final")}
    if stage["stage"] == "distill":
        stage["distill"] = {**stage.get("distill", {}), "teacher": str(shared / "teacher" / "sft" / "final")}
    raw["stages"] = [stage]
    raw["model"]["name_or_path"] = "distft://tiny-base"  # the base's held-out text is the default retain set
    return raw


def train_shared(shared: Path) -> None:
    quick = in_process(load_yaml("rlhf_quickstart.yaml"))
    if not (shared / "reward" / "summary.json").is_file():
        print("training the shared SFT policy and reward model ...", flush=True)
        run_stages(quick, shared, [0, 1])
    teacher = in_process(load_yaml("recipes/distill.yaml"))
    if not (shared / "teacher" / "sft" / "summary.json").is_file():
        print("training the distillation teacher ...", flush=True)
        run_stages({**teacher, "stages": teacher["stages"][:1]}, shared / "teacher", [0])


PLAN_MODEL = "meta-llama/Llama-3.1-8B-Instruct"  # its config.json ships in configs/models/


def planned_gib(name: str) -> float:
    """`distft plan`'s per-GPU total for the algorithm's stage as its recipe ships (method, models held),
    at Llama-3.1-8B in bf16, 2048 tokens, micro-batch 1, ZeRO-3 with gradient checkpointing on 8 GPUs."""
    import re
    import subprocess
    import sys

    config, index, overrides = ALGORITHMS[name]
    raw = yaml.safe_load((CONFIGS / config).read_text())
    stages = len(raw["stages"])
    args = [f"model.name_or_path={PLAN_MODEL}", "model.dtype=bfloat16", "model.max_seq_len=2048",
            "scaling.use_gpu=true", "scaling.num_workers=8"]
    for i in range(stages):
        args += [f"stages.{i}.train.micro_batch_size=1", f"stages.{i}.train.global_batch_size=64",
                 f"stages.{i}.strategy.name=deepspeed", f"stages.{i}.strategy.zero_stage=3",
                 f"stages.{i}.strategy.gradient_checkpointing=true"]
    args += [f"stages.{index}.{k}={v}" for k, v in overrides.items()]
    if raw["stages"][index].get("init_from"):  # the distillation student: an 8B student too
        args.append(f"stages.{index}.init_from={PLAN_MODEL}")
    r = subprocess.run([sys.executable, "-m", "distft.cli", "plan", str(CONFIGS / config), *args],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    if r.returncode:
        raise SystemExit(f"distft plan {config} failed:\n{r.stderr[-2000:]}")
    blocks = re.split(r"^stage ", r.stdout, flags=re.M)[1:]
    (total,) = re.findall(r"^  total\s+([0-9.]+)", blocks[index], flags=re.M)
    return float(total)


def spread(values: list[float], fmt: str, scale: float = 1.0) -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mid = format(statistics.mean(values), fmt)
    return mid if len(values) == 1 else f"{mid} ({format(min(values), fmt)} to {format(max(values), fmt)})"


def render(report: dict) -> str:
    start, rows = report["start"], report["results"]
    lines = [f"{report['date']}, {report['machine']}; seeds {report['seeds']}; from the SFT policy "
             f"(exact match {start['exact_match']:.1%}, reward-model score {start['reward']:.2f}); "
             f"{start['items']} held-out prompts; mean (min to max) over seeds.", "",
             "| algorithm | exact match | gain (points) | reward-model score | KL to the SFT policy | base perplexity "
             "change | wall time | plan at 8B, GiB per GPU |",
             "|---|---|---|---|---|---|---|---|"]
    for name, runs in rows.items():
        if not runs:
            continue
        em = [r["exact_match"] for r in runs]
        lines.append(
            f"| {name} | {spread(em, '.1%')} | {spread([e - start['exact_match'] for e in em], '+.1f', 100)} | "
            f"{spread([r['reward'] for r in runs], '.2f')} | {spread([r['kl'] for r in runs], '.2f')} | "
            f"{spread([r['retain_worse_by'] for r in runs], '+.1%')} | {spread([r['seconds'] for r in runs], '.0f')} s | "
            f"{report.get('plan', {}).get(name, '-')} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--only", help="comma-separated algorithm names (as in the table; 'grpo' matches every variant)")
    ap.add_argument("--out", default="/tmp/distft-rlhf-bench")
    ap.add_argument("--from-json", help="print the table of an earlier run's results.json")
    args = ap.parse_args()
    if args.from_json:
        print(render(json.loads(Path(args.from_json).read_text())))
        return
    out = Path(args.out)
    shared = out / "shared"
    train_shared(shared)
    reward_dir, policy_dir = shared / "reward" / "final", shared / "sft" / "final"
    start = score_policy(policy_dir, reward_dir, policy_dir, kl_prompts=0)
    print(f"SFT policy: exact match {start['exact_match']:.1%}, reward {start['reward']:.3f}", flush=True)
    wanted = [n for n in ALGORITHMS if not args.only or any(n == o or n.startswith(o + " ")
                                                             for o in args.only.split(","))]
    results_file = out / "results.json"
    report = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results = {n: [r for r in report.get("results", {}).get(n, []) if r["seed"] in args.seeds] for n in ALGORITHMS}
    for seed in args.seeds:
        for name in wanted:
            if any(r["seed"] == seed for r in results[name]):
                continue  # measured already (the script resumes)
            run_dir = out / f"{name.replace(' ', '_').replace('(', '').replace(')', '')}-seed{seed}"
            # This script's own scratch, left by a run that was not recorded: a stage would resume from its
            # checkpoints (measured: a changed recipe then scored the earlier model), so it starts clean.
            shutil.rmtree(run_dir, ignore_errors=True)
            raw = algorithm_config(name, seed, shared)
            (summary,) = run_stages(raw, run_dir, [0])
            scored = score_policy(run_dir / raw["stages"][0]["stage"] / "final", reward_dir, policy_dir)
            retain = (summary.get("retain") or [{}])[0]
            results[name].append({**scored, "seed": seed, "seconds": summary["bench_seconds"],
                                  "retain_worse_by": retain.get("worse_by")})
            print(f"{name} seed {seed}: exact match {scored['exact_match']:.1%}, reward {scored['reward']:.3f}, "
                  f"KL {scored['kl']:.2f}, {summary['bench_seconds']:.0f} s", flush=True)
            report = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.node()}, {platform.processor() or ''} "
                      f"{__import__('os').cpu_count()} CPUs".replace("  ", " "), "seeds": args.seeds,
                      "start": start, "results": results}
            results_file.write_text(json.dumps(report, indent=2))
    report["plan"] = {name: planned_gib(name) for name in ALGORITHMS}
    results_file.write_text(json.dumps(report, indent=2))
    print()
    print(render(report))


if __name__ == "__main__":
    main()
