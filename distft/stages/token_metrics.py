"""TRL's per-token training metrics (entropy, token accuracy, token count) at log steps only.

TRL 1.16's `SFTTrainer.compute_loss` gathers three metrics across ranks and reads them to the host on
every micro-batch: entropy, mean token accuracy and the batch's token count. Between log steps nobody
sees them (`log()` averages and clears them), yet each is a collective and a device sync inside the
step: under gloo DDP on CPU workers, four small all-gathers per micro-batch (benchmarks/step.py).
Here a step that will not log computes only the loss, normalised as TRL does (the model's own loss over
its full logits while they are small, else TRL's chunked log-prob head), and counts its tokens locally; a step that logs runs TRL's own `compute_loss`,
so the logged entropy and accuracy are those of the logged step's batch (TRL's: the mean over the
interval), and `num_tokens` stays the exact total over every rank.

Only the plain loss is taken over (negative log-likelihood or DFT, no custom `compute_loss_func`, no
label smoothing, no MoE auxiliary loss, no sequence parallelism); anything else is TRL's path on every
step, unchanged.
"""

from __future__ import annotations


# A micro-batch's logits in fp32 up to this size are computed whole, as the bare Trainer does (see below).
PLAIN_LOGITS_MAX_BYTES = 1 << 30


def metrics_at_log_steps(trainer_cls):
    """`trainer_cls` (an SFTTrainer) with its per-token metrics computed only on steps that log."""
    import torch
    from transformers import Trainer

    from distft.data.packing import REAL_TOKENS

    class TokenMetricsAtLogSteps(trainer_cls):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._unlogged_tokens = None  # this rank's tokens since TRL last counted them, as a tensor
            self._vocab = self.model.config.get_text_config().vocab_size

        def _logs_this_step(self) -> bool:
            # compute_loss runs inside step global_step + 1; DefaultFlowCallback logs after it when:
            step, every = self.state.global_step + 1, self.args.logging_steps
            return (self.args.logging_first_step and step == 1) or (every > 0 and step % every == 0) \
                or step >= self.state.max_steps

        def _plain_loss(self) -> bool:
            parallelism = getattr(self.accelerator, "parallelism_config", None)
            return (self.compute_loss_func is None and self.label_smoother is None and not self.aux_loss_enabled
                    and self.args.loss_type in ("nll", "dft")
                    and not (parallelism is not None and getattr(parallelism, "sp_enabled", False)))

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if not model.training or not self._plain_loss():
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            if self._logs_this_step():
                # Every rank logs the same steps, so this gather is in lockstep like TRL's own.
                if self._unlogged_tokens is not None:
                    total = self.accelerator.gather_for_metrics(self._unlogged_tokens.reshape(1)).sum().item()
                    self._total_train_tokens += int(total) // self._tp_size
                    self._unlogged_tokens = None
                return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            inputs = dict(inputs)
            real = inputs.pop(REAL_TOKENS, None)  # packed rows (trainer_setup.packed_rows_trainer): the exact count
            inputs["use_cache"] = False
            if self.args.loss_type == "nll" and inputs["input_ids"].numel() * self._vocab * 4 <= PLAIN_LOGITS_MAX_BYTES:
                # The model's own loss over its full logits, as transformers' Trainer computes it: TRL's chunked
                # head saves the logits' memory by recomputing them in the backward pass, which costs time.
                # Below this size that memory is small (distft plan counts full logits anyway), and the chunked
                # head made the tiny base's step 1.4x the bare Trainer's (benchmarks/step.py).
                result = Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            else:
                # TRL's loss, less the metrics (trl/trainer/sft_trainer.py, SFTTrainer.compute_loss).
                outputs = model(**inputs, fused_lm_head=True)
                per_token_loss = -outputs.log_probs  # zero on ignored positions
                if self.args.loss_type == "dft":
                    per_token_loss = per_token_loss * outputs.log_probs.exp().detach()
                num_tokens = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
                loss = per_token_loss.sum() / torch.as_tensor(num_tokens).clamp(min=1)
                if self.args.average_tokens_across_devices and num_items_in_batch is not None:
                    loss = loss * (self.accelerator.num_processes // self.get_tp_size())
                result = (loss, outputs) if return_outputs else loss
            if real is not None:
                tokens = real
            elif "attention_mask" in inputs:
                tokens = inputs["attention_mask"].sum()
            else:  # padding-free rows carry position_ids instead
                tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
            tokens = tokens.detach().to(torch.long)
            self._unlogged_tokens = tokens if self._unlogged_tokens is None else self._unlogged_tokens + tokens
            return result

    TokenMetricsAtLogSteps.__name__ = TokenMetricsAtLogSteps.__qualname__ = f"{trainer_cls.__name__}"
    return TokenMetricsAtLogSteps
