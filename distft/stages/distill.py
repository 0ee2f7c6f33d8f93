"""Knowledge distillation (GKD: Agarwal et al. 2024) with TRL's GKDTrainer (trl.experimental in 1.16).

The student (init_from, by default the base model) learns to match the teacher's next-token
distribution, token by token, under a generalised Jensen-Shannon divergence (`distill.beta`: 0
forward KL, 1 reverse KL). A `distill.lmbda` share of the batches is on-policy: the student
samples its own responses to the prompts and the teacher scores them, which corrects the
mistakes the student actually makes; the other batches use the data's responses. With
`distill.seq_kd` the off-policy batches use responses the teacher samples instead.

GKD rather than TRL's main DistillationTrainer: that one is on-policy only (no mixing share), and
the share is the setting users of on-policy distillation tune.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py):
instruction rows as chat turns -> GKDConfig -> student -> held-out exact match before -> the
teacher (frozen) and GKDTrainer, which evaluates before the first step -> ... -> exact match after.
The divergence on the eval split, before and after, is the summary's `teacher_divergence_*`: the
student's distance to its teacher on the data's responses.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.config.schema import MethodConfig
from distft.data.formats import DataError, to_messages
from distft.data.loading import split_rows
from distft.models.loading import load_model
from distft.stages.chain import source_model
from distft.stages.context import StageContext
from distft.stages.trainer_setup import first_eval
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage

# GKD's collator reads chat turns: rows the chat template renders. prompt_completion rows are raw strings.
CHAT_FORMATS = ("alpaca", "messages")


class Distill(TrainerRecipe):
    arguments_class = "trl.experimental.gkd:GKDConfig"

    def load_data(self, b: Built) -> StageData:
        data_cfg = b.stage.data
        train_rows, eval_rows, fmt = split_rows(data_cfg, b.stage.train.seed)
        if fmt not in CHAT_FORMATS:
            raise DataError(f"data.train: the distill stage renders rows with the chat template (alpaca or messages "
                            f"rows); {data_cfg.train} has format {fmt}.")

        def chat(rows):
            return rows.map(lambda row: {"messages": to_messages(row, fmt)}, remove_columns=rows.column_names,
                            desc="Rendering chat turns")

        d = b.stage.distill
        on_policy = f", {d.lmbda:.0%} of batches sampled by the student" if d.lmbda else ", off-policy only"
        return StageData(chat(train_rows), chat(eval_rows), len(train_rows),
                         f"({fmt}): {len(train_rows)} rows{on_policy}", {"fmt": fmt})

    def arguments(self, b: Built) -> dict:
        d = b.stage.distill
        return {"max_length": b.cfg.model.max_seq_len, "lmbda": d.lmbda, "beta": d.beta,
                "temperature": d.temperature, "max_new_tokens": d.max_new_tokens, "seq_kd": d.seq_kd,
                "eval_on_start": True}  # the divergence to the teacher before any step: the summary's "before"

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl.experimental.gkd import GKDTrainer

        teacher = self.load_teacher(b)
        return GKDTrainer(
            model=model,
            teacher_model=teacher,
            args=args,
            train_dataset=b.data.train,
            eval_dataset=b.data.eval,
            processing_class=b.tokenizer,
            callbacks=callbacks,
        )

    def load_teacher(self, b: Built):
        """The teacher as a plain causal LM (a LoRA output merged first), frozen. Loaded after the
        Trainer's arguments, like the student: under ZeRO-3 it is read into partitions too."""
        cfg, ctx = b.cfg, b.ctx
        teacher_cfg = source_model(cfg, ctx, cfg.teacher_source(ctx.stage_index), "teacher", "teacher")
        teacher = load_model(teacher_cfg, MethodConfig(name="full"), cfg.scaling.use_gpu, log=ctx.log)
        teacher.requires_grad_(False)
        return teacher.eval()

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        task = b.data.extra["task"]
        return {"eval_items": len(task.rows) if task else 0,
                # GKD's loss on the eval split: the generalised JSD to the teacher on the data's responses.
                "teacher_divergence_before": first_eval(trainer).get("eval_loss"),
                "teacher_divergence_after": eval_metrics.get("eval_loss"),
                "teacher": b.cfg.teacher_source(b.ctx.stage_index), "on_policy_share": b.stage.distill.lmbda,
                "train_rows": len(b.data.train)}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, Distill())
