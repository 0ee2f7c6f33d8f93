"""Cheap checks that a model directory will load, run where a failure is still one clear line.

The workers load a model with `from_pretrained`; when its files are damaged they fail minutes
later, after Ray has started, with a traceback. These checks read only what is cheap to read:
config.json, the JSON headers of the safetensors files (compared with the files' sizes), the
tokenizer, and whether the architecture has the configured attention implementation. Each
problem is one message naming the file and the fix; callers add the config field it came from.
"""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

from distft.errors import UserError

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# A JSON header larger than this is not a safetensors header (the format caps it at 100 MB).
MAX_HEADER = 100_000_000
DAMAGED_FIX = ("Fix: download or export the model again (an interrupted copy or a full disk cuts files short), "
               "or point at a complete model directory.")


class ModelFilesError(UserError):
    """A model directory that cannot load (a missing, truncated or unreadable file); the message says which."""


def _read_json(path: Path) -> tuple[object, str | None]:
    """(parsed JSON, None) or (None, the one-line problem)."""
    try:
        return json.loads(path.read_bytes()), None
    except OSError as e:
        return None, f"cannot read {path}: {e.strerror or e}. Fix: check the file's permissions and the disk."
    except (UnicodeDecodeError, ValueError) as e:
        where = f" (line {e.lineno})" if isinstance(e, json.JSONDecodeError) else ""
        return None, f"{path} is not valid JSON{where}. {DAMAGED_FIX}"


def safetensors_problem(path: Path) -> str | None:
    """A truncated or damaged safetensors file, found from its header alone: the 8-byte header length,
    the JSON header, and the end of the last tensor's data against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            if len(head) < 8 or 8 + n > size:
                return f"{path} is truncated ({size} bytes; its header is cut off). {DAMAGED_FIX}"
            if n > MAX_HEADER:
                return f"{path} is not a safetensors file (its header length is {n} bytes). {DAMAGED_FIX}"
            header = json.loads(f.read(n))
    except OSError as e:
        return f"cannot read {path}: {e.strerror or e}. Fix: check the file's permissions and the disk."
    except (UnicodeDecodeError, ValueError):
        return f"{path} is damaged (its safetensors header is not valid JSON). {DAMAGED_FIX}"
    try:
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return f"{path} is damaged (its safetensors header has no valid data_offsets). {DAMAGED_FIX}"
    expected = 8 + n + end
    if size < expected:
        return f"{path} is truncated ({size} bytes, header says {expected}). {DAMAGED_FIX}"
    if size > expected:  # safetensors refuses trailing bytes too
        return f"{path} is damaged ({size} bytes, header says {expected}). {DAMAGED_FIX}"
    return None


def weight_files(path: Path) -> tuple[list[Path], str | None]:
    """The safetensors files `from_pretrained` reads from this directory, or the problem when there are none
    (or a shard its index lists is missing)."""
    index = path / SAFE_INDEX
    if index.is_file():
        data, problem = _read_json(index)
        if problem:
            return [], problem
        shards = sorted(set((data or {}).get("weight_map", {}).values())) if isinstance(data, dict) else []
        if not shards:
            return [], f"{index} lists no weight files (no weight_map). {DAMAGED_FIX}"
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            return [], (f"{path / missing[0]} is missing ({len(missing)} of the {len(shards)} shards {SAFE_INDEX} "
                        f"lists are). {DAMAGED_FIX}")
        return [path / s for s in shards], None
    if (path / SAFE_WEIGHTS).is_file():
        return [path / SAFE_WEIGHTS], None
    if any((path / p).is_file() for p in PICKLE_WEIGHTS):
        # Not read here (reading them runs their code); whether they may load is model.allow_pickle_weights'
        # business, which preflight and from_pretrained(use_safetensors=True) enforce with their own message.
        return [], None
    others = sorted(p.name for p in path.glob("*.safetensors"))
    found = f" (it has {others[0]}, which from_pretrained does not read)" if others else ""
    return [], (f"{path} has a config.json but no weights: no {SAFE_WEIGHTS} or {SAFE_INDEX}{found}. "
                "Fix: copy the model's weight files into it, or point at a complete model directory.")


def model_dir_problem(path: Path) -> str | None:
    """The first reason this model or adapter directory cannot load: config.json, then the weights."""
    adapter = path / "adapter_config.json"
    if adapter.is_file():
        data, problem = _read_json(adapter)
        if problem:
            return problem
        if not (path / ADAPTER_WEIGHTS).is_file():
            if (path / "adapter_model.bin").is_file():
                return None  # pickle: see weight_files
            return (f"{path} has an adapter_config.json but no {ADAPTER_WEIGHTS}. "
                    "Fix: copy the adapter's weights into it, or point at a complete adapter directory.")
        if problem := safetensors_problem(path / ADAPTER_WEIGHTS):
            return problem
        base = (data or {}).get("base_model_name_or_path") if isinstance(data, dict) else None
        if base and Path(base).is_absolute() and Path(base).is_dir() and Path(base) != path:
            return model_dir_problem(Path(base))  # the adapter loads on top of it
        return None
    config = path / "config.json"
    if not config.is_file():
        return f"{path} has no config.json; it is not a Hugging Face model directory."
    data, problem = _read_json(config)
    if problem:
        return problem
    if not isinstance(data, dict):
        return f"{config} does not hold a JSON object. {DAMAGED_FIX}"
    files, problem = weight_files(path)
    if problem:
        return problem
    for f in files:
        if problem := safetensors_problem(f):
            return problem
    return None


def tokenizer_problem(path: Path | str, revision: str | None = None) -> str | None:
    """Load the tokenizer the way the stages do (AutoTokenizer), and say in one line why it does not."""
    from transformers import AutoTokenizer, PretrainedConfig

    kwargs = {}
    tok_config = Path(path) / "tokenizer_config.json"
    if tok_config.is_file():
        data, problem = _read_json(tok_config)
        if problem:
            return problem
        # AutoTokenizer builds the model's config only to pick a tokenizer class, which importing the
        # architecture makes cost seconds. When tokenizer_config.json names the class, a plain config
        # carrying the model type selects the same one in milliseconds.
        model_config, _ = _read_json(Path(path) / "config.json")
        if isinstance(data, dict) and data.get("tokenizer_class") and not data.get("auto_map"):
            kwargs["config"] = PretrainedConfig(name_or_path=str(path))
            if isinstance(model_config, dict) and isinstance(model_config.get("model_type"), str):
                kwargs["config"].model_type = model_config["model_type"]
    try:
        AutoTokenizer.from_pretrained(str(path), revision=revision, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure to load user files is reported, not raised
        return tokenizer_failure(path, e)
    return None


def tokenizer_failure(path: Path | str, e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return (f"{path}: its tokenizer does not load ({type(e).__name__}: {first}). Fix: copy the model's "
            "tokenizer files (tokenizer.json, tokenizer_config.json, ...) into it, or point at a complete "
            "model directory.")


def _modeling_file(model_type: str) -> Path | None:
    """transformers' modeling_<type>.py for a model type, found on disk without importing transformers."""
    spec = importlib.util.find_spec("transformers")  # the top-level package only: nothing is imported
    if not spec or not spec.origin:
        return None
    models = Path(spec.origin).parent / "models"
    module = model_type.replace("-", "_")
    if not (models / module).is_dir():  # a few types live under another name (e.g. openai-gpt -> openai)
        from transformers.models.auto.configuration_auto import model_type_to_module_name

        module = model_type_to_module_name(model_type)
    found = models / module / f"modeling_{module}.py"
    return found if found.is_file() else None


def _declares(model_type: str, attr: str, arch: str | None = None) -> bool:
    """Whether the architecture's class (`arch`, else its causal LM) sets `attr = True`, itself or through a
    base class in the same file: read from the modeling file's syntax tree, without importing it (importing
    transformers and a modeling module costs seconds; this is milliseconds). False means "not known"."""
    path = _modeling_file(model_type)
    try:
        tree = ast.parse(path.read_text(encoding="utf-8")) if path else None
    except (OSError, SyntaxError, ValueError):
        return False
    classes = {c.name: c for c in (tree.body if tree else []) if isinstance(c, ast.ClassDef)}

    def value(name: str, seen: set) -> bool | None:
        c = classes.get(name)
        if c is None or name in seen:
            return None
        seen.add(name)
        for stmt in c.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else [stmt.target] if isinstance(
                stmt, ast.AnnAssign) else []
            if any(isinstance(t, ast.Name) and t.id == attr for t in targets):
                return stmt.value.value if isinstance(stmt.value, ast.Constant) else None
        for base in c.bases:
            if isinstance(base, ast.Name) and (found := value(base.id, seen)) is not None:
                return found
        return None

    name = arch if arch in classes else next((n for n in classes if n.endswith("ForCausalLM")), None)
    return bool(name) and value(name, set()) is True


def _model_class(model_type: str):
    """The class the stages would build for this model type (a causal LM, else a classifier or the base)."""
    import transformers
    from transformers.models.auto import modeling_auto as auto

    for names in (auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
                  auto.MODEL_MAPPING_NAMES):
        name = names.get(model_type)
        if isinstance(name, (tuple, list)):
            name = name[0]
        if name:
            try:
                return getattr(transformers, name)
            except (AttributeError, ImportError):
                return None
    return None


def supports(model_type: str, attr: str, arch: str | None = None) -> tuple[bool | None, str]:
    """(does the architecture set `attr` (e.g. `_supports_sdpa`), its class name); None when unknown."""
    if _declares(model_type, attr, arch):
        return True, model_type
    cls = _model_class(model_type)  # the exact answer, only on the rare path: it imports the modeling code
    if cls is None:
        return None, model_type
    value = getattr(cls, attr, None)
    if attr == "_supports_flash_attn" and not value:
        value = getattr(cls, "_supports_flash_attn_2", value)
    return (value if isinstance(value, bool) else None), cls.__name__


def attention_problem(config: dict, attn: str | None, use_gpu: bool, trust_remote_code: bool = False) -> str | None:
    """`model.attn_implementation` against what the architecture (and the device) can run, naming the
    setting that works. Models with remote code are left to the workers (their code is not run here)."""
    if not attn or attn == "eager":
        return None
    if attn.startswith("flash_attention") and not use_gpu:
        return (f"model.attn_implementation={attn} runs only on GPUs, and this run's workers use CPUs. "
                "Fix: model.attn_implementation=sdpa (or scaling.use_gpu=true on a GPU cluster).")
    model_type = config.get("model_type")
    if not isinstance(model_type, str) or (trust_remote_code and config.get("auto_map")):
        return None
    attr = "_supports_sdpa" if attn == "sdpa" else "_supports_flash_attn"
    archs = config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None
    ok, name = supports(model_type, attr, arch)
    if ok is not False:
        return None
    works = "eager"
    if attn != "sdpa" and supports(model_type, "_supports_sdpa", arch)[0]:
        works = "sdpa"
    from importlib.metadata import version

    return (f"model.attn_implementation={attn}: {name} (model type {model_type}) does not support it in "
            f"transformers {version('transformers')}. Fix: model.attn_implementation={works}.")


def check_inference_source(source: str) -> None:
    """Refuse a damaged model or adapter directory, or a hub id that cannot be fetched, before generate,
    eval or export load it (ModelFilesError)."""
    path = Path(source)
    if path.is_dir():
        problem = model_dir_problem(path)
    else:
        from distft.models.hub import hub_model_problem

        problem = hub_model_problem(source)
    if problem:
        raise ModelFilesError(problem)
