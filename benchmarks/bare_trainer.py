"""The floor that benchmarks/overhead.py compares `distft train` with: a bare TRL SFTTrainer under torchrun.

    torchrun --nproc-per-node 2 benchmarks/bare_trainer.py --model DIR --data ROWS.jsonl --out DIR ...

No distft import: the model and rows are read with transformers and datasets as a user
without distft would. It writes `<out>/metrics.jsonl` lines shaped like a distft stage's
(time, step, loss), so the same code reads both, and `<out>/phases.json` (process start).
"""

from __future__ import annotations

import time

STARTED = time.time()  # before the heavy imports: they are part of the startup being compared

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
from pathlib import Path  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--micro-batch", type=int, required=True)
    p.add_argument("--global-batch", type=int, required=True)
    p.add_argument("--max-len", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--log-every", type=int, required=True)
    p.add_argument("--eval-fraction", type=float, required=True)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()

    import datasets
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(a.threads)
    world = int(os.environ.get("WORLD_SIZE", 1))
    rank = int(os.environ.get("RANK", 0))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)

    class StepTimes(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if rank == 0 and logs and "loss" in logs:
                with (out / "metrics.jsonl").open("a") as f:
                    f.write(json.dumps({"time": round(time.time(), 3), "step": state.global_step,
                                        "loss": logs["loss"]}) + "\n")

    rows = datasets.load_dataset("json", data_files=a.data, split="train")
    parts = rows.train_test_split(test_size=a.eval_fraction, seed=42)
    tokenizer = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    args = SFTConfig(
        output_dir=str(out / "checkpoints"),
        per_device_train_batch_size=a.micro_batch,
        per_device_eval_batch_size=a.micro_batch,
        gradient_accumulation_steps=max(1, a.global_batch // (a.micro_batch * world)),
        learning_rate=a.lr,
        lr_scheduler_type="cosine",
        max_steps=a.max_steps,
        logging_steps=a.log_every,
        logging_first_step=True,
        eval_strategy="no",
        save_strategy="no",
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        max_length=a.max_len,
        seed=42,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=parts["train"], eval_dataset=parts["test"],
                         processing_class=tokenizer, callbacks=[StepTimes()])
    trainer.train()
    trainer.evaluate()
    trainer.save_model(str(out / "final"))  # safetensors, as distft exports
    if rank == 0:
        (out / "phases.json").write_text(json.dumps({"process_start": STARTED, "train_end": time.time()}))


if __name__ == "__main__":
    main()
