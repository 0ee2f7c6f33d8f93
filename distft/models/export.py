"""`distft export`: a run's model as a standalone Hugging Face directory, optionally with its adapter
merged into the base, in the dtype asked for.

The source (a run's `final/`) is verified against its manifest first. LoRA-family and IA3
adapters merge (`merge_and_unload`); a QLoRA adapter merges into its base loaded in full
precision (the 4-bit base dequantized), the usual way to ship QLoRA results. Prompt and prefix
tuning have nothing to merge into: they export as adapters. The output is written under a
temporary name of its own (`distft.owned.building`: nothing that exists is replaced or deleted) and
renamed into place, with the tokenizer, the generation config, and a
manifest of its own.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from distft.distributed.checkpoint import (CheckpointError, build_manifest, is_disk_error, read_manifest,
                                          verify_checkpoint, write_manifest)
from distft.errors import UserError
from distft.models.loading import final_model_dir
from distft.models.methods import torch_dtype
from distft.owned import MARKER, WRITE_ERRNOS, building, publish, unmark, write_error

UNMERGEABLE = ("PROMPT_TUNING", "PREFIX_TUNING", "P_TUNING")


class ExportError(UserError, ValueError):
    """The model cannot be exported as asked; the message says why and what works instead."""


def _adapter(src: Path) -> dict | None:
    path = src / "adapter_config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def export_model(path: str | Path, out: str | Path, merge: bool = False, dtype: str = "bfloat16",
                 trust_remote_code: bool = False, log=print) -> Path:
    """Write `path`'s model (a run directory, or a model/adapter directory) to `out`; return `out`."""
    src, out = final_model_dir(Path(path)), Path(out)
    if not (src / "config.json").is_file() and _adapter(src) is None:
        raise ExportError(f"no model at {src}. Fix: pass a run directory (runs/<run>) or its final/ directory.")
    if read_manifest(src) is not None:
        problems = verify_checkpoint(src)
        if problems:
            raise CheckpointError(f"{src} does not match its manifest, so it is not exported:\n  - "
                                  + "\n  - ".join(problems) + "\nFix: re-export from an intact run, or resume the "
                                  "run from a checkpoint that verifies.")
    else:  # a model directory without a manifest (and an adapter's local base): its files, cheaply, first
        from distft.models.verify import model_dir_problem

        if problem := model_dir_problem(src):
            raise ExportError(problem)
    if out.exists():
        raise ExportError(f"{out} already exists. Fix: --out <a new directory>, or delete it yourself.")
    adapter = _adapter(src)
    if merge and adapter and adapter.get("peft_type") in UNMERGEABLE:
        raise ExportError(f"{src} is a {adapter['peft_type'].lower()} adapter: its virtual tokens are an input, "
                          "not a weight change, so there is nothing to merge. Fix: export without --merge (the "
                          "adapter loads with peft on its base).")
    # Built under a fresh name of its own (an existing `<out>.partial`, or anything else, is never touched),
    # removed again if the export fails, and renamed into place once complete.
    try:
        _write_export(src, out, adapter, merge, dtype, trust_remote_code)
    except OSError as e:  # a full disk, a file-size limit, a read-only place: the partial export is gone
        if e.errno not in WRITE_ERRNOS:
            raise
        raise write_error(out, e, "--out") from None
    except Exception as e:
        if not is_disk_error(e):
            raise
        cause = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ExportError(f"--out: writing {out} failed ({cause}); nothing was left there. Fix: free disk space, "
                          "or raise the quota or file-size limit (ulimit -f), or choose --out on another disk.") from None
    what = ("adapter (unmerged)" if adapter and not merge else f"{'merged ' if adapter else ''}model in {dtype}")
    log(f"exported {what}: {out}")
    return out


def _write_export(src: Path, out: Path, adapter: dict | None, merge: bool, dtype: str, trust_remote_code: bool):
    with building(out, "export", "--out") as tmp:
        if adapter and not merge:
            shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("distft_manifest.json", MARKER),
                            dirs_exist_ok=True)
        else:
            model = _load_merged(src, adapter, trust_remote_code)
            model = model.to(torch_dtype(dtype))
            model.save_pretrained(str(tmp), safe_serialization=True)
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(src), trust_remote_code=trust_remote_code).save_pretrained(str(tmp))
        (tmp / "distft_export.json").write_text(json.dumps(
            {"source": str(src), "merged": bool(adapter and merge), "dtype": None if adapter and not merge else dtype,
             "peft_type": adapter.get("peft_type") if adapter else None}, indent=2))
        unmark(tmp)  # the manifest covers the export's own files only
        write_manifest(tmp, build_manifest(tmp, step=(read_manifest(src) or {}).get("step", 0), world_size=1,
                                           strategy="export"))
        try:
            publish(tmp, out)
        except OSError:
            if out.exists():  # made meanwhile by someone else: theirs stays, ours goes
                raise ExportError(f"{out} appeared while exporting; it was left as it is. Fix: --out <a new "
                                  "directory>.") from None
            raise


def _load_merged(src: Path, adapter: dict | None, trust_remote_code: bool):
    """The full model in float32: the checkpoint itself, or its base with the adapter merged in."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    if adapter is None:
        config = AutoConfig.from_pretrained(str(src), trust_remote_code=trust_remote_code)
        seq_cls = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
        cls = AutoModelForSequenceClassification if seq_cls else AutoModelForCausalLM
        return cls.from_pretrained(str(src), dtype=torch.float32, trust_remote_code=trust_remote_code,
                                   use_safetensors=True)
    if adapter.get("task_type") == "SEQ_CLS" and (src / "distft_labels.json").is_file():  # a classify stage's
        from peft import PeftModel

        labels = json.loads((src / "distft_labels.json").read_text())["labels"]
        base = AutoModelForSequenceClassification.from_pretrained(
            adapter["base_model_name_or_path"], num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={name: i for i, name in enumerate(labels)}, ignore_mismatched_sizes=True, dtype=torch.float32,
            use_safetensors=True, trust_remote_code=trust_remote_code)
        return PeftModel.from_pretrained(base, str(src)).merge_and_unload()
    if adapter.get("task_type") == "SEQ_CLS":  # a reward model's adapter carries its one-score head
        from distft.models.loading import load_reward_for_inference

        return load_reward_for_inference(src, trust_remote_code)[0]
    from peft import AutoPeftModelForCausalLM

    # No quantization config: a QLoRA adapter's base loads in full precision, and merges into that.
    model = AutoPeftModelForCausalLM.from_pretrained(str(src), dtype=torch.float32, use_safetensors=True,
                                                     trust_remote_code=trust_remote_code)
    return model.merge_and_unload()
