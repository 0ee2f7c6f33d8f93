"""Sequence classification: text + label rows -> AutoModelForSequenceClassification, with the Trainer.

The steps of its own, in the order the shared skeleton runs them (stages/trainer_stage.py): data
(labels from the training rows) -> model with the method applied -> held-out scores before ->
Trainer -> ... -> scores after. Accuracy, precision, recall
and F1 (macro and per class) come from scikit-learn, on the held-out file (`evaluate.data`) or,
without one, on the eval split.
"""

from __future__ import annotations

import json

from distft.config import DistftConfig
from distft.data.formats import DataError
from distft.data.loading import load_checked, split_rows
from distft.distributed.sharding import full_parameters
from distft.models.loading import load_classifier
from distft.stages.context import StageContext
from distft.stages.trainer_setup import score_on_rank0
from distft.stages.trainer_stage import Built, StageData, TrainerRecipe, run_trainer_stage


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
    """Held-out scores of the model as loaded, outside the Trainer (see Classify.score)."""
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


class Classify(TrainerRecipe):
    arguments_class = "transformers:TrainingArguments"

    def load_data(self, b: Built) -> StageData:
        # The label set is the training rows'; held-out rows must use the same labels.
        stage, data_cfg, max_len, tok = b.stage, b.stage.data, b.cfg.model.max_seq_len, b.tokenizer
        train_rows, eval_rows, _ = split_rows(data_cfg, stage.train.seed)
        labels = label_names(train_rows)
        train_ds = encode(train_rows, tok, labels, data_cfg.text_field, max_len, "data.train")
        eval_ds = encode(eval_rows, tok, labels, data_cfg.text_field, max_len, "data.eval")
        held_ds = eval_ds
        if stage.evaluate.data:
            held_rows, _ = load_checked(stage.evaluate.data, data_cfg, "evaluate.data", fmt="classification")
            if stage.evaluate.max_samples:
                held_rows = held_rows.select(range(min(len(held_rows), stage.evaluate.max_samples)))
            held_ds = encode(held_rows, tok, labels, data_cfg.text_field, max_len, "evaluate.data")
        for r in b.retain:  # labelled rows of the stage's own labels, scored like the held-out rows
            enc = encode(r.rows, tok, labels, data_cfg.text_field, max_len, f"evaluate.retain ({r.source})")
            r.score_fn = (lambda model, enc=enc: scores_as_loaded(model, enc, tok, classification_metrics(labels),
                                                                  stage.train.micro_batch_size)["heldout_accuracy"])
        return StageData(train_ds, eval_ds, len(train_ds),
                         f"(classification): {len(train_ds)} training rows, {len(eval_ds)} eval, {len(held_ds)} "
                         f"held-out; labels {labels}", {"labels": labels, "held": held_ds})

    def load_model(self, b: Built):
        return load_classifier(b.model_cfg, b.stage.method, b.data.extra["labels"], b.cfg.scaling.use_gpu,
                               log=b.ctx.log)

    def score(self, b: Built, model, when: str) -> dict:
        stage, held, labels = b.stage, b.data.extra["held"], b.data.extra["labels"]
        if when == "before":
            if not stage.evaluate.before:
                scores = {}
            elif b.sharded_at_load():  # only rank 0 holds weights before they are sharded
                scores = score_on_rank0(lambda: scores_as_loaded(model, held, b.tokenizer,
                                                                 classification_metrics(labels),
                                                                 stage.train.micro_batch_size), b.ctx)
            else:
                # Not the Trainer's predict(): before training it would prepare a DeepSpeed model as an
                # inference engine that train() then cannot step ("'NoneType' object has no attribute
                # 'backward'", measured). Every rank scores every row, with ZeRO-3's shards gathered.
                with full_parameters(model, stage.strategy.label()):
                    scores = scores_as_loaded(model, held, b.tokenizer, classification_metrics(labels),
                                              stage.train.micro_batch_size)
            b.data.extra["before"] = scores
        else:
            # predict() neither logs nor triggers evaluation callbacks: the held-out score is not an eval step.
            scores = b.data.extra["trainer"].predict(held, metric_key_prefix="heldout").metrics
            before = b.data.extra["before"]
            if b.ctx.is_main:
                nan = float("nan")
                b.ctx.log(f"[{stage.label()}] held-out accuracy {before.get('heldout_accuracy', nan):.1%} -> "
                          f"{scores['heldout_accuracy']:.1%}, macro F1 {before.get('heldout_f1_macro', nan):.3f} -> "
                          f"{scores['heldout_f1_macro']:.3f} ({len(held)} rows)")
        return {f"{k.removeprefix('heldout_')}_{when}": v for k, v in scores.items() if _score(k)}

    def build_trainer(self, b: Built, model, args, callbacks: list):
        from transformers import DataCollatorWithPadding, Trainer

        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=b.data.train,
            eval_dataset=b.data.eval,
            processing_class=b.tokenizer,
            data_collator=DataCollatorWithPadding(b.tokenizer),
            compute_metrics=classification_metrics(b.data.extra["labels"]),
            callbacks=callbacks,
        )
        # transformers 5 takes any model whose forward has **kwargs to normalise its loss by the batch's
        # label count itself, and then skips dividing by the accumulation steps; classification losses are
        # plain means, so gradients (and the logged loss) came out summed over micro-batches (measured: the
        # first loss 1.39 / 2.78 / 5.55 with 1 / 2 / 4 accumulation steps). This restores the division.
        trainer.model_accepts_loss_kwargs = False
        b.data.extra["trainer"] = trainer  # the held-out score after training is its predict()
        return trainer

    def summary(self, b: Built, trainer, eval_metrics: dict) -> dict:
        return {"labels": b.data.extra["labels"], "heldout_rows": len(b.data.extra["held"])}

    def exported(self, b: Built, model, final_dir) -> None:
        if (final_dir / "adapter_config.json").is_file():
            # An adapter export carries no config.json, so the label set would be lost to whoever merges it.
            (final_dir / LABELS_FILE).write_text(json.dumps({"labels": b.data.extra["labels"]}))


def run(cfg: DistftConfig, ctx: StageContext) -> dict:
    return run_trainer_stage(cfg, ctx, Classify())


def _score(key: str) -> bool:
    return key.startswith("heldout_") and not key.endswith(("_runtime", "_per_second", "_loss"))
