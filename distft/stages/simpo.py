"""SimPO (Meng et al. 2024) through TRL's CPOTrainer with loss_type simpo (trl.experimental in 1.16).

The implicit reward is the policy's own length-normalised log-likelihood of a response times
`simpo.beta`, so no reference model is held (half DPO's model memory with full fine-tuning);
the loss pushes the chosen reward above the rejected one by a margin `simpo.gamma`. With
`simpo.sft_weight` > 0 an NLL term on chosen is added (CPO-SimPO). The steps and what is reported
are the preference stages' (stages/pairs.py).
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.stages.context import StageContext
from distft.stages.pairs import PairRecipe
from distft.stages.trainer_stage import Built, run_trainer_stage


class SimPO(PairRecipe):
    arguments_class = "trl.experimental.cpo:CPOConfig"
    trainer_class = "trl.experimental.cpo:CPOTrainer"
    reward_is = "length-normalised reward"
    prepends_bos = True

    def own_arguments(self, b: Built) -> dict:
        simpo = b.stage.simpo
        return {"loss_type": "simpo", "beta": simpo.beta, "simpo_gamma": simpo.gamma, "cpo_alpha": simpo.sft_weight,
                "remove_unused_columns": False}  # its collator reads the pair columns (TRL warns otherwise)


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, SimPO())
