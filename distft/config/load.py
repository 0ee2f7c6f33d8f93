"""YAML + dotted overrides -> a validated `DistftConfig`, with errors a user can act on.

Every problem becomes one line that names the field as the user wrote it (the
single-stage shorthand `train.lr`, not the internal `stages.0.train.lr`) and
says how to fix it. All problems are reported at once, never a traceback.
"""

from __future__ import annotations

import copy
import difflib
import typing
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from distft.config.schema import (
    STAGE_KINDS,
    DPOStage,
    GRPOStage,
    PPOStage,
    PretrainStage,
    RewardStage,
    SFTStage,
    DataConfig,
    DistftConfig,
    EvaluateConfig,
    MethodConfig,
    ModelConfig,
    RunConfig,
    ScalingConfig,
    StageBase,
    StrategyConfig,
    TrainConfig,
)
from distft.errors import UserError

# Sections that may appear at top level as defaults for every stage.
STAGE_SECTIONS: dict[str, type[BaseModel]] = {
    "data": DataConfig,
    "method": MethodConfig,
    "train": TrainConfig,
    "evaluate": EvaluateConfig,
    "strategy": StrategyConfig,
}
SHARED_SECTIONS: dict[str, type[BaseModel]] = {"model": ModelConfig, "scaling": ScalingConfig, "run": RunConfig}
STAGE_CLASSES: dict[str, type[StageBase]] = {
    "sft": SFTStage, "pretrain": PretrainStage, "reward": RewardStage, "ppo": PPOStage, "dpo": DPOStage,
    "grpo": GRPOStage,
}
# Keys of one stage only (never shared defaults); the single-stage shorthand takes them at top level.
STAGE_ONLY_KEYS = ("name", "init_from", "reward", "ppo", "dpo", "grpo")
# `tune` is read by `distft tune` (config/search.py); every other command runs the base config and ignores it.
TOP_LEVEL_KEYS = [*SHARED_SECTIONS, *STAGE_SECTIONS, "stage", "stages", *STAGE_ONLY_KEYS, "tune"]


class ConfigError(UserError):
    """A config that cannot run. `problems` holds one actionable line each."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(dict.fromkeys(problems))  # dedupe, keep order
        super().__init__(str(self))

    def __str__(self) -> str:
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"invalid config {self.source}:\n{lines}"


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}. Fix: check the path (try `ls configs/`)."])
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(str(path), [f"malformed YAML{where}: {problem}. Fix: check indentation and quoting."]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(str(path), [f"the top level must be a mapping of sections, got {type(raw).__name__}."])
    return raw


def parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ValueError(f"override {item!r} is not of the form a.b=value (e.g. train.lr=1e-4)")
    key, _, text = item.partition("=")
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {item!r} has an empty key; use dotted names like train.lr=1e-4")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.split("."), value


def apply_overrides(raw: dict, overrides: list[str] | tuple[str, ...], source: str = "<overrides>") -> dict:
    """Set `a.b=c` values on the raw dict. Values are YAML-parsed, then coerced by the schema."""
    problems = []
    for item in overrides:
        try:
            parts, value = parse_override(item)
        except ValueError as e:
            problems.append(str(e))
            continue
        node: Any = raw
        for depth, part in enumerate(parts[:-1]):
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(f"override {item!r}: {'.'.join(parts[: depth + 1])} is not a valid list index")
                    break
                node = node[int(part)]
            else:
                if not isinstance(node.get(part, {}), (dict, list)):
                    node[part] = {}
                node = node.setdefault(part, {})
        else:
            last = parts[-1]
            if isinstance(node, list):
                if not last.isdigit() or int(last) >= len(node):
                    problems.append(f"override {item!r}: {last} is not a valid list index")
                    continue
                node[int(last)] = value
            else:
                node[last] = value
    if problems:
        raise ConfigError(source, problems)
    return raw


def _unwrap_model(annotation) -> type[BaseModel] | None:
    """The pydantic model inside `X`, `X | None` or `list[X]`, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _unwrap_model(arg)
        if found is not None:
            return found
    return None


# Names users bring from other tools (HF TrainingArguments, peft, Axolotl) that spelling distance misses.
ALIASES = {
    "rank": "r",
    "lora_r": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "batch_size": "global_batch_size",
    "per_device_train_batch_size": "micro_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "lr_scheduler_type": "scheduler",
    "optim": "optimizer",
    "model_name_or_path": "name_or_path",
    "base_model": "name_or_path",
    "sequence_len": "max_seq_len",
    "max_length": "max_seq_len",
    "workers": "num_workers",
}


def _suggest(key: str, valid: list[str]) -> str:
    alias = ALIASES.get(key)
    if alias in valid:
        return f"did you mean `{alias}`?"
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if close:
        return f"did you mean `{close[0]}`?"
    return f"valid keys: {', '.join(sorted(valid))}"


def unknown_keys(obj: Any, model: type[BaseModel], path: str, extra_allowed: tuple[str, ...] = ()) -> list[str]:
    """Unknown keys in a raw dict, checked recursively against `model`, each with the closest valid key."""
    if not isinstance(obj, dict):
        return []
    problems = []
    fields = model.model_fields
    valid = [*fields, *extra_allowed]
    for key, value in obj.items():
        where = f"{path}.{key}" if path else str(key)
        if key not in valid:
            problems.append(f"{where}: unknown key; {_suggest(str(key), valid)}")
            continue
        if key in fields:
            sub = _unwrap_model(fields[key].annotation)
            if sub is not None:
                problems.extend(unknown_keys(value, sub, where))
    return problems


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _has_path(d: Any, parts: list) -> bool:
    for p in parts:
        if isinstance(d, dict) and p in d:
            d = d[p]
        else:
            return False
    return True


def build_config(raw: dict, source: str = "<config>") -> DistftConfig:
    """Normalise the single-stage shorthand and shared defaults, then validate."""
    raw = copy.deepcopy(raw)
    raw.pop("tune", None)
    problems = []
    for key in raw:
        if key not in TOP_LEVEL_KEYS:
            problems.append(f"{key}: unknown top-level key; {_suggest(str(key), TOP_LEVEL_KEYS)}")
    for key, model in {**SHARED_SECTIONS, **STAGE_SECTIONS}.items():
        problems.extend(unknown_keys(raw.get(key), model, key))

    shorthand = "stages" not in raw
    structural = []  # problems that leave no stages to validate
    if "stage" in raw and "stages" in raw:
        problems.append("stage and stages are both set. Fix: use `stage: sft` for one stage, or a `stages:` list.")
    if shorthand:
        single = {"stage": raw.pop("stage", "sft")}
        single.update({k: raw.pop(k) for k in STAGE_ONLY_KEYS if k in raw})
        cls = STAGE_CLASSES.get(single["stage"]) if isinstance(single["stage"], str) else None
        for key in STAGE_ONLY_KEYS:
            if key in single and cls is not None:
                if key not in cls.model_fields:
                    problems.append(f"{key}: not a setting of stage {single['stage']}; "
                                    f"{_suggest(key, [k for k in cls.model_fields if k != 'stage'])}")
                else:
                    sub = _unwrap_model(cls.model_fields[key].annotation)
                    if sub is not None:
                        problems.extend(unknown_keys(single[key], sub, key))
        stage_dicts = [single]
    else:
        stage_dicts = raw.pop("stages")
        if not isinstance(stage_dicts, list) or not stage_dicts:
            structural.append("stages: must be a non-empty list of stages, e.g. `- stage: sft`.")
            stage_dicts = []
    shared = {k: raw.pop(k) for k in list(STAGE_SECTIONS) if k in raw}
    stages = []
    for i, st in enumerate(stage_dicts):
        if not isinstance(st, dict):
            structural.append(f"stages.{i}: must be a mapping with at least `stage: <{'|'.join(STAGE_KINDS)}>`.")
            continue
        if not shorthand:
            cls = STAGE_CLASSES.get(st.get("stage")) if isinstance(st.get("stage"), str) else None
            problems.extend(unknown_keys(st, cls or StageBase, f"stages.{i}", extra_allowed=("stage",)))
        stages.append(_deep_merge(shared, st))
    if structural:
        raise ConfigError(source, problems + structural)
    raw["stages"] = stages

    # Unknown keys are already reported (with suggestions); validate the rest too, so a
    # user fixes every problem in one pass instead of one per run.
    cfg = None
    try:
        cfg = DistftConfig.model_validate(raw)
    except ValidationError as e:
        described = [_describe(err, stage_dicts, shorthand) for err in e.errors() if err["type"] != "extra_forbidden"]
        problems += [line for text in described for line in text.split("\n")]
        if not problems:  # an unknown key the pre-check missed: still one clear line each
            problems = [_describe(err, stage_dicts, shorthand) for err in e.errors()]
    if problems:
        raise ConfigError(source, problems)
    return cfg


def _describe(err: dict, stage_dicts: list, shorthand: bool) -> str:
    loc = [p for p in err["loc"]]
    # Discriminated unions insert the tag ('sft') into the location; users never wrote it.
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in STAGE_KINDS:
        del loc[2]
    if loc[:1] == ["stages"] and len(loc) >= 2 and isinstance(loc[1], int):
        i, rest = loc[1], loc[2:]
        from_shared = shorthand or not _has_path(stage_dicts[i], rest)
        loc = rest if from_shared else loc
    path = ".".join(str(p) for p in loc)
    kind, msg = err["type"], err["msg"]
    if kind == "value_error":
        msg = msg.removeprefix("Value error, ")
        return msg.replace("stages.0.", "") if shorthand else msg
    if kind == "missing":
        return f"{path}: required field is missing."
    if kind == "union_tag_invalid":
        tag = err.get("ctx", {}).get("tag")
        return f"{path or 'stage'}: unknown stage {tag!r}; available stages: {', '.join(STAGE_KINDS)}."
    if kind == "union_tag_not_found":
        return f"{path}: each stage needs `stage: <{'|'.join(STAGE_KINDS)}>`."
    if kind == "extra_forbidden":
        return f"{path}: unknown key."
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{path}: {msg}{got_text}."


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DistftConfig:
    raw = read_yaml(path)
    apply_overrides(raw, overrides, source=str(path))
    return build_config(raw, source=str(path))


def dump_config(cfg: DistftConfig, path: str | Path) -> None:
    """Write the resolved config; it reloads with `load_config` to the same value."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
