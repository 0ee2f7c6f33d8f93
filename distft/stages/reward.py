"""Reward modelling with TRL's RewardTrainer: a scalar head trained on preference pairs.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): pairs
-> RewardConfig -> sequence-classification model -> held-out pairwise accuracy before ->
RewardTrainer -> ... -> accuracy after. The loss is Bradley-Terry, -log sigmoid(r(chosen) -
r(rejected)); TRL logs the batch accuracy and margin itself. Like every stage it runs in one
process, under torchrun, or in a Ray Train worker; the environment comes in through `ctx`.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.data.formats import encode_preference
from distft.data.loading import load_checked, split_preference_rows, tokenize_preferences
from distft.distributed.sharding import full_parameters
from distft.models.loading import load_reward_model
from distft.stages.context import StageContext
from distft.stages.evaluate import Pairwise, pairwise_accuracy
from distft.stages.trainer_setup import score_on_rank0
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage


class Reward(TrainerRecipe):
    arguments_class = "trl:RewardConfig"

    def load_data(self, b: Built) -> StageData:
        # Validated pairs -> chosen/rejected token ids. We tokenize (as TRL would), so the held-out
        # scoring reads exactly what training read, and over-long pairs are counted.
        data_cfg, max_len = b.stage.data, b.cfg.model.max_seq_len
        train_ds, eval_ds, stats = split_preference_rows(data_cfg, b.stage.train.seed, "reward", tokenize_preferences,
                                                         b.tokenizer, max_len)
        held_out = _held_out_pairs(b.stage, data_cfg, b.tokenizer) if b.stage.evaluate.data else None
        return StageData(train_ds, eval_ds, len(train_ds), f"(preference): {stats.describe(max_len)}",
                         {"stats": stats, "held_out": held_out})

    def arguments(self, b: Built) -> dict:
        return {"max_length": None}  # pairs are already tokenized and length-checked above

    def load_model(self, b: Built):
        # The base or SFT model's body under a new one-output `score` head (or an RM's own head), with
        # the method's adapters attached.
        model = load_reward_model(b.model_cfg, b.stage.method, b.cfg.scaling.use_gpu, log=b.ctx.log)
        model.config.pad_token_id = b.tokenizer.pad_token_id  # the head reads the last non-pad token
        return model

    def score(self, b: Built, model, when: str) -> dict:
        # Held-out pairwise accuracy: about 50% before training with a new head.
        stage, ctx, held_out = b.stage, b.ctx, b.data.extra["held_out"]
        scored = None
        if held_out is not None and (when == "after" or (stage.evaluate.before and not ctx.resume_from)):
            if when == "before" and b.sharded_at_load():  # only rank 0 holds weights before they are sharded
                scored = score_on_rank0(lambda: _score(model, b.tokenizer, held_out, stage, 0, 1), ctx)
            else:
                scored = _score(model, b.tokenizer, held_out, stage, ctx.rank, ctx.world_size)
            ctx.log(f"[{stage.label()}] held-out pairwise accuracy {when} training: {_describe(scored)}")
        keys = {f"pairwise_accuracy_{when}": scored.accuracy if scored else None,
                f"mean_margin_{when}": scored.mean_margin if scored else None}
        if when == "after":
            keys["pairwise_accuracy_by_kind"] = {k: c / max(n, 1) for k, (c, n) in scored.by_kind.items()} \
                if scored else {}
            keys["eval_pairs"] = scored.total if scored else 0
        return keys

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl import RewardTrainer

        return RewardTrainer(model=model, args=args, train_dataset=b.data.train, eval_dataset=b.data.eval,
                             processing_class=b.tokenizer, callbacks=callbacks)

    def evaluated(self, b: Built, eval_metrics: dict) -> None:
        b.ctx.log(f"[{b.stage.label()}] eval split: accuracy {eval_metrics.get('eval_accuracy', float('nan')):.1%}, "
                  f"margin {eval_metrics.get('eval_margin', float('nan')):.3f}")  # TRL's, batch means

    def exported(self, b: Built, model, final_dir) -> None:
        pass  # a score head, not a language model: no generation config

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        return {"eval_accuracy": eval_metrics.get("eval_accuracy"), "eval_margin": eval_metrics.get("eval_margin"),
                "train_pairs": len(b.data.train), "dropped_pairs": b.data.extra["stats"].dropped}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, Reward())


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
