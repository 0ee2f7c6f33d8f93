"""Kahneman-Tversky optimisation (Ethayarajh et al. 2024) with TRL's KTOTrainer.

KTO needs no pairs: each row is one response with a label, desirable (true) or not (false), the
kind of feedback a product collects as thumbs up and down. The loss raises the implicit reward
`beta * log(policy / reference)` of desirable responses above a reference point (the batch's KL
estimate) and pushes undesirable ones below it, each side weighted (`kto.desirable_weight`,
`kto.undesirable_weight`: the paper advises weight x count about even between the sides).
Preference pairs are accepted too and split into one row of each label.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py):
labelled rows -> KTOConfig -> policy (by default the last earlier SFT output) -> held-out exact
match before -> KTOTrainer -> ... -> exact match after. The reference is the starting policy,
frozen (lora/qlora: the model with adapters disabled, no copy).
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.data.loading import split_feedback_rows
from distft.stages.context import StageContext
from distft.stages.trainer_setup import base_as_reference, first_eval
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage


class KTO(TrainerRecipe):
    arguments_class = "trl:KTOConfig"

    def load_data(self, b: Built) -> StageData:
        max_len = b.cfg.model.max_seq_len
        train, held, stats, pairs = split_feedback_rows(b.stage.data, b.stage.train.seed, b.tokenizer, max_len)
        desirable = sum(train["label"])
        unpaired = f"{pairs} preference pairs split into " if pairs else ""
        described = (f"(feedback): {unpaired}{stats.pairs} labelled responses, {desirable} desirable and "
                     f"{stats.pairs - desirable} not; {stats.dropped} dropped as longer than "
                     f"model.max_seq_len={max_len}")
        return StageData(train, held, len(train), described, {"stats": stats, "desirable": desirable})

    def arguments(self, b: Built) -> dict:
        kto = b.stage.kto
        return {"max_length": b.cfg.model.max_seq_len, "beta": kto.beta, "loss_type": kto.loss_type,
                "desirable_weight": kto.desirable_weight, "undesirable_weight": kto.undesirable_weight,
                "eval_on_start": True}  # the summary's "before" for the eval split's reward margin

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl import KTOTrainer

        trainer = KTOTrainer(
            model=model,
            ref_model=None,  # full: TRL loads a frozen copy of the starting model; lora: see base_as_reference
            args=args,
            train_dataset=b.data.train,
            eval_dataset=b.data.eval,
            processing_class=b.tokenizer,
            callbacks=callbacks,
        )
        base_as_reference(trainer)
        return trainer

    def evaluated(self, b: Built, eval_metrics: dict) -> None:
        margin = eval_metrics.get("eval_rewards/margins")
        if margin is not None:
            b.ctx.log(f"[{b.stage.label()}] eval split: implicit reward of desirable minus undesirable responses "
                      f"{margin:.3f}")

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        task = b.data.extra["task"]
        return {"eval_items": len(task.rows) if task else 0,
                "eval_reward_margin_before": first_eval(trainer).get("eval_rewards/margins"),
                "eval_reward_margin": eval_metrics.get("eval_rewards/margins"),
                "eval_reward_desirable": eval_metrics.get("eval_rewards/chosen"),
                "eval_reward_undesirable": eval_metrics.get("eval_rewards/rejected"),
                "train_responses": len(b.data.train), "train_desirable": b.data.extra["desirable"],
                "dropped_responses": b.data.extra["stats"].dropped}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, KTO())
