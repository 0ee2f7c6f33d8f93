"""Pure builders for fine-tuning methods: peft `LoraConfig`, bitsandbytes config, and parameter counts."""

from __future__ import annotations

from dataclasses import dataclass

from distft.config.schema import MethodConfig, ModelConfig


def build_lora_config(method: MethodConfig, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    lora = method.lora
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save,
        bias="none",
        task_type=task_type,
    )


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(name, "auto")


def quant_compute_dtype(method: MethodConfig, model: ModelConfig, use_gpu: bool) -> str:
    if method.quantization.compute_dtype:
        return method.quantization.compute_dtype
    if model.dtype != "auto":
        return model.dtype
    return "bfloat16" if use_gpu else "float32"


def build_bnb_config(method: MethodConfig, model: ModelConfig, use_gpu: bool):
    """4-bit quantization for QLoRA. bitsandbytes is imported lazily: only QLoRA needs it."""
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise RuntimeError(
            "method.name=qlora needs bitsandbytes. Fix: pip install bitsandbytes==0.50.2, or use method.name=lora."
        ) from None
    from transformers import BitsAndBytesConfig

    q = method.quantization
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant_compute_dtype(method, model, use_gpu)),
    )


@dataclass(frozen=True)
class ParamCount:
    trainable: int
    total: int

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / max(self.total, 1)

    def describe(self) -> str:
        return f"trainable params {self.trainable:,} / {self.total:,} ({self.percent:.2f}%)"


def count_params(model) -> ParamCount:
    trainable = total = 0
    for p in model.parameters():
        # Logical parameters: 4-bit weights pack two per element, ZeRO-3 keeps only a shard here.
        n = getattr(p, "ds_numel", p.numel())
        if p.__class__.__name__ == "Params4bit":
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return ParamCount(trainable, total)
