"""Reward modelling with TRL's RewardTrainer: a scalar head trained on preference pairs.

Reads top to bottom: pairs -> sequence-classification model -> held-out pairwise
accuracy before -> trainer -> train -> accuracy after -> export. The loss is
Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)); TRL logs the batch accuracy
and margin itself. Like every stage it runs in one process, under torchrun, or in
a Ray Train worker; the environment comes in through `ctx`.
"""

from __future__ import annotations

import time

from distft.config import DistftConfig
from distft.data.formats import DataError, encode_preference
from distft.data.loading import load_checked, split_rows, tokenize_preferences
from distft.distributed import fsdp
from distft.distributed.collectives import local_leader_first
from distft.distributed.sharding import full_parameters
from distft.models.loading import load_reward_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.chain import stage_model
from distft.stages.context import StageContext
from distft.stages.evaluate import Pairwise, pairwise_accuracy
from distft.stages.trainer_setup import (
    export_model,
    finish,
    prepare_worker,
    ready,
    run_summary,
    score_on_rank0,
    stage_callbacks,
    total_steps,
    train,
    trainer_arguments,
)


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    from trl import RewardConfig, RewardTrainer

    stage = cfg.stages[ctx.stage_index]
    train_cfg, data_cfg, strategy = stage.train, stage.data, stage.strategy
    use_fsdp = strategy.name == "fsdp"
    started = time.time()
    stage_dir = prepare_worker(cfg, ctx)
    model_cfg = stage_model(cfg, ctx)  # the base, or an earlier stage's output

    # Data: validated pairs -> chosen/rejected token ids. We tokenize (as TRL would), so the
    # held-out scoring below reads exactly what training read, and over-long pairs are counted.
    tokenizer = load_tokenizer(model_cfg)
    max_len = cfg.model.max_seq_len
    with local_leader_first(ctx.local_rank):  # once per node; the others read the datasets cache
        train_rows, eval_rows, fmt = split_rows(data_cfg, train_cfg.seed)
        if fmt != "preference":
            raise DataError(f"data.train: the reward stage trains on preference pairs (chosen/rejected, optional "
                            f"prompt); {data_cfg.train} has format {fmt}.")
        train_ds, train_stats = tokenize_preferences(train_rows, tokenizer, max_len, "data.train")
        eval_ds, _ = tokenize_preferences(eval_rows, tokenizer, max_len, "data.eval")
    ctx.log(f"[{stage.label()}] data (preference): {train_stats.describe(max_len)}")

    steps = total_steps(cfg, ctx, len(train_ds))
    args = RewardConfig(
        **trainer_arguments(cfg, ctx, stage_dir),
        max_length=None,  # pairs are already tokenized and length-checked above
    )
    # Model: the base or SFT model's body under a new one-output `score` head (or an RM's own
    # head), with the method's adapters attached. Under FSDP2 only local rank 0 reads the weights.
    with fsdp.load_env(use_fsdp and ctx.world_size > 1):
        model = load_reward_model(model_cfg, stage.method, cfg.scaling.use_gpu, log=ctx.log)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    params = count_params(model)

    # Held-out pairwise accuracy before training (about 50% with a new head), so the summary
    # shows what training bought.
    held_out = None
    before = None
    if stage.evaluate.data:
        held_out = _held_out_pairs(stage, data_cfg, tokenizer)
        if stage.evaluate.before and not ctx.resume_from:
            if use_fsdp:  # only rank 0 holds weights before they are sharded
                before = score_on_rank0(lambda: _score(model, tokenizer, held_out, stage, 0, 1), ctx)
            else:
                before = _score(model, tokenizer, held_out, stage, ctx.rank, ctx.world_size)
            ctx.log(f"[{stage.label()}] held-out pairwise accuracy before training: {_describe(before)}")

    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=stage_callbacks(cfg, ctx, stage_dir, steps),
    )
    ready(trainer, stage, ctx)
    result = train(trainer, ctx)
    eval_metrics = trainer.evaluate()  # eval split: eval_accuracy, eval_margin (TRL's, batch means)
    ctx.log(f"[{stage.label()}] eval split: accuracy {eval_metrics.get('eval_accuracy', float('nan')):.1%}, "
            f"margin {eval_metrics.get('eval_margin', float('nan')):.3f}")

    after = None
    if held_out is not None:
        after = _score(trainer.model, tokenizer, held_out, stage, ctx.rank, ctx.world_size)
        ctx.log(f"[{stage.label()}] held-out pairwise accuracy after training: {_describe(after)}")

    # Export: a full sequence-classification model, or the adapter plus its head (its config
    # points at the base). Either reloads with transformers (+ peft), see load_reward_for_inference.
    final_dir = stage_dir / "final"
    export_model(trainer, final_dir, ctx)
    summary = {
        **run_summary(cfg, ctx, trainer, result, eval_metrics, params, started, final_dir),
        "eval_accuracy": eval_metrics.get("eval_accuracy"),
        "eval_margin": eval_metrics.get("eval_margin"),
        "pairwise_accuracy_before": before.accuracy if before else None,
        "pairwise_accuracy_after": after.accuracy if after else None,
        "mean_margin_before": before.mean_margin if before else None,
        "mean_margin_after": after.mean_margin if after else None,
        "pairwise_accuracy_by_kind": {k: c / max(n, 1) for k, (c, n) in after.by_kind.items()} if after else {},
        "eval_pairs": after.total if after else 0,
        "train_pairs": len(train_ds),
        "dropped_pairs": train_stats.dropped,
    }
    return finish(cfg, ctx, stage_dir, final_dir, summary, tokenizer)


def _held_out_pairs(stage, data_cfg, tokenizer) -> dict:
    rows, _ = load_checked(stage.evaluate.data, data_cfg, "evaluate.data", fmt="preference")
    if stage.evaluate.max_samples:
        rows = rows.select(range(min(len(rows), stage.evaluate.max_samples)))
    pairs = [encode_preference(row, tokenizer) for row in rows]
    # An optional `kind` per pair (the bundled pairs have one) splits the accuracy by kind.
    kinds = [str(k) if k is not None else "other" for k in rows["kind"]] if "kind" in rows.column_names else None
    return {"chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs], "kinds": kinds}


def _score(model, tokenizer, pairs: dict, stage, rank: int, world_size: int) -> Pairwise:
    # Ranks score different numbers of pairs: gather sharded weights once, not per forward.
    with full_parameters(model, stage.strategy.label()):
        return pairwise_accuracy(model, tokenizer.pad_token_id, pairs["chosen"], pairs["rejected"], pairs["kinds"],
                                 stage.evaluate.batch_size, rank, world_size)


def _describe(p: Pairwise) -> str:
    kinds = ", ".join(f"{k} {c / max(n, 1):.1%}" for k, (c, n) in p.by_kind.items())
    return f"{p.accuracy:.1%}, mean margin {p.mean_margin:.3f} ({p.total} pairs{'; ' + kinds if kinds else ''})"
