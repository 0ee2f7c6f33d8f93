"""Direct preference optimisation (Rafailov et al. 2023) with TRL's DPOTrainer.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): pairs
-> DPOConfig -> policy (by default the last earlier SFT output) -> held-out exact match before ->
DPOTrainer -> ... -> exact match after. The loss pushes the implicit reward
`beta * log(policy / reference)` of the chosen response above the rejected one's. The reference
is the policy's starting point, frozen: with lora/qlora the model with its adapters disabled (no
copy), with full a second copy TRL loads from the same directory.
Like every stage it runs in one process, under torchrun, or in a Ray Train worker.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.data.loading import fitting_preferences, split_preference_rows
from distft.stages.context import StageContext
from distft.stages.trainer_setup import base_as_reference
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage


class DPO(TrainerRecipe):
    arguments_class = "trl:DPOConfig"

    def load_data(self, b: Built) -> StageData:
        # Validated pairs, strings or chat turns; TRL tokenizes them (chat turns through the template).
        # A pair longer than max_seq_len is dropped and counted, as in the reward stage: TRL would
        # truncate it, often cutting away exactly the tokens where chosen and rejected differ.
        data_cfg, max_len = b.stage.data, b.cfg.model.max_seq_len
        train_rows, eval_rows, stats = split_preference_rows(data_cfg, b.stage.train.seed, "dpo", fitting_preferences,
                                                             b.tokenizer, max_len)
        return StageData(train_rows, eval_rows, len(train_rows), f"(preference): {stats.describe(max_len)}",
                         {"stats": stats})

    def arguments(self, b: Built) -> dict:
        dpo = b.stage.dpo
        return {"max_length": b.cfg.model.max_seq_len, "beta": dpo.beta, "loss_type": [dpo.loss_type],
                "label_smoothing": dpo.label_smoothing}

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl import DPOTrainer

        trainer = DPOTrainer(
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
        # Eval split: the share of pairs whose implicit reward ranks chosen first, and the mean margin.
        # Both start at 0 exactly: policy and reference agree before the first step.
        accuracy, margin = eval_metrics.get("eval_rewards/accuracies"), eval_metrics.get("eval_rewards/margins")
        if accuracy is not None and margin is not None:
            b.ctx.log(f"[{b.stage.label()}] eval split: implicit reward accuracy {accuracy:.1%}, margin {margin:.3f}")

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        accuracy, margin = eval_metrics.get("eval_rewards/accuracies"), eval_metrics.get("eval_rewards/margins")
        task = b.data.extra["task"]
        return {"eval_items": len(task.rows) if task else 0, "eval_reward_accuracy": accuracy,
                "eval_reward_margin": margin, "train_pairs": len(b.data.train),
                "dropped_pairs": b.data.extra["stats"].dropped}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, DPO())
