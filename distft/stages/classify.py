"""Sequence classification: text + label rows -> AutoModelForSequenceClassification, with the Trainer.

Reads top to bottom: data (labels from the training rows) -> model with the method applied ->
held-out scores before -> trainer -> train -> scores after -> export. Accuracy, precision, recall
and F1 (macro and per class) come from scikit-learn, on the held-out file (`evaluate.data`) or,
without one, on the eval split.
"""

from __future__ import annotations

import json
import time

from distft.config import DistftConfig
from distft.data.formats import DataError
from distft.data.loading import load_checked, split_rows
from distft.distributed import fsdp
from distft.distributed.collectives import local_leader_first
from distft.models.loading import load_classifier, load_tokenizer
from distft.models.methods import count_params
from distft.stages.chain import stage_model
from distft.stages.context import StageContext
from distft.stages.trainer_setup import (
    export_model,
    finish,
    prepare_worker,
    ready,
    run_summary,
    score_on_rank0,
    stage_callbacks,
    total_steps,
    train,
    trainer_arguments,
)


LABELS_FILE = "distft_labels.json"  # beside a classifier's adapter: the labels its head was trained on


def label_names(rows) -> list[str]:
    return sorted({str(v) for v in rows["label"]})


def encode(rows, tokenizer, labels: list[str], text_field: str, max_len: int, where: str):
    index = {name: i for i, name in enumerate(labels)}
    unknown = sorted({str(v) for v in rows["label"]} - set(index))
    if unknown:
        raise DataError(f"{where}: label(s) {unknown} never occur in the training data {labels}. Fix: train on "
                        "rows of every label, or drop those rows.")

    def one(row):
        ids = tokenizer(row[text_field], truncation=True, max_length=max_len)
        return {**ids, "labels": index[str(row["label"])]}

    return rows.map(one, remove_columns=rows.column_names)


def classification_metrics(labels: list[str]):
    """compute_metrics for the Trainer: accuracy, macro precision/recall/F1 and F1 per class (scikit-learn)."""
    import numpy as np
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    def compute(prediction) -> dict:
        logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        predicted, gold = np.argmax(logits, axis=-1), prediction.label_ids
        ids = list(range(len(labels)))
        p, r, f, _ = precision_recall_fscore_support(gold, predicted, labels=ids, average="macro", zero_division=0)
        _, _, per_class, _ = precision_recall_fscore_support(gold, predicted, labels=ids, average=None,
                                                             zero_division=0)
        return {"accuracy": float(accuracy_score(gold, predicted)), "precision_macro": float(p),
                "recall_macro": float(r), "f1_macro": float(f),
                **{f"f1_{name}": float(v) for name, v in zip(labels, per_class)}}

    return compute


def scores_as_loaded(model, ds, tokenizer, compute, batch: int) -> dict:
    """Held-out scores of the model as loaded, outside the Trainer, before training. Rank 0 scores
    alone (score_on_rank0) and shares the result: under FSDP2 only it holds weights then."""
    import numpy as np
    import torch
    from transformers import DataCollatorWithPadding, EvalPrediction

    collate = DataCollatorWithPadding(tokenizer)
    logits, gold = [], []
    model.eval()
    with torch.no_grad():
        for start in range(0, len(ds), batch):
            b = collate([ds[i] for i in range(start, min(start + batch, len(ds)))])
            gold.append(b.pop("labels").numpy())
            logits.append(model(**{k: v.to(model.device) for k, v in b.items()}).logits.float().cpu().numpy())
    model.train()
    metrics = compute(EvalPrediction(predictions=np.concatenate(logits), label_ids=np.concatenate(gold)))
    return {f"heldout_{k}": v for k, v in metrics.items()}


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

    stage = cfg.stages[ctx.stage_index]
    data_cfg, max_len = stage.data, cfg.model.max_seq_len
    started = time.time()
    stage_dir = prepare_worker(cfg, ctx)
    model_cfg = stage_model(cfg, ctx)

    # Data: the label set is the training rows'; held-out rows must use the same labels.
    tokenizer = load_tokenizer(model_cfg)
    with local_leader_first(ctx.local_rank):  # once per node; the others read the datasets cache
        train_rows, eval_rows, _ = split_rows(data_cfg, stage.train.seed)
        labels = label_names(train_rows)
        train_ds = encode(train_rows, tokenizer, labels, data_cfg.text_field, max_len, "data.train")
        eval_ds = encode(eval_rows, tokenizer, labels, data_cfg.text_field, max_len, "data.eval")
        held_ds = eval_ds
        if stage.evaluate.data:
            held_rows, _ = load_checked(stage.evaluate.data, data_cfg, "evaluate.data", fmt="classification")
            if stage.evaluate.max_samples:
                held_rows = held_rows.select(range(min(len(held_rows), stage.evaluate.max_samples)))
            held_ds = encode(held_rows, tokenizer, labels, data_cfg.text_field, max_len, "evaluate.data")
    ctx.log(f"[{stage.label()}] data: {len(train_ds)} training rows, {len(eval_ds)} eval, {len(held_ds)} held-out; "
            f"labels {labels}")

    # Under FSDP2 only local rank 0 reads the weights; the others build on the meta device and get
    # their shards at prepare time (as sft and reward do).
    sharded_at_load = stage.strategy.name == "fsdp" and ctx.world_size > 1
    with fsdp.load_env(sharded_at_load):
        model = load_classifier(model_cfg, stage.method, labels, cfg.scaling.use_gpu, log=ctx.log)
    params = count_params(model)
    steps = total_steps(cfg, ctx, len(train_ds))
    trainer = Trainer(
        model=model,
        args=TrainingArguments(**trainer_arguments(cfg, ctx, stage_dir)),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=classification_metrics(labels),
        callbacks=stage_callbacks(cfg, ctx, stage_dir, steps),
    )
    # transformers 5.23 takes any model whose forward has **kwargs to normalise its loss by the batch's
    # label count itself, and then skips dividing by the accumulation steps; classification losses are
    # plain means, so gradients (and the logged loss) came out summed over micro-batches (measured: the
    # first loss 1.39 / 2.78 / 5.55 with 1 / 2 / 4 accumulation steps). This restores the division.
    trainer.model_accepts_loss_kwargs = False
    ready(trainer, stage, ctx)

    # predict() neither logs nor triggers evaluation callbacks: the held-out score is not an eval step.
    before = {}
    # The Trainer's predict() before training would prepare a DeepSpeed model as an inference engine
    # that train() then cannot step ("'NoneType' object has no attribute 'backward'", measured).
    if stage.evaluate.before and (sharded_at_load or stage.strategy.name == "deepspeed"):
        before = score_on_rank0(lambda: scores_as_loaded(model, held_ds, tokenizer, classification_metrics(labels),
                                                         stage.train.micro_batch_size), ctx)
    elif stage.evaluate.before:
        before = trainer.predict(held_ds, metric_key_prefix="heldout").metrics
    result = train(trainer, ctx)
    eval_metrics = trainer.evaluate()
    after = trainer.predict(held_ds, metric_key_prefix="heldout").metrics
    if ctx.is_main:
        ctx.log(f"[{stage.label()}] held-out accuracy {before.get('heldout_accuracy', float('nan')):.1%} -> "
                f"{after['heldout_accuracy']:.1%}, macro F1 {before.get('heldout_f1_macro', float('nan')):.3f} -> "
                f"{after['heldout_f1_macro']:.3f} ({len(held_ds)} rows)")

    final_dir = stage_dir / "final"
    export_model(trainer, final_dir, ctx)
    if ctx.is_main and (final_dir / "adapter_config.json").is_file():
        # An adapter export carries no config.json, so the label set would be lost to whoever merges it.
        (final_dir / LABELS_FILE).write_text(json.dumps({"labels": labels}))
    summary = {
        **run_summary(cfg, ctx, trainer, result, eval_metrics, params, started, final_dir),
        "labels": labels,
        "heldout_rows": len(held_ds),
        **{f"{k.removeprefix('heldout_')}_before": v for k, v in before.items() if _score(k)},
        **{f"{k.removeprefix('heldout_')}_after": v for k, v in after.items() if _score(k)},
    }
    return finish(cfg, ctx, stage_dir, final_dir, summary, tokenizer)


def _score(key: str) -> bool:
    return key.startswith("heldout_") and not key.endswith(("_runtime", "_per_second", "_loss"))
