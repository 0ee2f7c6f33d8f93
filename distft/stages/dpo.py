"""Direct preference optimisation (Rafailov et al. 2023) with TRL's DPOTrainer.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): pairs
-> DPOConfig -> policy (by default the last earlier SFT output) -> held-out exact match before ->
DPOTrainer -> ... -> exact match after. The loss pushes the implicit reward
`beta * log(policy / reference)` of the chosen response above the rejected one's (`dpo.loss_type`:
sigmoid as published, ipo's squared loss, hinge, robust). The reference is the policy's starting
point, frozen: with lora/qlora the model with its adapters disabled (no copy), with full a second
copy TRL loads from the same directory. Both start equal, so the eval split's implicit-reward
accuracy and margin start at 0 exactly.
Like every stage it runs in one process, under torchrun, or in a Ray Train worker.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.stages.context import StageContext
from distft.stages.pairs import PairRecipe
from distft.stages.trainer_stage import Built, run_trainer_stage


class DPO(PairRecipe):
    arguments_class = "trl:DPOConfig"
    trainer_class = "trl:DPOTrainer"  # ref_model None: full loads a frozen copy; lora: base_as_reference

    def own_arguments(self, b: Built) -> dict:
        dpo = b.stage.dpo
        return {"beta": dpo.beta, "loss_type": [dpo.loss_type], "label_smoothing": dpo.label_smoothing}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, DPO())
