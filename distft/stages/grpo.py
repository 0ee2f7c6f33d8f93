"""Group relative policy optimisation (Shao et al. 2024) with TRL's GRPOTrainer.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): prompts
-> rewards and GRPOConfig -> policy (by default the last earlier SFT output) -> held-out exact match
before -> GRPOTrainer -> ... -> exact match after. For each prompt the policy samples
`grpo.num_generations` answers; each answer's advantage is its reward relative to its group's, so no
critic is needed. The reward is `reward.model_weight * RM(prompt, answer) + sum(weight *
function(...))`: the reward model (`reward.model`, else the last earlier reward stage) scores the
chat-rendered conversation as the reward stage trained it, and each `reward.functions` entry is a
distft reward function (see distft/rl/rewards.py) given the row's reference answer. With `grpo.beta
> 0` a KL penalty holds the policy near its start: with lora/qlora the model with adapters disabled,
with full a frozen copy. Like every stage it runs in one process, under torchrun, or in a Ray Train
worker.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.config.schema import grpo_group_errors
from distft.data.formats import DataError, policy_prompt, reference_answer, scored_ids
from distft.data.loading import split_rows
from distft.models.loading import load_reward_for_inference
from distft.rl.rewards import resolve, weighted_scores
from distft.stages.chain import source_path
from distft.stages.context import StageContext
from distft.stages.evaluate import reward_scores
from distft.stages.trainer_setup import base_as_reference, logged_value
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage

PROMPT_FORMATS = ("alpaca", "messages", "prompt_completion")


class GRPO(TrainerRecipe):
    arguments_class = "trl:GRPOConfig"

    def check(self, cfg: DistftConfig, ctx: StageContext) -> None:
        check_groups(cfg, ctx.stage_index, ctx.world_size)
        grpo = cfg.stages[ctx.stage_index].grpo
        if grpo.generation == "vllm":
            from distft.models.vllm_engine import engine_environment, vllm_problem

            if problem := vllm_problem(f"stages.{ctx.stage_index}.grpo.generation"):
                raise ImportError(problem)
            engine_environment(grpo.vllm, cfg.scaling.use_gpu)  # before TRL imports vLLM

    def load_data(self, b: Built) -> StageData:
        # Prompts (chat turns when the rows are chat-shaped, so TRL renders them with the template,
        # exactly as the exact-match evaluation does) and each row's reference answer for reward functions.
        data_cfg, grpo = b.stage.data, b.stage.grpo
        train_rows, eval_rows, fmt = split_rows(data_cfg, b.stage.train.seed)
        if fmt not in PROMPT_FORMATS:
            raise DataError(f"data.train: the grpo stage samples answers to prompts (alpaca, messages or "
                            f"prompt_completion rows, whose answers feed reward functions); {data_cfg.train} has "
                            f"format {fmt}.")
        train_ds = prompt_dataset(train_rows, fmt, b.tokenizer)
        eval_ds = prompt_dataset(eval_rows, fmt, b.tokenizer)
        # A step takes global_batch_size samples: num_generations per prompt.
        return StageData(train_ds, eval_ds, len(train_ds) * grpo.num_generations,
                         f"({fmt}): {len(train_ds)} prompts, {grpo.num_generations} samples each")

    def arguments(self, b: Built) -> dict:
        # The reward weights are GRPOConfig's, so the rewards are set up here: the reward model first,
        # then the functions, with their weights in the same order.
        stage, ctx, cfg = b.stage, b.ctx, b.cfg
        for name in stage.reward.functions:
            resolve(name)  # an unknown or unimportable name fails now, not at the first rollout
        reward_funcs, weights = [], []
        source = cfg.reward_source(ctx.stage_index)
        if source:
            rm, rm_tokenizer = load_reward_for_inference(source_path(cfg, ctx.run_dir, source),
                                                         cfg.model.trust_remote_code, cfg.model.allow_pickle_weights)
            if cfg.scaling.use_gpu:
                rm.to(f"cuda:{ctx.local_rank}")
            reward_funcs.append(reward_model_function(rm, rm_tokenizer, stage.evaluate.batch_size))
            weights.append(stage.reward.model_weight)
            ctx.log(f"[{stage.label()}] reward model {source} (weight {stage.reward.model_weight})")
        for name, weight in stage.reward.functions.items():
            reward_funcs.append(trl_reward_function(name, b.tokenizer))
            weights.append(weight)
        if stage.reward.functions:
            ctx.log(f"[{stage.label()}] reward functions: "
                    + ", ".join(f"{n} (weight {w})" for n, w in stage.reward.functions.items()))
        if not reward_funcs:  # the schema refuses this config; a hand-built one gets the same fix
            raise ValueError(f"stages.{ctx.stage_index}.reward: nothing scores the samples. Fix: reward.model=<reward "
                             "model dir or stage name>, and/or reward.functions={exact_match: 1.0}.")
        b.data.extra["reward_funcs"] = reward_funcs
        grpo = stage.grpo
        engine = {}
        if grpo.generation == "vllm":  # TRL's colocated engine: one per worker, synced by TRL every step
            engine = {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": cfg.model.max_seq_len,
                      "vllm_gpu_memory_utilization": grpo.vllm.gpu_memory_utilization,
                      "vllm_enable_sleep_mode": cfg.scaling.use_gpu and grpo.vllm.sleep}
        return {"num_generations": grpo.num_generations, "max_completion_length": grpo.max_new_tokens,
                "temperature": grpo.temperature, "beta": grpo.beta, "epsilon": grpo.epsilon,
                "epsilon_high": grpo.epsilon_high, "loss_type": grpo.loss_type, "scale_rewards": grpo.scale_rewards,
                "reward_weights": weights, **engine}

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from trl import GRPOTrainer

        funcs = b.data.extra["reward_funcs"]
        trainer = GRPOTrainer(
            model=model,
            reward_funcs=funcs,
            args=args,
            train_dataset=b.data.train,
            eval_dataset=b.data.eval,
            processing_class=b.tokenizer,
            reward_processing_classes=[None] * len(funcs),
            callbacks=callbacks,
        )
        base_as_reference(trainer)
        if getattr(trainer, "vllm_generation", None) is not None:
            from distft.models.vllm_engine import trl_colocate_sync

            gen = trainer.vllm_generation
            gen.sync_weights = trl_colocate_sync(gen, b.cfg.scaling.use_gpu)
        return trainer

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        history, task = trainer.state.log_history, b.data.extra["task"]
        return {
            "eval_items": len(task.rows) if task else 0,
            "mean_reward_first": logged_value(history, "reward", 0),  # per logging window, over its samples
            "mean_reward_last": logged_value(history, "reward", -1),
            "kl_last": logged_value(history, "kl", -1),  # logged only with grpo.beta > 0
            "eval_reward": eval_metrics.get("eval_reward"),  # the mean weighted reward of sampled answers
            "train_prompts": len(b.data.train),
        }


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, GRPO())


def check_groups(cfg: DistftConfig, index: int, world_size: int) -> None:
    """The config's group checks again with the real world size (the launcher's may differ from the YAML's)."""
    errors = grpo_group_errors(f"stages.{index}", cfg.stages[index], world_size)
    if errors:
        raise ValueError("\n".join(errors))


def prompt_dataset(rows, fmt: str, tokenizer):
    """Rows -> {prompt, reference}: TRL samples answers to `prompt`; reward functions get `reference`."""
    return rows.map(lambda row: {"prompt": policy_prompt(row, fmt, tokenizer), "reference": reference_answer(row, fmt)},
                    remove_columns=rows.column_names, desc="Building prompts")


def reward_model_function(model, tokenizer, batch_size: int):
    """The reward model as a TRL reward function, reading exactly what it was trained on.

    Handed the model itself, TRL renders prompt + decoded completion, and a completion decodes
    with the leading space it was generated with (" bear"): the chat template then writes two
    spaces, a token sequence the reward model never saw (measured: GRPO's reward fell instead of
    rising). Here the answer is stripped and rendered by `scored_ids`, as PPO and the reward stage do.
    """

    def reward_model(prompts, completions, **_) -> list[float]:
        texts = [(c if isinstance(c, str) else c[-1]["content"]).strip() for c in completions]
        seqs = [scored_ids(p, [{"role": "assistant", "content": t}] if isinstance(p, list) else t, tokenizer)
                for p, t in zip(prompts, texts)]
        return reward_scores(model, seqs, tokenizer.pad_token_id, batch_size).tolist()

    return reward_model


def trl_reward_function(name: str, tokenizer):
    """A distft reward function `fn(prompts, completions, references)` as TRL calls one: with keyword
    arguments, chat-turn prompts and completions, and every dataset column (here `reference`)."""

    def reward(prompts, completions, reference, **_) -> list[float]:
        texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
        prompts = [p if isinstance(p, str) else tokenizer.apply_chat_template(p, tokenize=False,
                                                                              add_generation_prompt=True)
                   for p in prompts]
        return weighted_scores({name: 1.0}, prompts, texts, reference)  # checks one number per completion

    reward.__name__ = name  # TRL logs rewards/<name>/mean
    return reward
