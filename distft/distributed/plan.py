"""Per-rank memory of a config before launch: model states, buffers, activations, and the GPUs it needs.

Pure functions of the typed config and a `ModelShape` (counted from config.json on the meta
device). The formulas follow what the libraries do, as measured by benchmarks/memory.py:

- parameters, gradients and Adam moments (two per trainable parameter) in the dtype the
  strategy keeps them in. DeepSpeed with bf16/fp16 holds 16-bit parameters and gradients plus an
  fp32 master copy and fp32 moments (2 + 2 + 4 + 8 bytes per parameter); DDP and FSDP2 keep
  moments in the parameters' dtype. DeepSpeed ZeRO-1/2 keep an fp32 master partition even in
  fp32 training; ZeRO-3 in fp32 uses the partition itself.
- what is partitioned over N ranks: ZeRO-1 optimizer states (gradients too: it reduces them
  into partitions before the step), ZeRO-2 also gradients, ZeRO-3 and FSDP2 everything.
  ZeRO-3 keeps parameters below `param_persistence_threshold` whole on every rank.
- buffers: DDP's gradient buckets (a second copy of the gradients), DeepSpeed's reduce and
  all-gather buckets (5e8 elements by default), ZeRO-3's largest gathered layer.
- activations for the micro-batch and sequence length, with and without gradient checkpointing,
  and the logits (kept in fp32 for the loss).
- PPO: policy, reference (none with LoRA: adapters disabled), critic and reward model, plus the
  generation KV cache and, under ZeRO-3, the policy gathered whole once per rollout.

DeepSpeed's own estimators are shown beside ours as a second opinion (`deepspeed_estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from distft.config.schema import DistftConfig, MethodConfig, StrategyConfig
from distft.models.shapes import ModelShape

GiB = 2**30
DS_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size and allgather_bucket_size (elements)
NF4_BYTES = 0.5 + 1 / 64 * 0.5  # 4-bit weights + double-quantized absmax per 64-block (about 4.13 bits)


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}.get(name, 2)


@dataclass
class Memory:
    """Bytes per rank, by kind; `cpu` is host memory that offload moves off the GPU."""

    params: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0  # Adam moments + any fp32 master copy
    buffers: float = 0.0
    activations: float = 0.0
    cpu: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def model_states(self) -> float:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> float:
        return self.model_states + self.buffers + self.activations

    def add(self, other: Memory) -> Memory:
        return Memory(*(getattr(self, k) + getattr(other, k) for k in
                        ("params", "grads", "optimizer", "buffers", "activations", "cpu")),
                      notes=self.notes + other.notes)


def zero_stage(strategy: StrategyConfig) -> int:
    """The ZeRO-paper stage a strategy corresponds to: DDP 0, FSDP2 full sharding 3."""
    if strategy.name == "deepspeed":
        return strategy.zero_stage
    return 3 if strategy.name == "fsdp" else 0


def model_states(shape: ModelShape, method: MethodConfig, strategy: StrategyConfig, model_dtype: str,
                 world: int, trainable: bool = True) -> Memory:
    """Parameters, gradients and optimizer states per rank for one model (trainable or frozen)."""
    precision = strategy.resolved_precision(model_dtype)
    weight = dtype_bytes(model_dtype) if model_dtype != "auto" else 2
    stage, n = zero_stage(strategy), world
    deepspeed = strategy.name == "deepspeed"
    train_params = shape.trainable(method) if trainable else 0
    mem = Memory()
    # Weights: a 4-bit base for QLoRA; under ZeRO-3/FSDP2 a 1/N partition (small ZeRO-3 params stay whole).
    if method.name == "qlora":
        q = shape.quantized_linear_params()
        base = q * NF4_BYTES + (shape.params - q) * weight
    else:
        base = shape.params * weight
    if deepspeed and precision in ("bf16", "fp16"):
        base = shape.params * 2  # DeepSpeed runs the module in 16 bits
    adapter = train_params * 4 if method.uses_adapter() else 0  # peft keeps adapters in fp32
    if stage == 3:
        persistent = sum(s for s in shape.small_params if s < strategy.param_persistence_threshold) if deepspeed else 0
        per_param = base / max(shape.params, 1)
        mem.params = (base - persistent * per_param) / n + persistent * per_param + adapter / n
    else:
        mem.params = base + adapter
    if not train_params:
        return _offload(mem, strategy)
    # Gradients and optimizer states of what trains.
    if deepspeed and precision in ("bf16", "fp16"):
        grad_b, moment_b, master_b = 2, 8, 4
    elif deepspeed:
        grad_b, moment_b, master_b = 4, 8, 4 if stage in (1, 2) else 0
    else:
        grad_b = 4 if method.uses_adapter() else weight
        moment_b, master_b = 2 * grad_b, 0
    mem.grads = train_params * grad_b / (n if stage >= 1 and deepspeed or stage >= 2 else 1)
    mem.optimizer = train_params * (moment_b + master_b) / (n if stage >= 1 else 1)
    # Buffers the libraries allocate on top.
    if strategy.name == "ddp" and world > 1:
        mem.buffers = train_params * grad_b  # DDP's gradient buckets: a second copy of the gradients
    elif deepspeed and stage in (1, 2):
        mem.buffers = min(DS_BUCKET, train_params) * grad_b + min(DS_BUCKET, shape.params) * 2
    elif deepspeed and stage == 3:
        mem.buffers = min(DS_BUCKET, train_params) * grad_b + shape.largest_layer * 2
    return _offload(mem, strategy)


def _offload(mem: Memory, strategy: StrategyConfig) -> Memory:
    if strategy.name == "deepspeed" and strategy.offload_optimizer != "none":
        mem.cpu += mem.optimizer
        mem.optimizer = 0.0
        mem.notes.append(f"optimizer states offloaded to {strategy.offload_optimizer}")
    if strategy.name == "deepspeed" and strategy.offload_params != "none":
        mem.cpu += mem.params
        mem.params = 0.0
        mem.notes.append(f"parameters offloaded to {strategy.offload_params}")
    if strategy.name == "fsdp" and strategy.fsdp_offload:
        mem.cpu += mem.model_states
        mem.params = mem.grads = mem.optimizer = 0.0
        mem.notes.append("FSDP2 CPUOffloadPolicy: model states on the CPU")
    return mem


def activation_bytes(shape: ModelShape, micro_batch: int, seq_len: int, checkpointing: bool,
                     act_bytes: int = 2) -> float:
    """Activations kept for backward in a Llama-style decoder (memory-efficient attention: no s^2 term).

    Per layer and token: the attention block keeps its input, normed input, q, k, v, attention
    output and o_proj input (about 5h + 2 kv); the MLP its input, normed input, gate, up, act(gate)
    and the product (2h + 4f). With checkpointing only each layer's input stays, and one layer is
    recomputed at a time. The logits are kept in 16 bits and again in fp32 for the loss.
    """
    tokens = micro_batch * seq_len
    kv = 2 * shape.kv_heads * shape.head_dim
    per_layer = tokens * (7 * shape.hidden + kv + 4 * shape.intermediate) * act_bytes
    logits = tokens * shape.vocab * (act_bytes + 4)
    if checkpointing:
        return shape.layers * tokens * shape.hidden * act_bytes + per_layer + logits
    return shape.layers * per_layer + logits


def kv_cache_bytes(shape: ModelShape, batch: int, tokens: int, act_bytes: int = 2) -> float:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * tokens * batch * act_bytes


def stage_memory(cfg: DistftConfig, index: int, shape: ModelShape, world: int,
                 critic: ModelShape | None = None, reward: ModelShape | None = None) -> Memory:
    """Per-rank peak of one stage on `world` ranks: its models, buffers and activations."""
    stage = cfg.stages[index]
    strategy, method = stage.strategy, stage.method
    dtype = cfg.model.dtype
    act = 4 if strategy.resolved_precision(dtype) == "fp32" else 2
    seq = cfg.model.max_seq_len
    mem = model_states(shape, method, strategy, dtype, world)
    if stage.stage not in ("ppo", "grpo"):
        pairs = 2 if stage.stage in ("reward", "dpo") else 1  # chosen and rejected go through together
        mem.activations = activation_bytes(shape, stage.train.micro_batch_size * pairs, seq,
                                           strategy.gradient_checkpointing, act)
        if stage.stage == "dpo" and not method.uses_adapter():  # TRL's frozen reference copy
            mem = mem.add(model_states(shape, method, strategy, dtype, world, trainable=False))
        return mem
    # RL stages: the policy above, then reference, critic and reward model, then generation.
    if not method.uses_adapter():
        mem = mem.add(model_states(shape, method, strategy, dtype, world, trainable=False))
        mem.notes.append("reference: a frozen copy of the policy")
    else:
        mem.notes.append("reference: the policy with adapters disabled (no copy)")
    if stage.stage == "ppo":
        mem = mem.add(model_states(critic or shape, method, strategy, dtype, world))
    if reward is not None or cfg.reward_source(index):
        mem = mem.add(model_states(reward or shape, MethodConfig(name="full"), strategy, dtype, world,
                                   trainable=False))
    rollout = stage.ppo.rollout_batch_size // world if stage.stage == "ppo" else stage.train.micro_batch_size
    kv = kv_cache_bytes(shape, rollout, seq, act)
    gathered = shape.params * dtype_bytes(dtype) if zero_stage(strategy) == 3 else 0.0
    train_act = activation_bytes(shape, stage.train.micro_batch_size, seq, strategy.gradient_checkpointing, act)
    if stage.stage == "ppo":
        train_act *= 2  # actor and critic forwards of a minibatch
    mem.activations = max(train_act, kv + gathered)
    if gathered:
        mem.notes.append(f"generation gathers the whole policy once per rollout ({gathered / GiB:.1f} GiB)")
    mem.notes.append(f"generation KV cache {kv / GiB:.2f} GiB ({rollout} sequences x {seq} tokens)")
    return mem


def deepspeed_estimate(shape: ModelShape, strategy: StrategyConfig, world: int, gpus_per_node: int) -> float | None:
    """DeepSpeed's own per-GPU estimate of model states (a second opinion), or None for other strategies."""
    if strategy.name != "deepspeed" or strategy.zero_stage not in (2, 3):
        return None
    import os

    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    per_node = min(world, gpus_per_node)
    nodes = max(1, world // per_node)
    if strategy.zero_stage == 2:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

        _, gpu = estimate_zero2_model_states_mem_needs(shape.params, per_node, nodes,
                                                       cpu_offload=strategy.offload_optimizer != "none")
        return float(gpu)
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    _, gpu, _ = estimate_zero3_model_states_mem_needs(shape.params, shape.largest_layer, per_node, nodes,
                                                      cpu_offload=strategy.offload_optimizer != "none",
                                                      cpu_offload_params=strategy.offload_params != "none")
    return float(gpu)


# Strategies a recommendation tries, cheapest in communication first.
CANDIDATES = {
    "ddp": {"name": "ddp"},
    "zero1": {"name": "deepspeed", "zero_stage": 1},
    "zero2": {"name": "deepspeed", "zero_stage": 2},
    "zero3": {"name": "deepspeed", "zero_stage": 3},
    "fsdp2": {"name": "fsdp"},
    "zero3+offload": {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu"},
}


def world_sizes(gpus_per_node: int, limit: int = 1024) -> list[int]:
    small = [n for n in (1, 2, 4) if n < gpus_per_node]
    return small + list(range(gpus_per_node, limit + 1, gpus_per_node))


def smallest_fit(cfg: DistftConfig, index: int, shape: ModelShape, gpu_bytes: float, gpus_per_node: int,
                 strategy: StrategyConfig, checkpointing: bool | None = None, **models) -> tuple[int, Memory] | None:
    """The fewest GPUs (and the memory there) on which stage `index` fits with `strategy`, or None."""
    stage = cfg.stages[index]
    update = {"strategy": strategy}
    if checkpointing is not None:
        update["strategy"] = strategy.model_copy(update={"gradient_checkpointing": checkpointing})
    trial = cfg.model_copy(deep=True)
    trial.stages[index] = stage.model_copy(update=update)
    for n in world_sizes(gpus_per_node):
        mem = stage_memory(trial, index, shape, n, **models)
        if mem.total <= gpu_bytes:
            return n, mem
    return None


def architecture_of(cfg: DistftConfig, source: str) -> str:
    """The model a source (a stage name or a path) is an architecture of: stage names are followed back."""
    seen = set()
    while (i := cfg.stage_named(source)) is not None and source not in seen:
        seen.add(source)
        source = cfg.init_source(i)
    return source
