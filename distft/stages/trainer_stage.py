"""The skeleton every Trainer stage runs, in one place: sft (and pretrain), reward, dpo, grpo, classify.

    prepare the worker -> tokenizer -> data and retain sets (once per node) -> Trainer arguments ->
    model (under FSDP2 read by local rank 0 alone) -> held-out and retain scores before -> Trainer
    -> train -> eval split -> held-out and retain scores after -> export -> summary

A stage is a recipe (torchtune's word): an object whose methods are the steps particular to it
(its data, its TRL trainer and arguments, what it scores and reports), and a `run(cfg, ctx)` that
hands it to `run_trainer_stage`. The order of the steps and what they share (resume, FSDP2
loading, early stopping, export, the summary) live here once, so the stages cannot drift apart.
The arguments are built before the model on purpose: under ZeRO-3 transformers then loads the
weights straight into partitions (zero.Init) instead of one whole copy per worker.

PPO keeps its own loop (stages/ppo.py): TRL 1.16 has no PPO trainer.
"""

from __future__ import annotations

import pkgutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from distft.config import DistftConfig
from distft.config.schema import TINY_BASE, ModelConfig, StageBase
from distft.distributed import fsdp
from distft.distributed.collectives import local_leader_first
from distft.models.loading import load_model, load_tokenizer
from distft.models.methods import count_params
from distft.stages.chain import stage_model
from distft.stages.context import StageContext
from distft.stages.retain import RetainWatch, load_retain_sets, retain_at_eval
from distft.stages.trainer_setup import (
    export_model,
    complete_stage,
    held_out_task,
    prepare_worker,
    prepare_trainer,
    run_summary,
    score_held_out,
    sharded_at_load,
    stage_callbacks,
    total_steps,
    train,
    trainer_arguments,
)


@dataclass
class StageData:
    """What a recipe's data step returns."""

    train: object  # the Trainer's train_dataset (or a stream)
    eval: object  # its eval_dataset
    items: int  # training items per epoch, for the step count (0 for a stream: train.max_steps counts)
    described: str  # logged as "[label] data <described>"
    extra: dict = field(default_factory=dict)  # what the recipe's later steps need (stats, labels, held-out rows)


@dataclass
class Built:
    """What the skeleton has built so far, handed to each step of the recipe."""

    cfg: DistftConfig
    ctx: StageContext
    stage: StageBase
    stage_dir: Path
    model_cfg: ModelConfig  # what the stage starts from: the base, or an earlier stage's output
    tokenizer: object
    data: StageData | None = None
    retain: list = field(default_factory=list)  # the stage's retain sets (stages/retain.py)

    def sharded_at_load(self) -> bool:
        return sharded_at_load(self.stage, self.ctx)


class TrainerRecipe:
    """The steps of a Trainer stage that are its own. A stage sets `arguments_class` and implements
    `load_data`, `build_trainer` and `summary`; the other steps have defaults that fit a policy
    (a causal LM scored by held-out exact match), which a stage with a head overrides."""

    # Its TrainingArguments subclass as "module:Class" (e.g. "trl:SFTConfig"), imported when the stage
    # runs: the stage modules stay cheap to import (tests, the CLI) and TRL is imported in workers only.
    arguments_class: str

    def check(self, cfg: DistftConfig, ctx: StageContext) -> None:
        """Before anything is set up or loaded: what only the real world size can tell."""

    def load_data(self, b: Built) -> StageData:
        raise NotImplementedError

    def arguments(self, b: Built) -> dict:
        """Keyword arguments for `arguments_class` beyond the ones every stage shares."""
        return {}

    def load_model(self, b: Built):
        """The policy: a causal LM with the method's adapters attached (a stage with a head loads its own)."""
        return load_model(b.model_cfg, b.stage.method, b.cfg.scaling.use_gpu, log=b.ctx.log)

    def score(self, b: Built, model, when: str) -> dict:
        """Held-out scores `when` ("before" or "after") training, as summary keys. By default greedy
        answers to `evaluate.data`, scored by exact match (read in the training format, if the
        data step recorded one as `fmt`)."""
        task = b.data.extra.setdefault("task", held_out_task(b.stage, b.data.extra.get("fmt")))
        return {f"exact_match_{when}": score_held_out(model, b.tokenizer, task, b.stage, b.ctx, when)}

    def build_trainer(self, b: Built, model, args, callbacks: list):
        raise NotImplementedError

    def evaluated(self, b: Built, eval_metrics: dict) -> None:
        """Right after the eval split's evaluation: a stage may log what its metrics say."""

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        """The stage's own summary keys (task metrics, data counts)."""
        raise NotImplementedError

    def exported(self, b: Built, model, final_dir: Path) -> None:
        """On rank 0, after the export: what goes beside the weights. A language model's generation
        config, by default; a score or classification head has none."""
        model.generation_config.save_pretrained(str(final_dir))


def run_trainer_stage(cfg: DistftConfig, ctx: StageContext, recipe: TrainerRecipe) -> dict:
    stage = cfg.stages[ctx.stage_index]
    started = time.time()
    recipe.check(cfg, ctx)
    stage_dir = prepare_worker(cfg, ctx)
    model_cfg = stage_model(cfg, ctx)  # the base, or an earlier stage's output
    b = Built(cfg, ctx, stage, stage_dir, model_cfg, load_tokenizer(model_cfg))

    with local_leader_first(ctx.local_rank):  # once per node; the others read the datasets cache
        b.retain = load_retain_sets(cfg, stage)  # first: replay rows are checked against them
        b.data = recipe.load_data(b)
    ctx.log(f"[{stage.label()}] data {b.data.described}")
    if type(stage).no_retain and stage.evaluate.retain is None and cfg.model.name_or_path == TINY_BASE:
        ctx.log(f"[{stage.label()}] no retain set: {type(stage).no_retain}")

    steps = total_steps(cfg, ctx, b.data.items)
    args = pkgutil.resolve_name(recipe.arguments_class)(**trainer_arguments(cfg, ctx, stage_dir),
                                                        **recipe.arguments(b))
    with fsdp.load_env(b.sharded_at_load()):
        model = recipe.load_model(b)
    params = count_params(model)

    before = recipe.score(b, model, "before")  # so the summary shows what training bought
    callbacks = stage_callbacks(cfg, ctx, stage_dir, steps)
    retained = RetainWatch(b.retain, b.tokenizer, stage, ctx, stage_dir, cfg.model.max_seq_len, callbacks[0].metrics)
    retained.before(model, rank0_only=b.sharded_at_load())
    if b.retain and stage.evaluate.retain_every_eval:  # first: its scores join the eval row the others log
        callbacks.insert(0, retain_at_eval(b.tokenizer, b.retain, stage, ctx, cfg.model.max_seq_len))
    trainer = recipe.build_trainer(b, model, args, callbacks)
    prepare_trainer(trainer, stage, ctx)
    result = train(trainer, ctx)
    eval_metrics = trainer.evaluate()
    recipe.evaluated(b, eval_metrics)
    after = recipe.score(b, trainer.model, "after")
    forgetting = retained.after(trainer.model, trainer.state.global_step)

    # Export: a full HF model, or the adapter alone (its config points at the model it started from).
    final_dir = stage_dir / "final"
    export_model(trainer, final_dir, ctx)
    summary = {**run_summary(cfg, ctx, trainer, result, eval_metrics, params, started, final_dir),
               **before, **after, **recipe.summary(b, trainer, eval_metrics), **forgetting}
    if ctx.is_main:
        recipe.exported(b, model, final_dir)
    return complete_stage(cfg, ctx, stage_dir, final_dir, summary, b.tokenizer)
