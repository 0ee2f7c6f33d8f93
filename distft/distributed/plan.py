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
- buffers: DDP's gradient buckets (a second copy of the gradients), DeepSpeed's reduce bucket and
  ZeRO-3's gathered parameters (live limit plus prefetch, at least the largest layer), read from the
  run's own DeepSpeed settings (`zero_settings`: distft's hidden-size sizing, user JSON merged over).
- on CPU workers (`host_peak`): the per-process baseline, and what DeepSpeed's engines hold above
  their shards at the peak, measured by benchmarks/plan_accuracy.py.
- activations for the micro-batch and sequence length, with and without gradient checkpointing,
  and the logits (kept in fp32 for the loss).
- PPO: policy, reference (none with LoRA: adapters disabled), critic and reward model, plus the
  generation KV cache and, under ZeRO-3, the policy gathered whole once per rollout.

DeepSpeed's own estimators are shown beside ours as a second opinion (`deepspeed_estimate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from distft.config.schema import DistftConfig, MethodConfig, StrategyConfig, rollout_engine

if TYPE_CHECKING:  # the planner is handed a shape; counting one (models.shapes) is the layer above's job
    from distft.models.shapes import ModelShape

GiB = 2**30
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
    engine: float = 0.0  # `generation: vllm`: the rollout engine (counted in `activations`, its phase's peak)
    engine_need: float = 0.0  # what the engine must hold: its copy of the weights and the rollout's KV cache

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


# DeepSpeed's own defaults for what distft's config leaves unset (deepspeed/runtime/zero/config.py).
DS_DEFAULTS = {"reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000,
               "stage3_prefetch_bucket_size": 50_000_000, "stage3_max_live_parameters": 1_000_000_000,
               "stage3_max_reuse_distance": 1_000_000_000, "stage3_param_persistence_threshold": 100_000}


def zero_settings(strategy: StrategyConfig, shape: ModelShape, train=None, precision: str = "fp32",
                  world: int = 1) -> dict:
    """The `zero_optimization` section a DeepSpeed run of this model gets: distft's sizing from the model's
    hidden size, any user JSON (strategy.deepspeed_config) merged over it, DeepSpeed's defaults under both.
    "auto" (HF's placeholder) means the hidden-size sizing."""
    from distft.config.schema import TrainConfig
    from distft.distributed.deepspeed import build_deepspeed_config, zero_sizes

    config = build_deepspeed_config(strategy, train or TrainConfig(), precision, world, shape.hidden)
    h = shape.hidden
    sized = {**zero_sizes(strategy.zero_stage, h, strategy.param_persistence_threshold),
             "stage3_prefetch_bucket_size": int(0.9 * h * h)}  # what HF's integration fills "auto" with
    zero = {**DS_DEFAULTS, **config["zero_optimization"]}
    return {k: (sized.get(k, DS_DEFAULTS.get(k)) if v == "auto" else v) for k, v in zero.items()}


def model_states(shape: ModelShape, method: MethodConfig, strategy: StrategyConfig, model_dtype: str,
                 world: int, trainable: bool = True, zero: dict | None = None) -> Memory:
    """Parameters, gradients and optimizer states per rank for one model (trainable or frozen).

    `zero`: the run's `zero_optimization` settings (`zero_settings`), for DeepSpeed's buffers."""
    if strategy.name == "deepspeed" and zero is None:
        zero = zero_settings(strategy, shape, precision=strategy.resolved_precision(model_dtype), world=world)
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
        threshold = zero["stage3_param_persistence_threshold"] if deepspeed else 0
        persistent = sum(s for s in shape.small_params if s < threshold)
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
        mem.buffers = min(zero["reduce_bucket_size"], train_params) * grad_b
    elif deepspeed and stage == 3:
        # The reduce bucket, and what is gathered at once: the live-parameter limit or the largest layer,
        # whichever is more (a layer is gathered whole), never more than the model.
        gathered = min(shape.params, max(zero["stage3_max_live_parameters"] + zero["stage3_prefetch_bucket_size"],
                                         shape.largest_layer))
        mem.buffers = min(zero["reduce_bucket_size"], train_params) * grad_b + gathered * weight
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
                 critic: ModelShape | None = None, reward: ModelShape | None = None,
                 teacher: ModelShape | None = None, gpu_bytes: float | None = None) -> Memory:
    """Per-rank peak of one stage on `world` ranks: its models, buffers and activations. `gpu_bytes`: the card,
    of which a vLLM rollout engine takes `gpu_memory_utilization` (unknown: what the engine needs)."""
    stage = cfg.stages[index]
    strategy, method = stage.strategy, stage.method
    dtype = cfg.model.dtype
    act = 4 if strategy.resolved_precision(dtype) == "fp32" else 2
    seq = cfg.model.max_seq_len
    mem = model_states(shape, method, strategy, dtype, world)
    if not type(stage).rewarded:
        pairs = 2 if type(stage).pairs else 1  # chosen and rejected go through together
        mem.activations = activation_bytes(shape, stage.train.micro_batch_size * pairs, seq,
                                           strategy.gradient_checkpointing, act)
        if type(stage).reference_copy and not method.uses_adapter():  # TRL's frozen reference copy
            mem = mem.add(model_states(shape, method, strategy, dtype, world, trainable=False))
            mem.notes.append("reference: a frozen copy of the policy")
        if stage.kind == "distill":  # the teacher, frozen, and the student's sampled responses
            mem = mem.add(model_states(teacher or shape, MethodConfig(name="full"), strategy, dtype, world,
                                       trainable=False))
            mem.notes.append("teacher: frozen, " + ("its own shape" if teacher else "assumed the student's shape"))
            mem.activations *= 2  # the teacher's forward beside the student's
        return mem
    # RL stages: the policy above, then reference, critic and reward model, then generation.
    if not method.uses_adapter():
        mem = mem.add(model_states(shape, method, strategy, dtype, world, trainable=False))
        mem.notes.append("reference: a frozen copy of the policy")
    else:
        mem.notes.append("reference: the policy with adapters disabled (no copy)")
    if stage.kind == "ppo":
        mem = mem.add(model_states(critic or shape, method, strategy, dtype, world))
    if reward is not None or cfg.reward_source(index):
        mem = mem.add(model_states(reward or shape, MethodConfig(name="full"), strategy, dtype, world,
                                   trainable=False))
    rollout = stage.ppo.rollout_batch_size // world if stage.kind == "ppo" else stage.train.micro_batch_size
    kv = kv_cache_bytes(shape, rollout, seq, act)
    train_act = activation_bytes(shape, stage.train.micro_batch_size, seq, strategy.gradient_checkpointing, act)
    if stage.kind == "ppo":
        train_act *= 2  # actor and critic forwards of a minibatch
    if rollout_engine(stage) == "vllm":
        return _with_engine(mem, cfg, stage, shape, kv, train_act, rollout, seq, gpu_bytes)
    gathered = shape.params * dtype_bytes(dtype) if zero_stage(strategy) == 3 else 0.0
    mem.activations = max(train_act, kv + gathered)
    if gathered:
        mem.notes.append(f"generation gathers the whole policy once per rollout ({gathered / GiB:.1f} GiB)")
    mem.notes.append(f"generation KV cache {kv / GiB:.2f} GiB ({rollout} sequences x {seq} tokens)")
    return mem


def _with_engine(mem: Memory, cfg: DistftConfig, stage, shape: ModelShape, kv: float, train_act: float, rollout: int,
                 seq: int, gpu_bytes: float | None) -> Memory:
    """A colocated vLLM engine generates instead of the trained policy: no gathered policy, no HF KV cache;
    the engine holds a whole copy of the weights (never sharded) and its KV cache. On a GPU it reserves
    `gpu_memory_utilization` of the card at start whatever it needs, and with `sleep` it hands the card
    back (weights to host memory) while the trainer updates, so the two phases share the peak."""
    settings = getattr(stage, stage.kind).vllm
    weights = shape.params * dtype_bytes(cfg.model.dtype)
    need = weights + kv
    use_gpu = cfg.scaling.use_gpu
    if use_gpu and gpu_bytes:
        engine = max(need, settings.gpu_memory_utilization * gpu_bytes)
    elif use_gpu:
        engine = need
    else:
        engine = weights + settings.cpu_kv_cache_gib * GiB
    shared = use_gpu and settings.sleep
    mem.activations = max(train_act, engine) if shared else train_act + engine
    mem.engine, mem.engine_need = engine, need
    if shared:
        mem.cpu += weights
    mem.notes.append(
        f"vLLM engine {engine / GiB:.2f} GiB (weights {weights / GiB:.2f} + KV cache for {rollout} sequences x {seq} "
        f"tokens {kv / GiB:.2f}" + (f", reserved as gpu_memory_utilization={settings.gpu_memory_utilization:g}"
                                     if use_gpu and gpu_bytes else "")
        + ("); asleep while training, its weights in host memory" if shared else "); beside training"))
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
        mem = stage_memory(trial, index, shape, n, gpu_bytes=gpu_bytes, **models)
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


@dataclass
class HostMemory:
    """A worker process's peak resident memory on a CPU node, by part (bytes)."""

    baseline: float  # the process itself: Python, torch, transformers, DeepSpeed, the data
    stage: Memory  # what the stage holds (stage_memory), all of it in host RAM on a CPU worker
    transient: float = 0.0  # what the engines hold above the formulas at the peak (see host_peak)

    @property
    def total(self) -> float:
        return self.baseline + self.stage.total + self.stage.cpu + self.transient

    def parts(self) -> dict:
        return {"baseline": self.baseline, "transient": self.transient, "params": self.stage.params,
                "grads": self.stage.grads,
                "optimizer": self.stage.optimizer, "buffers": self.stage.buffers,
                "activations": self.stage.activations, "offloaded": self.stage.cpu}


# A worker process before its model: Python, torch, transformers, TRL, datasets, DeepSpeed and the
# tokenized data. Fitted by benchmarks/plan_accuracy.py on the calibration set (0.1B DDP: peak after
# loading minus the weights), 2026-12-06.
WORKER_BASELINE = 0.95 * GiB
# The same process before it loads its model (imports and data only): the base of the loading peak.
# Fitted on 1.1B LoRA DDP, where loading is the peak: 0.55 GiB below the mapped file and the copy.
LOAD_BASELINE = 0.55 * GiB


# Loading peaks, in copies of the weights above LOAD_BASELINE: a rank that holds the whole model (DDP,
# ZeRO-1/2) has the mapped checkpoint and its private copy resident together; ZeRO-3's rank 0, which
# reads the checkpoint for every rank, held 1.56 (fitted on 1.1B LoRA ZeRO-3).
LOAD_COPIES = {"whole": 2.0, "zero3": 1.56}


def host_peak(cfg: DistftConfig, index: int, shape: ModelShape, world: int, **models) -> HostMemory:
    """Per-worker peak host memory of stage `index` on CPU workers.

    What the engines hold above their shards at the peak, measured on CPU (benchmarks/plan_accuracy.py,
    2 workers, fp32, 0.1B-1.1B Llamas, with distft's worker allocator setting):

    - ZeRO-1/2/3 steps: every rank's backward makes the full gradients before they are reduced into
      partitions. (ZeRO-3's gathered parameters are in `buffers`: up to the live limit, DeepSpeed's 1e9 by
      default, so the whole of a sub-billion model; measured, that is what its peak holds.)
    - FSDP2 and DDP steps: nothing beyond the formulas.
    - Loading (LOAD_COPIES): the peak of LoRA and other frozen-weight runs, whose steps add little.
      FSDP2 loads on rank 0 only and its rank 0 peak stays below its steps'.
    """
    mem = stage_memory(cfg, index, shape, world, **models)
    strategy, method = cfg.stages[index].strategy, cfg.stages[index].method
    weight = dtype_bytes(cfg.model.dtype)  # "auto" counts as 16 bits, as in model_states
    trainable = shape.trainable(method)
    transient = 0.0
    if strategy.name == "deepspeed" and strategy.zero_stage >= 1 and world > 1:
        grad_b = 2 if strategy.resolved_precision(cfg.model.dtype) in ("bf16", "fp16") else 4
        transient = max(0.0, trainable * grad_b - mem.grads)
    copies = LOAD_COPIES["zero3"] if strategy.name == "deepspeed" and strategy.zero_stage == 3 else (
        None if strategy.partitions_parameters() else LOAD_COPIES["whole"])
    if copies:
        loading = LOAD_BASELINE + copies * shape.params * weight
        transient = max(transient, loading - (WORKER_BASELINE + mem.total + mem.cpu))
    return HostMemory(WORKER_BASELINE, mem, transient)
