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
    STAGE_CLASSES,
    STAGE_KINDS,
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
# Keys of one stage only (never shared defaults); the single-stage shorthand takes them at top level.
STAGE_ONLY_KEYS = ("name", "init_from", *dict.fromkeys(k for cls in STAGE_CLASSES.values() for k in cls.own_sections))
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


def _yaml_text(path: Path) -> str:
    """The file as text, or one line naming the line of the first byte that is not UTF-8."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(str(path), [f"cannot read {path}: {e.strerror}. Fix: check its permissions "
                                      "and that it is a regular file."]) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ConfigError(str(path), [
            f"line {line}, column {column}: byte 0x{data[e.start]:02x} is not UTF-8 text. Fix: save the file "
            f"as UTF-8 (e.g. `iconv -f latin1 -t utf-8 {path} > fixed.yaml`), or remove that character."]) from None


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _duplicate_keys(node: yaml.Node, path: str = "", seen_nodes: set | None = None) -> list[str]:
    """Keys set twice in one mapping, with both lines. PyYAML keeps the last silently, so a second
    `train:` section would drop everything the first one set."""
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:  # an alias: the anchored node was checked where it was defined
        return []
    seen_nodes.add(id(node))
    problems = []
    if isinstance(node, yaml.MappingNode):
        first: dict[tuple[str, str], yaml.Node] = {}
        for key, value in node.value:
            if key.tag == _MERGE_TAG:  # `<<: *defaults`: overriding merged keys is what merges are for
                problems += _duplicate_keys(value, path, seen_nodes)
                continue
            name = key.value if isinstance(key, yaml.ScalarNode) else "<complex key>"
            where = f"{path}.{name}" if path else str(name)
            ident = (key.tag, name)
            if isinstance(key, yaml.ScalarNode) and ident in first:
                problems.append(f"{where}: set twice, at line {first[ident].start_mark.line + 1} and line "
                                f"{key.start_mark.line + 1}; YAML would keep only the second. Fix: keep one "
                                f"`{name}:`, merging what both set.")
            else:
                first[ident] = key
            problems += _duplicate_keys(value, where, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            problems += _duplicate_keys(item, f"{path}.{i}" if path else str(i), seen_nodes)
    return problems


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), [f"config file not found: {path}. Fix: check the path (try `ls configs/`)."])
    text, loader = _yaml_text(path), None
    try:
        loader = yaml.SafeLoader(text)  # its reader already refuses control characters (ReaderError)
        node = loader.get_single_node()
        duplicates = _duplicate_keys(node) if node is not None else []
        if duplicates:
            raise ConfigError(str(path), duplicates)
        raw = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        fix = "check indentation and quoting."
        if isinstance(e, yaml.reader.ReaderError):  # a control character: its position is in characters
            where = f" at line {text.count(chr(10), 0, e.position) + 1}"
            problem, fix = f"character #x{e.character:04x} is a control character", "remove that character."
        raise ConfigError(str(path), [f"malformed YAML{where}: {problem}. Fix: {fix}"]) from None
    finally:
        if loader is not None:
            loader.dispose()
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


# Names users bring from other tools (HF TrainingArguments, peft, Axolotl, LLaMA-Factory) that
# spelling distance misses. A tuple when the other tool's name covers more than one of ours.
ALIASES: dict[str, str | tuple[str, ...]] = {
    "rank": "r",
    "lora_r": "r",
    "lora_rank": "r",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "lora_target_modules": "target_modules",
    "learning_rate": "lr",
    "num_epochs": "epochs",
    "num_train_epochs": "epochs",
    "batch_size": ("micro_batch_size", "global_batch_size"),
    "train_batch_size": ("micro_batch_size", "global_batch_size"),
    "per_device_train_batch_size": "micro_batch_size",
    "total_batch_size": "global_batch_size",
    "effective_batch_size": "global_batch_size",
    "gradient_accumulation_steps": "global_batch_size",
    "warmup_steps": "warmup_ratio",
    "num_steps": "max_steps",
    "total_steps": "max_steps",
    "eval_steps": "eval_every",
    "save_steps": "save_every",
    "logging_steps": "log_every",
    "max_norm": "max_grad_norm",
    "grad_clip": "max_grad_norm",
    "clip_grad_norm": "max_grad_norm",
    "lr_scheduler_type": "scheduler",
    "lr_scheduler": "scheduler",
    "optim": "optimizer",
    "random_seed": "seed",
    "save_total_limit": "keep_checkpoints",
    "model_name_or_path": "name_or_path",
    "model_name": "name_or_path",
    "base_model": "name_or_path",
    "torch_dtype": "dtype",
    "sequence_len": "max_seq_len",
    "max_length": "max_seq_len",
    "max_seq_length": "max_seq_len",
    "cutoff_len": "max_seq_len",
    "context_length": "max_seq_len",
    "workers": "num_workers",
    "mixed_precision": "precision",
    "dataset": "train",
    "train_file": "train",
    "eval_file": "eval",
    "validation_file": "eval",
    "val_set_size": "eval_fraction",
    "test_size": "eval_fraction",
    "output": "output_dir",
    "run_name": "name",
}


def _similarity(a: str, b: str) -> float:
    """Spelling closeness of two snake_case names: of the whole names, or word by word, so a
    misspelt word (`learnig_rate`) matches the name it misspells rather than one sharing letters."""
    whole = difflib.SequenceMatcher(None, a, b).ratio()
    wa, wb = [w for w in a.split("_") if w], [w for w in b.split("_") if w]
    if not wa or not wb:
        return whole
    best = [max(difflib.SequenceMatcher(None, w, v).ratio() for v in wb) for w in wa]
    words = sum(r for r in best if r >= 0.75) / max(len(wa), len(wb))
    return max(whole, words)


def _suggest(key: str, valid: list[str]) -> str:
    """`did you mean X?` from the valid keys and the other tools' names for them; else the valid keys."""
    candidates: dict[str, tuple[str, ...]] = {v: (v,) for v in valid}
    for alias, targets in ALIASES.items():
        targets = tuple(t for t in ((targets,) if isinstance(targets, str) else targets) if t in valid)
        if targets and alias not in candidates:
            candidates[alias] = targets
    # On a tie the alias wins: a name from another tool says what the user meant more surely than letters.
    scored = sorted(((_similarity(key.lower(), name), name not in valid, name) for name in candidates), reverse=True)
    score, _, name = scored[0] if scored else (0.0, False, "")
    if score >= 0.6:
        return "did you mean " + " or ".join(f"`{t}`" for t in candidates[name]) + "?"
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


def deep_merge(base: dict, over: dict) -> dict:
    """`over` laid on a copy of `base`, mapping by mapping (a nested dict merges, anything else replaces)."""
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = deep_merge(out[k], v)
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
        stages.append(deep_merge(shared, st))
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
    if kind == "finite_number":
        return f"{path}: {err.get('input')} is not a finite number. Fix: set a finite value."
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, (dict, list)) else ""
    return f"{path}: {msg}{got_text}."


def override_paths(raw: dict, overrides: list[str] | tuple[str, ...]) -> set[str]:
    """The dotted paths whose whole value comes from the command line: each override's key, or the
    part of it the file did not have (`trian` for `trian.lr=1`). Call before applying them."""
    paths = set()
    for item in overrides:
        try:
            parts, _ = parse_override(item)
        except ValueError:
            continue  # apply_overrides reports it
        depth = next((d for d in range(1, len(parts)) if not _exists(raw, parts[:d])), len(parts))
        paths.add(".".join(parts[:depth]))
    return paths


def _exists(node: Any, parts: list[str]) -> bool:
    for p in parts:
        if isinstance(node, dict) and p in node:
            node = node[p]
        elif isinstance(node, list) and p.isdigit() and int(p) < len(node):
            node = node[int(p)]
        else:
            return False
    return True


def mark_overrides(problems: list[str], paths: set[str]) -> list[str]:
    """`override train.lr: ...` for a problem in a value from the command line: the error's header
    names the config file, which never held that value."""
    def from_cli(problem: str) -> bool:
        where = problem.split(":", 1)[0]
        return any(where == p or where.startswith(p + ".") for p in paths)

    return [f"override {p}" if from_cli(p) else p for p in problems]


def load_config(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> DistftConfig:
    raw = read_yaml(path)
    from_cli = override_paths(raw, overrides)
    apply_overrides(raw, overrides, source=str(path))
    try:
        return build_config(raw, source=str(path))
    except ConfigError as e:
        raise ConfigError(e.source, mark_overrides(e.problems, from_cli)) from None


def dump_config(cfg: DistftConfig, path: str | Path) -> None:
    """Write the resolved config; it reloads with `load_config` to the same value."""
    Path(path).write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
