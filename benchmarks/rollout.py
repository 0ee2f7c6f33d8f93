"""Rollout engines side by side: transformers `generate` (`generation: hf`) against a colocated vLLM engine
(`generation: vllm`), with the weight sync PPO does after every update.

    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/rollout.py --scales tiny                 # CPU
    flock /tmp/distft-cpu.lock .venv/bin/python benchmarks/rollout.py --scales 0.5b --prompts 16    # CPU
    python benchmarks/rollout.py --scales 0.5b --prompts 256 --new-tokens 256 --gpu  # the GPU command

Each round, alternating the engines: both generate from the same prompt token ids, sampled at
temperature 1, exactly `--new-tokens` tokens per prompt (EOS ignored, `min_new_tokens` /
`min_tokens`), so the two do the same work; the script checks that the generated token counts
are equal. Then one PPO-like update of the policy (forward and backward over the rollout
sequences, an Adam step) and, for vLLM, the sync of the updated weights into the engine. The
table gives tokens/s, seconds per round of generation, sync and update, and the share of the
step spent generating and syncing, as medians over rounds, with the ratio to `hf` measured in
the same run. The 0.5B model is a Llama of Qwen2.5-0.5B's size with random weights (throughput
only); the tiny one is the shipped base. fp32 on CPU; bf16 with `--gpu`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def half_b_model(out: Path, tokenizer_dir: Path) -> Path:
    """A Llama of Qwen2.5-0.5B's shape (24 layers, hidden 896, 14 heads, 2 KV heads), random weights."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (out / "config.json").is_file():
        return out
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                      num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    return out


def prompts_of(tok, n: int) -> list[str]:
    from distft.data.formats import detect_format, generation_prompt

    rows = [json.loads(line) for line in (REPO / "configs" / "data" / "facts_train.jsonl").read_text().splitlines()[:n]]
    fmt = detect_format(rows[0])
    return [generation_prompt(r, fmt, tok) for r in rows]


def hf_round(model, tok, prompts, new_tokens: int):
    import torch

    enc = tok(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=True,
                             temperature=1.0, top_k=None, top_p=1.0, pad_token_id=tok.pad_token_id)
    return enc["input_ids"].cpu(), out[:, enc["input_ids"].shape[1]:].cpu()


def vllm_round(engine, tok, prompts, new_tokens: int, seed: int):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
    params = SamplingParams(temperature=1.0, max_tokens=new_tokens, min_tokens=new_tokens, ignore_eos=True,
                            detokenize=False, seed=seed)
    outs = engine.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
    return [len(o.outputs[0].token_ids) for o in outs]


def update(model, opt, tok, prompt_ids, response_ids):
    """One PPO-like optimizer step over the rollout: forward and backward of every sequence."""
    import torch

    ids = torch.cat([prompt_ids, response_ids], dim=1).to(model.device)
    attention = (ids != tok.pad_token_id).long()
    model.train()
    loss = model(input_ids=ids, attention_mask=attention).logits.float().logsumexp(-1).mean()
    loss.backward()
    opt.step()
    opt.zero_grad()
    model.eval()


def run_scale(name: str, path: Path, args) -> list[dict]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distft.config.schema import VLLMSettings
    from distft.models.vllm_engine import VLLMEngine

    dtype = "bfloat16" if args.gpu else "float32"
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    if args.gpu:
        model.to("cuda")
    opt = torch.optim.Adam(model.parameters(), lr=1e-6)
    prompts = prompts_of(tok, args.prompts)
    t0 = time.time()
    engine = VLLMEngine(str(path), None, dtype, VLLMSettings(gpu_memory_utilization=0.3, sleep=args.gpu),
                        use_gpu=args.gpu, max_model_len=512, seed=0, world_size=1, rank=0, local_rank=0,
                        trust_remote_code=False, log=lambda m: None)
    engine.sync(model, "ddp")
    start = time.time() - t0
    rows = {"hf": [], "vllm": []}
    for r in range(args.rounds + 1):  # round 0 warms both engines up and is not counted
        order = ("hf", "vllm") if r % 2 == 0 else ("vllm", "hf")
        for which in order:
            t = time.time()
            if which == "hf":
                prompt_ids, response_ids = hf_round(model, tok, prompts, args.new_tokens)
                tokens = int((response_ids != -1).sum())
                gen = time.time() - t
                rollout = (prompt_ids, response_ids)
            else:
                lengths = vllm_round(engine, tok, prompts, args.new_tokens, seed=r)
                tokens = sum(lengths)
                gen = time.time() - t
            t = time.time()
            update(model, opt, tok, *rollout)  # the same update after either engine: hf's last rollout
            upd = time.time() - t
            sync = 0.0
            if which == "vllm":
                t = time.time()
                engine.sync(model, "ddp")
                sync = time.time() - t
            if r:
                rows[which].append({"tokens": tokens, "gen": gen, "sync": sync, "update": upd})
    expected = args.prompts * args.new_tokens
    same = all(row["tokens"] == expected for rs in rows.values() for row in rs)
    out = []
    for which, rs in rows.items():
        med = {k: statistics.median(x[k] for x in rs) for k in ("gen", "sync", "update")}
        out.append({"scale": name, "engine": which, "tokens_per_round": rs[0]["tokens"], "same_tokens": same,
                    "tokens_per_s": rs[0]["tokens"] / med["gen"], **med,
                    "gen_min": min(x["gen"] for x in rs), "gen_max": max(x["gen"] for x in rs),
                    "share": (med["gen"] + med["sync"]) / (med["gen"] + med["sync"] + med["update"]),
                    "engine_start_s": start if which == "vllm" else 0.0})
    engine.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--scales", nargs="+", default=["tiny", "0.5b"], choices=["tiny", "0.5b"])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--out", default=None, help="default: benchmarks/results/rollout_<scales>.json")
    args = p.parse_args()

    import torch

    from distft.models.bundled import tiny_base_dir

    tiny = tiny_base_dir()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.scales:
            path = tiny if scale == "tiny" else half_b_model(Path(tmp) / "half-b", tiny)
            results += run_scale(scale, path, args)
    print(f"{datetime.date.today()}, {platform.node()}, {os.cpu_count()} CPUs, "
          f"{torch.cuda.get_device_name() if args.gpu else 'CPU'}, torch {torch.__version__}; {args.prompts} prompts x "
          f"{args.new_tokens} new tokens per round, medians of {args.rounds} rounds (min-max of generation)")
    print(f"same work: every round of both engines generated exactly {args.prompts} x {args.new_tokens} tokens: "
          f"{'yes' if all(r['same_tokens'] for r in results) else 'NO'}")
    print("| scale | engine | tokens/s | vs hf | generate s | sync s | update s | generate + sync share of the step | engine start s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        hf = next(x for x in results if x["scale"] == r["scale"] and x["engine"] == "hf")
        print(f"| {r['scale']} | {r['engine']} | {r['tokens_per_s']:,.0f} | {r['tokens_per_s'] / hf['tokens_per_s']:.2f}x | "
              f"{r['gen']:.2f} ({r['gen_min']:.2f}-{r['gen_max']:.2f}) | {r['sync']:.3f} | {r['update']:.2f} | "
              f"{r['share']:.0%} | {r['engine_start_s']:.1f} |")
    out = args.out or REPO / "benchmarks" / "results" / f"rollout_{'_'.join(args.scales)}.json"
    Path(out).write_text(json.dumps({"date": str(datetime.date.today()), "machine": platform.node(),
                                          "cpus": os.cpu_count(), "args": vars(args), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
