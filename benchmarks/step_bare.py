"""The floor `benchmarks/step.py` compares distft with: a bare transformers `Trainer` on the same token rows.

    python benchmarks/step_bare.py --tokens TRAIN.jsonl --eval-tokens EVAL.jsonl --model DIR --out DIR ...
    torchrun --nproc-per-node 2 benchmarks/step_bare.py ...        # 2 processes, gloo DDP

No distft import: what a user writes without a framework. The rows are `input_ids` and `labels`
(prompt positions -100) that step.py wrote with distft's own encoder, so both train on the same
tokens under the same loss mask; the model's own loss, the Trainer's own sampler, seed and
optimizer. Writes `<out>/metrics.jsonl` (time, step, loss: the shape of a distft stage's rows, so
one reader serves both) and `<out>/times.json` (process start, train start, end of train, end).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: they are part of the start being compared

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--tokens", required=True)
    p.add_argument("--eval-tokens", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--accum", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--optimizer", required=True)
    p.add_argument("--scheduler", required=True)
    p.add_argument("--warmup", type=float, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
    p.add_argument("--max-grad-norm", type=float, required=True)
    p.add_argument("--seed", type=int, required=True)
    p.add_argument("--log-every", type=int, required=True)
    a = p.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    torch.set_num_threads(a.threads)
    rank = int(os.environ.get("RANK", 0))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    class StepTimes(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank == 0 and logs and "loss" in logs:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), "step": state.global_step,
                                        "loss": logs["loss"]}) + "\n")

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def collate(rows):
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    train = datasets.load_dataset("json", data_files=a.tokens, split="train")
    held_out = datasets.load_dataset("json", data_files=a.eval_tokens, split="train")
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    args = TrainingArguments(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=a.micro_batch,
        per_device_eval_batch_size=a.micro_batch,
        gradient_accumulation_steps=a.accum,
        learning_rate=a.lr,
        optim=a.optimizer,
        lr_scheduler_type=a.scheduler,
        warmup_steps=a.warmup,
        weight_decay=a.weight_decay,
        max_grad_norm=a.max_grad_norm,
        max_steps=a.max_steps,
        seed=a.seed,
        logging_steps=a.log_every,
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=held_out, data_collator=collate,
                      callbacks=[StepTimes()])
    began = time.time()
    trainer.train()
    trained = time.time()
    trainer.evaluate()
    trainer.save_model(str(out / "final"))  # safetensors, as distft's export
    if rank == 0:
        (out / "times.json").write_text(json.dumps({"start": STARTED, "train_start": began, "trained": trained,
                                                    "end": time.time()}))


if __name__ == "__main__":
    main()
