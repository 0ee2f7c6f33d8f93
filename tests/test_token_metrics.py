"""SFT's per-token metrics at log steps only (distft/stages/token_metrics.py): the same training as TRL's
own SFTTrainer, step for step, with the metrics on the logged steps and without their collectives on
the others."""

from __future__ import annotations

import pytest

from conftest import REPO


def _train(trainer_cls, model_dir, rows, tmp_path, steps: int, log_every: int, accum: int = 1):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # noqa: F401  (trainer_cls is one)

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    args = SFTConfig(output_dir=str(tmp_path / trainer_cls.__name__), per_device_train_batch_size=4,
                     gradient_accumulation_steps=accum, max_steps=steps, logging_steps=log_every,
                     logging_first_step=True, learning_rate=1e-3, save_strategy="no", eval_strategy="no",
                     use_cpu=True, report_to="none", disable_tqdm=True, seed=7, max_length=64)
    trainer = trainer_cls(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    gathers = []
    gather = trainer.accelerator.gather_for_metrics

    def counted(x, *a, **kw):
        gathers.append(trainer.state.global_step)
        return gather(x, *a, **kw)

    trainer.accelerator.gather_for_metrics = counted
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return logs, gathers


@pytest.mark.parametrize("accum", [1, 2])
def test_same_losses_and_token_count_as_trl_with_the_metrics_only_on_logged_steps(tiny_base, tmp_path, accum):
    import datasets
    from transformers import AutoTokenizer
    from trl import SFTTrainer

    from distft.data.loading import load_checked, tokenize_dataset
    from distft.config.schema import DataConfig
    from distft.stages.token_metrics import metrics_at_log_steps

    data = DataConfig(train=str(REPO / "configs/data/facts_train.jsonl"))
    rows, fmt = load_checked(data.train, data, "data.train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ds, _ = tokenize_dataset(rows.select(range(96)), fmt, tokenizer, 64, "completion", "text")
    assert isinstance(ds, datasets.Dataset)

    theirs, their_gathers = _train(SFTTrainer, tiny_base, ds, tmp_path, steps=7, log_every=3, accum=accum)
    ours, our_gathers = _train(metrics_at_log_steps(SFTTrainer), tiny_base, ds, tmp_path, steps=7, log_every=3,
                               accum=accum)
    assert [h["step"] for h in ours] == [h["step"] for h in theirs] == [1, 3, 6]
    for mine, ref in zip(ours, theirs):
        assert mine["loss"] == pytest.approx(ref["loss"], rel=1e-5)
        assert mine["num_tokens"] == ref["num_tokens"]  # every rank's tokens, every step, exactly
        assert 0 <= mine["mean_token_accuracy"] <= 1 and mine["entropy"] > 0  # the logged step's batch
    # TRL gathers on every micro-batch (4 per micro-batch over 7 steps); here only on the micro-batches of
    # the logged steps (1, 3, 6, and the last, 7), plus one token count for the steps in between.
    assert len(their_gathers) == 4 * 7 * accum
    assert sorted(set(our_gathers)) == [0, 2, 5, 6]  # global_step while steps 1, 3, 6 and 7 run
    assert len(our_gathers) == 4 * 4 * accum + 2  # the token counts pending at steps 3 and 6
