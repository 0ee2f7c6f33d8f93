"""Resume as users meet it (issue 18, item 4, and item 10's restart marker), through the real `distft` command.

A stage's checkpoint has two names: `<stage>/checkpoints/checkpoint-N` and the copy Ray Train registered
(`<run>/ray/<ray run name>/checkpoint_<time>`): hard links to one copy where Ray's storage is on the run's
filesystem, a second copy where it is elsewhere (`run.storage_path`). Each case here copies the run
directory, which makes them separate copies, as on other storage. `distft resume` must verify the one the workers will
load, report damage in either, pass its choice to the workers explicitly, and mark the restart in
metrics.jsonl. Faults are injected for real: checkpoint files truncated on disk (proven damaged with
`verify_checkpoint` before each case).

- Refusals of `--from` need no Ray: a run directory with sealed checkpoints and Ray copies is built
  here (fast tier).
- Resumes launch Ray (slow): ONE real training run in a module fixture; each case copies its run
  directory and turns it into what a driver killed while saving checkpoint-40 of 40 leaves (no
  checkpoint-40, no summary, no export), then damages the copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from distft.distributed.checkpoint import build_manifest, complete_checkpoints, read_manifest, verify_checkpoint
from distft.distributed.checkpoint import write_manifest
from faults import REPO, assert_unchanged, check_failure, run_distft, snapshot

WEIGHTS = "adapter_model.safetensors"


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def ray_copy(run: Path, step: int) -> Path:
    """Ray Train's registered copy of `step` (the earlier attempt's), found by its manifest."""
    (found,) = [d for attempt in (run / "ray").iterdir() if attempt.is_dir()
                for d in complete_checkpoints(attempt) if read_manifest(d)["step"] == step]
    return found


def damage(run: Path, *where: str, step: int = 30) -> list[Path]:
    """Truncate the weights of `step`'s local copy and/or Ray's copy; proven damaged before the case runs."""
    hit = []
    for w in where:
        ckpt = run / "sft" / "checkpoints" / f"checkpoint-{step}" if w == "local" else ray_copy(run, step)
        truncate(ckpt / WEIGHTS)
        problems = verify_checkpoint(ckpt)
        assert problems and "truncated" in problems[0], problems  # the fault is in effect
        hit.append(ckpt)
    return hit


# --- `--from` refused before anything runs (no Ray) -------------------------------------------------------

@pytest.fixture()
def sealed_run(tmp_path, tiny_random) -> Path:
    """A run interrupted after checkpoint-30: sealed checkpoints 10, 20, 30 and Ray's copies of them."""
    from distft.config import dump_config, load_config

    run = tmp_path / "runs" / "sealed"
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [
        f"model.name_or_path={tiny_random}", "scaling.num_workers=1", f"run.output_dir={run.parent}",
        f"run.name={run.name}"])
    run.mkdir(parents=True)
    dump_config(cfg, run / "config.yaml")
    (run / "sft").mkdir()
    (run / "sft" / "ray_run_name").write_text("sft-20261206-000000-abcd\n")
    for step in (10, 20, 30):
        ckpt = run / "sft" / "checkpoints" / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / WEIGHTS).write_bytes(bytes(range(256)) * 64 * step)
        write_manifest(ckpt, build_manifest(ckpt, step=step, world_size=1, strategy="ddp"))
        shutil.copytree(ckpt, run / "ray" / "sft-20261206-000000-abcd" / f"checkpoint_2026-12-06_00-00-{step}.000000")
    return run


# (id, argv with $RUN, copies damaged at step 30, phrases in stderr with $RUN)
REFUSED = [
    ("from-a-checkpoint-damaged-in-both-copies", "resume $RUN --from checkpoint-30", ("local", "ray"),
     ("--from checkpoint-30: checkpoint-30 (local) is damaged: adapter_model.safetensors:",
      "checkpoint-30 (Ray's copy ray/sft-20261206-000000-abcd/checkpoint_",
      "the checkpoints of stage sft that verify: checkpoint-20, checkpoint-10",
      "Fix: distft resume $RUN --from checkpoint-20.")),
    ("train-resume-from-a-damaged-checkpoint", "train --resume $RUN --from checkpoint-30", ("local", "ray"),
     ("checkpoint-30 (local) is damaged", "Fix: distft resume $RUN --from checkpoint-20.")),
    ("from-a-checkpoint-that-does-not-exist", "resume $RUN --from checkpoint-35", (),
     ("--from checkpoint-35: stage sft has no checkpoint-35",
      "that verify: checkpoint-30, checkpoint-20, checkpoint-10", "Fix: distft resume $RUN --from checkpoint-30.")),
    ("from-not-a-checkpoint-name", "resume $RUN --from latest", (),
     ("--from latest: not a checkpoint name. Fix: --from checkpoint-N",)),
    ("from-without-a-run-to-resume", "train configs/quickstart.yaml --from checkpoint-20", (),
     ("--from checkpoint-20 picks the checkpoint of a run to resume. Fix: distft train --resume RUN_DIR",)),
]


@pytest.mark.parametrize("argv, damaged, phrases", [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_from_is_refused_in_one_line_naming_the_checkpoints_that_verify(sealed_run, tiny_random, argv, damaged,
                                                                       phrases):
    damage(sealed_run, *damaged)
    before = snapshot(sealed_run, tiny_random)
    r = run_distft(*argv.replace("$RUN", str(sealed_run)).split(), timeout=300)
    check_failure(r, 2, tuple(p.replace("$RUN", str(sealed_run)) for p in phrases))
    assert_unchanged(before, snapshot(sealed_run, tiny_random))


# --- resumes that work (Ray) ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_random) -> Path:
    """One real run, 40 steps with checkpoints at 10, 20, 30, 40 (the last 3 kept), locally and in Ray's storage."""
    root = tmp_path_factory.mktemp("resume")
    r = run_distft("train", "configs/quickstart.yaml", f"model.name_or_path={tiny_random}", "scaling.num_workers=1",
                   "train.max_steps=40", "train.save_every=10", "train.log_every=5", "run.keep_checkpoints=3",
                   "evaluate.data=null",
                   "data.max_train_samples=400", f"run.output_dir={root}", "run.name=base", timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = root / "base"
    assert [c.name for c in complete_checkpoints(run / "sft" / "checkpoints")] == [
        "checkpoint-20", "checkpoint-30", "checkpoint-40"]
    assert ray_copy(run, 40) and ray_copy(run, 30) and ray_copy(run, 20)
    return run


def interrupted(trained: Path, tmp_path: Path) -> Path:
    """A copy of the run as a driver killed while saving checkpoint-40 leaves it: the steps up to 40 logged,
    checkpoint-30 the newest sealed one (locally and in Ray's storage), no export, no summary."""
    run = shutil.copytree(trained, tmp_path / "run", symlinks=True)
    for done in ("summary.json", "final", "sft/summary.json"):
        (run / done).unlink()
    for unsaved in (run / "sft" / "final", run / "sft" / "checkpoints" / "checkpoint-40", ray_copy(run, 40)):
        shutil.rmtree(unsaved)
    return run


def metrics(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]


# (id, argv with $RUN, copies damaged at step 30, phrases in stdout, the step it resumes from, from Ray's copy)
RESUMED = [
    ("newest-checkpoint-damaged-in-both-copies", "resume $RUN", ("local", "ray"),
     ("checkpoint-30 (local) is damaged: adapter_model.safetensors:", "the manifest says",
      "checkpoint-30 (Ray's copy ray/sft-", "resuming from checkpoint-20"), 20, False),
    ("only-the-local-copy-damaged", "resume $RUN", ("local",),
     ("checkpoint-30 (local) is damaged: adapter_model.safetensors:", "resuming from checkpoint-30 (Ray's copy ray/sft-"),
     30, True),
    ("train-resume-from-an-earlier-checkpoint", "train --resume $RUN --from checkpoint-20", (),
     ("resuming from checkpoint-20",), 20, False),
]


# Beyond the full tier's time budget (each resume is a Ray launch): `make test-slow` runs it.
SLOWEST = {"train-resume-from-an-earlier-checkpoint"}


@pytest.mark.slow
@pytest.mark.parametrize("argv, damaged, phrases, from_step, from_ray",
                         [pytest.param(*c[1:], id=c[0], marks=[pytest.mark.slowest] if c[0] in SLOWEST else [])
                          for c in RESUMED])
def test_resume_verifies_what_the_workers_load_reports_damage_and_marks_the_restart(
        trained, tiny_random, tmp_path, argv, damaged, phrases, from_step, from_ray):
    run = interrupted(trained, tmp_path)
    hit = damage(run, *damaged)
    logged_before = (run / "sft" / "metrics.jsonl").read_bytes()
    earlier_attempt = ray_copy(run, 20).parent
    kept = snapshot(tiny_random, earlier_attempt, run / "sft" / "checkpoints" / "checkpoint-20", run / "config.yaml")

    r = run_distft(*argv.replace("$RUN", str(run)).split(), timeout=600)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-4000:]
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    for p in phrases:
        assert p in r.stdout, (p, r.stdout[-3000:])
    assert out.count("is damaged") == len(damaged), out[-3000:]  # one line per damaged copy, none for good ones
    (summary,) = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 40
    # Nothing distft had was changed: the model, the earlier attempt's Ray copies (the damaged one too: Ray
    # never restores or rotates them now), the checkpoint it resumed from or kept, the config.
    assert_unchanged(kept, snapshot(tiny_random, earlier_attempt, run / "sft" / "checkpoints" / "checkpoint-20",
                                    run / "config.yaml"))
    assert all(p.exists() for p in hit)  # damaged copies are skipped, never deleted by the resume itself

    # The restart is marked, after everything logged before it: the steps after the marker from `from_step`
    # on redo earlier ones, and a reader tells them apart by the marker.
    assert (run / "sft" / "metrics.jsonl").read_bytes().startswith(logged_before)
    rows = metrics(run)
    (i,) = [k for k, row in enumerate(rows) if row.get("event") == "resume"]
    marker = rows[i]
    assert marker["from_step"] == from_step and marker["last_step"] == 40 and marker["source"] == "distft resume"
    assert ("/ray/" in marker["checkpoint"]) == from_ray, marker
    assert "step" not in marker  # readers that want steps skip it
    before = [row["step"] for row in rows[:i] if "loss" in row]
    after = [row["step"] for row in rows[i + 1:] if "loss" in row]
    assert max(before) == 40 and all(s > from_step for s in after), (before, after)
    assert set(range(from_step + 5, 41, 5)) <= set(after)  # the redone steps, each logged once more
    from distft.launch.runs import last_logged_step

    assert last_logged_step(run / "sft" / "metrics.jsonl") == 40
