"""PPO RLHF, distft's own (TRL removed its PPOTrainer in 1.13).

The classic recipe (Ziegler et al. 2019, Ouyang et al. 2022), in the order a step runs:

1. rollout: the policy samples a response to each prompt of the batch (a pluggable
   generator; `hf` is transformers `generate`, gathered once per rollout under ZeRO-3);
2. score: the frozen reward model and/or Python reward functions, weighted, with an
   optional penalty for responses that never emitted EOS;
3. per-token KL penalty against the frozen reference (with LoRA the policy with its
   adapters disabled, so no second copy), the score added at the last token;
4. GAE advantages (whitened) and returns from the critic's values;
5. `ppo.ppo_epochs` passes over the rollout in minibatches of `train.global_batch_size`:
   clipped policy loss for the actor, clipped value loss for the critic;
6. the KL coefficient is updated (fixed, or adaptive towards `ppo.kl_target`).

The math is in `distft/rl/ppo.py` as pure functions. Models come from earlier stages
(`DistftConfig.init_source`, `reward_source`, `critic_source`): the SFT output is the
policy and the reference, the reward model scores and initialises the critic. Each rank
generates for its own share of the prompts; DDP or DeepSpeed averages the gradients.
Like every stage it runs in one process, under torchrun, or in a Ray Train worker.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from distft.config import DistftConfig
from distft.data.formats import DataError, generation_prompt, reference_answer, scored_ids, to_messages
from distft.data.loading import load_checked
from distft.distributed.checkpoint import CheckpointPublisher, staging_dir
from distft.distributed.collectives import barrier, broadcast_from_rank0, sum_over_ranks
from distft.distributed.engine import TrainEngine, build_engine, prepare_frozen
from distft.distributed.sharding import full_parameters, optimizer_shard, parameter_shard
from distft.models.loading import load_model, load_reward_for_inference, load_reward_model, load_tokenizer
from distft.models.methods import count_params
from distft.models.shapes import hidden_size
from distft.rl import ppo as rl
from distft.rl.rewards import normalize_answer, weighted_scores
from distft.stages.chain import plain_model_dir, source_path, stage_model
from distft.stages.context import StageContext
from distft.stages.evaluate import reward_scores
from distft.stages.reporting import MetricsLog, _fmt_seconds
from distft.stages.retain import RetainWatch, load_retain_sets
from distft.stages.trainer_setup import complete_stage, prepare_worker

PROMPT_FORMATS = ("alpaca", "messages", "prompt_completion")


@dataclass
class Prompt:
    text: str  # what the policy is given (chat template applied, generation prompt added)
    scored: list | str  # the prompt as the reward model reads it: chat turns, or the raw string
    reference: str | None  # the dataset's answer, for reward functions such as exact_match


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    import torch

    stage = cfg.stages[ctx.stage_index]
    settings, train_cfg, strategy = stage.ppo, stage.train, stage.strategy
    started = time.time()
    stage_dir = prepare_worker(cfg, ctx)
    use_gpu = cfg.scaling.use_gpu
    precision = strategy.resolved_precision(cfg.model.dtype)
    world = ctx.world_size

    # Prompts: instruction rows without their answers (the answers feed reward functions).
    policy_cfg = stage_model(cfg, ctx)
    tokenizer = load_tokenizer(policy_cfg)
    prompts = load_prompts(stage.data.train, stage.data, tokenizer, cfg.model.max_seq_len - settings.max_new_tokens,
                           "data.train", stage.data.max_train_samples, ctx.log)
    if settings.generation != "vllm":
        generator = resolve_generator(settings.generation)  # a bad engine name fails before any model loads
    per_rank = settings.rollout_batch_size // world
    steps_per_epoch = max(1, len(prompts) // settings.rollout_batch_size)
    total = train_cfg.max_steps or max(1, math.ceil(steps_per_epoch * train_cfg.epochs))
    minibatches = settings.rollout_batch_size // train_cfg.global_batch_size
    optimizer_steps = total * settings.ppo_epochs * minibatches
    ctx.log(f"[{stage.label()}] {len(prompts)} prompts, {total} rollouts of {settings.rollout_batch_size} "
            f"({per_rank} per worker), {settings.ppo_epochs} PPO epochs x {minibatches} minibatches each")

    # Models. Under ZeRO-3 the trained ones load straight into partitions (zero.Init) when a
    # DeepSpeed config is registered first; it must stay referenced while they load.
    ds_marker = _zero3_loading(strategy, train_cfg, precision, world, hidden_size(policy_cfg.name_or_path))
    policy = load_model(policy_cfg, stage.method, use_gpu, log=ctx.log)
    params = count_params(policy)
    critic_path = _critic_init(cfg, ctx, stage_dir, policy_cfg)
    critic = load_reward_model(policy_cfg.model_copy(update={"name_or_path": critic_path}), stage.method, use_gpu,
                               log=lambda m: ctx.log(f"[{stage.label()}] critic: {m}"))
    critic.config.pad_token_id = tokenizer.pad_token_id
    reference = None
    if not stage.method.uses_adapter():  # LoRA's reference is the policy with its adapters disabled
        reference = load_model(policy_cfg, stage.method.model_copy(update={"name": "full"}), use_gpu, log=lambda m: None)
        reference = prepare_frozen(reference, strategy, train_cfg, precision, world)
    reward_model, reward_tokenizer = None, None
    reward_src = cfg.reward_source(ctx.stage_index)
    if reward_src:
        reward_model, reward_tokenizer = load_reward_for_inference(source_path(cfg, ctx.run_dir, reward_src),
                                                                   cfg.model.trust_remote_code,
                                                                   cfg.model.allow_pickle_weights)
        reward_model = prepare_frozen(reward_model, strategy, train_cfg, precision, world)
    del ds_marker
    ctx.log(f"[{stage.label()}] reward: " + " + ".join(
        ([f"{stage.reward.model_weight:g} x reward model {reward_src}"] if reward_src else [])
        + [f"{w:g} x {name}" for name, w in stage.reward.functions.items()]))
    if use_gpu and not strategy.partitions_parameters():  # ZeRO-3 places its partitions itself
        device = torch.device("cuda", torch.cuda.current_device())
        for m in (policy, critic, reference, reward_model):
            if m is not None:
                m.to(device)

    actor = build_engine(policy, strategy, train_cfg, train_cfg.lr, precision, world, optimizer_steps, use_gpu)
    value = build_engine(critic, strategy, train_cfg, settings.critic_lr or train_cfg.lr, precision, world,
                         optimizer_steps, use_gpu)
    # After the engine: ZeRO-3's own forward hooks must wrap the head's output first, so the
    # values read here re-gather the head's weights in backward like any other output.
    values_of = ValueReader(value.module)
    if settings.generation == "vllm":
        generator = VLLMRollouts.start(cfg, ctx, policy_cfg, actor.module, train_cfg.seed)
    scorer = Scorer(stage.reward, reward_model, reward_tokenizer, stage.evaluate.batch_size)
    kl_ctl = (rl.AdaptiveKLController(settings.kl_coef, settings.kl_target, settings.kl_horizon)
              if settings.kl_target else rl.FixedKLController(settings.kl_coef))

    # Held-out score before training: greedy answers, exact match and mean reward.
    held_out = None
    before = None
    if stage.evaluate.data:
        held_out = load_prompts(stage.evaluate.data, stage.data, tokenizer,
                                cfg.model.max_seq_len - stage.evaluate.max_new_tokens, "evaluate.data",
                                stage.evaluate.max_samples, ctx.log)
        if stage.evaluate.before and not ctx.resume_from:
            before = evaluate(actor, generator, held_out, tokenizer, scorer, stage, ctx)
            ctx.log(f"[{stage.label()}] held-out before PPO: {_describe(before)}")

    # Retain sets before the first rollout (a resumed stage reads what its first attempt scored).
    metrics_log = MetricsLog.for_stage(cfg, ctx, stage_dir)
    retained = RetainWatch(load_retain_sets(cfg, stage), tokenizer, stage, ctx, stage_dir, cfg.model.max_seq_len,
                           metrics_log)
    retained.before(actor.module)

    # Resume: engines, KL coefficient and the step; the prompt order is a function of (seed, step).
    start = 0
    if ctx.resume_from:
        state = json.loads((Path(ctx.resume_from) / "ppo_state.json").read_text())
        actor.load(Path(ctx.resume_from) / "actor")
        value.load(Path(ctx.resume_from) / "critic")
        kl_ctl.value, start = state["kl_coef"], state["step"]
        rng_file = Path(ctx.resume_from) / f"rng_state_{ctx.rank}.pt"
        if rng_file.is_file():  # absent after a change of world size: sampling then differs, nothing else
            rng = torch.load(rng_file, weights_only=True)
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state(rng["cuda"])
        if isinstance(generator, VLLMRollouts):  # it started from the policy's initialisation
            generator.sync(actor.module, strategy.label())
    publisher = CheckpointPublisher(stage_dir / "checkpoints", keep=cfg.run.keep_checkpoints, world_size=world,
                                    strategy=strategy.label(), log=ctx.log) if ctx.is_main else None
    if publisher:
        stage_dir.mkdir(parents=True, exist_ok=True)
        publisher.recover()
    save_every = train_cfg.save_every or steps_per_epoch
    history: list[dict] = []
    loop_started = time.time()
    for step in range(start, total):
        batch = rank_batch(prompts, step, settings.rollout_batch_size, ctx.rank, world, train_cfg.seed)
        t0 = time.time()
        if isinstance(generator, VLLMRollouts):
            generator.step = step  # its sampler is seeded from (seed, step, rank): resumable
        with gathered_for(generator, actor.module, strategy.label()):  # hf under ZeRO-3: once per rollout
            rollout = make_rollout(actor.module, generator, tokenizer, batch, settings, sample=True)
        release(generator)
        t1 = time.time()
        scores, parts = scorer.score(batch, rollout)
        t2 = time.time()
        experience = make_experience(actor, value, values_of, reference, rollout, scores, settings, kl_ctl.value)
        stats = ppo_update(actor, value, values_of, experience, settings, train_cfg.micro_batch_size, train_cfg.seed,
                           step)
        t3 = time.time()
        synced = generator.sync(actor.module, strategy.label()) if isinstance(generator, VLLMRollouts) else {}
        t4 = time.time()
        metrics = {
            "step": step + 1,
            **_global_means({**experience.stats, **parts, **stats}, world),
            "kl_coef": kl_ctl.value,
            "lr": actor.lr(),
            "time_generate": round(t1 - t0, 3),
            "time_score": round(t2 - t1, 3),
            "time_train": round(t3 - t2, 3),
            **({"time_sync": round(t4 - t3, 3), **synced} if synced else {}),
        }
        kl_ctl.update(metrics["kl"], settings.rollout_batch_size)
        history.append(metrics)
        if metrics_log is not None:
            metrics_log.write(metrics)
        last = step + 1 == total
        logged = (step + 1) % train_cfg.log_every == 0 or step == start or last
        if logged:
            done = step + 1 - start
            eta = (time.time() - loop_started) / done * (total - step - 1)
            ctx.log(f"[{stage.label()}] step {step + 1}/{total} reward {metrics['score']:.3f} "
                    f"(std {metrics['score_std']:.3f}) kl {metrics['kl']:.3f} coef {metrics['kl_coef']:.3f} "
                    f"entropy {metrics['entropy']:.3f} clip {metrics['policy_clipfrac']:.2f} "
                    f"vf {metrics['value_loss']:.4f} len {metrics['response_length']:.1f} | gen "
                    f"{metrics['time_generate']:.1f}s train {metrics['time_train']:.1f}s, eta {_fmt_seconds(eta)}")
        if (step + 1) % save_every == 0 or last:
            checkpoint = save_checkpoint(actor, value, kl_ctl.value, step + 1, stage_dir, cfg, ctx, publisher)
            ctx.report(metrics, checkpoint_dir=str(checkpoint) if checkpoint else None)
            if checkpoint and publisher:
                publisher.rotate()  # after the report: Ray has copied what it registered
        elif logged:  # a report per rollout would cost more than the rollout (Ray Train's report is a sync)
            ctx.report(metrics, progress=True)
    if publisher:
        publisher.finish()
    if metrics_log is not None:
        metrics_log.close()

    after = None
    if held_out is not None:
        after = evaluate(actor, generator, held_out, tokenizer, scorer, stage, ctx)
        ctx.log(f"[{stage.label()}] held-out after PPO: {_describe(after)}")
    forgetting = retained.after(actor.module, total)

    final_dir = stage_dir / "final"
    export_policy(actor.module, strategy.label(), final_dir, ctx)
    tail = history[-max(1, len(history) // 10):]  # the last tenth of the rollouts, for end-of-run values
    summary = {
        "stage": stage.label(),
        "kind": "ppo",
        "method": stage.method.name,
        "strategy": strategy.label(),
        "world_size": world,
        "trainable_params": params.trainable,
        "total_params": params.total,
        **parameter_shard(actor.module),
        **optimizer_shard(actor.model, actor.optimizer),
        "steps": total,
        "prompts": len(prompts),
        "policy_from": cfg.init_source(ctx.stage_index),
        "reward_from": reward_src,
        "critic_from": cfg.critic_source(ctx.stage_index) or "policy init (new value head)",
        "reward_first": history[0]["score"] if history else None,
        "reward_last": _mean(tail, "score"),
        "kl_last": _mean(tail, "kl"),
        "kl_target": settings.kl_target,
        "kl_coef_last": kl_ctl.value,
        "exact_match_before": before["exact_match"] if before else None,
        "exact_match_after": after["exact_match"] if after else None,
        "heldout_reward_before": before["reward"] if before else None,
        "heldout_reward_after": after["reward"] if after else None,
        "eval_items": after["items"] if after else 0,
        "time_generate": round(sum(h["time_generate"] for h in history), 1),
        "time_train": round(sum(h["time_train"] for h in history), 1),
        "generation": settings.generation,
        **({"time_sync": round(sum(h.get("time_sync", 0.0) for h in history), 1),
            "engine_logprob_diff": _mean(tail, "engine_logprob_diff")} if settings.generation == "vllm" else {}),
        "wall_seconds": round(time.time() - started, 1),
        "model_dir": str(final_dir),
        **forgetting,
    }
    return complete_stage(cfg, ctx, stage_dir, final_dir, summary, tokenizer)


# ---------------------------------------------------------------- data


def load_prompts(source: str, data_cfg, tokenizer, max_prompt_tokens: int, field: str, limit: int | None,
                 log=print) -> list[Prompt]:
    """Instruction rows -> prompts; a prompt too long to leave room for the response is dropped (counted)."""
    rows, fmt = load_checked(source, data_cfg, field)
    if fmt not in PROMPT_FORMATS:
        raise DataError(f"{field}: the ppo stage samples responses to prompts from alpaca, messages or "
                        f"prompt_completion rows; {source} has format {fmt}.")
    if limit:
        rows = rows.select(range(min(len(rows), limit)))
    out, dropped = [], 0
    for row in rows:
        text = generation_prompt(row, fmt, tokenizer)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) > max_prompt_tokens:
            dropped += 1
            continue
        if fmt == "prompt_completion":
            scored = row["prompt"]
        else:
            messages = to_messages(row, fmt)
            scored = messages[: max(j for j, m in enumerate(messages) if m["role"] == "assistant")]
        out.append(Prompt(text, scored, reference_answer(row, fmt)))
    if not out:
        raise DataError(f"{field}: no prompt of {source} fits model.max_seq_len minus ppo.max_new_tokens "
                        f"({max_prompt_tokens} tokens). Fix: raise model.max_seq_len.")
    if dropped:
        log(f"{field}: dropped {dropped} prompts longer than {max_prompt_tokens} tokens")
    return out


def rank_batch(prompts: list[Prompt], step: int, rollout: int, rank: int, world: int, seed: int) -> list[Prompt]:
    """This rank's prompts for rollout `step`: a seeded shuffle per pass over the data, strided by rank."""
    per_epoch = len(prompts) // rollout * rollout or len(prompts)
    start = step * rollout
    epoch, offset = divmod(start, per_epoch)
    order = list(range(len(prompts)))
    random.Random(seed * 100_003 + epoch).shuffle(order)
    chosen = [order[(offset + i) % len(order)] for i in range(rollout)]
    return [prompts[i] for i in chosen[rank::world]]


# ---------------------------------------------------------------- rollout


def hf_generate(model, tokenizer, prompts: list[str], settings, sample: bool):
    """(prompt_ids [B, P] left-padded, prompt_mask, response_ids [B, R]) with transformers `generate`."""
    import torch

    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        enc = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    finally:
        tokenizer.padding_side = side
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    kwargs = {"do_sample": True, "temperature": settings.temperature, "top_k": settings.top_k or None,
                  "top_p": settings.top_p} if sample else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=settings.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id, use_cache=True, synced_gpus=_zero3_group(model),
                             **kwargs)
    return enc["input_ids"], enc["attention_mask"], out[:, enc["input_ids"].shape[1]:]


def _zero3_group(model) -> bool:
    """Whether ranks must run generation's forward passes in lockstep: ZeRO-3 parameters across ranks.

    Even with the whole policy gathered (`full_parameters`), each forward of a ZeRO-3 module starts with
    DeepSpeed's step bookkeeping, a broadcast (`reset_step`). A rank whose answers all ended early ran
    fewer forwards, and the ranks' collectives then paired up wrongly and hung (seen once the shipped
    base learned to stop: rank 0 in the reference forward, rank 1 still in the policy's). transformers'
    `synced_gpus` keeps a finished rank running dummy forwards until every rank is done, as it does for
    its own ZeRO-3 integration."""
    import torch.distributed as dist

    return dist.is_initialized() and dist.get_world_size() > 1 and any(hasattr(p, "ds_id") for p in model.parameters())


# A generator turns prompt strings into token ids; `vllm` (VLLMRollouts below) needs the stage's context.
GENERATORS = {"hf": hf_generate}


def resolve_generator(name: str):
    """A built-in generator, or `package.module:function` with `hf_generate`'s signature and return value."""
    if name in GENERATORS:
        return GENERATORS[name]
    import pkgutil

    try:
        return pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise ValueError(f"ppo.generation: cannot use {name!r} ({e}). Fix: hf, or an importable "
                         "'package.module:function'.") from None


class VLLMRollouts:
    """`generation: vllm`: this worker's vLLM engine behind `hf_generate`'s signature (it also returns the
    engine's logprobs), synced with the trained policy before the first rollout and after every update."""

    def __init__(self, engine, seed: int, rank: int):
        self.engine, self.seed, self.rank = engine, seed, rank
        self.step = 0

    @classmethod
    def start(cls, cfg: DistftConfig, ctx: StageContext, policy_cfg, module, seed: int) -> VLLMRollouts:
        from distft.models.vllm_engine import VLLMEngine

        stage = cfg.stages[ctx.stage_index]
        t0 = time.time()
        engine = VLLMEngine(policy_cfg.name_or_path, policy_cfg.revision, cfg.model.dtype, stage.ppo.vllm,
                            use_gpu=cfg.scaling.use_gpu, max_model_len=cfg.model.max_seq_len, seed=seed,
                            world_size=ctx.world_size, rank=ctx.rank, local_rank=ctx.local_rank,
                            trust_remote_code=cfg.model.trust_remote_code,
                            log=lambda m: ctx.log(f"[{stage.label()}] {m}"))
        rollouts = cls(engine, seed, ctx.rank)
        synced = rollouts.sync(module, stage.strategy.label())
        ctx.log(f"[{stage.label()}] vLLM engine started and synced ({synced['sync_tensors']} tensors) in "
                f"{time.time() - t0:.1f}s")
        return rollouts

    def __call__(self, model, tokenizer, prompts: list[str], settings, sample: bool):
        from distft.models.vllm_engine import Sampling

        sampling = Sampling(settings.max_new_tokens, settings.temperature, settings.top_k, settings.top_p)
        # One seed per (run seed, step, rank): the rollout of a resumed run is the uninterrupted one's.
        seed = (self.seed * 1_000_003 + self.step * 100_003 + self.rank * 10_007) % 2**31
        return self.engine.generate(tokenizer, prompts, sampling, sample, seed)

    def sync(self, module, strategy: str) -> dict:
        import torch

        with torch.no_grad():
            return self.engine.sync(module, strategy)


def release(generator) -> None:
    """A vLLM engine on a GPU sleeps while the trainer works (its weights to host memory, its KV cache freed)."""
    if isinstance(generator, VLLMRollouts):
        generator.engine.sleep()


def gathered_for(generator, module, strategy: str):
    """ZeRO-3: the whole policy gathered once around transformers generation; a vLLM engine holds its own copy."""
    return nullcontext() if isinstance(generator, VLLMRollouts) else full_parameters(module, strategy)


@dataclass
class Rollout:
    prompt_ids: object  # [B, P], left-padded
    prompt_mask: object
    response_ids: object  # [B, R]
    mask: object  # [B, R]: response tokens up to and including the first EOS
    finished: object  # [B]: the response emitted EOS
    texts: list[str]  # decoded responses, special tokens removed
    engine_logprobs: object = None  # [B, R] the engine's own, when it reports them: a check, never the loss's

    def sequences(self):
        """(input_ids, attention_mask, position_ids) of prompt + response, positions as in generation."""
        import torch

        ids = torch.cat([self.prompt_ids, self.response_ids], dim=1)
        attention = torch.cat([self.prompt_mask, self.mask.to(self.prompt_mask.dtype)], dim=1)
        positions = (attention.cumsum(dim=1) - 1).clamp(min=0)
        return ids, attention, positions

    def select(self, idx) -> Rollout:
        return Rollout(self.prompt_ids[idx], self.prompt_mask[idx], self.response_ids[idx], self.mask[idx],
                       self.finished[idx], [self.texts[i] for i in idx.tolist()],
                       None if self.engine_logprobs is None else self.engine_logprobs[idx])


def make_rollout(model, generator, tokenizer, batch: list[Prompt], settings, sample: bool) -> Rollout:
    was_training = model.training
    model.eval()
    try:
        out = generator(model, tokenizer, [p.text for p in batch], settings, sample)
    finally:
        model.train(was_training)
    prompt_ids, prompt_mask, response_ids = out[:3]
    engine_logprobs = out[3] if len(out) > 3 else None
    mask, finished = rl.response_mask(response_ids, tokenizer.eos_token_id)
    # Tokens after the first EOS are padding from here on.
    response_ids = response_ids.masked_fill(mask == 0, tokenizer.pad_token_id)
    texts = tokenizer.batch_decode(response_ids, skip_special_tokens=True)
    return Rollout(prompt_ids, prompt_mask, response_ids, mask, finished, [t.strip() for t in texts],
                   engine_logprobs)


# ---------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """score = model_weight * RM(prompt, response) + sum(weight * function(prompt, response, reference))."""

    spec: object  # the stage's RewardSpec
    model: object  # the frozen reward model, or None
    tokenizer: object  # the reward model's tokenizer
    batch_size: int

    def score(self, batch: list[Prompt], rollout: Rollout):
        """(scores [B], {name: mean} parts for the log)."""
        import torch

        total = torch.zeros(len(batch))
        parts = {}
        if self.model is not None:
            seqs = [scored_ids(p.scored, _as_response(p.scored, t), self.tokenizer) for p, t in zip(batch, rollout.texts)]
            rm = reward_scores(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size)
            total += self.spec.model_weight * rm
            parts["reward_model"] = float(rm.mean())
        if self.spec.functions:
            fn = torch.tensor(weighted_scores(self.spec.functions, [p.text for p in batch], rollout.texts,
                                              [p.reference for p in batch]))
            total += fn
            parts["reward_functions"] = float(fn.mean())
        return total, parts


def _as_response(prompt, text: str):
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


# ---------------------------------------------------------------- experience and the update


class ValueReader:
    """Per-token values from a sequence-classification model: the output of its head at every position.

    The reward model's `score` head, applied to each position instead of only the last one,
    is the critic's value head (the "critic initialised from the RM" of InstructGPT).
    """

    def __init__(self, critic):
        heads = [(n, m) for n, m in critic.named_modules() if n.split(".")[-1] in ("score", "classifier")]
        if not heads:
            raise ValueError("the critic has no `score`/`classifier` head to read values from")
        _, head = min(heads, key=lambda nm: nm[0].count("."))  # the outermost (peft wraps the head)
        self.captured = None
        head.register_forward_hook(self._capture)

    def _capture(self, module, args, output):
        self.captured = output

    def __call__(self, model, ids, attention, positions, start: int):
        """Values [B, R] of the states before each response token (prompt length `start`)."""
        model(input_ids=ids, attention_mask=attention, position_ids=positions)
        values = self.captured[..., 0].float()
        self.captured = None
        return values[:, start - 1 : -1]


def policy_forward(model, ids, attention, positions, response_ids, start: int, temperature: float):
    """(log-probs, entropies) [B, R] of the response tokens under `model`."""
    logits = model(input_ids=ids, attention_mask=attention, position_ids=positions).logits
    logits = logits[:, start - 1 : -1].float() / temperature
    return rl.logprobs_from_logits(logits, response_ids), rl.entropy_from_logits(logits)


@dataclass
class Experience:
    rollout: Rollout
    logprobs: object
    values: object
    advantages: object
    returns: object
    stats: dict


def make_experience(actor: TrainEngine, value: TrainEngine, values_of: ValueReader, reference, rollout: Rollout,
                    scores, settings, kl_coef: float) -> Experience:
    import torch

    ids, attention, positions = rollout.sequences()
    start = rollout.prompt_ids.shape[1]
    with torch.no_grad():
        logprobs, entropy = policy_forward(actor.module, ids, attention, positions, rollout.response_ids, start,
                                           settings.temperature)
        if reference is None:  # LoRA: the reference is the policy without its adapters
            with actor.module.disable_adapter():
                ref_logprobs, _ = policy_forward(actor.module, ids, attention, positions, rollout.response_ids, start,
                                                 settings.temperature)
        else:
            ref_logprobs, _ = policy_forward(reference, ids, attention, positions, rollout.response_ids, start,
                                             settings.temperature)
        values = values_of(value.module, ids, attention, positions, start)
    mask = rollout.mask
    scores = scores.to(logprobs.device)
    raw = scores
    if settings.whiten_rewards:
        scores = rl.masked_whiten(scores.unsqueeze(1), torch.ones_like(scores.unsqueeze(1)), shift_mean=False)[:, 0]
    rewards, kl = rl.token_rewards(scores, logprobs, ref_logprobs, mask, kl_coef, settings.kl_estimator,
                                   rollout.finished, settings.unfinished_penalty)
    advantages, returns = rl.gae_advantages(rewards, values, mask, settings.gamma, settings.lam)
    advantages = rl.masked_whiten(advantages, mask)
    lengths = mask.sum(dim=1).float()
    stats = {
        "score": float(raw.mean()),  # before whitening: what the reward model and functions said
        "score_std": float(raw.std()) if len(raw) > 1 else 0.0,
        "kl": float((kl * mask).sum(dim=1).mean()),  # per sequence: summed over its tokens
        "entropy": float(rl.masked_mean(entropy, mask)),
        "response_length": float(lengths.mean()),
        "finished": float(rollout.finished.float().mean()),
        "value_mean": float(rl.masked_mean(values, mask)),
    }
    if rollout.engine_logprobs is not None:  # how far the engine's sampler is from the trained policy
        stats["engine_logprob_diff"] = float(rl.masked_mean((rollout.engine_logprobs - logprobs).abs(), mask))
    return Experience(rollout, logprobs, values, advantages, returns, stats)


def ppo_update(actor: TrainEngine, value: TrainEngine, values_of: ValueReader, exp: Experience, settings,
               micro: int, seed: int, step: int) -> dict:
    import torch

    n = exp.rollout.response_ids.shape[0]
    start = exp.rollout.prompt_ids.shape[1]
    gen = torch.Generator().manual_seed(seed * 7919 + step)
    sums: dict[str, float] = {}
    count = 0
    for _ in range(settings.ppo_epochs):
        for chunk in torch.randperm(n, generator=gen).split(micro):
            part = exp.rollout.select(chunk)
            ids, attention, positions = part.sequences()
            logprobs, _entropy = policy_forward(actor.model, ids, attention, positions, part.response_ids, start,
                                               settings.temperature)
            pl = rl.policy_loss(logprobs, exp.logprobs[chunk], exp.advantages[chunk], part.mask, settings.clip_eps)
            actor.backward(pl.loss)
            actor.step()
            values = values_of(value.model, ids, attention, positions, start)
            vl = rl.value_loss(values, exp.values[chunk], exp.returns[chunk], part.mask, settings.value_clip_eps)
            value.backward(vl.loss)
            value.step()
            for key, v in (("policy_loss", pl.loss), ("policy_clipfrac", pl.clip_fraction), ("approx_kl", pl.approx_kl),
                           ("value_loss", vl.loss), ("value_clipfrac", vl.clip_fraction)):
                sums[key] = sums.get(key, 0.0) + float(v.detach())
            count += 1
    return {k: v / max(count, 1) for k, v in sums.items()}


def _global_means(values: dict, world: int) -> dict:
    """Each rank's batch means -> means over all ranks (equal batch sizes), for the log and the KL controller."""
    if world <= 1:
        return values
    keys = sorted(values)
    return {k: v / world for k, v in zip(keys, sum_over_ranks([values[k] for k in keys]))}


def _mean(rows: list[dict], key: str) -> float | None:
    return sum(r[key] for r in rows) / len(rows) if rows else None


# ---------------------------------------------------------------- evaluation, checkpoints, export


def evaluate(actor: TrainEngine, generator, held_out: list[Prompt], tokenizer, scorer: Scorer, stage,
             ctx: StageContext) -> dict:
    """Greedy answers to held-out prompts: exact match against the references and the mean reward."""
    mine = held_out[ctx.rank :: ctx.world_size]
    real = len(mine)
    # Every rank runs the same number of equal batches (collectives under ZeRO-3): pad, count only real items.
    mine = mine + mine[:1] * (math.ceil(len(held_out) / ctx.world_size) - real)
    settings = stage.ppo.model_copy(update={"max_new_tokens": stage.evaluate.max_new_tokens})
    correct, reward_sum = 0.0, 0.0
    bs = stage.evaluate.batch_size
    with gathered_for(generator, actor.module, stage.strategy.label()):
        for i in range(0, len(mine), bs):
            batch = mine[i : i + bs]
            rollout = make_rollout(actor.module, generator, tokenizer, batch, settings, sample=False)
            scores, _ = scorer.score(batch, rollout)
            keep = max(0, min(len(batch), real - i))
            correct += sum(p.reference is not None and normalize_answer(t) == normalize_answer(p.reference)
                           for p, t in zip(batch[:keep], rollout.texts[:keep]))
            reward_sum += float(scores[:keep].sum())
    release(generator)
    items = real
    if ctx.world_size > 1:
        correct, reward_sum, items = sum_over_ranks([correct, reward_sum, real])
    return {"exact_match": correct / max(items, 1), "reward": reward_sum / max(items, 1), "items": int(items)}


def _describe(result: dict) -> str:
    return f"exact match {result['exact_match']:.1%}, mean reward {result['reward']:.3f} ({result['items']} prompts)"


def save_checkpoint(actor: TrainEngine, value: TrainEngine, kl_coef: float, step: int, stage_dir: Path, cfg, ctx,
                    publisher: CheckpointPublisher | None) -> Path | None:
    """Actor and critic (weights, optimizer, scheduler) and the PPO state, staged then sealed by rank 0."""
    import torch

    staged = staging_dir(stage_dir / "checkpoints") / f"checkpoint-{step}"
    actor.save(staged / "actor", ctx.is_main)
    value.save(staged / "critic", ctx.is_main)
    # Sampling draws from each rank's RNG: restoring it makes a resumed run the uninterrupted one.
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, staged / f"rng_state_{ctx.rank}.pt")
    if ctx.is_main:
        from distft.config import dump_config

        (staged / "ppo_state.json").write_text(json.dumps({"step": step, "kl_coef": kl_coef}))
        dump_config(cfg, staged / "distft_config.yaml")
    barrier()  # every rank's files are written before rank 0 hashes them
    ready = publisher.publish(step) if publisher else None
    ready = broadcast_from_rank0(str(ready) if ready else None)
    return Path(ready) if ready and ctx.is_main else None


def export_policy(module, strategy_label: str, final_dir: Path, ctx: StageContext) -> None:
    """The trained policy as one HF model (or adapter) in safetensors; gathered once under ZeRO-3."""
    with full_parameters(module, strategy_label):
        if ctx.is_main:
            module.save_pretrained(str(final_dir), safe_serialization=True)
            if getattr(module, "generation_config", None) is not None:
                module.generation_config.save_pretrained(str(final_dir))
    barrier()


def _critic_init(cfg: DistftConfig, ctx: StageContext, stage_dir: Path, policy_cfg) -> str:
    """Where the critic starts: the reward model (a LoRA RM merged once) or, with none, the policy's init."""
    source = cfg.critic_source(ctx.stage_index)
    if not source:
        return policy_cfg.name_or_path
    return plain_model_dir(source_path(cfg, ctx.run_dir, source), stage_dir, ctx, cfg.model, name="critic_init",
                           reward=True)


def _zero3_loading(strategy, train_cfg, precision: str, world: int, hidden: int | None):
    """Keep a `HfDeepSpeedConfig` alive while models load, so ZeRO-3 partitions them as they load."""
    if strategy.name != "deepspeed" or strategy.zero_stage != 3:
        return nullcontext()
    from transformers.integrations import HfDeepSpeedConfig

    from distft.distributed.deepspeed import build_deepspeed_config

    return HfDeepSpeedConfig(build_deepspeed_config(strategy, train_cfg, precision, world, hidden))

