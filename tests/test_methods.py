"""Every fine-tuning method trains exactly the parameters it should, on every architecture we name.

Each case loads a tiny random model through `load_model` (the training path), takes two optimizer
steps on one batch, and compares every parameter before and after: the ones that changed must
be exactly the method's. Two steps, because LoRA's B starts at zero, so A only moves on the second.
"""

from __future__ import annotations

import re

import pytest
import torch

from distft.config import build_config
from distft.models.loading import load_model
from distft.models.methods import MethodError, count_params

ARCHS = ("llama", "qwen2", "gpt2", "gpt_neox")


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tiny_random):
    """Tiny random models of each architecture, sharing the bundled tokenizer."""
    from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPTNeoXConfig, LlamaConfig,
                              Qwen2Config)

    tok = AutoTokenizer.from_pretrained(tiny_random)
    vocab = len(tok)
    configs = {
        "llama": LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2),
        "qwen2": Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2),
        "gpt2": GPT2Config(vocab_size=vocab, n_embd=64, n_layer=3, n_head=4, n_positions=128),
        "gpt_neox": GPTNeoXConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                  num_attention_heads=4),
    }
    out = {}
    for arch, config in configs.items():
        torch.manual_seed(0)
        d = tmp_path_factory.mktemp(arch)
        AutoModelForCausalLM.from_config(config).save_pretrained(d)
        tok.save_pretrained(d)
        out[arch] = d
    return out


def method_cfg(path, **method):
    return build_config({"model": {"name_or_path": str(path), "dtype": "float32"}, "stage": "sft",
                         "data": {"train": "x"}, "method": method}).stages[0].method, \
        build_config({"model": {"name_or_path": str(path)}, "stage": "sft", "data": {"train": "x"}}).model


def changed_after_two_steps(path, **method) -> tuple[set[str], set[str], object]:
    """(names that changed, names of every parameter, the model) after two AdamW steps on one batch."""
    method_config, model_config = method_cfg(path, **method)
    model = load_model(model_config, method_config, log=lambda m: None)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    return changed, set(before), model


def only(names: set[str], pattern: str) -> set[str]:
    return {n for n in names if re.search(pattern, n)}


BLOCK = {"llama": r"model\.layers\.(\d+)\.", "qwen2": r"model\.layers\.(\d+)\.", "gpt2": r"transformer\.h\.(\d+)\.",
         "gpt_neox": r"gpt_neox\.layers\.(\d+)\."}
HEAD = {"llama": r"^lm_head\.", "qwen2": r"^lm_head\.", "gpt2": r"^lm_head\.", "gpt_neox": r"^(embed_out|lm_head)\."}


@pytest.mark.parametrize("arch", ARCHS)
def test_full_trains_everything(arch, arch_dirs):
    changed, names, _ = changed_after_two_steps(arch_dirs[arch], name="full")
    assert changed == names


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["lora", "dora", "rslora"])
def test_lora_family_trains_only_its_adapters_with_all_linear_targets(arch, name, arch_dirs):
    changed, names, model = changed_after_two_steps(arch_dirs[arch], name=name, lora={"r": 4, "alpha": 8})
    adapters = only(names, r"lora_(A|B|magnitude_vector)")
    assert changed == adapters and adapters
    assert bool(only(names, "lora_magnitude_vector")) == (name == "dora")
    # all-linear reached every block's attention and MLP projections, not the output head
    blocks = {re.search(BLOCK[arch], n).group(1) for n in only(adapters, BLOCK[arch])}
    assert blocks == {"0", "1", "2"} and not only(adapters, "lm_head|embed_out")


def test_rslora_scales_by_the_square_root_of_the_rank(arch_dirs):
    _, _, lora = changed_after_two_steps(arch_dirs["llama"], name="lora", lora={"r": 16, "alpha": 32})
    _, _, rs = changed_after_two_steps(arch_dirs["llama"], name="rslora", lora={"r": 16, "alpha": 32})
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert lora.get_submodule(q).scaling["default"] == pytest.approx(32 / 16)
    assert rs.get_submodule(q).scaling["default"] == pytest.approx(32 / 4)


@pytest.mark.parametrize("arch", ARCHS)
def test_ia3_trains_only_its_scales(arch, arch_dirs):
    changed, names, _ = changed_after_two_steps(arch_dirs[arch], name="ia3")
    assert changed == only(names, r"ia3_l") and changed


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", ["prompt_tuning", "prefix_tuning"])
def test_virtual_token_methods_train_only_their_prompt(arch, name, arch_dirs):
    changed, names, model = changed_after_two_steps(arch_dirs[arch], name=name, prompt={"num_virtual_tokens": 6})
    assert changed == only(names, r"^prompt_encoder\.") and changed
    count = count_params(model)
    assert 0 < count.trainable < count.total / 10


@pytest.mark.parametrize("arch", ARCHS)
def test_freeze_trains_the_last_blocks_and_the_head(arch, arch_dirs):
    changed, names, _ = changed_after_two_steps(arch_dirs[arch], name="freeze", freeze={"trainable_layers": 1})
    last = {n for n in names if (m := re.search(BLOCK[arch], n)) and m.group(1) == "2"}
    # GPT-2 ties its head to the input embeddings: one parameter, listed under the embeddings' name
    head = only(names, HEAD[arch]) | ({"transformer.wte.weight"} if arch == "gpt2" else set())
    assert changed == last | head
    if arch == "gpt2":
        changed_no_head, _, _ = changed_after_two_steps(arch_dirs[arch], name="freeze",
                                                        freeze={"trainable_layers": 1, "train_head": False})
        assert changed_no_head == last


def test_freeze_can_add_named_modules_and_the_embeddings(arch_dirs):
    changed, names, _ = changed_after_two_steps(arch_dirs["llama"], name="freeze", freeze={
        "trainable_layers": 0, "train_head": False, "train_embeddings": True, "modules": ["model.norm"]})
    assert changed == {"model.embed_tokens.weight", "model.norm.weight"}


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox"])
def test_bitfit_trains_only_the_biases(arch, arch_dirs):
    changed, names, _ = changed_after_two_steps(arch_dirs[arch], name="bitfit")
    assert changed == only(names, r"\.bias$") and changed


def test_bitfit_on_a_model_without_biases_names_the_alternatives(arch_dirs):
    with pytest.raises(MethodError, match=r"bitfit trains only bias terms, and LlamaForCausalLM has none.*"
                                          r"Fix: method.name=freeze .* ia3 .* lora"):
        changed_after_two_steps(arch_dirs["llama"], name="bitfit")


def test_freeze_refuses_more_blocks_than_the_model_has_and_unknown_modules(arch_dirs):
    with pytest.raises(MethodError, match=r"trainable_layers=5, but LlamaForCausalLM has 3 blocks"):
        changed_after_two_steps(arch_dirs["llama"], name="freeze", freeze={"trainable_layers": 5})
    with pytest.raises(MethodError, match=r"method.freeze.modules: no parameter name contains 'nrom'"):
        changed_after_two_steps(arch_dirs["llama"], name="freeze", freeze={"modules": ["nrom"]})


def test_qlora_trains_only_adapters_over_a_4bit_base(arch_dirs):
    pytest.importorskip("bitsandbytes")
    changed, names, model = changed_after_two_steps(arch_dirs["llama"], name="qlora", lora={"r": 4, "alpha": 8})
    # 4-bit weights do not compare bit for bit after a clone (packed storage); they must not train at all
    packed = {n for n, p in model.named_parameters() if p.__class__.__name__ == "Params4bit"}
    assert packed and not any(p.requires_grad for n, p in model.named_parameters() if n in packed)
    assert changed - packed == only(names, r"lora_(A|B)") and changed
