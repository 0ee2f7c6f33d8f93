"""Direct preference optimisation (Rafailov et al. 2023) with TRL's DPOTrainer.

Reads top to bottom: pairs -> policy (by default the last earlier SFT output) -> held-out
exact match before -> trainer -> train -> exact match after -> export. The loss pushes
the implicit reward `beta * log(policy / reference)` of the chosen response above the
rejected one's. The reference is the policy's starting point, frozen: with lora/qlora the
model with its adapters disabled (no copy), with full a second copy TRL loads from the
same directory.
Like every stage it runs in one process, under torchrun, or in a Ray Train worker.
"""

from __future__ import annotations

import time

from distft.config import DistftConfig
from distft.data.formats import DataError
from distft.data.loading import fitting_preferences, split_rows
from distft.distributed import fsdp
from distft.models.loading import load_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.chain import stage_model
from distft.stages.context import StageContext
from distft.stages.trainer_setup import (
    base_as_reference,
    export_model,
    finish,
    held_out_task,
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
    from trl import DPOConfig, DPOTrainer

    stage = cfg.stages[ctx.stage_index]
    train_cfg, data_cfg, strategy = stage.train, stage.data, stage.strategy
    use_fsdp = strategy.name == "fsdp"
    started = time.time()
    stage_dir = prepare_worker(cfg, ctx)
    model_cfg = stage_model(cfg, ctx)  # the last earlier sft/pretrain output, else the base

    # Data: validated pairs, strings or chat turns; TRL tokenizes them (chat turns through the
    # template). A pair longer than max_seq_len is dropped and counted, as in the reward stage:
    # TRL would truncate it, often cutting away exactly the tokens where chosen and rejected differ.
    tokenizer = load_tokenizer(model_cfg)
    train_rows, eval_rows, fmt = split_rows(data_cfg, train_cfg.seed)
    if fmt != "preference":
        raise DataError(f"data.train: the dpo stage trains on preference pairs (chosen/rejected, optional prompt); "
                        f"{data_cfg.train} has format {fmt}.")
    max_len = cfg.model.max_seq_len
    train_rows, train_stats = fitting_preferences(train_rows, tokenizer, max_len, "data.train")
    eval_rows, _ = fitting_preferences(eval_rows, tokenizer, max_len, "data.eval")
    ctx.log(f"[{stage.label()}] data (preference): {train_stats.describe(max_len)}")

    steps = total_steps(cfg, ctx, len(train_rows))
    args = DPOConfig(
        **trainer_arguments(cfg, ctx, stage_dir),
        max_length=max_len,
        beta=stage.dpo.beta,
        loss_type=[stage.dpo.loss_type],
        label_smoothing=stage.dpo.label_smoothing,
    )
    # The policy, with the method's adapters attached. Under FSDP2 only local rank 0 reads the weights.
    with fsdp.load_env(use_fsdp and ctx.world_size > 1):
        model = load_model(model_cfg, stage.method, cfg.scaling.use_gpu, log=ctx.log)
    params = count_params(model)

    # Held-out task score before training: DPO on near misses should sharpen the answers themselves.
    task = held_out_task(stage)
    before = score_held_out(model, tokenizer, task, stage, ctx, "before")

    trainer = DPOTrainer(
        model=model,
        ref_model=None,  # full: TRL loads a frozen copy of the starting model; lora: see base_as_reference
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        processing_class=tokenizer,
        callbacks=stage_callbacks(cfg, ctx, stage_dir, steps),
    )
    base_as_reference(trainer)
    ready(trainer, stage, ctx)
    result = train(trainer, ctx)
    # Eval split: the share of pairs whose implicit reward ranks chosen first, and the mean margin.
    # Both start at 0 exactly: policy and reference agree before the first step.
    eval_metrics = trainer.evaluate()
    accuracy, margin = eval_metrics.get("eval_rewards/accuracies"), eval_metrics.get("eval_rewards/margins")
    if accuracy is not None and margin is not None:
        ctx.log(f"[{stage.label()}] eval split: implicit reward accuracy {accuracy:.1%}, margin {margin:.3f}")

    after = score_held_out(trainer.model, tokenizer, task, stage, ctx, "after")

    # Export: a full HF model, or the trained adapter alone (its config points at the starting model).
    final_dir = stage_dir / "final"
    export_model(trainer, final_dir, ctx)
    summary = {
        **run_summary(cfg, ctx, trainer, result, eval_metrics, params, started, final_dir),
        "exact_match_before": before,
        "exact_match_after": after,
        "eval_items": len(task.rows) if task else 0,
        "eval_reward_accuracy": accuracy,
        "eval_reward_margin": margin,
        "train_pairs": len(train_rows),
        "dropped_pairs": train_stats.dropped,
    }
    if ctx.is_main:
        model.generation_config.save_pretrained(str(final_dir))
    return finish(cfg, ctx, stage_dir, final_dir, summary, tokenizer)

