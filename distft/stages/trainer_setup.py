"""What every Trainer-based stage does the same way: worker set-up and the shared Trainer arguments.

A stage still reads top to bottom; it calls `prepare_worker` first and spreads
`trainer_arguments(...)` into its TRL config, adding only what is its own
(SFT's packing and max_length, the reward model's pre-tokenized pairs), and scores the
held-out task with `held_out_task` / `score_held_out` before and after training.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import NamedTuple

from transformers import TrainerCallback

from distft.config import DistftConfig
from distft.distributed.checkpoint import build_manifest, check_resume_on_ranks, staging_dir, write_manifest
from distft.distributed.collectives import broadcast_from_rank0
from distft.distributed.plan import architecture_of
from distft.distributed.process_group import ensure_process_group
from distft.distributed.strategy import trainer_strategy_kwargs
from distft.models.hub import fetch_first
from distft.models.shapes import hidden_size
from distft.stages.context import StageContext
from distft.stages.quiet import quiet_libraries
from distft.stages.reporting import ReportCallback


def prepare_worker(cfg: DistftConfig, ctx: StageContext) -> Path:
    """Threads, logging, process group, seed, and the resume check. Returns the stage directory."""
    import torch
    from transformers import set_seed

    stage = cfg.stages[ctx.stage_index]
    strategy = stage.strategy
    use_deepspeed = strategy.name == "deepspeed"
    if not cfg.scaling.use_gpu:
        # Read when deepspeed is first imported, which transformers and TRL do under any strategy; unset, it
        # probes for a GPU and warns in every worker that it settled on the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    stage_dir = Path(ctx.run_dir) / stage.label()
    torch.set_num_threads(cfg.scaling.threads_per_worker())
    if ctx.world_size == 1 and strategy.name == "ddp" and (not cfg.scaling.use_gpu or torch.cuda.device_count() <= 1):
        # One rank has nothing to synchronise, but accelerate reads a LOCAL_RANK (Ray Train and torchrun
        # set one) as a distributed run and wraps the model in DDP: its gradient-bucket copies and
        # one-rank all-reduce cost a small model 6-10% of its step (benchmarks/step.py, 1x2). Without
        # it the Trainer trains the model as is, as it does in a plain `python` process. Not with more
        # than one visible GPU, where the Trainer would then spread the batch with DataParallel.
        os.environ.pop("LOCAL_RANK", None)
    quiet_libraries()
    ensure_process_group(ctx.world_size, cfg.scaling.use_gpu, deepspeed=use_deepspeed,
                         timeout_s=cfg.run.collective_timeout_s)
    fetch_first(cfg, ctx)  # hub models and datasets: one download per cache, before any rank loads them
    set_seed(stage.train.seed)
    if ctx.resume_from:  # a damaged, half-written or incompatible checkpoint is refused before anything is built
        check_resume_on_ranks(ctx.resume_from, world_size=ctx.world_size, strategy=strategy.label(),
                              is_main=ctx.is_main, search=[stage_dir / "checkpoints"])
    ctx.log(f"[{stage.label()}] {stage.train.batch_plan(ctx.world_size)}")
    return stage_dir


def total_steps(cfg: DistftConfig, ctx: StageContext, train_rows: int) -> int:
    train = cfg.stages[ctx.stage_index].train
    per_step = train.micro_batch_size * ctx.world_size * train.grad_accum(ctx.world_size)
    return train.max_steps or max(1, math.ceil(math.ceil(train_rows / per_step) * train.epochs))


def trainer_arguments(cfg: DistftConfig, ctx: StageContext, stage_dir: Path) -> dict:
    """TrainingArguments kwargs shared by every stage, derived from the same typed sections."""
    stage = cfg.stages[ctx.stage_index]
    train = stage.train
    return dict(
        output_dir=str(staging_dir(stage_dir / "checkpoints")),  # ReportCallback seals each into checkpoints/
        per_device_train_batch_size=train.micro_batch_size,
        per_device_eval_batch_size=train.micro_batch_size,
        gradient_accumulation_steps=train.grad_accum(ctx.world_size),
        learning_rate=train.lr,
        optim=train.optimizer,
        lr_scheduler_type=train.scheduler,
        warmup_steps=train.warmup_ratio,  # transformers 5 takes a ratio (<1) here
        weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm,
        num_train_epochs=train.epochs,
        max_steps=train.max_steps or -1,
        seed=train.seed,
        logging_steps=train.log_every,
        logging_first_step=True,
        eval_strategy="steps" if train.eval_every else "epoch",
        eval_steps=train.eval_every,
        save_strategy="steps" if train.save_every else "epoch",
        save_steps=train.save_every,
        save_total_limit=None,  # ReportCallback rotates (run.keep_checkpoints), never the last complete one
        use_cpu=not cfg.scaling.use_gpu,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        # Built before the model on purpose: under ZeRO-3 `from_pretrained` then loads
        # straight into partitions (zero.Init) instead of a full copy per worker.
        **trainer_strategy_kwargs(stage.strategy, train, cfg.model.dtype, ctx.world_size,
                                  # only DeepSpeed sizes buffers from it: no config read (or Hub call) otherwise
                                  hidden_size(architecture_of(cfg, cfg.init_source(ctx.stage_index)))
                                  if stage.strategy.name == "deepspeed" else None),
    )


def stage_callbacks(cfg: DistftConfig, ctx: StageContext, stage_dir: Path, total_steps: int) -> list:
    """Progress, metrics and checkpoint sealing (ReportCallback); early stopping and gradual unfreezing when
    configured."""
    from distft.stages.early_stopping import EarlyStopping
    from distft.stages.unfreezing import GradualUnfreezing

    stage = cfg.stages[ctx.stage_index]
    callbacks = [ReportCallback(ctx, stage.label(), stage_dir, total_steps, cfg)]
    if stage.train.early_stopping:
        callbacks.append(EarlyStopping(stage.train.early_stopping, stage_dir / "checkpoints",
                                       callbacks[0].checkpoints, ctx.log, stage.label()))
    if stage.method.name == "freeze" and stage.method.freeze.unfreeze_every:
        callbacks.append(GradualUnfreezing(stage.method.freeze, ctx.log, stage.label()))
    return callbacks


def train(trainer, ctx: StageContext):
    """`trainer.train()`, then (early stopping) the best checkpoint loaded back, so that what is evaluated
    and exported next is the best model, not the last. A stage may evaluate or predict with the Trainer
    before this; the ranks still train one model (see `_forget_evaluation_prepare`)."""
    from distft.stages.early_stopping import restore_best

    _forget_evaluation_prepare(trainer)
    check = _ReplicasSynced(trainer, ctx.world_size)
    trainer.add_callback(check)
    try:
        result = trainer.train(resume_from_checkpoint=ctx.resume_from)
    finally:
        trainer.remove_callback(check)
    restore_best(trainer, ctx.log)
    return result


def _forget_evaluation_prepare(trainer) -> None:
    """Undo accelerate's evaluation-only preparation of the model, so `train()` wraps it in DDP.

    `Trainer.predict`/`evaluate` before `train()` runs `accelerator.prepare_model(model,
    evaluation_mode=True)`, which leaves the model unwrapped but marks it `_is_accelerate_prepared`;
    accelerate 1.15's double-wrap guard then hands `train()` the bare model. Every rank trained its
    own replica on its own half of each batch, with no gradient all-reduce, and rank 0 exported a
    model that saw half the data: MiniLM sentiment, 1 epoch at global batch 16, held-out accuracy
    0.77-0.91 on 1 process and 0.54-0.68 on 2 ranks (benchmarks/workers_classify.py). DeepSpeed and
    FSDP evaluations prepare the model fully (it is then the wrapped one), and are left as they are.
    """
    model = trainer.model
    if trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled or trainer.model_wrapped is not model:
        return
    if getattr(model, "_is_accelerate_prepared", False):
        model._is_accelerate_prepared = False
        trainer.accelerator._models[:] = [m for m in trainer.accelerator._models if m is not model]


class _ReplicasSynced(TrainerCallback):
    """Refuses to take a step when several plain data-parallel ranks were left without DDP: each would
    train a model of its own, and nothing else would notice (the logged loss is averaged over ranks)."""

    def __init__(self, trainer, world_size: int):
        self.trainer, self.world_size = trainer, world_size

    def on_train_begin(self, args, state, control, **kwargs):
        from torch.nn.parallel import DistributedDataParallel

        t = self.trainer
        if self.world_size > 1 and not (t.is_deepspeed_enabled or t.is_fsdp_enabled) \
                and not isinstance(t.model_wrapped, DistributedDataParallel):
            raise RuntimeError(f"{self.world_size} ranks would train unsynchronised replicas: the Trainer did not "
                               f"wrap the model in DDP (it is a {type(t.model_wrapped).__name__}).")


def prepare_trainer(trainer, stage, ctx: StageContext) -> None:
    """After building a Trainer: ReportCallback prints progress (not the Trainer's PrinterCallback), and
    FSDP2 is switched on for CPU workers, where accelerate alone would silently run DDP."""
    from transformers.trainer_callback import PrinterCallback

    from distft.distributed import fsdp

    trainer.remove_callback(PrinterCallback)
    if stage.strategy.name == "fsdp" and fsdp.enable_on_cpu(trainer):
        ctx.log(f"[{stage.label()}] FSDP2 on CPU: fully_shard over gloo")


def score_on_rank0(score, ctx: StageContext):
    """Run `score()` on rank 0 only and share its result: before training under FSDP2, the other
    ranks hold meta tensors until `fully_shard` hands them their shards."""
    return broadcast_from_rank0(score() if ctx.is_main else None)


class HeldOut(NamedTuple):
    rows: object  # a datasets.Dataset of validated prompt/answer rows
    fmt: str


def held_out_task(stage, fmt: str | None = None) -> HeldOut | None:
    """The `evaluate.data` rows scored by exact match, capped at evaluate.max_samples; None when unset.

    SFT reads them in its training format (`fmt`). DPO and GRPO train on pairs or prompts, so
    there the format is detected from the file's columns.
    """
    from distft.data.formats import DataError
    from distft.data.loading import load_checked

    ev = stage.evaluate
    if not ev.data:
        return None
    data = stage.data if fmt else stage.data.model_copy(update={"format": "auto"})
    rows, fmt = load_checked(ev.data, data, "evaluate.data", fmt=fmt)
    if fmt not in ("alpaca", "messages", "prompt_completion"):
        raise DataError(f"evaluate.data: exact match generates answers to prompts (alpaca, messages or "
                        f"prompt_completion rows); {ev.data} has format {fmt}. Fix: point evaluate.data at "
                        "held-out prompt/answer rows, or leave it unset.")
    if ev.max_samples:
        rows = rows.select(range(min(len(rows), ev.max_samples)))
    return HeldOut(rows, fmt)


def sharded_at_load(stage, ctx: StageContext) -> bool:
    """FSDP2 over several ranks: only local rank 0 reads the weights; the others get their shards when the
    Trainer prepares the model (placeholders until then). Until then, rank 0 alone can score."""
    return stage.strategy.name == "fsdp" and ctx.world_size > 1


def score_held_out(model, tokenizer, task: HeldOut | None, stage, ctx: StageContext, when: str) -> float | None:
    """Held-out exact match `when` ("before" or "after") training, logged. None without `evaluate.data`,
    and before training when `evaluate.before` is off or the run resumes (the start was scored already)."""
    from distft.distributed.sharding import full_parameters
    from distft.stages.evaluate import exact_match

    if task is None or (when == "before" and (not stage.evaluate.before or ctx.resume_from)):
        return None
    ev = stage.evaluate

    def score(rank: int, world_size: int) -> float:
        with full_parameters(model, stage.strategy.label()):
            return exact_match(model, tokenizer, task.rows, task.fmt, ev.max_new_tokens, ev.batch_size,
                               rank, world_size).accuracy

    if when == "before" and sharded_at_load(stage, ctx):
        accuracy = score_on_rank0(lambda: score(0, 1), ctx)
    else:
        accuracy = score(ctx.rank, ctx.world_size)
    ctx.log(f"[{stage.label()}] held-out exact match {when} training: {accuracy:.1%} ({len(task.rows)} items)")
    return accuracy


def base_as_reference(trainer) -> None:
    """Make a lora/qlora policy's frozen reference the model with its adapters disabled. Call right after
    building a TRL DPO or GRPO trainer, before `train()`.

    Handed a PeftModel, those trainers add a `ref` adapter, a frozen copy of the policy's, which then
    runs in every reference pass and is saved beside the trained adapter in each checkpoint and the
    export. distft's adapter always starts fresh (zero) on a plain model (an earlier LoRA output is
    merged first, see chain.py), so the model with adapters disabled is the same reference with no
    copy; TRL falls back to exactly that when no `ref` adapter exists.
    """
    model = trainer.model
    if "ref" in getattr(model, "peft_config", {}):
        model.delete_adapter("ref")


def export_model(trainer, final_dir: Path, ctx: StageContext) -> None:
    """One consolidated HF model (or adapter) in `final_dir`. Call on every rank."""
    from distft.distributed import fsdp

    if trainer.is_fsdp_enabled:
        fsdp.save_full_model(trainer, final_dir, ctx.is_main)
    else:
        trainer.save_model(str(final_dir))


def own_shard_loader(trainer_cls):
    """`trainer_cls` training on `stream`, one worker's own shard of a stream, read as given. Construct it
    with a small in-memory `train_dataset` (the eval rows) for the Trainer's own checks.

    accelerate would split an iterable dataset across ranks once more (keeping every N-th batch
    of a shard that is already this rank's alone), so the loader is built here unprepared, as
    Ray's own `prepare_trainer` does; the Trainer still moves each batch to the device.
    """
    from torch.utils.data import DataLoader

    class OwnShard(trainer_cls):
        def __init__(self, *args, stream, **kwargs):
            super().__init__(*args, **kwargs)
            # Swapped in after construction: TRL's __init__ takes a sample of its train dataset, which from
            # a stream would start (and abandon) an epoch of every worker's shard.
            self.train_dataset = stream

        def get_train_dataloader(self):
            return DataLoader(self.train_dataset, batch_size=self._train_batch_size, collate_fn=self.data_collator,
                              num_workers=0)

    OwnShard.__name__ = f"OwnShard{trainer_cls.__name__}"
    return OwnShard


def packed_rows_trainer(trainer_cls):
    """`trainer_cls` (TRL's SFTTrainer, packing) batching each packed bin as a row of its own.

    The collator goes in after construction: TRL refuses one of ours with packing. TRL counts a
    padding-free batch's tokens (`num_tokens`) as the width of its one row; with a row per bin
    that undercounts by the batch size, so the count comes from the collator's exact total.
    """
    from distft.data.packing import REAL_TOKENS, packed_rows_collator

    class PackedRows(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.data_collator = packed_rows_collator(self.processing_class.pad_token_id)

        def compute_loss(self, model, inputs, *args, **kwargs):
            inputs = dict(inputs)
            real = inputs.pop(REAL_TOKENS, None)
            counted = self._total_train_tokens
            result = super().compute_loss(model, inputs, *args, **kwargs)
            if real is not None and self._total_train_tokens != counted:  # a training batch TRL counted
                total = self.accelerator.gather_for_metrics(real.reshape(1)).sum().item()
                self._total_train_tokens = counted + total // self._tp_size
                self._metrics["train"]["num_tokens"] = [self._total_train_tokens]
            return result

    PackedRows.__name__ = f"PackedRows{trainer_cls.__name__}"
    return PackedRows


def logged_value(history: list[dict], key: str, index: int) -> float | None:
    """The `index`-th value of `key` in a Trainer's log history (0: first, -1: last); None if never logged."""
    values = [h[key] for h in history if key in h]
    return values[index] if values else None


def first_eval(trainer) -> dict:
    """The Trainer's evaluation before its first step (`eval_on_start`: a stage's "before" on its eval
    split), or {} if it made none."""
    return next((m for m in trainer.state.log_history if m.get("step") == 0 and "eval_loss" in m), {})


def run_summary(cfg: DistftConfig, ctx: StageContext, trainer, result, eval_metrics: dict, params, started: float,
                final_dir: Path) -> dict:
    """The summary keys every stage shares; each stage adds its own task metrics."""
    import time

    from distft.distributed.sharding import optimizer_shard, parameter_shard
    from distft.stages.early_stopping import EarlyStopping, overfitting

    stage = cfg.stages[ctx.stage_index]
    history = trainer.state.log_history
    reporters = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, ReportCallback)]
    early = [cb for cb in trainer.callback_handler.callbacks if isinstance(cb, EarlyStopping)]
    return {
        "stage": stage.label(),
        "kind": stage.kind,
        "method": stage.method.name,
        "trainable_params": params.trainable,
        "total_params": params.total,
        "steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "first_logged_loss": logged_value(history, "loss", 0),
        "last_logged_loss": logged_value(history, "loss", -1),
        "eval_loss": eval_metrics.get("eval_loss"),
        "world_size": ctx.world_size,
        "strategy": stage.strategy.label(),
        **parameter_shard(trainer.model),
        **optimizer_shard(trainer.model_wrapped, trainer.optimizer),
        "wall_seconds": round(time.time() - started, 1),
        # When this rank-0 process began and ended train(): the launcher's startup_s splits at them.
        "trained_between": [reporters[0].started, reporters[0].ended] if reporters else None,
        "model_dir": str(final_dir),
        "stopped_early_at": reporters[0].stopped_at if reporters else None,
        "checkpoint_blocked_s": reporters[0].checkpoint_blocked if reporters else [],
        # Peak RSS growth after the first steps (None on short runs and off Linux).
        "train_rss_growth_mib": reporters[0].rss.growth_mib() if reporters else None,
        **(reporters[0].memory_summary() if reporters else {}),  # peak_rss_mib: each rank's high-water mark
        **(early[0].summary() if early else {}),
        **overfitting(history, stage.train.overfit_gap),
    }


def complete_stage(cfg: DistftConfig, ctx: StageContext, stage_dir: Path, final_dir: Path, summary: dict, tokenizer) -> dict:
    """Rank 0 completes the export (tokenizer, resolved config) and writes the summary; every rank reports done."""
    from distft.config import dump_config
    from distft.stages.summary import write_stage_summary

    summary["fingerprint"] = cfg.stage_fingerprint(ctx.stage_index)
    if ctx.is_main:
        tokenizer.save_pretrained(str(final_dir))
        dump_config(cfg, final_dir / "distft_config.yaml")
        # The manifest, written last, says the export is complete; a pipeline rerun verifies it
        # before reusing this stage's output.
        write_manifest(final_dir, build_manifest(final_dir, step=int(summary.get("steps") or 0),
                                                 world_size=ctx.world_size, strategy=summary.get("strategy", "")))
        write_stage_summary(stage_dir, summary)
    # Not `done`: Tune reads a result with done=True as the end of the trial and kills its actor at
    # once, taking Ray Train's controller down before it frees the workers (their CPUs leak).
    ctx.report({"stage_done": 1, **{k: v for k, v in summary.items() if isinstance(v, (int, float))}})
    return summary
