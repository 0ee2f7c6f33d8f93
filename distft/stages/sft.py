"""Supervised fine-tuning (and continued pretraining) with TRL's SFTTrainer.

Reads top to bottom: data -> model -> held-out score before -> trainer -> train
-> score after -> export. Works in one process, under torchrun, or inside a
Ray Train worker; the environment comes in through `ctx`.
"""

from __future__ import annotations

import time

from distft.config import DistftConfig
from distft.data.loading import split_rows, streamed_split, tokenize_dataset
from distft.data.packing import uses_varlen_kernel
from distft.distributed import fsdp
from distft.distributed.collectives import local_leader_first
from distft.models.loading import load_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.chain import stage_model
from distft.stages.context import StageContext
from distft.stages.token_metrics import metrics_at_log_steps
from distft.stages.trainer_setup import (
    export_model,
    finish,
    held_out_task,
    own_shard_loader,
    packed_rows_trainer,
    prepare_worker,
    ready,
    run_summary,
    score_held_out,
    stage_callbacks,
    total_steps,
    train,
    trainer_arguments,
)


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    from trl import SFTConfig, SFTTrainer

    stage = cfg.stages[ctx.stage_index]
    train_cfg, data_cfg, strategy = stage.train, stage.data, stage.strategy
    use_fsdp = strategy.name == "fsdp"
    started = time.time()
    stage_dir = prepare_worker(cfg, ctx)
    model_cfg = stage_model(cfg, ctx)  # the base, or an earlier stage's output

    # Data: validated rows -> token ids with loss labels (prompt tokens masked).
    # Once per node: the other ranks read what local rank 0 wrote to the datasets cache.
    tokenizer = load_tokenizer(model_cfg)
    max_len = cfg.model.max_seq_len
    with local_leader_first(ctx.local_rank):
        if data_cfg.streaming:  # Ray Data tokenized this worker's shard already; only eval rows load here
            train_ds, eval_rows, fmt = streamed_split(data_cfg, ctx.dataset_shard("train"))
        else:
            train_rows, eval_rows, fmt = split_rows(data_cfg, train_cfg.seed)
            train_ds, train_stats = tokenize_dataset(train_rows, fmt, tokenizer, max_len, stage.loss_on(),
                                                     data_cfg.text_field)
        eval_ds, _ = tokenize_dataset(eval_rows, fmt, tokenizer, max_len, stage.loss_on(), data_cfg.text_field,
                                      field="data.eval" if data_cfg.eval else "data.train (its eval_fraction split)")
    described = "streamed from Ray Data, tokenized by its tasks" if data_cfg.streaming else train_stats.describe(max_len)
    ctx.log(f"[{stage.label()}] data ({fmt}, loss on {stage.loss_on()}): {described}")

    steps = total_steps(cfg, ctx, 0 if data_cfg.streaming else len(train_ds))
    args = SFTConfig(
        **trainer_arguments(cfg, ctx, stage_dir),
        max_length=max_len,
        packing=data_cfg.packing,
        # A resumed stream cannot be fast-forwarded: skipping would re-read (and re-tokenize) everything
        # trained so far, and Ray's split hands rows out afresh anyway. It goes on with new rows.
        ignore_data_skip=data_cfg.streaming,
    )
    # Model, with the method's adapters attached. Under FSDP2 only local rank 0 reads the
    # weights; the other ranks build on the meta device and get their shards at prepare time.
    with fsdp.load_env(use_fsdp and ctx.world_size > 1):
        model = load_model(model_cfg, stage.method, cfg.scaling.use_gpu, log=ctx.log)
    params = count_params(model)

    # Held-out task score before training, so the summary shows what training bought.
    task = held_out_task(stage, fmt)
    before = score_held_out(model, tokenizer, task, stage, ctx, "before")

    trainer_cls, train_data = SFTTrainer, {"train_dataset": train_ds}
    if data_cfg.streaming:  # the eval rows stand in while TRL's __init__ samples its train set (own_shard_loader)
        trainer_cls, train_data = own_shard_loader(SFTTrainer), {"train_dataset": eval_ds, "stream": train_ds}
    elif data_cfg.packing and not uses_varlen_kernel(model):  # each bin a row (distft/data/packing.py)
        trainer_cls = packed_rows_trainer(SFTTrainer)
    trainer_cls = metrics_at_log_steps(trainer_cls)  # no per-step metric collectives (stages/token_metrics.py)
    trainer = trainer_cls(
        model=model,
        args=args,
        **train_data,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        callbacks=stage_callbacks(cfg, ctx, stage_dir, steps),
    )
    ready(trainer, stage, ctx)
    result = train(trainer, ctx)
    eval_metrics = trainer.evaluate()

    after = score_held_out(trainer.model, tokenizer, task, stage, ctx, "after")

    # Export: a full HF model, or the adapter (its config points at the base).
    final_dir = stage_dir / "final"
    export_model(trainer, final_dir, ctx)
    summary = {
        **run_summary(cfg, ctx, trainer, result, eval_metrics, params, started, final_dir),
        "exact_match_before": before,
        "exact_match_after": after,
        "eval_items": len(task.rows) if task else 0,
        "train_rows": None if data_cfg.streaming else train_stats.rows,
        "truncated_rows": None if data_cfg.streaming else train_stats.truncated,
    }
    if ctx.is_main:
        model.generation_config.save_pretrained(str(final_dir))
    return finish(cfg, ctx, stage_dir, final_dir, summary, tokenizer)
