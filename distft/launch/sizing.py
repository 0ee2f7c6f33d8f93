"""`distft plan` and the fit check of `distft validate`: the memory plan of a config, as text.

Ray-free: shapes come from config.json on the meta device, formulas from
distft/distributed/plan.py; nothing is downloaded or launched.
"""

from __future__ import annotations

from distft.config import DistftConfig
from distft.config.schema import ALL_STRATEGIES, METHOD_STRATEGIES, StrategyConfig
from distft.distributed import plan
from distft.models.shapes import ModelShape, model_shape

GiB = plan.GiB


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}" if x < 10 * GiB else f"{x / GiB:.1f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def stage_shapes(cfg: DistftConfig, index: int, cache: dict) -> dict:
    """{"shape": policy or trained model, "critic": ..., "reward": ..., "teacher": ...} as ModelShapes (cached by
    source)."""

    def get(source: str | None) -> ModelShape | None:
        if not source:
            return None
        name = plan.architecture_of(cfg, source)
        if name not in cache:
            cache[name] = model_shape(name)
        return cache[name]

    out = {"shape": get(cfg.init_source(index))}
    stage = cfg.stages[index]
    if type(stage).rewarded:
        out["reward"] = get(cfg.reward_source(index))
    if stage.kind == "ppo":
        out["critic"] = get(cfg.critic_source(index)) or out["shape"]
    if stage.kind == "distill":
        out["teacher"] = get(cfg.teacher_source(index))
    return out


def describe_stage(cfg: DistftConfig, index: int, shapes: dict, world: int, gpu_gib: float,
                   gpus_per_node: int) -> list[str]:
    stage = cfg.stages[index]
    shape = shapes["shape"]
    models = {k: v for k, v in shapes.items() if k != "shape"}
    strategy = stage.strategy
    gpu = gpu_gib * GiB
    card = gpu if cfg.scaling.use_gpu else None
    mem = plan.stage_memory(cfg, index, shape, world, gpu_bytes=card, **models)
    other = strategy.model_copy(update={"gradient_checkpointing": not strategy.gradient_checkpointing})
    alt = plan.stage_memory(cfg.model_copy(update={"stages": [*cfg.stages[:index],
                                                              stage.model_copy(update={"strategy": other}),
                                                              *cfg.stages[index + 1:]]}),
                            index, shape, world, gpu_bytes=card, **models)
    cpu = not cfg.scaling.use_gpu
    lines = [
        f"stage {stage.label()} ({stage.kind}, method {stage.method.name}) on {world} "
        f"{'CPU worker(s)' if cpu else 'GPU(s)'}, {strategy.label()}, "
        f"{strategy.resolved_precision(cfg.model.dtype)}: {shape.name}, {_count(shape.params)} parameters, "
        f"{_count(shape.trainable(stage.method))} trainable",
        f"  {'per rank':<22}{'GiB':>8}",
        f"  {'parameters':<22}{_gib(mem.params):>8}",
        f"  {'gradients':<22}{_gib(mem.grads):>8}",
        f"  {'optimizer states':<22}{_gib(mem.optimizer):>8}   (Adam moments + fp32 master copy where kept)",
        f"  {'buffers':<22}{_gib(mem.buffers):>8}   (DDP buckets / DeepSpeed reduce, gather buckets)",
        f"  {'activations':<22}{_gib(mem.activations):>8}   (gradient checkpointing "
        f"{'on' if strategy.gradient_checkpointing else 'off'}; {'off' if strategy.gradient_checkpointing else 'on'}: "
        f"{_gib(alt.activations)})",
    ]
    if mem.engine:
        lines.append(f"  {'vLLM engine':<22}{_gib(mem.engine):>8}   (counted in activations: see the note)")
    if cpu:
        host = plan.host_peak(cfg, index, shape, world, **models)
        per, total, most = host_need(cfg, index, shapes)
        node, store = node_memory(), object_store(cfg)
        need = total + RAY_PROCESSES + store
        lines += [
            f"  {'engine transients':<22}{_gib(host.transient):>8}   (DeepSpeed on CPU: full gradients before the reduce; loading)",
            f"  {'process baseline':<22}{_gib(host.baseline):>8}   (Python, torch, transformers, DeepSpeed)",
            f"  {'host RAM per worker':<22}{_gib(host.total):>8}   (peak resident memory, VmHWM)",
            f"  this machine: {most} worker(s) x {_gib(per)} + Ray's processes {_gib(RAY_PROCESSES)} + object store "
            f"{_gib(store)} = {_gib(need)} of {_gib(node)} GiB RAM: "
            + (f"headroom {_gib(node - need)}" if need <= node else f"OVER by {_gib(need - node)}"),
        ]
    else:
        lines.append(f"  {'total':<22}{_gib(mem.total):>8}   of {gpu_gib:g} GiB: "
                     + (f"headroom {_gib(gpu - mem.total)}" if mem.total <= gpu else f"OVER by {_gib(mem.total - gpu)}"))
    if mem.cpu:
        lines.append(f"  {'host memory':<22}{_gib(mem.cpu):>8}   (offloaded, per rank)")
    lines += [f"  note: {n}" for n in mem.notes]
    second = plan.deepspeed_estimate(shape, strategy, world, gpus_per_node)
    if second is not None:
        lines.append(f"  DeepSpeed's own estimate of model states (a second opinion): {_gib(second)} GiB per GPU")
    fits = []
    for name, spec in plan.CANDIDATES.items():
        if stage.kind == "ppo" and spec["name"] == "fsdp":
            continue  # the ppo stage runs under DDP or DeepSpeed
        candidate = StrategyConfig(**spec, precision=strategy.precision,
                                   gradient_checkpointing=strategy.gradient_checkpointing)
        found = plan.smallest_fit(cfg, index, shape, gpu, gpus_per_node, candidate, **models)
        fits.append(f"{name} {found[0]}" if found else f"{name} -")
    lines.append(f"  {'on GPUs instead (scaling.use_gpu=true), ' if cpu else ''}fewest {gpu_gib:g} GiB GPUs that fit: "
                 f"{', '.join(fits)}")
    return lines


def render_plan(cfg: DistftConfig, gpu_gib: float, gpus_per_node: int, world: int | None = None) -> str:
    cache: dict = {}
    # An elastic run may train at its minimum, where sharded states take the most per GPU.
    world = world or cfg.scaling.fewest_workers()
    lines = []
    for i in range(len(cfg.stages)):
        lines += describe_stage(cfg, i, stage_shapes(cfg, i, cache), world, gpu_gib, gpus_per_node)
    lines.append("Estimates from config.json alone (no weights read); activations assume memory-efficient "
                 "attention (sdpa/flash), so no sequence-squared term.")
    return "\n".join(lines)


def fit_warnings(cfg: DistftConfig, gpus_per_node: int = 8) -> list[str]:
    """For `validate`: one line per stage that does not fit `scaling.gpu_memory_gib`, naming what would."""
    s = cfg.scaling
    if not s.use_gpu or not s.gpu_memory_gib:
        return []
    gpu = s.gpu_memory_gib * GiB
    cache: dict = {}
    warnings = []
    for i, stage in enumerate(cfg.stages):
        shapes = stage_shapes(cfg, i, cache)
        models = {k: v for k, v in shapes.items() if k != "shape"}
        world = s.fewest_workers()  # an elastic run may shrink to its minimum: the most per GPU
        mem = plan.stage_memory(cfg, i, shapes["shape"], world, gpu_bytes=gpu, **models)
        if mem.engine_need:
            settings = getattr(stage, stage.kind).vllm
            if mem.engine_need > settings.gpu_memory_utilization * gpu:
                warnings.append(
                    f"stages.{i}.{stage.kind}.vllm.gpu_memory_utilization: the vLLM engine needs "
                    f"{mem.engine_need / GiB:.1f} GiB (a whole copy of the weights and the rollout's KV cache), "
                    f"{settings.gpu_memory_utilization:g} of {s.gpu_memory_gib:g} GiB is "
                    f"{settings.gpu_memory_utilization * gpu / GiB:.1f}. Fix: "
                    f"{stage.kind}.vllm.gpu_memory_utilization={min(0.9, mem.engine_need / gpu + 0.05):.2f}, or a "
                    f"smaller {'ppo.rollout_batch_size' if stage.kind == 'ppo' else 'train.micro_batch_size'}.")
        if mem.total <= gpu:
            continue
        options = []
        more = plan.smallest_fit(cfg, i, shapes["shape"], gpu, gpus_per_node, stage.strategy, **models)
        if more:
            options.append(f"scaling.num_workers={more[0]}")
        zero = () if s.elastic() else (  # ZeRO checkpoints cannot resume at another size: no elastic runs
            ("strategy.name=deepspeed strategy.zero_stage=3", {"name": "deepspeed", "zero_stage": 3}),
            ("strategy.offload_optimizer=cpu (ZeRO-3)", {"name": "deepspeed", "zero_stage": 3, "offload_optimizer": "cpu"}))
        for label, spec in zero:
            candidate = StrategyConfig(**spec, precision=stage.strategy.precision,
                                       gradient_checkpointing=stage.strategy.gradient_checkpointing)
            trial = plan.smallest_fit(cfg, i, shapes["shape"], gpu, gpus_per_node, candidate, **models)
            if trial and trial[0] <= world:
                options.append(label)
        if not stage.strategy.gradient_checkpointing:
            trial = plan.smallest_fit(cfg, i, shapes["shape"], gpu, gpus_per_node, stage.strategy,
                                      checkpointing=True, **models)
            if trial and trial[0] <= world:
                options.append("strategy.gradient_checkpointing=true")
        fix = f" Fix: {' or '.join(options)}." if options else " No strategy fits within 1024 GPUs of this size."
        warnings.append(f"stage {stage.label()}: about {_gib(mem.total)} GiB per GPU on {world} GPU(s), "
                        f"over scaling.gpu_memory_gib={s.gpu_memory_gib:g} (see `distft plan`).{fix}")
    return warnings


# Host RAM of CPU workers (scaling.use_gpu=false): every worker of a local cluster shares this machine's
# memory with Ray's own processes and its object store.
# Ray's own processes on the node: GCS, raylet, the dashboard and its heads, agents, the log monitor and
# idle workers held 1.7 GiB RSS on a private 2-CPU cluster here (2026-12-06), plus distft's driver and
# Train's controller.
RAY_PROCESSES = 2.0 * GiB


def node_memory() -> float:
    import psutil

    return float(psutil.virtual_memory().total)


def object_store(cfg: DistftConfig) -> float:
    """What Ray's object store takes from RAM for this run. Its size (30% of RAM by default) is a limit
    filled as objects are put: a streaming run (Ray Data blocks) fills it; otherwise workers read their
    own data and the store holds a few small objects, so it is not counted."""
    if not any(st.data.streaming for st in cfg.stages):
        return 0.0
    from distft.launch.rundir import object_store_bytes

    return float(object_store_bytes())


def _with_stage(cfg: DistftConfig, index: int, **update) -> DistftConfig:
    trial = cfg.model_copy(deep=True)
    trial.stages[index] = trial.stages[index].model_copy(update=update)
    return trial


def host_need(cfg: DistftConfig, index: int, shapes: dict) -> tuple[float, float, int]:
    """(per-worker peak, all workers together, world) for stage `index` on CPU workers, at the world size
    that needs the most in total (an elastic run may grow to its maximum, each worker holding more at its
    minimum)."""
    models = {k: v for k, v in shapes.items() if k != "shape"}
    best = (0.0, 0.0, 1)
    for world in cfg.scaling.world_sizes():
        per = plan.host_peak(cfg, index, shapes["shape"], world, **models).total
        if per * world > best[1]:
            best = (per, per * world, world)
    return best


def host_fixes(cfg: DistftConfig, index: int, shapes: dict, room: float) -> list[str]:
    """Settings (as dotted overrides) under which stage `index` fits `room` bytes of worker memory."""
    stage = cfg.stages[index]
    trials: list[tuple[str, DistftConfig]] = []
    for label, spec in (("strategy.name=fsdp", {"name": "fsdp"}),
                        ("strategy.name=deepspeed strategy.zero_stage=3", {"name": "deepspeed", "zero_stage": 3})):
        label_of = StrategyConfig(**spec).label()
        if (stage.strategy.label() == label_of or (stage.kind == "ppo" and spec["name"] == "fsdp")
                or label_of not in METHOD_STRATEGIES.get(stage.method.name, ALL_STRATEGIES)
                or (spec["name"] == "fsdp" and stage.method.name == "qlora")):
            continue  # what it is already, or what the config would refuse (the ppo stage: DDP or DeepSpeed)
        strategy = StrategyConfig(**spec, precision=stage.strategy.precision,
                                  gradient_checkpointing=stage.strategy.gradient_checkpointing)
        trials.append((label, _with_stage(cfg, index, strategy=strategy)))
    if not stage.strategy.gradient_checkpointing:
        trials.append(("strategy.gradient_checkpointing=true", _with_stage(
            cfg, index, strategy=stage.strategy.model_copy(update={"gradient_checkpointing": True}))))
    if stage.method.name == "full":
        trials.append(("method.name=lora", _with_stage(cfg, index, method=stage.method.model_copy(
            update={"name": "lora"}))))
    if not cfg.scaling.elastic():
        for n in range(cfg.scaling.num_workers - 1, 0, -1):
            trial = cfg.model_copy(deep=True)
            trial.scaling = trial.scaling.model_copy(update={"num_workers": n})
            trials.append((f"scaling.num_workers={n}", trial))
    fits = []
    for label, trial in trials:
        try:
            if host_need(trial, index, shapes)[1] <= room:
                fits.append(label)
        except ValueError:  # a combination the stage does not support
            continue
        if label.startswith("scaling.num_workers") and fits and fits[-1] == label:
            break  # the most workers that fit is enough
    return fits


def host_problems(cfg: DistftConfig, node: float | None = None) -> list[str]:
    """For a CPU config on a local cluster: one line per stage whose workers do not fit this machine's RAM
    (with Ray's processes and object store), naming the settings that would fit."""
    if cfg.scaling.use_gpu:
        return []
    node = node or node_memory()
    store = object_store(cfg)
    room = node - RAY_PROCESSES - store
    cache: dict = {}
    problems = []
    for i, stage in enumerate(cfg.stages):
        shapes = stage_shapes(cfg, i, cache)
        per, total, world = host_need(cfg, i, shapes)
        if total <= room:
            continue
        fixes = host_fixes(cfg, i, shapes, room)
        fix = f" Fix: {' or '.join(fixes[:4])}." if fixes else (
            " No strategy, method or worker count fits: use a machine with more memory, or GPUs "
            "(scaling.use_gpu=true).")
        problems.append(
            f"stage {stage.label()}: about {_gib(per)} GiB per CPU worker x {world} worker(s) = {_gib(total)} GiB, "
            f"plus Ray's processes ({_gib(RAY_PROCESSES)}) and object store ({_gib(store)}), is over "
            f"this machine's {_gib(node)} GiB of RAM (see `distft plan`).{fix}")
    return problems

