"""A model's shape from its `config.json` alone: built on the meta device, so no weight is read or downloaded.

`configs/models/<hub id>/config.json` ships the configs of the real models our shipped
YAML names, so planning them works offline; any local model directory works too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from distft.config.schema import LoraSettings, MethodConfig

SHIPPED_CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "models"


@dataclass
class ModelShape:
    name: str
    params: int  # every parameter once (tied weights once)
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool
    # (module name, in_features, out_features) of every nn.Linear, for LoRA and 4-bit counts
    linears: list[tuple[str, int, int]] = field(default_factory=list)
    small_params: list[int] = field(default_factory=list)  # sizes of parameters under 1e6 elements
    largest_layer: int = 0  # parameters of the largest leaf module (DeepSpeed's estimator wants it)

    def lora_targets(self, lora: LoraSettings) -> list[tuple[str, int, int]]:
        """The linears LoRA wraps (all-linear skips the output head)."""
        def hit(leaf: str) -> bool:
            return leaf not in ("lm_head", "score") if lora.target_modules == "all-linear" else leaf in lora.target_modules

        return [(n, i, o) for n, i, o in self.linears if hit(n.rsplit(".", 1)[-1])]

    def lora_params(self, lora: LoraSettings) -> int:
        """Trainable LoRA parameters: r x (in + out) per targeted linear."""
        return sum(lora.r * (fan_in + fan_out) for _, fan_in, fan_out in self.lora_targets(lora))

    def trainable(self, method: MethodConfig) -> int:
        if method.name == "full":
            return self.params
        if method.is_lora():
            extra = self.dora_magnitudes(method.lora) if method.name == "dora" else 0
            return self.lora_params(method.lora) + extra
        return trainable_on_meta(self.name, method)  # freeze, bitfit, prompt/prefix tuning, ia3: count them

    def dora_magnitudes(self, lora: LoraSettings) -> int:
        """DoRA adds one magnitude per output feature of each targeted linear."""
        return sum(fan_out for _, _, fan_out in self.lora_targets(lora))

    def quantized_linear_params(self) -> int:
        """Parameters bitsandbytes stores in 4 bits: every linear but the output head."""
        return sum(i * o for name, i, o in self.linears if name.rsplit(".", 1)[-1] not in ("lm_head", "score"))


def find_config(name_or_path: str) -> Path:
    """The config.json for a model: a local directory, the bundled tiny base, or one shipped in configs/models/."""
    from distft.models.loading import resolve_model_path

    local = Path(resolve_model_path(name_or_path)).expanduser()
    for candidate in (local / "config.json", local, SHIPPED_CONFIGS / name_or_path / "config.json"):
        if candidate.is_file() and candidate.name == "config.json":
            return candidate
    if (local / "adapter_config.json").is_file():  # an adapter: plan its base
        return find_config(json.loads((local / "adapter_config.json").read_text())["base_model_name_or_path"])
    raise FileNotFoundError(
        f"no config.json for {name_or_path!r}: not a local model directory and not shipped in "
        f"{SHIPPED_CONFIGS.relative_to(SHIPPED_CONFIGS.parents[1])}/. Fix: download only its config.json "
        f"(huggingface-cli download {name_or_path} config.json --local-dir configs/models/{name_or_path})."
    )


def _text_config(name_or_path: str) -> dict | None:
    """The (text) model's config.json as a dict, or None where none can be read."""
    try:
        data = json.loads(find_config(name_or_path).read_text())
    except (OSError, ValueError):  # FileNotFoundError included: not local, not shipped
        try:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(name_or_path)  # the Hub cache, or the Hub
            data = config.get_text_config().to_dict()
        except Exception:  # offline, gated, missing: sizing falls back, loading reports the real error
            return None
    return data.get("text_config") or data


def _hidden(text: dict) -> int | None:
    value = text.get("hidden_size") or text.get("d_model") or text.get("n_embd")
    return int(value) if value else None


def hidden_size(name_or_path: str) -> int | None:
    """The (text) model's hidden size from its config.json, or None where none can be read (DeepSpeed then
    keeps its default buffer sizes: a slower or larger run, never a failed one)."""
    return _hidden(_text_config(name_or_path) or {})


def largest_matrix(name_or_path: str) -> int | None:
    """Elements of the model's largest weight matrix (an MLP projection or the embedding), from config.json;
    None where none can be read."""
    text = _text_config(name_or_path) or {}
    hidden = _hidden(text)
    if not hidden:
        return None
    wider = max(int(text.get("intermediate_size") or text.get("ffn_dim") or 4 * hidden), int(text.get("vocab_size") or 0))
    return hidden * wider


def _meta_model(name_or_path: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(find_config(name_or_path).parent))
    with torch.device("meta"):
        try:
            return config, AutoModelForCausalLM.from_config(config)
        except ValueError:  # an encoder (BERT, MiniLM): sized as the classifier the classify stage builds
            from transformers import AutoModelForSequenceClassification

            return config, AutoModelForSequenceClassification.from_config(config)


def trainable_on_meta(name_or_path: str, method: MethodConfig) -> int:
    """What `method` trains, counted by applying it (the training code's own builders) on the meta device."""
    import torch

    from distft.models.loading import attach_method

    _, model = _meta_model(name_or_path)
    # How virtual tokens start does not change how many there are (and needs a tokenizer).
    counted = method.model_copy(update={"prompt": method.prompt.model_copy(update={"init_text": None})})
    task = "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    with torch.device("meta"):
        model = attach_method(model, counted, task, log=lambda m: None)
    seen, total = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def model_shape(name_or_path: str) -> ModelShape:
    """Count a model's parameters and record its shape, from config.json on the meta device."""
    import torch

    config, model = _meta_model(name_or_path)
    text = config.get_text_config()
    seen, params, small, largest = set(), 0, [], 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        params += p.numel()
        if p.numel() < 1_000_000:
            small.append(p.numel())
    for module in model.modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        largest = max(largest, own)
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)]
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return ModelShape(
        name=name_or_path, params=params, layers=text.num_hidden_layers, hidden=text.hidden_size,
        intermediate=getattr(text, "intermediate_size", 4 * text.hidden_size), heads=heads,
        kv_heads=getattr(text, "num_key_value_heads", None) or heads, head_dim=head_dim, vocab=text.vocab_size,
        tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)), linears=linears, small_params=small,
        largest_layer=largest,
    )
