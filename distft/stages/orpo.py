"""Odds-ratio preference optimisation (Hong et al. 2024) with TRL's ORPOTrainer (trl.experimental in 1.16).

ORPO folds SFT and preference learning into one stage with no reference model: the loss is the
NLL of the chosen response plus `orpo.beta` (the paper's lambda) times -log sigmoid of the log
odds ratio between chosen and rejected. It can start from the base itself; distft's recipe
starts from a short SFT like the other preference stages, so their results compare.
The steps and what is reported are the preference stages' (stages/pairs.py); the implicit reward
TRL logs is `beta * log p(response)`, length-averaged.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.stages.context import StageContext
from distft.stages.pairs import PairRecipe
from distft.stages.trainer_stage import Built, run_trainer_stage


class ORPO(PairRecipe):
    arguments_class = "trl.experimental.orpo:ORPOConfig"
    trainer_class = "trl.experimental.orpo:ORPOTrainer"
    reward_is = "log-odds reward"
    prepends_bos = True

    def own_arguments(self, b: Built) -> dict:
        # Its collator reads the pair columns (TRL sets this itself, with a warning).
        return {"beta": b.stage.orpo.beta, "remove_unused_columns": False}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, ORPO())
