"""One durable copy of each checkpoint (issue 20, item 4): where Ray Train's storage is on the run's filesystem,
its registered copy is hard links to distft's sealed checkpoint, and either side deleting its names never
touches the other's data. Fast tier: no Ray cluster (Ray's real StorageContext and Checkpoint, no workers).
The Ray launch that asserts the same on a real run is test_checkpoints.py::test_ray_registers_sealed_checkpoints_only.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from distft.distributed.checkpoint import (MANIFEST, build_manifest, link_copy, same_filesystem, verify_checkpoint,
                                           write_manifest)


def sealed(path: Path, step: int = 10) -> Path:
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(os.urandom(4096))
    (path / "global_step10").mkdir()
    (path / "global_step10" / "zero_pp_rank_0_optim_states.pt").write_bytes(os.urandom(2048))
    write_manifest(path, build_manifest(path, step=step, world_size=1, strategy="ddp"))
    return path


def files(root: Path) -> dict[str, os.stat_result]:
    return {p.relative_to(root).as_posix(): p.stat() for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_linked_copy_shares_every_file_and_either_side_can_go(tmp_path):
    ckpt = sealed(tmp_path / "sft" / "checkpoints" / "checkpoint-10")
    copy = tmp_path / "ray" / "attempt" / "checkpoint_2026"
    assert link_copy(ckpt, copy)
    ours, theirs = files(ckpt), files(copy)
    assert set(ours) == set(theirs) and MANIFEST in ours and "global_step10/zero_pp_rank_0_optim_states.pt" in ours
    for rel in ours:  # the same data, stored once
        assert (ours[rel].st_dev, ours[rel].st_ino) == (theirs[rel].st_dev, theirs[rel].st_ino), rel
        assert theirs[rel].st_nlink == 2, rel
    assert verify_checkpoint(copy) == []

    # Ray's rotation deletes its copy through pyarrow (delete_fs_path -> LocalFileSystem.delete_dir): ours stays whole.
    import pyarrow.fs

    pyarrow.fs.LocalFileSystem().delete_dir(str(copy))
    assert not copy.exists() and verify_checkpoint(ckpt) == []
    assert all(s.st_nlink == 1 for s in files(ckpt).values())

    # ... and the other way round: distft's rotation (rmtree of checkpoint-N) leaves Ray's copy whole.
    assert link_copy(ckpt, copy)
    shutil.rmtree(ckpt)
    assert verify_checkpoint(copy) == []


def test_nothing_is_linked_over_a_directory_that_is_not_ours(tmp_path):
    ckpt = sealed(tmp_path / "checkpoint-10")
    theirs = tmp_path / "ray" / "checkpoint_2026"
    theirs.mkdir(parents=True)
    (theirs / "keep.txt").write_text("someone else's")
    assert not link_copy(ckpt, theirs)
    assert [p.name for p in theirs.iterdir()] == ["keep.txt"] and (theirs / "keep.txt").read_text() == "someone else's"


def test_where_links_fail_nothing_is_left_behind(tmp_path, monkeypatch):
    ckpt = sealed(tmp_path / "checkpoint-10")
    made = []

    def cross_device(src, dst, **kwargs):
        if made:  # the first file links, the second is "on another filesystem"
            raise OSError(errno.EXDEV, "Invalid cross-device link")
        made.append(dst)
        os.link(src, dst)

    monkeypatch.setattr(os, "link", cross_device)
    target = tmp_path / "ray" / "checkpoint_2026"
    assert not link_copy(ckpt, target)
    assert made and not target.exists()  # the half-linked directory it created is gone
    assert verify_checkpoint(ckpt) == []


def test_same_filesystem_by_device_including_paths_not_created_yet(tmp_path):
    assert same_filesystem(tmp_path, tmp_path / "not" / "yet")
    assert not same_filesystem(tmp_path, "/proc/self")  # procfs: never the run's filesystem


def fake_context(monkeypatch, storage) -> None:
    import ray.train

    class Context:
        def get_storage(self):
            return storage

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())


def test_ray_registers_the_linked_copy_where_storage_shares_the_filesystem(tmp_path, monkeypatch):
    """`link_upload` is what Ray calls as `checkpoint_upload_fn`: its result must pass Ray's own check
    (a checkpoint inside the run's storage, on its filesystem) and hold the sealed files, not copies."""
    import ray.train
    from ray.train.v2._internal.execution.context import is_managed_checkpoint
    from ray.train.v2._internal.execution.storage import StorageContext

    from distft.launch.worker import link_upload, linkable_storage

    ckpt = sealed(tmp_path / "run" / "sft" / "checkpoints" / "checkpoint-10")
    storage = StorageContext(storage_path=str(tmp_path / "run" / "ray"), experiment_dir_name="sft-attempt")
    fake_context(monkeypatch, storage)
    assert linkable_storage(str(ckpt)) is storage

    registered = link_upload(storage)(ray.train.Checkpoint.from_directory(str(ckpt)), "checkpoint_2026-12-06")
    assert is_managed_checkpoint(storage, registered)
    copy = Path(registered.path)
    assert copy.parent == Path(storage.experiment_fs_path)
    assert {r: (s.st_ino, s.st_dev) for r, s in files(copy).items()} == \
           {r: (s.st_ino, s.st_dev) for r, s in files(ckpt).items()}


def test_storage_that_is_not_this_filesystem_keeps_the_upload(tmp_path, monkeypatch):
    from ray.train.v2._internal.execution.storage import StorageContext

    from distft.launch.worker import linkable_storage

    ckpt = sealed(tmp_path / "checkpoint-10")
    # A local path this node does not see as Ray's storage (Ray's marker is missing: another node's disk).
    storage = StorageContext(storage_path=str(tmp_path / "ray"), experiment_dir_name="sft-attempt")
    (Path(storage.experiment_fs_path) / ".validate_storage_marker").unlink()
    fake_context(monkeypatch, storage)
    assert linkable_storage(str(ckpt)) is None

    # Remote storage: any filesystem that is not the local one (s3://, gs://) is uploaded as before.
    import pyarrow.fs

    remote = StorageContext(storage_path=str(tmp_path / "remote"), experiment_dir_name="sft-attempt",
                            storage_filesystem=pyarrow.fs.SubTreeFileSystem(str(tmp_path),
                                                                            pyarrow.fs.LocalFileSystem()))
    fake_context(monkeypatch, remote)
    assert linkable_storage(str(ckpt)) is None

    # Another filesystem: the checkpoint on one device, Ray's storage on another.
    local = StorageContext(storage_path=str(tmp_path / "ray2"), experiment_dir_name="sft-attempt")
    fake_context(monkeypatch, local)
    monkeypatch.setattr("distft.distributed.checkpoint.same_filesystem", lambda a, b: False)
    assert linkable_storage(str(ckpt)) is None
