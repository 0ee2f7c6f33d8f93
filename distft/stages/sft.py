"""Supervised fine-tuning (and continued pretraining) with TRL's SFTTrainer.

Reads top to bottom: data -> model -> held-out score before -> trainer -> train
-> score after -> export. Works in one process, under torchrun, or inside a
Ray Train worker; the environment comes in through `ctx`.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from distft.config import DistftConfig, dump_config
from distft.data.loading import load_checked, split_rows, tokenize_dataset
from distft.distributed import fsdp
from distft.distributed.checkpoint import check_resume_on_ranks, staging_dir
from distft.distributed.process_group import ensure_process_group
from distft.distributed.sharding import full_parameters, optimizer_shard, parameter_shard
from distft.distributed.strategy import trainer_strategy_kwargs
from distft.models.loading import load_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.context import StageContext
from distft.stages.evaluate import exact_match
from distft.stages.reporting import ReportCallback, quiet_libraries


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    import torch
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer

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

    # Data: validated rows -> token ids with loss labels (prompt tokens masked).
    tokenizer = load_tokenizer(cfg.model)
    train_rows, eval_rows, fmt = split_rows(data_cfg, train_cfg.seed)
    max_len = cfg.model.max_seq_len
    train_ds, train_stats = tokenize_dataset(train_rows, fmt, tokenizer, max_len, stage.loss_on(), data_cfg.text_field)
    eval_ds, _ = tokenize_dataset(eval_rows, fmt, tokenizer, max_len, stage.loss_on(), data_cfg.text_field)
    ctx.log(f"[{stage.label()}] data ({fmt}, loss on {stage.loss_on()}): {train_stats.describe(max_len)}")

    grad_accum = train_cfg.grad_accum(ctx.world_size)
    steps_per_epoch = math.ceil(len(train_ds) / (train_cfg.micro_batch_size * ctx.world_size * grad_accum))
    total_steps = train_cfg.max_steps or max(1, math.ceil(steps_per_epoch * train_cfg.epochs))
    args = SFTConfig(
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
        max_length=max_len,
        packing=data_cfg.packing,
        use_cpu=not cfg.scaling.use_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Created before the model on purpose: under ZeRO-3 `from_pretrained` then loads
        # straight into partitions (zero.Init) instead of a full copy per worker.
        **trainer_strategy_kwargs(strategy, train_cfg, cfg.model.dtype, ctx.world_size),
    )
    # Model, with the method's adapters attached. Under FSDP2 only local rank 0 reads the
    # weights; the other ranks build on the meta device and get their shards at prepare time.
    with fsdp.load_env(use_fsdp and ctx.world_size > 1):
        model = load_model(cfg.model, stage.method, cfg.scaling.use_gpu, log=ctx.log)
    params = count_params(model)

    # Held-out task score before training, so the summary shows what training bought.
    task_rows = None
    before = None
    if stage.evaluate.data:
        task_rows, _ = load_checked(stage.evaluate.data, data_cfg, "evaluate.data", fmt=fmt)
        if stage.evaluate.max_samples:
            task_rows = task_rows.select(range(min(len(task_rows), stage.evaluate.max_samples)))
        if stage.evaluate.before and not ctx.resume_from:
            before = _score_before(model, tokenizer, task_rows, fmt, stage, ctx, rank0_only=use_fsdp)
            ctx.log(f"[{stage.label()}] held-out exact match before training: {before:.1%} ({len(task_rows)} items)")

    trainer = SFTTrainer(
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
    eval_metrics = trainer.evaluate()

    after = None
    if task_rows is not None:
        after = _score(trainer.model, tokenizer, task_rows, fmt, stage, ctx)
        ctx.log(f"[{stage.label()}] held-out exact match after training: {after:.1%} ({len(task_rows)} items)")

    # Export: a full HF model, or the adapter (its config points at the base).
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
        "first_logged_loss": _logged_loss(trainer.state.log_history, 0),
        "last_logged_loss": _logged_loss(trainer.state.log_history, -1),
        "eval_loss": eval_metrics.get("eval_loss"),
        "exact_match_before": before,
        "exact_match_after": after,
        "eval_items": len(task_rows) if task_rows is not None else 0,
        "train_rows": train_stats.rows,
        "truncated_rows": train_stats.truncated,
        "world_size": ctx.world_size,
        "strategy": strategy.label(),
        **parameter_shard(trainer.model),
        **optimizer_shard(trainer.model_wrapped, trainer.optimizer),
        "wall_seconds": round(time.time() - started, 1),
        "model_dir": str(final_dir),
    }
    if ctx.is_main:
        tokenizer.save_pretrained(str(final_dir))
        model.generation_config.save_pretrained(str(final_dir))
        dump_config(cfg, final_dir / "distft_config.yaml")
        (stage_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    ctx.report({"done": 1, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})
    return summary


def _score(model, tokenizer, rows, fmt, stage, ctx) -> float:
    ev = stage.evaluate
    with full_parameters(model, stage.strategy.label()):
        result = exact_match(model, tokenizer, rows, fmt, ev.max_new_tokens, ev.batch_size, ctx.rank, ctx.world_size)
    return result.accuracy


def _score_before(model, tokenizer, rows, fmt, stage, ctx, rank0_only: bool) -> float:
    """Before training. Under FSDP2 only rank 0 has weights yet (the rest are on the meta device)."""
    if not rank0_only or ctx.world_size == 1:
        return _score(model, tokenizer, rows, fmt, stage, ctx)
    import torch.distributed as dist

    ev = stage.evaluate
    result = [None]
    if ctx.is_main:
        result[0] = exact_match(model, tokenizer, rows, fmt, ev.max_new_tokens, ev.batch_size).accuracy
    dist.broadcast_object_list(result, src=0)
    return result[0]


def _logged_loss(history: list[dict], index: int) -> float | None:
    losses = [h["loss"] for h in history if "loss" in h]
    return losses[index] if losses else None
