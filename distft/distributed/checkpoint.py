"""Checkpoints that are complete or absent, and verifiable before a resume trusts them.

transformers 5's `Trainer._save_checkpoint` writes straight into `checkpoints/checkpoint-N`:
no temporary name and no rename, so a crash mid-save leaves a directory that looks like
any other, and its rotation (`save_total_limit`) keeps "the newest" by mtime whether or not
that one is complete. distft keeps the Trainer's save logic as it is and moves where it writes:

1. the Trainer's `output_dir` is a staging folder, `checkpoints/.partial/` (`staging_dir`);
2. once every rank has written its files, rank 0 hashes each file and writes
   `distft_manifest.json` (path, size and sha256 of every file, plus step, world size,
   strategy label and distft version) last, atomically (temporary name, fsync, os.replace);
3. then renames `.partial/checkpoint-N` to `checkpoints/checkpoint-N`, one atomic rename
   on the same filesystem (`seal`).

So a `checkpoint-N` directory exists only once it is complete, and `verify_checkpoint`
re-checks it later. The manifest detects truncation, corruption and files changed or added
after the save; it is not a signature, so whoever can write the directory can rewrite it too.

Resume verifies first (`check_resume`) and refuses a damaged checkpoint with the files at
fault and the latest earlier checkpoint that verifies. It also refuses a world-size change
for strategies whose optimizer state is one shard per rank (DeepSpeed ZeRO); `reshardable`
is the hook for strategies whose checkpoints load on any world size.

No Ray imports, and torch only inside the two collective helpers at the bottom.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from distft.errors import UserError
from distft.distributed.collectives import broadcast_from_rank0

MANIFEST = "distft_manifest.json"
STAGING = ".partial"
FORMAT_VERSION = 1
# Checkpoints up to this size are hashed on the training thread (sha256 runs at roughly
# 0.5-2 GB/s per core, so about a second); larger ones on a background thread.
SYNC_HASH_ENV = "DISTFT_SYNC_HASH_MAX_BYTES"
DEFAULT_SYNC_HASH_MAX_BYTES = 1 << 30
_CHECKPOINT_NAME = re.compile(r"^checkpoint-(\d+)$")
_REPLACED_NAME = re.compile(r"^replaced-checkpoint-\d+-\d+$")  # seal()'s set-aside copy of a redone step
_CHUNK = 8 << 20


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be used (damaged, incomplete or incompatible); the message names the file and the fix."""


def reshardable(strategy_label: str) -> bool:
    """Whether a checkpoint written under this strategy loads on another world size.

    DDP: the HF checkpoint holds one full optimizer state, and the global batch is fixed
    (accumulation is derived), so any world size continues the same run. FSDP (torch
    distributed checkpoint) reshards on load. DeepSpeed ZeRO keeps one optimizer shard per
    rank; universal checkpoints could convert them, but distft does not do that (yet).
    """
    return strategy_label == "ddp" or strategy_label.startswith("fsdp")


def staging_dir(checkpoints_dir: str | Path) -> Path:
    """Where the Trainer writes (its `output_dir`): checkpoints appear beside it only once sealed."""
    return Path(checkpoints_dir) / STAGING


def checkpoint_step(path: str | Path) -> int | None:
    m = _CHECKPOINT_NAME.match(Path(path).name)
    return int(m.group(1)) if m else None


def _files(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            rel = (Path(dirpath) / name).relative_to(root).as_posix()
            if rel not in (MANIFEST, MANIFEST + ".tmp"):
                out.append(rel)
    return out


def _sha256(path: Path, fsync: bool = False) -> str:
    h = hashlib.sha256()  # hashlib releases the GIL on large buffers: a background hash runs beside training
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
        if fsync:  # the data must be on disk before a rename publishes it
            os.fsync(f.fileno())
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dir_bytes(path: str | Path) -> int:
    root = Path(path)
    return sum((root / rel).stat().st_size for rel in _files(root)) if root.is_dir() else 0


def build_manifest(ckpt_dir: str | Path, *, step: int, world_size: int, strategy: str, fsync: bool = False) -> dict:
    from distft import __version__

    root = Path(ckpt_dir)
    files = [{"path": rel, "size": (root / rel).stat().st_size, "sha256": _sha256(root / rel, fsync)}
             for rel in _files(root)]
    return {
        "format": FORMAT_VERSION,
        "distft_version": __version__,
        "step": step,
        "world_size": world_size,
        "strategy": strategy,
        "created": round(time.time(), 3),
        "total_bytes": sum(f["size"] for f in files),
        "files": files,
    }


def write_manifest(ckpt_dir: str | Path, manifest: dict) -> Path:
    """Atomically: a reader sees the previous manifest (or none), never half of this one."""
    root = Path(ckpt_dir)
    tmp, final = root / (MANIFEST + ".tmp"), root / MANIFEST
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(root)
    return final


def seal(staged: str | Path, final: str | Path, *, step: int, world_size: int, strategy: str) -> Path:
    """Hash `staged`, write its manifest last, then rename it to `final`. Returns `final`."""
    staged, final = Path(staged), Path(final)
    write_manifest(staged, build_manifest(staged, step=step, world_size=world_size, strategy=strategy, fsync=True))
    old = None
    if final.exists():  # the same step saved again (a restart redid it): the new copy replaces it
        old = staged.parent / f"replaced-{final.name}-{time.time_ns()}"
        os.rename(final, old)
    os.rename(staged, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_manifest(ckpt_dir: str | Path) -> dict | None:
    """The manifest, or None when missing or unreadable (`verify_checkpoint` says which)."""
    try:
        m = json.loads((Path(ckpt_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return m if isinstance(m, dict) and isinstance(m.get("files"), list) else None


def verify_checkpoint(ckpt_dir: str | Path) -> list[str]:
    """Problems with a checkpoint directory, one line each, naming the file; [] when it verifies."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return [f"{root}: not a directory"]
    path = root / MANIFEST
    if not path.exists():
        return [f"{MANIFEST} is missing: the save never completed (interrupted mid-write), "
                "or the directory was not written by distft"]
    manifest = read_manifest(root)
    if manifest is None:
        return [f"{MANIFEST} is unreadable or not a distft manifest"]
    problems, listed = [], set()
    for entry in manifest["files"]:
        rel, size, digest = entry.get("path", ""), entry.get("size"), entry.get("sha256")
        listed.add(rel)
        if not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
            problems.append(f"{rel!r}: not a path inside the checkpoint (manifest entry refused)")
            continue
        f = root / rel
        if not f.is_file():
            problems.append(f"{rel}: missing (the manifest lists {size} bytes)")
            continue
        actual = f.stat().st_size
        if actual != size:
            how = "truncated" if actual < size else "grew"
            problems.append(f"{rel}: {actual} bytes, the manifest says {size} ({how} after the save)")
        elif _sha256(f) != digest:
            problems.append(f"{rel}: contents differ from the manifest (sha256 mismatch: corrupted or modified)")
    for rel in _files(root):
        if rel not in listed:
            problems.append(f"{rel}: not in the manifest (added after the checkpoint was completed)")
    return problems


def upload_snapshot(ckpt_dir: str | Path) -> Path | None:
    """A hard-linked copy of a sealed checkpoint, for Ray to upload in the background and then delete.

    Ray's asynchronous upload reads the directory while training goes on, and our rotation may
    delete the original meanwhile (keep_checkpoints). Hard links cost no copy and keep the files
    alive for the upload; sealed checkpoints are never modified, so they stay what the manifest
    says. None when links are impossible (another filesystem): then the caller uploads synchronously.
    """
    import uuid

    ckpt_dir = Path(ckpt_dir)
    target = ckpt_dir.parent / ".uploading" / f"{ckpt_dir.name}-{uuid.uuid4().hex[:8]}"
    try:
        shutil.copytree(ckpt_dir, target, copy_function=os.link)
    except OSError:
        shutil.rmtree(target, ignore_errors=True)
        return None
    return target


def same_filesystem(a: str | Path, b: str | Path) -> bool:
    """Whether `a` and `b` (or, for a path not created yet, its nearest existing parent) are on one filesystem."""
    def device(p: Path) -> int | None:
        for q in (p, *p.parents):
            try:
                return os.stat(q).st_dev
            except OSError:
                continue
        return None

    da, db = device(Path(a).absolute()), device(Path(b).absolute())
    return da is not None and da == db


def link_copy(ckpt_dir: str | Path, target: str | Path) -> bool:
    """Give a sealed checkpoint a second name: `target`, a new directory whose files are hard links to its files.

    The data is stored once, and either name can go (Ray's rotation deleting its copy, ours deleting
    `checkpoint-N`) without touching the other: an unlink removes one name, the data stays while another
    exists. A symlinked directory would not do: deleting "the copy" through it (rmtree, pyarrow's
    delete_dir) would empty the checkpoint itself. Sealed checkpoints are never modified in place, so
    the two names always hold what the manifest says.

    False where links are impossible (another filesystem, one without hard links), leaving nothing at
    `target`; also False, touching nothing, when `target` already exists (not ours).
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.mkdir(target)
    except OSError:
        return False
    try:
        shutil.copytree(ckpt_dir, target, copy_function=os.link, dirs_exist_ok=True)
    except (OSError, shutil.Error):
        shutil.rmtree(target, ignore_errors=True)  # created just above: ours to remove
        return False
    return True


def complete_checkpoints(parent: str | Path) -> list[Path]:
    """Directories directly under `parent` that carry a manifest, oldest step first (not hashed)."""
    found = []
    parent = Path(parent)
    if not parent.is_dir():
        return []
    for d in parent.iterdir():
        if d.is_dir() and not d.name.startswith(".") and (m := read_manifest(d)) is not None:
            found.append((int(m.get("step", -1)), d.name, d))
    return [d for _, _, d in sorted(found)]


# What full disks, quotas, file-size limits, read-only and failing disks raise as, by library:
# Python's OSError errno, safetensors' Rust "os error N", torch.save's zip writer (no errno at all).
_DISK_ERRNOS = {5, 27, 28, 30, 122}  # EIO, EFBIG, ENOSPC, EROFS, EDQUOT
_DISK_TEXT = re.compile(r"os error (5|27|28|30|122)\b|PytorchStreamWriter failed|inline_container\.cc")


def is_disk_error(error: BaseException) -> bool:
    while error is not None:
        if isinstance(error, OSError) and error.errno in _DISK_ERRNOS:
            return True
        if _DISK_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


def is_permission_error(error: BaseException) -> bool:
    """EPERM or EACCES anywhere in the chain: the fix is the directory's permissions, not disk space."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (1, 13):
            return True
        error = error.__cause__ or error.__context__
    return False


def write_failure(checkpoints_dir: str | Path, error: BaseException, resume_hint: str,
                  since: float = 0.0) -> str | None:
    """The account of a stage that failed writing (a checkpoint, or any file on a full disk), else None.

    A checkpoint left in the staging folder was being written when the error came: it never
    becomes `checkpoint-N` (it is deleted on the next start), and the latest sealed one is
    re-verified here, so the message can say it is intact. Only checkpoints staged at or after `since`
    (this attempt's start) count: an older leftover is an earlier crash's, not this failure's."""
    staged = sorted((d for d in staging_dir(checkpoints_dir).glob("checkpoint-*")
                     if d.is_dir() and d.stat().st_mtime >= since),
                    key=lambda d: checkpoint_step(d) or -1)
    disk, denied = is_disk_error(error), is_permission_error(error)
    if not staged and not disk and not denied:
        return None
    what = f"writing checkpoint {staged[-1].name}" if staged else "writing to disk"
    cause = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    sealed = complete_checkpoints(checkpoints_dir)
    if sealed and not verify_checkpoint(sealed[-1]):
        kept = f"the previous checkpoint, {sealed[-1]}, is intact (verified)"
    elif sealed:
        kept = f"the latest sealed checkpoint, {sealed[-1]}, does not verify either"
    else:
        kept = "no checkpoint had been completed yet"
    if disk:
        fix = "free disk space, or raise the quota or file-size limit (ulimit -f), for "
    elif denied:
        fix = "make it writable again (owner and mode, `lsattr`/`chattr -i`, a read-only mount) for "
    else:
        fix = "fix the cause above for "
    return (f"{what} failed ({type(error).__name__}: {cause}); the stage stopped and {kept}. "
            f"Fix: {fix}{Path(checkpoints_dir).parent.parent}, then {resume_hint}.")


def previous_good(ckpt_dir: str | Path, search: list[str | Path] = ()) -> Path | None:
    """The latest checkpoint before `ckpt_dir` (beside it, or in `search`) that verifies."""
    ckpt_dir = Path(ckpt_dir)
    m = read_manifest(ckpt_dir)
    step = m.get("step") if m else checkpoint_step(ckpt_dir)
    candidates = {}
    for parent in [ckpt_dir.parent, *map(Path, search)]:
        for d in complete_checkpoints(parent):
            if d.resolve() != ckpt_dir.resolve():
                s = read_manifest(d).get("step", -1)
                if step is None or s < step:
                    candidates[d.resolve()] = (s, d)
    for _, d in sorted(candidates.values(), key=lambda x: x[0], reverse=True):
        if not verify_checkpoint(d):
            return d
    return None


def run_of(search: list[str | Path]) -> Path | None:
    """The run directory of a stage's `<run>/<stage>/checkpoints` among `search`, if one is there."""
    for d in map(Path, search):
        if d.name == "checkpoints":
            return d.parent.parent
    return None


def summarize_problems(problems: list[str], most: int = 3) -> str:
    more = f"; and {len(problems) - most} more" if len(problems) > most else ""
    return "; ".join(problems[:most]) + more


def sealed_copies(local_dir: str | Path, copy_dirs: list[str | Path] = ()) -> list[tuple[int, str, Path]]:
    """Every sealed copy of a stage's checkpoints, newest step first: (step, where, path), `where` being
    "local" for `<stage>/checkpoints/checkpoint-N` and "Ray's copy" for those under `copy_dirs` (the
    directories of Ray Train runs, whose `checkpoint_<time>` copies carry the same manifest). At one
    step, the local copy comes first. Not hashed: `first_verified` verifies, newest first."""
    found = [(int(read_manifest(d).get("step", -1)), 0, "local", d) for d in complete_checkpoints(local_dir)]
    for parent in copy_dirs:
        found += [(int(read_manifest(d).get("step", -1)), 1, "Ray's copy", d) for d in complete_checkpoints(parent)]
    return [(step, where, d) for step, _, where, d in sorted(found, key=lambda f: (-f[0], f[1], str(f[3])))]


def copy_label(step: int, where: str, path: Path, run_dir: Path | None = None) -> str:
    """`checkpoint-30 (local)`, `checkpoint-30 (Ray's copy ray/sft-.../checkpoint_...)`: what damage and choice lines say."""
    if where == "local":
        return f"checkpoint-{step} (local)"
    shown = path
    if run_dir is not None and path.is_relative_to(run_dir):
        shown = path.relative_to(run_dir)
    return f"checkpoint-{step} ({where} {shown})"


def first_verified(copies: list[tuple[int, str, Path]], log: Callable[[str], None] = print,
                   run_dir: Path | None = None) -> tuple[int, str, Path] | None:
    """The first copy that verifies, in the given order; each damaged one before it is reported on one line."""
    for step, where, path in copies:
        problems = verify_checkpoint(path)
        if not problems:
            return step, where, path
        log(f"{copy_label(step, where, path, run_dir)} is damaged: {summarize_problems(problems, 1)}; skipped")
    return None


def check_resume(ckpt_dir: str | Path, *, world_size: int, strategy: str, search: list[str | Path] = ()) -> dict:
    """Verify a checkpoint before resuming from it; returns its manifest or raises CheckpointError."""
    ckpt_dir = Path(ckpt_dir)
    problems = verify_checkpoint(ckpt_dir)
    if problems:
        prev = previous_good(ckpt_dir, search)
        run = run_of(search)
        command = f"distft resume {run}" if run else None
        if prev is not None:
            step = (read_manifest(prev) or {}).get("step", checkpoint_step(prev))
            fix = (f"Fix: resume from {prev} instead (the latest earlier checkpoint that verifies)"
                   + (f": {command} --from checkpoint-{step}." if command else "."))
        else:
            fix = (f"No earlier checkpoint in {ckpt_dir.parent} verifies. Fix: start the stage again without resuming"
                   + (f" ({command} does, keeping this attempt aside)." if command else "."))
        # One line: the CLI shows a worker's error by its last `...Error: ...` line.
        raise CheckpointError(f"refusing to resume from {ckpt_dir}: it does not match its {MANIFEST}: "
                              f"{summarize_problems(problems)}. {fix}")
    manifest = read_manifest(ckpt_dir)
    saved_strategy, saved_world = manifest.get("strategy"), manifest.get("world_size")
    if saved_strategy != strategy:
        raise CheckpointError(
            f"refusing to resume from {ckpt_dir}: it was written under strategy {saved_strategy!r} and this run uses "
            f"{strategy!r}, whose checkpoints have another layout (resuming would load it partially or fail late). "
            f"Fix: resume with the strategy section it was written with, or start a new run from the exported model."
        )
    if saved_world != world_size and not reshardable(strategy):
        raise CheckpointError(
            f"refusing to resume from {ckpt_dir}: it was written by {saved_world} ranks under {strategy}, which keeps "
            f"one optimizer shard per rank, and this run has {world_size}. Fix: resume with "
            f"scaling.num_workers={saved_world}, or start a new run from the exported model "
            f"(DDP and FSDP checkpoints resume on any number of workers)."
        )
    return manifest


class CheckpointPublisher:
    """Rank 0's side of checkpointing: seal staged checkpoints, say which to register, rotate.

    Registration (the report to Ray that attaches a checkpoint) must only ever name a sealed
    checkpoint, yet every rank has to call report the same number of times. The choice:

    - up to `sync_max_bytes` (the common case) the checkpoint is sealed on the training thread,
      and the report at the same save registers it;
    - above it, sealing runs on one background thread (in save order) while training goes on,
      and each later save, or the end of training, registers the newest checkpoint sealed by
      then. A crash can then cost one more save interval than a synchronous seal would;
      nothing unsealed is ever registered.

    Rotation runs on the training thread only, never deletes the newest sealed checkpoint,
    and ignores directories without a manifest (it cannot tell what they are).
    """

    def __init__(self, checkpoints_dir: str | Path, *, keep: int, world_size: int, strategy: str,
                 sync_max_bytes: int | None = None, log: Callable[[str], None] = print):
        self.dir = Path(checkpoints_dir)
        self.staging = staging_dir(self.dir)
        self.keep, self.world_size, self.strategy, self.log = keep, world_size, strategy, log
        if sync_max_bytes is None:
            sync_max_bytes = int(os.environ.get(SYNC_HASH_ENV, DEFAULT_SYNC_HASH_MAX_BYTES))
        self.sync_max_bytes = sync_max_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self._sealed: list[Path] = []
        self.best_step: int | None = None  # kept through rotation (early stopping's best)
        self._lock = threading.Lock()
        self.registered: Path | None = None

    def recover(self) -> None:
        """At train start: publish staged checkpoints a crash left sealed, delete the ones it left half-written."""
        if not self.staging.is_dir():
            return
        for d in sorted(self.staging.iterdir()):
            if not d.is_dir() or d.is_symlink():
                continue
            # Only names this staging scheme writes (the Trainer's `checkpoint-N`, seal's `replaced-...`)
            # are distft's to remove; anything else found here is someone else's and stays.
            if checkpoint_step(d) is None and not _REPLACED_NAME.match(d.name):
                self.log(f"left {d} alone: not a checkpoint distft staged")
                continue
            final = self.dir / d.name
            if checkpoint_step(d) is not None and not final.exists() and not verify_checkpoint(d):
                os.rename(d, final)
                self.log(f"published {final}: sealed before an interruption, not yet renamed")
            else:
                shutil.rmtree(d, ignore_errors=True)
                self.log(f"removed {d}: left incomplete (or superseded) by an interrupted save")

    def publish(self, step: int) -> Path | None:
        """Seal the Trainer's checkpoint for `step`; return a sealed checkpoint to register now, if any."""
        self._reap()
        staged = self.staging / f"checkpoint-{step}"
        if staged.is_dir():
            job = dict(staged=staged, final=self.dir / staged.name, step=step,
                       world_size=self.world_size, strategy=self.strategy)
            if not self._pending and dir_bytes(staged) <= self.sync_max_bytes:
                self._done(seal(**job))
            else:  # behind any pending seal too, so checkpoints complete in save order
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="distft-seal")
                self._pending.append(self._pool.submit(lambda: self._done(seal(**job))))
        return self._to_register()

    def finish(self) -> Path | None:
        """Wait for background seals (the run must not end before them); return a checkpoint to register, if any."""
        for fut in self._pending:
            fut.result()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        return self._to_register()

    def _done(self, path: Path) -> Path:
        with self._lock:
            self._sealed.append(path)
        return path

    def _reap(self) -> None:
        for fut in [f for f in self._pending if f.done()]:
            self._pending.remove(fut)
            fut.result()  # a failed seal (disk full, ...) fails the run here, as a failed torch.save would

    def _to_register(self) -> Path | None:
        self._reap()
        with self._lock:
            newest = max(self._sealed, key=lambda p: checkpoint_step(p) or -1, default=None)
        if newest is None or (self.registered and checkpoint_step(newest) <= checkpoint_step(self.registered)):
            return None
        self.registered = newest
        return newest

    def rotate(self) -> list[Path]:
        """Keep the newest `keep` sealed checkpoints; the newest one, and the best (`best_step`, set by early
        stopping), are never deleted."""
        sealed = [d for d in complete_checkpoints(self.dir) if checkpoint_step(d) is not None]
        doomed = [d for d in sealed[: max(0, len(sealed) - max(self.keep, 1))]
                  if checkpoint_step(d) != self.best_step]
        for d in doomed:
            shutil.rmtree(d, ignore_errors=True)
        return doomed


def check_resume_on_ranks(ckpt_dir: str | Path, *, world_size: int, strategy: str, is_main: bool,
                          search: list[str | Path] = ()) -> None:
    """`check_resume` on rank 0 only (hashing once, not once per rank); every rank raises its verdict."""
    error = None
    if is_main:
        try:
            check_resume(ckpt_dir, world_size=world_size, strategy=strategy, search=search)
        except CheckpointError as e:
            error = str(e)
    error = broadcast_from_rank0(error)
    if error:
        raise CheckpointError(error)
