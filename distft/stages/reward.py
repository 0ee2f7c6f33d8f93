"""Reward modelling with TRL's RewardTrainer: a scalar head trained on preference pairs.

Reads top to bottom: pairs -> sequence-classification model -> held-out pairwise
accuracy before -> trainer -> train -> accuracy after -> export. The loss is
Bradley-Terry, -log sigmoid(r(chosen) - r(rejected)); TRL logs the batch accuracy
and margin itself. Like every stage it runs in one process, under torchrun, or in
a Ray Train worker; the environment comes in through `ctx`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from distft.config import DistftConfig, dump_config
from distft.data.formats import DataError, encode_preference
from distft.data.loading import load_checked, split_rows, tokenize_preferences
from distft.distributed import fsdp
from distft.distributed.checkpoint import check_resume_on_ranks, staging_dir
from distft.distributed.process_group import ensure_process_group
from distft.distributed.sharding import full_parameters, optimizer_shard, parameter_shard
from distft.distributed.strategy import trainer_strategy_kwargs
from distft.models.loading import load_reward_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.context import StageContext
from distft.stages.evaluate import Pairwise, pairwise_accuracy
from distft.stages.reporting import ReportCallback, quiet_libraries


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    import torch
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import RewardConfig, RewardTrainer

    stage = cfg.stages[ctx.stage_index]
    train_cfg, data_cfg, strategy = stage.train, stage.data, stage.strategy
    use_deepspeed, use_fsdp = strategy.name == "deepspeed", strategy.name == "fsdp"
    if use_deepspeed and not cfg.scaling.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when deepspeed is first imported
    stage_dir = Path(ctx.run_dir) / stage.label()
    started = time.time()
    torch.set_num_threads(cfg.scaling.threads_per_worker())
    quiet_libraries()
    ensure_process_group(ctx.world_size, cfg.scaling.use_gpu, deepspeed=use_deepspeed)
    set_seed(train_cfg.seed)
    if ctx.resume_from:  # a damaged, half-written or incompatible checkpoint is refused before anything is built
        check_resume_on_ranks(ctx.resume_from, world_size=ctx.world_size, strategy=strategy.label(),
                              is_main=ctx.is_main, search=[stage_dir / "checkpoints"])
    ctx.log(f"[{stage.label()}] {train_cfg.batch_plan(ctx.world_size)}")

    # Data: validated pairs -> chosen/rejected token ids. We tokenize (as TRL would), so the
    # held-out scoring below reads exactly what training read, and over-long pairs are counted.
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, fmt = split_rows(data_cfg, train_cfg.seed)
    if fmt != "preference":
        raise DataError(f"data.train: the reward stage trains on preference pairs (chosen/rejected, optional prompt); "
                        f"{data_cfg.train} has format {fmt}.")
    max_len = cfg.model.max_seq_len
    train_ds, train_stats = tokenize_preferences(train_rows, tokenizer, max_len, "data.train")
    eval_ds, _ = tokenize_preferences(eval_rows, tokenizer, max_len, "data.eval")
    ctx.log(f"[{stage.label()}] data (preference): {train_stats.describe(max_len)}")

    grad_accum = train_cfg.grad_accum(ctx.world_size)
    steps_per_epoch = math.ceil(len(train_ds) / (train_cfg.micro_batch_size * ctx.world_size * grad_accum))
    total_steps = train_cfg.max_steps or max(1, math.ceil(steps_per_epoch * train_cfg.epochs))
    args = RewardConfig(
        output_dir=str(staging_dir(stage_dir / "checkpoints")),  # ReportCallback seals each into checkpoints/
        per_device_train_batch_size=train_cfg.micro_batch_size,
        per_device_eval_batch_size=train_cfg.micro_batch_size,
        gradient_accumulation_steps=grad_accum,
        learning_rate=train_cfg.lr,
        optim=train_cfg.optimizer,
        lr_scheduler_type=train_cfg.scheduler,
        warmup_steps=train_cfg.warmup_ratio,  # transformers 5 takes a ratio (<1) here
        weight_decay=train_cfg.weight_decay,
        max_grad_norm=train_cfg.max_grad_norm,
        num_train_epochs=train_cfg.epochs,
        max_steps=train_cfg.max_steps or -1,
        seed=train_cfg.seed,
        logging_steps=train_cfg.log_every,
        logging_first_step=True,
        eval_strategy="steps" if train_cfg.eval_every else "epoch",
        eval_steps=train_cfg.eval_every,
        save_strategy="steps" if train_cfg.save_every else "epoch",
        save_steps=train_cfg.save_every,
        save_total_limit=None,  # ReportCallback rotates (run.keep_checkpoints), never the last complete one
        max_length=None,  # pairs are already tokenized and length-checked above
        use_cpu=not cfg.scaling.use_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Created before the model on purpose: under ZeRO-3 `from_pretrained` then loads
        # straight into partitions (zero.Init) instead of a full copy per worker.
        **trainer_strategy_kwargs(strategy, train_cfg, cfg.model.dtype, ctx.world_size),
    )
    # Model: the base or SFT model's body under a new one-output `score` head (or an RM's own
    # head), with the method's adapters attached. Under FSDP2 only local rank 0 reads the weights.
    with fsdp.load_env(use_fsdp and ctx.world_size > 1):
        model = load_reward_model(cfg.model, stage.method, cfg.scaling.use_gpu, log=ctx.log)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head reads the last non-pad token
    params = count_params(model)

    # Held-out pairwise accuracy before training (about 50% with a new head), so the summary
    # shows what training bought.
    held_out = None
    before = None
    if stage.evaluate.data:
        held_out = _held_out_pairs(stage, data_cfg, tokenizer)
        if stage.evaluate.before and not ctx.resume_from:
            before = _score_before(model, tokenizer, held_out, stage, ctx, rank0_only=use_fsdp)
            ctx.log(f"[{stage.label()}] held-out pairwise accuracy before training: {_describe(before)}")

    trainer = RewardTrainer(
        model=model,
        args=args,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=[ReportCallback(ctx, stage.label(), stage_dir, total_steps, cfg)],
    )
    trainer.remove_callback(PrinterCallback)  # ReportCallback prints one progress line instead
    if use_fsdp and fsdp.enable_on_cpu(trainer):
        ctx.log(f"[{stage.label()}] FSDP2 on CPU: fully_shard over gloo")
    result = trainer.train(resume_from_checkpoint=ctx.resume_from)
    eval_metrics = trainer.evaluate()  # eval split: eval_accuracy, eval_margin (TRL's, batch means)
    ctx.log(f"[{stage.label()}] eval split: accuracy {eval_metrics.get('eval_accuracy', float('nan')):.1%}, "
            f"margin {eval_metrics.get('eval_margin', float('nan')):.3f}")

    after = None
    if held_out is not None:
        after = _score(trainer.model, tokenizer, held_out, stage, ctx)
        ctx.log(f"[{stage.label()}] held-out pairwise accuracy after training: {_describe(after)}")

    # Export: a full sequence-classification model, or the adapter plus its head (its config
    # points at the base). Either reloads with transformers (+ peft), see load_reward_for_inference.
    final_dir = stage_dir / "final"
    if trainer.is_fsdp_enabled:
        fsdp.save_full_model(trainer, final_dir, ctx.is_main)
    else:
        trainer.save_model(str(final_dir))
    summary = {
        "stage": stage.label(),
        "kind": stage.stage,
        "method": stage.method.name,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": _logged(trainer.state.log_history, "loss", 0),
        "last_logged_loss": _logged(trainer.state.log_history, "loss", -1),
        "eval_loss": eval_metrics.get("eval_loss"),
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
        "world_size": ctx.world_size,
        "strategy": strategy.label(),
        **parameter_shard(trainer.model),
        **optimizer_shard(trainer.model_wrapped, trainer.optimizer),
        "wall_seconds": round(time.time() - started, 1),
        "model_dir": str(final_dir),
    }
    if ctx.is_main:
        tokenizer.save_pretrained(str(final_dir))
        dump_config(cfg, final_dir / "distft_config.yaml")
        (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.report({"done": 1, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})
    return summary


def _held_out_pairs(stage, data_cfg, tokenizer) -> dict:
    rows, _ = load_checked(stage.evaluate.data, data_cfg, "evaluate.data", fmt="preference")
    if stage.evaluate.max_samples:
        rows = rows.select(range(min(len(rows), stage.evaluate.max_samples)))
    pairs = [encode_preference(row, tokenizer) for row in rows]
    # An optional `kind` per pair (the bundled pairs have one) splits the accuracy by kind.
    kinds = [str(k) if k is not None else "other" for k in rows["kind"]] if "kind" in rows.column_names else None
    return {"chosen": [c for c, _ in pairs], "rejected": [r for _, r in pairs], "kinds": kinds}


def _score(model, tokenizer, pairs: dict, stage, ctx) -> Pairwise:
    # Ranks score different numbers of pairs: gather sharded weights once, not per forward.
    with full_parameters(model, stage.strategy.label()):
        return pairwise_accuracy(model, tokenizer.pad_token_id, pairs["chosen"], pairs["rejected"], pairs["kinds"],
                                 stage.evaluate.batch_size, ctx.rank, ctx.world_size)


def _score_before(model, tokenizer, pairs: dict, stage, ctx, rank0_only: bool) -> Pairwise:
    """Before training. Under FSDP2 only rank 0 has weights yet (the rest are on the meta device)."""
    if not rank0_only or ctx.world_size == 1:
        return _score(model, tokenizer, pairs, stage, ctx)
    import torch.distributed as dist

    result = [None]
    if ctx.is_main:
        result[0] = pairwise_accuracy(model, tokenizer.pad_token_id, pairs["chosen"], pairs["rejected"],
                                      pairs["kinds"], stage.evaluate.batch_size)
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _describe(p: Pairwise) -> str:
    kinds = ", ".join(f"{k} {c / max(n, 1):.1%}" for k, (c, n) in p.by_kind.items())
    return f"{p.accuracy:.1%}, mean margin {p.mean_margin:.3f} ({p.total} pairs{'; ' + kinds if kinds else ''})"


def _logged(history: list[dict], key: str, index: int) -> float | None:
    values = [h[key] for h in history if key in h]
    return values[index] if values else None
