"""Publishing an exported model to the Hugging Face Hub (`distft export RUN --push-to-hub`, run.push_to_hub):
a model card made from the run's record, and one commit through huggingface_hub.

The token comes from HF_TOKEN only, never from huggingface_hub's stored login: a push must be an explicit
act of the environment it runs in, and the token never reaches a file or a log. The local export is
only read: a failed push leaves it as it was, and says why (no token, no network, the endpoint refused).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import yaml

from distft.errors import UserError


class PushError(UserError):
    """A push to the Hub that did not happen; the message says why and what is intact."""


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _percent(value) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) else "-"


def model_card(repo_id: str, run_dir: Path | None, model_dir: Path) -> str:
    """The README.md of a pushed model: base, method, data, metrics and provenance, from the run's
    config.yaml, summary.json (per stage) and provenance.json. A bare model directory gets what it has."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text()) if run_dir and (run_dir / "config.yaml").is_file() \
        else {}
    summaries = _read_json(run_dir / "summary.json") if run_dir else None
    provenance = (_read_json(run_dir / "provenance.json") if run_dir else None) or {}
    adapter = _read_json(model_dir / "adapter_config.json")
    base = (config.get("model") or {}).get("name_or_path") or (adapter or {}).get("base_model_name_or_path")
    stages = config.get("stages") or []
    summaries = summaries if isinstance(summaries, list) else []
    methods = sorted({(st.get("method") or {}).get("name", "full") for st in stages}) or ["full"]
    kinds = [st.get("stage", "?") for st in stages]
    meta: dict = {"library_name": "peft" if adapter else "transformers",
                  "tags": ["distft", *dict.fromkeys(kinds), *methods]}
    if base and "://" not in base and not base.startswith(("/", ".")):  # a Hub id, not a local path
        meta["base_model"] = base
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {repo_id.split('/')[-1]}", ""]
    what = "a LoRA-family adapter" if adapter and adapter.get("peft_type") == "LORA" else (
        f"a {adapter['peft_type'].lower()} adapter" if adapter else "a full model")
    lines.append(f"{what[0].upper()}{what[1:]} fine-tuned"
                 + (f" from `{base}`" if base else "")
                 + (f" with [distft](https://github.com/distft/distft) ({' -> '.join(kinds)})." if kinds else
                    " with distft."))
    if stages:
        lines += ["", "## Training", "", "| stage | kind | method | strategy | steps | workers | data |",
                  "|---|---|---|---|---|---|---|"]
        by_label = {s.get("stage"): s for s in summaries if isinstance(s, dict)}
        for i, st in enumerate(stages):
            label = st.get("name") or st.get("stage")
            s = by_label.get(label) or (summaries[i] if i < len(summaries) and isinstance(summaries[i], dict) else {})
            data = (st.get("data") or {}).get("train") or (st.get("data") or {}).get("dataset") or "-"
            lines.append(f"| {label} | {st.get('stage', '-')} | {(st.get('method') or {}).get('name', 'full')} | "
                         f"{s.get('strategy', '-')} | {s.get('steps', '-')} | {s.get('world_size', '-')} | "
                         f"`{Path(str(data)).name}` |")
        rows = []
        for s in summaries:
            if not isinstance(s, dict):
                continue
            if s.get("exact_match_after") is not None:
                rows.append(f"| {s['stage']} | held-out exact match | {_percent(s.get('exact_match_before'))} | "
                            f"{_percent(s['exact_match_after'])} |")
            if isinstance(s.get("eval_loss"), (int, float)):
                rows.append(f"| {s['stage']} | eval loss | - | {s['eval_loss']:.4g} |")
            for r in s.get("retain") or []:
                if isinstance(r, dict) and r.get("after") is not None:
                    rows.append(f"| {s['stage']} | retain {r.get('name')} {r.get('kind')} | {r.get('before', '-')} | "
                                f"{r['after']} |")
        if rows:
            lines += ["", "## Results", "", "| stage | metric | before | after |", "|---|---|---|---|", *rows]
    versions = provenance.get("versions") or {}
    git = provenance.get("git") or {}
    if provenance:
        lines += ["", "## Provenance", ""]
        lines.append(f"- distft {provenance.get('distft', '?')}"
                     + (f", commit `{git['sha'][:12]}`{' (with local changes)' if git.get('dirty') else ''}"
                        if git.get("sha") else ""))
        if versions:
            lines.append("- " + ", ".join(f"{k} {v}" for k, v in versions.items() if v))
        if provenance.get("started_at"):
            lines.append(f"- trained {provenance['started_at'][:10]}")
    return "\n".join(lines) + "\n"


# Written by distft beside a model, and naming paths on this machine (the export's source, the run's data and
# output directories): the model card says what they would, without the paths. The manifest (hashes) goes up.
LOCAL_ONLY = ("distft_export.json", "distft_config.yaml")


def files_to_push(model_dir: Path) -> list[Path]:
    """The export's files that go to the Hub: all but hidden files, the card's place and LOCAL_ONLY."""
    return sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and not p.name.startswith(".")
                  and p.name not in LOCAL_ONLY and p.relative_to(model_dir).as_posix() != "README.md")


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_token(repo_id: str, after: str = "") -> str:
    """HF_TOKEN's value, or PushError naming the fix (`after`: what stays as it is, for the message)."""
    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PushError(f"push to {repo_id}: no token (HF_TOKEN is not set). Fix: export HF_TOKEN=<a write token "
                        f"from huggingface.co/settings/tokens>, then distft export ... --push-to-hub {repo_id}."
                        + (f" {after}" if after else ""))
    return token


def push_model(model_dir: Path, repo_id: str, private: bool = False, run_dir: Path | None = None,
               log=print) -> str:
    """Upload `model_dir` and its model card to `repo_id` in one commit; returns the repository's URL."""
    intact = f"The local export is intact: {model_dir}."
    token = hub_token(repo_id, intact)
    from huggingface_hub import CommitOperationAdd, HfApi, constants
    from huggingface_hub.errors import HfHubHTTPError

    if constants.HF_HUB_OFFLINE:
        raise PushError(f"push to {repo_id}: HF_HUB_OFFLINE is set, which forbids any request to the Hub. Fix: run "
                        f"the push with HF_HUB_OFFLINE=0. {intact}")

    card = model_card(repo_id, run_dir, model_dir).encode()
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(model_dir).as_posix(), path_or_fileobj=str(p))
                  for p in files_to_push(model_dir)]
    operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card))
    api = HfApi(token=token)
    try:
        url = api.create_repo(repo_id, private=private, exist_ok=True)
        api.create_commit(repo_id, operations=operations, commit_message="Upload model trained with distft")
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        why = {401: "the token was not accepted", 403: "the token may not write there",
               404: "no such organization or repository"}.get(status, "")
        said = " ".join((getattr(e, "server_message", None) or str(e)).split())[:200]
        raise PushError(f"push to {repo_id}: {_endpoint()} refused it (HTTP {status}{': ' + why if why else ''}; "
                        f"the server said: {said}). Fix: check that HF_TOKEN may write to {repo_id.split('/')[0]}, and "
                        f"the name. {intact}") from None
    except (OSError, ConnectionError) as e:
        raise PushError(f"push to {repo_id}: cannot reach {_endpoint()} ({' '.join(str(e).split())[:200]}). "
                        f"Fix: check the network (and HF_ENDPOINT), then retry. {intact}") from None
    except Exception as e:  # the HTTP client's transport errors (httpx, vendored as httpx2 in hub 2.x) are not OSErrors
        if type(e).__module__.split(".")[0].rstrip("0123456789") not in ("httpx", "httpcore", "requests", "urllib3"):
            raise
        raise PushError(f"push to {repo_id}: cannot reach {_endpoint()} ({type(e).__name__}: "
                        f"{' '.join(str(e).split())[:200]}). Fix: check the network (and HF_ENDPOINT), then retry. "
                        f"{intact}") from None
    log(f"pushed {model_dir} to {url} ({len(operations)} files, model card included)")
    return str(url)
