"""Fine-tuning methods: pure builders for the peft configs and bitsandbytes config, which parameters
freeze and bitfit train, and parameter counts.

Adapters (the LoRA family, prompt and prefix tuning, IA3) are peft's; distft only maps the config
onto them. freeze and bitfit need no library: they choose which of the model's own parameters
keep `requires_grad`.
"""

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
        use_dora=method.name == "dora",
        use_rslora=method.name == "rslora",  # scale alpha / sqrt(r) instead of alpha / r
    )


def build_peft_config(method: MethodConfig, task_type: str = "CAUSAL_LM", tokenizer_path: str | None = None):
    """The peft config of an adapter method (see MethodConfig.uses_adapter)."""
    if method.is_lora():
        return build_lora_config(method, task_type)
    if method.name == "prompt_tuning":
        from peft import PromptTuningConfig

        p = method.prompt
        init = dict(prompt_tuning_init="TEXT", prompt_tuning_init_text=p.init_text,
                    tokenizer_name_or_path=tokenizer_path) if p.init_text else {}
        return PromptTuningConfig(task_type=task_type, num_virtual_tokens=p.num_virtual_tokens, **init)
    if method.name == "prefix_tuning":
        from peft import PrefixTuningConfig

        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=method.prompt.num_virtual_tokens,
                                  prefix_projection=method.prompt.prefix_projection)
    if method.name == "ia3":
        from peft import IA3Config

        ia3 = method.ia3
        targets = None if ia3.target_modules == "auto" else ia3.target_modules
        return IA3Config(task_type=task_type, target_modules=targets,
                         feedforward_modules=ia3.feedforward_modules if targets else None)
    raise ValueError(f"method.name={method.name} is not an adapter method")


class MethodError(ValueError):
    """The method cannot apply to this model (e.g. bitfit on a model without biases); the message says why."""


def transformer_blocks(model) -> list:
    """The model's repeated blocks, in order: the longest ModuleList whose items share one class
    (model.layers in Llama/Qwen2, transformer.h in GPT-2, gpt_neox.layers, encoder.layer in BERT)."""
    import torch

    best: list = []
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > len(best):
            if len({type(m) for m in module}) == 1:
                best = list(module)
    return best


def head_modules(model) -> list:
    """The output head: the LM head, or a classifier's `score`/`classifier`."""
    heads = [model.get_output_embeddings()] if hasattr(model, "get_output_embeddings") else []
    heads += [getattr(model, name) for name in ("score", "classifier") if hasattr(model, name)]
    return [h for h in heads if h is not None]


def apply_partial(model, method: MethodConfig, log=print) -> None:
    """freeze / bitfit: leave `requires_grad` on only the parameters the method trains."""
    import torch

    for p in model.parameters():
        p.requires_grad_(False)
    if method.name == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith(".bias") or n == "bias"]
        if not biases:
            raise MethodError(
                f"method.name=bitfit trains only bias terms, and {type(model).__name__} has none (Llama- and "
                "Mistral-style models use no biases). Fix: method.name=freeze (the last blocks), ia3 (a few "
                "thousand scales) or lora.")
        for p in biases:
            p.requires_grad_(True)
        # As in BitFit (Ben Zaken et al., 2022): a classifier's task head is new, so it trains whole.
        for name in ("score", "classifier"):
            for p in getattr(model, name).parameters() if hasattr(model, name) else ():
                p.requires_grad_(True)
        return
    f = method.freeze
    chosen: list[torch.nn.Module] = []
    blocks = transformer_blocks(model)
    if f.trainable_layers > len(blocks):
        raise MethodError(f"method.freeze.trainable_layers={f.trainable_layers}, but {type(model).__name__} has "
                          f"{len(blocks)} blocks. Fix: method.freeze.trainable_layers={len(blocks)} or fewer "
                          "(or method.name=full).")
    if f.unfreeze_every:
        chosen += blocks  # every block gets gradients; GradualUnfreezing keeps the not-yet-unfrozen ones still
    elif f.trainable_layers:
        chosen += blocks[-f.trainable_layers:]
    if f.train_head:
        chosen += head_modules(model)
    if f.train_embeddings:
        chosen.append(model.get_input_embeddings())
    for module in chosen:
        for p in module.parameters():
            p.requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if any(m in n for m in f.modules)] if f.modules else []
    missing = [m for m in f.modules if not any(m in n for n, _ in named)]
    if missing:
        raise MethodError(f"method.freeze.modules: no parameter name contains {missing[0]!r}. Fix: use part of a "
                          f"name such as {next(iter(n for n, _ in model.named_parameters()))!r}.")
    for _, p in named:
        p.requires_grad_(True)
    if not any(p.requires_grad for p in model.parameters()):
        raise MethodError("method.freeze leaves nothing to train. Fix: method.freeze.trainable_layers >= 1, "
                          "train_head: true, or modules: [...].")
    head, emb = head_modules(model), model.get_input_embeddings()
    if f.train_head and not f.train_embeddings and any(h.weight is emb.weight for h in head if hasattr(h, "weight")):
        log("method freeze: the head shares its weight with the input embeddings, so they train too")


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
    if q.bits == 8:  # LLM.int8 (CUDA only: the config refuses it for CPU workers)
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=torch_dtype(quant_compute_dtype(method, model, use_gpu)),
    )


def quantized_linears(model) -> tuple[int, int]:
    """(linear layers bitsandbytes stores in 4 or 8 bits, all linear layers) of a loaded model."""
    import bitsandbytes as bnb
    import torch

    quantized = total = 0
    for module in model.modules():
        if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
            quantized += 1
            total += 1
        elif isinstance(module, torch.nn.Linear):
            total += 1
    return quantized, total


def keep_4bit_trainable(model) -> int:
    """Keep every Linear4bit on bitsandbytes' differentiable path (dequantize, then `F.linear`); returns
    how many layers it pinned.

    On a CPU with AVX512-BF16, bitsandbytes 0.50.2 repacks a Linear4bit's weight in place the first time
    it runs in eval mode without grad (the held-out score before training, an evaluation, generation),
    and from then on every forward, training included, calls `gemv_4bit`: a bf16 kernel with no autograd
    formula. Backward then drops the gradient through every frozen 4-bit weight (torch warns
    "gemv_4bit: an autograd kernel was not registered"), so the LoRA gradients were ~99% wrong and QLoRA
    stalled, only on CPUs that have the instruction. Clearing the layer's capability flag before any
    forward keeps the same numbers in evaluation and training, on every CPU.
    """
    import bitsandbytes as bnb

    pinned = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            if getattr(module.weight.quant_state, "packing_format_for_cpu", False):
                raise MethodError(f"{type(module).__name__} weights are already in bitsandbytes' CPU inference "
                                  "layout, which has no backward. Fix: load the model again for training.")
            module.support_avx512bf16_for_cpu = False
            pinned += 1
    return pinned


def check_quantized(model, method: MethodConfig, log=print) -> None:
    """QLoRA quantizes or refuses. transformers replaces only `nn.Linear` modules; an architecture that
    keeps its weights elsewhere (fused or custom layers) loads unquantized and without a word, and would
    train plain LoRA while calling it QLoRA.

    It also pins the 4-bit layers to their trainable path (`keep_4bit_trainable`): this runs on every
    QLoRA model right after loading, before its first forward."""
    keep_4bit_trainable(model)
    quantized, total = quantized_linears(model)
    bits = method.quantization.bits
    arch = type(model).__name__
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type:
        arch += f" (model type {model_type})"
    if not quantized:
        raise MethodError(
            f"method.name=qlora: no layer of {arch} was quantized to {bits} bits (0 of its {total} nn.Linear "
            "layers were replaced by bitsandbytes), so this would train plain LoRA on full-precision weights. "
            "Fix: method.name=lora for this architecture, or a model whose linear layers bitsandbytes replaces.")
    log(f"qlora: {quantized} of {total} linear layers stored in {bits} bits")


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
