"""QLoRA on CPU computes the gradients of LoRA over the dequantized base.

The reference is the same model with every bitsandbytes Linear4bit replaced by a plain Linear that holds
`dequantize_4bit` of its weight, and the same adapter weights. Before each comparison the model runs once
in eval mode without grad, as the held-out score before training does: on a CPU with AVX512-BF16,
bitsandbytes 0.50.2 then repacked the weights for its inference kernel (`gemv_4bit`, which has no
backward), and every later training step lost the gradient through the frozen 4-bit weights (relative
error 0.99 against this reference; QLoRA stalled). `as_if_avx512bf16` makes every machine take that
branch, so these tests fail without distft's fix on any CPU.

Measured on the pretrained tiny base (batch 1, 4 and 8; sequence 1, 16 and 64), in float32 and in
bfloat16 compute: the loss and the LoRA gradients equal the reference's bit for bit (relative error 0.0),
since bitsandbytes' CPU training path is the same `dequantize_4bit` and `F.linear`. Without the fix,
after one eval-mode forward: relative error 0.98 to 1.0.
"""

from __future__ import annotations

import copy

import pytest
import torch

from distft.config.schema import MethodConfig, ModelConfig
from distft.models.loading import load_model

bnb = pytest.importorskip("bitsandbytes")

VOCAB_LOW = 4  # ids below are bos/eos/pad/unk
TOLERANCE = 1e-5  # measured: 0.0 (the same dequantize and F.linear); without the fix: 0.98 to 1.0


@pytest.fixture()
def as_if_avx512bf16(monkeypatch):
    """Linear4bit reads the CPU's AVX512-BF16 support when it is built; on this CPU or any other, take the
    branch that repacks weights for inference."""
    monkeypatch.setattr(bnb.nn.modules, "has_avx512bf16", lambda: True)


def qlora(base, compute_dtype: str):
    method = MethodConfig(name="qlora", lora={"r": 8, "alpha": 16, "dropout": 0.0},
                          quantization={"quant_type": "nf4", "double_quant": True, "compute_dtype": compute_dtype})
    torch.manual_seed(0)
    net = load_model(ModelConfig(name_or_path=str(base)), method, use_gpu=False, log=lambda *_: None)
    # LoRA's B starts at zero, which leaves A without gradient: give both values.
    for name, p in net.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    return net


class DequantizedLinear(torch.nn.Module):
    """A frozen Linear over the dequantized weight, computing in the 4-bit layer's compute dtype."""

    def __init__(self, layer):
        super().__init__()
        w = layer.weight
        self.register_buffer("weight", bnb.functional.dequantize_4bit(w.data, w.quant_state).float())
        self.compute_dtype = layer.compute_dtype or torch.float32

    def forward(self, x):
        return torch.nn.functional.linear(x.to(self.compute_dtype), self.weight.to(self.compute_dtype)).to(x.dtype)


def dequantized_reference(net):
    ref = copy.deepcopy(net)
    replaced = 0
    for module in list(ref.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, bnb.nn.Linear4bit):
                assert child.bias is None  # Llama has no biases
                setattr(module, name, DequantizedLinear(child))
                replaced += 1
    assert replaced == 14  # 2 blocks x (q, k, v, o, gate, up, down)
    return ref


def eval_forward(net, vocab: int):
    """What the held-out score, an evaluation or generation does to the model before training goes on."""
    net.eval()
    with torch.no_grad():
        net(input_ids=torch.randint(VOCAB_LOW, vocab, (2, 8)))
    net.train()


def loss_and_grads(net, ids, targets):
    net.zero_grad(set_to_none=True)
    net.train()
    logits = net(input_ids=ids).logits.float()
    # Explicit targets rather than the shifted inputs, so a one-token sequence has a loss too.
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in net.named_parameters() if p.requires_grad}
    return loss.item(), grads


def relative_error(got: dict, want: dict) -> float:
    assert got.keys() == want.keys()
    assert all(g is not None for g in got.values()), "a LoRA weight got no gradient"
    diff = sum(((got[n] - want[n]) ** 2).sum() for n in want) ** 0.5
    return (diff / sum((w ** 2).sum() for w in want.values()) ** 0.5).item()


@pytest.mark.parametrize("compute_dtype", ["float32", "bfloat16"])
def test_lora_gradients_over_4bit_weights_match_the_dequantized_reference(tiny_base, as_if_avx512bf16, compute_dtype):
    net = qlora(tiny_base, compute_dtype)
    vocab = net.config.vocab_size
    ref = dequantized_reference(net)
    eval_forward(net, vocab)
    torch.manual_seed(1)
    # gemv_4bit is bitsandbytes' one-token kernel; it was reached at every batch and sequence length.
    for batch, length in [(1, 1), (1, 16), (4, 1), (4, 16)]:
        ids = torch.randint(VOCAB_LOW, vocab, (batch, length))
        targets = torch.randint(VOCAB_LOW, vocab, (batch, length))
        loss, grads = loss_and_grads(net, ids, targets)
        want_loss, want_grads = loss_and_grads(ref, ids, targets)
        assert len(grads) == 2 * 14
        assert loss == pytest.approx(want_loss, rel=TOLERANCE)
        err = relative_error(grads, want_grads)
        assert err <= TOLERANCE, f"B={batch} T={length}: LoRA gradient relative error {err:.3g}"
    packed = [m for m in net.modules() if isinstance(m, bnb.nn.Linear4bit)
              and getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert not packed, f"{len(packed)} 4-bit layers were repacked for bitsandbytes' inference kernel"


def test_qlora_training_follows_the_dequantized_reference_step_for_step(tiny_base, as_if_avx512bf16):
    """Evaluations between steps (as the Trainer's) leave later steps on the trainable path."""
    net = qlora(tiny_base, "float32")
    vocab = net.config.vocab_size
    ref = dequantized_reference(net)
    torch.manual_seed(2)
    ids = torch.randint(VOCAB_LOW, vocab, (4, 16))
    targets = torch.roll(ids, -1, dims=1)
    losses = {}
    for name, model in (("4bit", net), ("reference", ref)):
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
        losses[name] = []
        for _ in range(4):
            eval_forward(model, vocab)
            loss, _ = loss_and_grads(model, ids, targets)
            opt.step()
            losses[name].append(loss)
    assert losses["4bit"][-1] < losses["4bit"][0] - 0.5  # it learns the batch
    assert losses["4bit"] == pytest.approx(losses["reference"], rel=TOLERANCE)
