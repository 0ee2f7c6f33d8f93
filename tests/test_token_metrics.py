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
                     logging_first_step=True, learning_rate=1e-4, save_strategy="no", eval_strategy="no",
                     use_cpu=True, report_to="none", disable_tqdm=True, seed=7, max_length=64,
                     gradient_checkpointing=False)  # as distft's stages run (TRL's default is on)
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
        # Steps between logs take the model's own loss; its gradients and TRL's chunked head's differ in low
        # bits (the exact check is the next test), which a few steps of training carry into the loss.
        assert mine["loss"] == pytest.approx(ref["loss"], rel=2e-3)
        assert mine["num_tokens"] == ref["num_tokens"]  # every rank's tokens, every step, exactly
        assert 0 <= mine["mean_token_accuracy"] <= 1 and mine["entropy"] > 0  # the logged step's batch
    # TRL gathers on every micro-batch (4 per micro-batch over 7 steps); here only on the micro-batches of
    # the logged steps (1, 3, 6, and the last, 7), plus one token count for the steps in between.
    assert len(their_gathers) == 4 * 7 * accum
    assert sorted(set(our_gathers)) == [0, 2, 5, 6]  # global_step while steps 1, 3, 6 and 7 run
    assert len(our_gathers) == 4 * 4 * accum + 2  # the token counts pending at steps 3 and 6


def test_a_step_between_logs_takes_trls_loss_value_and_the_exact_gradient(tiny_base):
    """At fixed weights and batch: the loss TRL would compute, and the gradient of the plain cross-entropy
    over the model's logits (computed here by hand), to float precision."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from distft.config.schema import DataConfig
    from distft.data.loading import load_checked, tokenize_dataset
    from distft.stages.token_metrics import metrics_at_log_steps

    data = DataConfig(train=str(REPO / "configs/data/facts_train.jsonl"))
    rows, fmt = load_checked(data.train, data, "data.train")
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    ds, _ = tokenize_dataset(rows.select(range(32)), fmt, tokenizer, 64, "completion", "text")
    model = AutoModelForCausalLM.from_pretrained(tiny_base, dtype=torch.float32)
    args = SFTConfig(output_dir="/tmp/unused", per_device_train_batch_size=8, max_steps=10, logging_steps=5,
                     use_cpu=True, report_to="none", max_length=64, gradient_checkpointing=False)
    trainer = metrics_at_log_steps(SFTTrainer)(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    trainer.state.global_step, trainer.state.max_steps = 1, 10  # step 2: between logs
    trainer.model.train()
    batch = next(iter(trainer.get_train_dataloader()))
    n = (batch["labels"][:, 1:] != -100).sum()
    params = [p for p in trainer.model.parameters() if p.requires_grad]

    gathered = []
    trainer.accelerator.gather_for_metrics = lambda x, *a, **kw: gathered.append(x) or x
    ours = trainer.compute_loss(trainer.model, dict(batch), num_items_in_batch=n)
    assert gathered == [] and not trainer._metrics["train"].get("entropy")  # no collective, no metric
    grads = torch.autograd.grad(ours, params)
    theirs = SFTTrainer.compute_loss(trainer, trainer.model, dict(batch), num_items_in_batch=n)
    logits = trainer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    exact = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), batch["labels"][:, 1:].reshape(-1),
                                              ignore_index=-100, reduction="sum") / n
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6)
    assert ours.item() == pytest.approx(exact.item(), rel=1e-6)
    for g, e in zip(grads, torch.autograd.grad(exact, params)):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


_ONE_RANK = r"""
import json, os, sys
from pathlib import Path
import yaml
from distft.config import load_config
from distft.stages.context import StageContext
from distft.stages.trainer_setup import prepare_worker
from transformers import TrainingArguments

base, out, prepare = sys.argv[1], Path(sys.argv[2]), sys.argv[3] == "prepare"
(out / "c.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": base}, "stage": "sft",
                                             "data": {"train": str(out / "rows.jsonl")},
                                             "scaling": {"num_workers": 1, "cpus_per_worker": 1}}))
cfg = load_config(str(out / "c.yaml"))
if prepare:
    prepare_worker(cfg, StageContext(run_dir=out, world_size=1))
args = TrainingArguments(output_dir=str(out / "t"), use_cpu=True)
print(json.dumps({"type": str(args.distributed_state.distributed_type), "world": args.world_size}))
"""


@pytest.mark.parametrize("prepare", [True, False])
def test_one_rank_under_a_launcher_trains_without_ddp(tiny_base, tmp_path, prepare):
    """Ray Train and torchrun set LOCAL_RANK even for one worker; accelerate reads that as distributed and
    wraps the model in DDP (gradient-bucket copies, a one-rank all-reduce: 6-10% of a small model's step).
    After prepare_worker a one-rank DDP-strategy worker trains the model unwrapped; without it (the
    premise), accelerate would pick MULTI_CPU."""
    import json
    import os
    import socket
    import subprocess
    import sys

    (tmp_path / "rows.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    r = subprocess.run([sys.executable, "-c", _ONE_RANK, str(tiny_base), str(tmp_path), "prepare" if prepare else "no"],
                       env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["world"] == 1
    assert got["type"].endswith("NO" if prepare else "MULTI_CPU"), got
