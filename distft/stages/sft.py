"""Supervised fine-tuning (and continued pretraining) with TRL's SFTTrainer.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): data
(rows -> token ids with the prompt masked out of the loss, or a Ray Data stream) -> SFTConfig ->
model with its method -> held-out exact match before -> SFTTrainer -> ... -> exact match after.
Works in one process, under torchrun, or inside a Ray Train worker; the environment comes in
through `ctx`.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.data.loading import mix_replay, split_rows, streamed_split, tokenize_dataset
from distft.data.packing import uses_varlen_kernel
from distft.stages.context import StageContext
from distft.stages.retain import replay_texts
from distft.stages.token_metrics import metrics_at_log_steps
from distft.stages.trainer_setup import own_shard_loader, packed_rows_trainer
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage


class SFT(TrainerRecipe):
    arguments_class = "trl:SFTConfig"

    def load_data(self, b: Built) -> StageData:
        stage, data_cfg, max_len = b.stage, b.stage.data, b.cfg.model.max_seq_len
        stats = None
        if data_cfg.streaming:  # Ray Data tokenized this worker's shard already; only eval rows load here
            train_ds, eval_rows, fmt = streamed_split(data_cfg, b.ctx.dataset_shard("train"))
        else:
            train_rows, eval_rows, fmt = split_rows(data_cfg, stage.train.seed)
            train_ds, stats = tokenize_dataset(train_rows, fmt, b.tokenizer, max_len, stage.loss_on(),
                                               data_cfg.text_field)
            if data_cfg.replay:
                train_ds, replayed = mix_replay(train_ds, replay_texts(data_cfg.replay.source, b.retain),
                                                data_cfg.replay.fraction, b.tokenizer, max_len, stage.train.seed)
        eval_ds, _ = tokenize_dataset(eval_rows, fmt, b.tokenizer, max_len, stage.loss_on(), data_cfg.text_field,
                                      field="data.eval" if data_cfg.eval else "data.train (its eval_fraction split)")
        described = "streamed from Ray Data, tokenized by its tasks" if stats is None else stats.describe(max_len)
        if data_cfg.replay and stats is not None:
            described += (f"; plus {replayed} replay rows from {data_cfg.replay.source} "
                          f"({data_cfg.replay.fraction:.0%} of {len(train_ds)})")
        return StageData(train_ds, eval_ds, 0 if stats is None else len(train_ds),
                         f"({fmt}, loss on {stage.loss_on()}): {described}", {"fmt": fmt, "stats": stats})

    def arguments(self, b: Built) -> dict:
        data_cfg = b.stage.data
        # A resumed stream cannot be fast-forwarded: skipping would re-read (and re-tokenize) everything
        # trained so far, and Ray's split hands rows out afresh anyway. It goes on with new rows.
        return {"max_length": b.cfg.model.max_seq_len, "packing": data_cfg.packing,
                "ignore_data_skip": data_cfg.streaming}

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl import SFTTrainer

        data_cfg = b.stage.data
        trainer_cls, train_data = SFTTrainer, {"train_dataset": b.data.train}
        if data_cfg.streaming:  # the eval rows stand in while TRL's __init__ samples its train set (own_shard_loader)
            trainer_cls, train_data = own_shard_loader(SFTTrainer), {"train_dataset": b.data.eval,
                                                                     "stream": b.data.train}
        elif data_cfg.packing and not uses_varlen_kernel(model):  # each bin a row (distft/data/packing.py)
            trainer_cls = packed_rows_trainer(SFTTrainer)
        trainer_cls = metrics_at_log_steps(trainer_cls)  # no per-step metric collectives (stages/token_metrics.py)
        return trainer_cls(model=model, args=args, **train_data, eval_dataset=b.data.eval, processing_class=b.tokenizer,
                           callbacks=callbacks)

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        task, stats = b.data.extra["task"], b.data.extra["stats"]
        return {"eval_items": len(task.rows) if task else 0,
                "train_rows": stats.rows if stats else None,
                "truncated_rows": stats.truncated if stats else None}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, SFT())
