"""Checks and the plan, done on the driver before any cluster resources are taken.

Everything here is Ray-free so `distft validate` is instant and bad input
fails with one clear message instead of a worker traceback.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

from distft.config import TINY_BASE, DistftConfig
from distft.config.schema import MINILM, PREFERENCE_STAGES
from distft.data.formats import DataError
from distft.data.loading import load_checked, looks_local
from distft.errors import UserError


class PreflightError(UserError):
    """The config is valid but cannot run here (missing files, impossible resources)."""


def map_local_paths(cfg: DistftConfig, data_fn, model_fn) -> DistftConfig:
    """A copy of `cfg` with every data path through `data_fn` and every model path (the base, a
    stage's init_from, reward model, critic or teacher that is not an earlier stage) through `model_fn`."""
    cfg = cfg.model_copy(deep=True)
    cfg.model.name_or_path = model_fn(cfg.model.name_or_path)
    for st in cfg.stages:
        if st.init_from and cfg.stage_named(st.init_from) is None:
            st.init_from = model_fn(st.init_from)
        for field, ref in st.model_refs():
            if ref and cfg.stage_named(ref) is None:
                st.set_model_ref(field, model_fn(ref))
        st.data.train = data_fn(st.data.train)
        st.data.eval = data_fn(st.data.eval)
        st.evaluate.data = data_fn(st.evaluate.data)
        for retain in st.evaluate.retain or []:
            retain.data = data_fn(retain.data)
        if st.data.replay:
            st.data.replay.source = data_fn(st.data.replay.source)
        if st.strategy.deepspeed_config:
            st.strategy.deepspeed_config = data_fn(st.strategy.deepspeed_config)
    return cfg


def beside_config(cfg: DistftConfig, config_path: str | Path) -> DistftConfig:
    """Relative paths that do not exist from the cwd but do beside the config file, made absolute there:
    a shipped config (its data in configs/data/) runs from the repository root and from anywhere else.
    The cwd comes first, so a config that worked from the cwd keeps working unchanged."""
    config_dir = Path(config_path).resolve().parent
    cwd = Path.cwd()

    def fix(value: str | None) -> str | None:
        if not value or Path(value).expanduser().is_absolute() or (cwd / value).exists():
            return value
        beside = config_dir / value
        return str(beside.resolve()) if beside.exists() else value

    return map_local_paths(cfg, fix, fix)


def absolutize_paths(cfg: DistftConfig, base: Path | None = None) -> DistftConfig:
    """Ray workers run in another cwd: turn relative local paths into absolute ones."""
    base = base or Path.cwd()

    def fix(value: str | None) -> str | None:
        # A datasets name unless it looks like a file or exists here (a save_to_disk directory).
        local = value and (looks_local(value) or (base / value).exists())
        if local and not Path(value).expanduser().is_absolute():
            return str((base / value).resolve())
        return value

    def fix_model(value: str) -> str:  # a relative directory that exists here, else a hub id
        return str((base / value).resolve()) if (base / value).exists() else value

    return map_local_paths(cfg, fix, fix_model)


def model_problems(cfg: DistftConfig, ref: str, field: str, tokenizer: bool = True) -> list[str]:
    """What would make the workers fail to load `ref` (a model directory, a bundled model or a hub id), read
    cheaply here: config.json, the safetensors headers against the files' sizes, the tokenizer, and the
    architecture's support for model.attn_implementation. At most one problem per model."""
    from distft.models.hub import cached_snapshot, hub_model_problem, is_hub_model
    from distft.models.bundled import BundledModelError, tiny_base_dir
    from distft.models.loading import final_model_dir, minilm_path
    from distft.models.verify import attention_problem, model_dir_problem, tokenizer_problem

    m = cfg.model
    if ref == MINILM:
        try:
            path = minilm_path()
        except FileNotFoundError as e:
            return [f"{field}: {e}"]
    elif ref == TINY_BASE:
        try:
            path = tiny_base_dir()  # what every worker will load: the installed files, checked by hash
        except BundledModelError as e:
            return [f"{field}: {e}"]
    elif is_hub_model(ref):
        if problem := hub_model_problem(ref, m.revision if field == "model.name_or_path" else None):
            return [f"{field}: {problem}"]
        import huggingface_hub

        path = cached_snapshot(ref, m.revision if field == "model.name_or_path" else None)
        if path is None or not huggingface_hub.is_offline_mode():
            return []  # online, from_pretrained downloads what the cache lacks
    else:
        path = Path(ref).expanduser()
        if not path.exists():
            return [f"{field}: {ref} does not exist. Fix: pass a local HF directory or a hub id."]
        path = final_model_dir(path) if field != "model.name_or_path" else path  # a source may be a run
        adapter = (path / "adapter_config.json").is_file()
        if not adapter and not (path / "config.json").exists():
            return [f"{field}: {ref} has no config.json; it is not a Hugging Face model directory."]
        pickled = sorted(p.name for p in path.glob("*.bin") if p.name.startswith(("pytorch_model", "model")))
        if pickled and not any(path.glob("*.safetensors")) and not m.allow_pickle_weights:
            return [f"{field}: {ref} has its weights only as pickle ({pickled[0]}), which can run code "
                    "when loaded. Fix: convert them to safetensors, or set model.allow_pickle_weights=true if you "
                    "trust where they came from."]
    if problem := model_dir_problem(path):
        return [f"{field}: {problem}"]
    # What distft built or ships loads with its own tokenizer and sdpa: no need to pay for importing
    # transformers to say so. Remote code is never run on the driver.
    bundled = ref in (TINY_BASE, MINILM)
    if not (path / "config.json").is_file():
        return []  # an adapter: its base was checked above; attention follows the base's config
    config = json.loads((path / "config.json").read_bytes())
    if problem := attention_problem(config, m.attn_implementation, cfg.scaling.use_gpu, m.trust_remote_code):
        return [problem if field == "model.name_or_path" else f"{field}: {problem}"]
    if (tokenizer and not bundled and not m.trust_remote_code
            and (problem := tokenizer_problem(path, m.revision if is_hub_model(ref) else None))):
        return [f"{field}: {problem}"]
    return []


def check_model(cfg: DistftConfig, elsewhere: frozenset = frozenset()) -> list[str]:
    name = cfg.model.name_or_path
    if name in elsewhere:
        return []
    return model_problems(cfg, name, "model.name_or_path")


def check_methods(cfg: DistftConfig, elsewhere: frozenset = frozenset()) -> list[str]:
    """freeze and bitfit depend on the architecture (its blocks, its biases): apply them to the model
    built from config.json alone, on the meta device, so a mismatch is refused before launch."""
    from distft.models.methods import MethodError
    from distft.models.shapes import find_config, trainable_on_meta

    problems = []
    for i, st in enumerate(cfg.stages):
        source = cfg.init_source(i)
        if st.method.name not in ("freeze", "bitfit") or source in elsewhere or cfg.stage_named(source) is not None:
            continue
        try:
            find_config(source)
        except FileNotFoundError:
            continue  # a hub model not shipped here: the workers check it when they load it
        try:
            trainable_on_meta(source, st.method)
        except MethodError as e:
            prefix = "" if len(cfg.stages) == 1 else f"stages.{i}."
            problems.append(f"{prefix}{e}")
        except (OSError, ValueError):
            continue  # a config.json that does not parse: check_model names it
    return problems


def check_data(cfg: DistftConfig, elsewhere: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """(problems, notes): every local data file is read and every row validated (except those `elsewhere`:
    paths that exist only where the run goes, e.g. on a cluster's shared volume)."""
    import datasets

    datasets.disable_progress_bars()  # a check of small local files: its bars would bury the one error line
    problems, notes = [], []
    prefix = "" if len(cfg.stages) == 1 else "stages.{i}."
    for i, st in enumerate(cfg.stages):
        sources = [("data.train", st.data.train), ("data.eval", st.data.eval), ("evaluate.data", st.evaluate.data)]
        for field, src in sources:
            if not src:
                continue
            name = prefix.format(i=i) + field
            if src in elsewhere:
                notes.append(f"{name}: {src} is not on this machine; the job checks it on the cluster.")
                continue
            if not looks_local(src) and not Path(src).exists():
                notes.append(f"{name}: {src} is a datasets name; it is checked when the workers load it.")
                continue
            if field == "data.train" and st.data.streaming:
                from distft.launch.streaming import check_sample

                try:
                    notes.append(check_sample(src, st.data, name))
                except DataError as e:
                    problems.append(str(e))
                continue
            try:
                ds, fmt = load_checked(src, st.data, name)
                notes.append(f"{name}: {src}: {len(ds)} rows, format {fmt}")
            except DataError as e:
                problems.append(str(e))
                continue
            problem = _format_mismatch(name, src, fmt, st.kind, field)
            if problem:
                problems.append(problem)
    return problems, notes


def check_retain(cfg: DistftConfig, elsewhere: frozenset = frozenset()) -> tuple[list[str], list[str]]:
    """(problems, notes): each stage's retain sets and replay rows read as the stage will read them, and replay
    checked to share no row with a retain set. Sources that are datasets names, or only on a cluster, are
    left to the workers."""
    from distft.models.bundled import BundledModelError
    from distft.stages.retain import load_retain_sets, replay_texts

    problems, notes = [], []
    prefix = "" if len(cfg.stages) == 1 else "stages.{i}."
    for i, st in enumerate(cfg.stages):
        sources = [r.data for r in cfg.retain_for(st)] + ([st.data.replay.source] if st.data.replay else [])
        if not sources:
            continue
        away = [src for src in sources if src in elsewhere or not (src.startswith("distft://") or looks_local(src)
                                                                    or Path(src).exists())]
        if away:
            notes.append(f"{prefix.format(i=i)}evaluate.retain / data.replay: {away[0]} is checked when the workers "
                         "load it.")
            continue
        try:
            sets = load_retain_sets(cfg, st)
            replayed = replay_texts(st.data.replay.source, sets) if st.data.replay else None
        except (DataError, BundledModelError) as e:
            problems.append(prefix.format(i=i) + str(e))
            continue
        for r in sets:
            notes.append(f"{prefix.format(i=i)}retain {r.name}: {r.source}: {r.items} rows, {r.kind.replace('_', ' ')}")
        if replayed is not None:
            notes.append(f"{prefix.format(i=i)}data.replay: {st.data.replay.source}: {len(replayed)} text rows, "
                         "none in a retain set")
    return problems, notes


def _format_mismatch(name: str, src: str, fmt: str, kind: str, field: str) -> str | None:
    """A file of the wrong kind for its stage, found here rather than in the workers."""
    if field == "evaluate.data" and kind in (*PREFERENCE_STAGES, "kto") and kind != "reward":
        kind = "ppo"  # trained on pairs or labelled responses, scored by answering prompts (exact match)
    if kind == "kto":
        if fmt in ("feedback", "preference"):
            return None
        return (f"{name}: {src} has format {fmt}, but stage kto trains on labelled responses. Fix: point it at rows "
                "with prompt, completion and label (true/false), or at preference pairs (chosen/rejected).")
    if fmt == "feedback":
        return (f"{name}: {src} holds labelled responses (prompt, completion, label true/false), which stage {kind} "
                "cannot train on. Fix: use stage: kto for them.")
    if (kind == "classify") != (fmt == "classification"):
        if kind == "classify":
            return (f"{name}: {src} has format {fmt}, but stage classify trains on text + label rows. "
                    "Fix: point it at rows with `text` (data.text_field) and `label`.")
        return (f"{name}: {src} holds text + label rows for classification, which stage {kind} cannot train on. "
                "Fix: use stage: classify for them.")
    if kind in PREFERENCE_STAGES:
        if fmt == "preference":
            return None
        return (f"{name}: {src} has format {fmt}, but stage {kind} trains on preference pairs. "
                "Fix: point it at rows with chosen/rejected (and optionally prompt).")
    if fmt == "preference":
        return (f"{name}: {src} holds preference pairs (chosen/rejected), which stage {kind} cannot train on. "
                "Fix: use stage: reward, dpo, kto, orpo or simpo for them, or point this stage at alpaca, messages, "
                "prompt/completion or text rows.")
    if kind == "distill" and fmt == "prompt_completion":
        return (f"{name}: {src} holds prompt/completion strings, but stage distill renders rows with the chat template "
                "(GKD's collator reads chat turns). Fix: alpaca or messages rows.")
    if kind in ("ppo", "grpo", "distill") and fmt == "text":
        return (f"{name}: {src} is plain text, but stage {kind} needs prompts to answer. "
                "Fix: alpaca, messages or prompt/completion rows (their answers feed reward functions and "
                "distillation).")
    return None


def check_sources(cfg: DistftConfig, elsewhere: frozenset = frozenset()) -> list[str]:
    """Models named by path (init_from, and each stage's model_refs: reward.model, ppo.critic_from,
    distill.teacher) exist, and reward functions import."""
    from distft.rl.rewards import RewardFunctionError, resolve

    problems = []
    for i, st in enumerate(cfg.stages):
        where = "" if len(cfg.stages) == 1 else f"stages.{i}."
        fields = [("init_from", st.init_from), *st.model_refs()]
        if type(st).rewarded:
            for name in st.reward.functions:
                try:
                    resolve(name)
                except RewardFunctionError as e:
                    problems.append(f"{where}{e}")
        for field, ref in fields:
            if not ref or cfg.stage_named(ref) is not None or ref == TINY_BASE or ref in elsewhere:
                continue
            path = Path(ref).expanduser()
            names = ", ".join(s.label() for s in cfg.stages[:i]) or "none"
            if (path.is_absolute() or ref.startswith(".")) and not path.exists():
                problems.append(f"{where}{field}: {ref} is neither an earlier stage ({names}) nor an existing "
                                "directory. Fix: a stage name, a model directory or a hub id.")
                continue
            for problem in model_problems(cfg, ref, f"{where}{field}", tokenizer=False):
                if f"{ref!r} is not a local directory" in problem:  # perhaps a mistyped stage name
                    problem = problem.replace(f"{ref!r} is", f"{ref!r} is not an earlier stage ({names}),", 1)
                problems.append(problem)
    return problems


def check_local_resources(cfg: DistftConfig) -> list[str]:
    """For a private local cluster we know exactly what exists; refuse what can never be placed."""
    s = cfg.scaling
    cpus = os.cpu_count() or 1
    workers = s.fewest_workers()  # an elastic run starts with what there is, down to its minimum
    need = workers * s.cpus_per_worker
    problems = []
    if need > cpus:
        fit = max(1, int(cpus // s.cpus_per_worker))
        problems.append(
            f"scaling: {workers} workers x {s.cpus_per_worker:g} CPUs = {need:g} CPUs, but this machine has {cpus}. "
            f"Fix: scaling.num_workers={fit}, or a smaller scaling.cpus_per_worker, or run.address=<a bigger cluster>."
        )
    from distft.launch.streaming import spare_cpu_problem

    if need <= cpus and (problem := spare_cpu_problem(cfg, cpus)):
        problems.append(problem)
    if s.use_gpu:
        import torch

        gpus = torch.cuda.device_count()
        if workers * s.gpus_per_worker > gpus:
            problems.append(
                f"scaling.use_gpu: {workers} workers x {s.gpus_per_worker:g} GPUs requested, {gpus} GPU(s) here. "
                "Fix: scaling.use_gpu=false, fewer workers, or run.address=<a GPU cluster>."
            )
    return problems


def check_host_memory(cfg: DistftConfig, local_cluster: bool) -> list[str]:
    """CPU workers on a private local cluster, whose memory is this machine's: workers whose planned peak
    does not fit the RAM. Skipped for a model whose config.json cannot be read offline (nothing to count)."""
    if not local_cluster:
        return []
    from distft.launch.sizing import host_problems

    try:
        return host_problems(cfg)
    except FileNotFoundError:
        return []


def check_address(address: str | None, timeout_s: float = 5.0) -> list[str]:
    """A dead `host:port` makes `ray.init` retry for minutes; a TCP probe answers in seconds."""
    if not address or address in ("auto", "local") or "://" in address:
        return []
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return [f"run.address: {address!r} is not host:port (e.g. 127.0.0.1:6379), 'auto', or ray://host:port."]
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            return []
    except OSError as e:
        return [
            f"run.address: nothing answers at {address} ({e.strerror or e}). Fix: start the head with "
            "`ray start --head` (see cluster/README.md), check the address with `ray status`, or drop "
            "--address/run.address/RAY_ADDRESS to use a private local cluster."
        ]


def check_forwarded_env(cfg: DistftConfig) -> list[str]:
    missing = [k for k in cfg.run.forward_env if not os.environ.get(k)]
    return [f"run.forward_env: {k} is not set in this environment, so workers would run without it. Fix: "
            f"export {k}=..., or remove it from run.forward_env." for k in missing]


MLFLOW_SECRETS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def check_tracking(cfg: DistftConfig) -> list[str]:
    """run.report_to and run.push_to_hub: the client installed, a server named, the secrets forwarded.
    Whether the server answers is not checked here: an unreachable one is given up at launch with a
    warning (launch/tracking.py), since tracking must never keep a run from training."""
    import importlib.util

    from distft.launch.tracking import tracking_uri

    run, problems = cfg.run, []
    for name, extra in (("mlflow", "mlflow"), ("wandb", "wandb")):
        if name in run.report_to and importlib.util.find_spec(name) is None:
            problems.append(f"run.report_to has {name}, which is not installed. Fix: pip install 'distft[{extra}]', "
                            f"or drop {name} from run.report_to.")
    if "mlflow" in run.report_to:
        uri = tracking_uri(cfg)
        if not uri:
            problems.append("run.report_to has mlflow, but no tracking server is named. Fix: "
                            "run.mlflow.tracking_uri=http://HOST:5000, or export MLFLOW_TRACKING_URI=...")
        elif re.search(r"://[^/@\s]*:[^/@\s]*@", uri):  # never write a password into config.yaml or a log
            problems.append("run.mlflow.tracking_uri (or MLFLOW_TRACKING_URI) holds a password. Fix: the URI without "
                            "it, and MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN) "
                            "in the environment and in run.forward_env.")
        unsent = [k for k in MLFLOW_SECRETS if os.environ.get(k) and k not in run.forward_env]
        if unsent:
            problems.append(f"{unsent[0]} is set here but not in run.forward_env, so the workers would log to MLflow "
                            f"without it. Fix: run.forward_env=[{', '.join(dict.fromkeys([*run.forward_env, *unsent]))}].")
    if "wandb" in run.report_to and run.wandb.mode == "online" and "WANDB_API_KEY" not in run.forward_env:
        problems.append("run.report_to has wandb (online), but WANDB_API_KEY is not in run.forward_env, so the "
                        "workers could not log in. Fix: export WANDB_API_KEY=... and run.forward_env=[WANDB_API_KEY], "
                        "or run.wandb.mode=offline (files in the run directory; `wandb sync` later).")
    if run.push_to_hub and not os.environ.get("HF_TOKEN"):
        problems.append(f"run.push_to_hub={run.push_to_hub} needs HF_TOKEN, which is not set. Fix: export HF_TOKEN=<a "
                        "write token>, or drop run.push_to_hub (distft export RUN --push-to-hub later).")
    return problems


def check_engines(cfg: DistftConfig) -> list[str]:
    """`generation: vllm` on this machine's own cluster: vLLM must import here (a submitted job's cluster
    has its own environment, so its workers check there, with the same message)."""
    from distft.config.schema import rollout_engine
    from distft.models.vllm_engine import vllm_problem

    problems = []
    for i, st in enumerate(cfg.stages):
        prefix = "" if len(cfg.stages) == 1 else f"stages.{i}."
        if rollout_engine(st) == "vllm" and (problem := vllm_problem(f"{prefix}{st.kind}.generation")):
            problems.append(problem)
    return problems[:1]  # one install fixes every stage


def cluster_only_paths(cfg: DistftConfig) -> frozenset:
    """Absolute paths the config names that do not exist here: for a submitted job, paths on the cluster.
    Offline, hub models this machine's cache lacks too: the cluster may have them, or reach the hub."""
    import huggingface_hub

    from distft.models.hub import cached_snapshot, is_hub_model

    found = set()

    def note(value):
        if value and Path(value).expanduser().is_absolute() and not Path(value).expanduser().exists():
            found.add(value)
        return value

    def note_model(value):
        revision = cfg.model.revision if value == cfg.model.name_or_path else None
        if is_hub_model(value) and huggingface_hub.is_offline_mode() and cached_snapshot(value, revision) is None:
            found.add(value)
        return note(value)

    map_local_paths(cfg, note, note_model)
    return frozenset(found)


def preflight(cfg: DistftConfig, address: str | None, elsewhere: frozenset = frozenset()) -> list[str]:
    """Problems that make the run impossible, found before anything starts. Returns notes worth printing.
    Paths in `elsewhere` exist only where the run goes (a submitted job's cluster) and are not checked."""
    local_cluster = not address
    first = check_address(address) + check_forwarded_env(cfg) + check_tracking(cfg)
    sources = check_sources(cfg, elsewhere)
    # The methods' check needs only config.json: it still runs when the weights are damaged.
    methods = [] if first or sources else check_methods(cfg, elsewhere)
    problems = first + check_model(cfg, elsewhere) + sources + methods
    data_problems, notes = check_data(cfg, elsewhere)
    problems += data_problems
    if not data_problems:
        retain_problems, retain_notes = check_retain(cfg, elsewhere)
        problems, notes = problems + retain_problems, notes + retain_notes
    if local_cluster:
        problems += check_local_resources(cfg) + check_engines(cfg)
    problems += check_host_memory(cfg, local_cluster) if not problems else []
    if problems:
        raise PreflightError("\n".join(f"  - {p}" for p in problems))
    warning = trust_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    return notes


def trust_warning(cfg: DistftConfig) -> str | None:
    """A model's own Python code runs on every worker when trust_remote_code is on: say so, by name."""
    if not cfg.model.trust_remote_code:
        return None
    models = list(dict.fromkeys([cfg.model.name_or_path] + [st.init_from for st in cfg.stages if st.init_from]
                                + [st.reward.model for st in cfg.stages if getattr(st, "reward", None) and st.reward.model]))
    return (f"warning: model.trust_remote_code is on: Python code shipped with {', '.join(models)} runs on every "
            "worker when it loads. Keep it on only for models whose code you have read or trust; "
            "model.revision pins the commit that code comes from.")


def describe_plan(cfg: DistftConfig, run_dir: Path | None = None) -> str:
    s = cfg.scaling
    device = f"GPU x{s.gpus_per_worker:g}" if s.use_gpu else f"CPU x{s.cpus_per_worker:g}"
    lines = [
        f"model   {cfg.model.name_or_path} (dtype {cfg.model.dtype}, max_seq_len {cfg.model.max_seq_len})",
        f"workers {f'{s.min_workers} to {s.num_workers} (elastic)' if s.elastic() else s.num_workers} x {device} each, "
        f"{s.threads_per_worker()} torch thread(s) per worker",
        f"cluster {cfg.run.address or os.environ.get('RAY_ADDRESS') or 'private local Ray cluster'}",
    ]
    for i, st in enumerate(cfg.stages):
        lines.append(f"stage {i + 1}/{len(cfg.stages)}: {st.label()} ({st.kind}, method {st.method.name})")
        for world in (s.min_workers, s.num_workers) if s.elastic() else (s.num_workers,):
            lines.append(f"  batch   {st.train.batch_plan(world)}")
        strat = st.strategy
        offload = [f"{k}={getattr(strat, k)}" for k in ("offload_optimizer", "offload_params") if getattr(strat, k) != "none"]
        if strat.name == "fsdp":
            replicate, shard = strat.fsdp_mesh(s.num_workers)
            offload.append(f"{strat.fsdp_sharding} sharding over {shard} rank(s)" + (
                f" x {replicate} replicas" if replicate > 1 else ""))
        offload.append(f"precision {strat.resolved_precision(cfg.model.dtype)}")
        lines.append(f"  strategy {strat.label()} ({', '.join(offload)})")
        steps = f"max_steps {st.train.max_steps}" if st.train.max_steps else f"{st.train.epochs:g} epoch(s)"
        lines.append(f"  train   lr {st.train.lr:g} ({st.train.scheduler}, {st.train.optimizer}), {steps}")
        loss_on = f", loss on {st.loss_on()}, packing {st.data.packing}" if type(st).makes_policy else ""
        if type(st).from_policy or st.init_from:
            lines.append(f"  from    {cfg.init_source(i)}")
        if st.kind == "distill":
            d = st.distill
            lines.append(f"  teacher {cfg.teacher_source(i)} (generalised JSD beta {d.beta:g}, {d.lmbda:.0%} of batches "
                         "sampled by the student)")
        if type(st).rewarded:
            scored = ([f"reward model {cfg.reward_source(i)} x{st.reward.model_weight:g}"] if cfg.reward_source(i) else [])
            scored += [f"{name} x{w:g}" for name, w in st.reward.functions.items()]
            lines.append(f"  reward  {' + '.join(scored)}")
        lines.append(f"  data    {st.data.train} (format {st.data.format}{loss_on})")
        if st.evaluate.data:
            lines.append(f"  task    {st.evaluate.metric.replace('_', ' ')} on {st.evaluate.data}")
        if st.data.replay:
            lines.append(f"  replay  {st.data.replay.fraction:.0%} of the rows from {st.data.replay.source}")
        retained = cfg.retain_for(st)
        if retained:
            every = ", and at every eval" if st.evaluate.retain_every_eval else ""
            lines.append(f"  retain  {', '.join(f'{r.label()} ({r.data})' for r in retained)}: before and after"
                         f"{every}; forgetting beyond {st.evaluate.forgetting_tolerance:.0%} is flagged")
    trackers = []
    for name in cfg.run.report_to:
        if name == "mlflow":
            from distft.launch.tracking import tracking_uri

            trackers.append(f"mlflow (experiment {cfg.run.mlflow.experiment} at {tracking_uri(cfg)})")
        elif name == "wandb":
            trackers.append(f"wandb ({cfg.run.wandb.mode}, project {cfg.run.wandb.project})")
        else:
            trackers.append(name)
    if cfg.run.report_to != ["tensorboard"]:
        lines.append("metrics <stage>/metrics.jsonl" + (f", {', '.join(trackers)}" if trackers else ""))
    if cfg.run.push_to_hub:
        lines.append(f"publish {cfg.run.push_to_hub} on the Hugging Face Hub{' (private)' if cfg.run.hub_private else ''}")
    if run_dir:
        lines.append(f"output  {run_dir}")
    return "\n".join(lines)
