"""Faults in what users write (issue 18, items 6 and 10): configs, overrides, data files, run directories.

Each case spawns the real `distft` command (tests/faults.py) on a fault injected for real: a
Latin-1 byte in a config, a data file or a run's config.yaml; a YAML key set twice; `.inf`/`nan`
in a float field; a misspelt key given on the command line. Every case proves first that its
fault is in effect, then asserts exit 2, at most 5 lines on stderr naming the path or field and the
fix, no traceback, and every file present before byte-identical after. No Ray: all of this is
refused before any cluster is asked for.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from faults import assert_unchanged, check_failure, non_utf8, run_distft, snapshot, user_env

LATIN1 = b"\xe9"  # 'é' in Latin-1: never valid UTF-8 on its own


def _rows(n: int = 24) -> list[dict]:
    from distft.data.task import make_splits

    train, _ = make_splits(n_train=n, n_test=2, seed=3)
    return train


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_random) -> Path:
    """Everything the cases read, written once: good files next to broken ones."""
    root = tmp_path_factory.mktemp("inputs")
    rows = _rows()
    (root / "train.jsonl").write_bytes(_jsonl(rows))
    # Row 5 carries the Latin-1 byte inside a JSON string: valid JSON to a reader that guesses Latin-1.
    bad = _jsonl(rows[:4]) + b'{"instruction": "Which animal?", "input": "The caf' + LATIN1 + b' cat.", "output": "cat"}\n'
    (root / "bad.jsonl").write_bytes(bad + _jsonl(rows[4:]))
    (root / "bad.csv").write_bytes(b"instruction,input,output\nWhich animal?,The cat.,cat\nWhich?,caf" + LATIN1 + b",cat\n")
    good = (f"# a config as a user writes it\nmodel:\n  name_or_path: {tiny_random}\n  max_seq_len: 64\n"
            f"scaling:\n  num_workers: 1\nstage: sft\ndata:\n  train: {root / 'train.jsonl'}\n"
            "train:\n  lr: 1.0e-3\n  epochs: 1\n  global_batch_size: 8\n  micro_batch_size: 8\n")
    (root / "good.yaml").write_text(good)
    non_utf8(root / "latin1.yaml", good)
    # The second `train:` section silently replaced the first (and its lr) before this was refused.
    (root / "dup.yaml").write_text(good + "train:\n  epochs: 2\n")
    (root / "inf.yaml").write_text(good.replace("lr: 1.0e-3", "lr: .inf"))
    runs = root / "runs"
    for name in ("first", "second", "broken"):
        (runs / name).mkdir(parents=True)
        (runs / name / "config.yaml").write_text(good)
    non_utf8(runs / "broken" / "config.yaml", good)
    return root


def _prove_not_utf8(path: Path) -> None:
    with pytest.raises(UnicodeDecodeError):
        path.read_bytes().decode("utf-8")


def _line_of_bad_byte(path: Path) -> int:
    data = path.read_bytes()
    return data[: data.index(LATIN1)].count(b"\n") + 1


def _good_text(world: Path) -> str:
    return (world / "good.yaml").read_text()


# (id, argv with $W for the world directory, the file holding the fault, phrases in stderr)
# A phrase "$LINE" is replaced by the line of the bad byte in that file.
ENCODING = [
    ("validate-config", "validate $W/latin1.yaml", "latin1.yaml",
     ("invalid config $W/latin1.yaml", "line $LINE", "is not UTF-8 text", "Fix: save the file as UTF-8")),
    ("plan-config", "plan $W/latin1.yaml", "latin1.yaml",
     ("invalid config $W/latin1.yaml", "line $LINE", "Fix:")),
    ("resume-run", "resume $W/runs/broken", "runs/broken/config.yaml",
     ("invalid config $W/runs/broken/config.yaml", "line $LINE", "Fix:")),
    ("runs-show", "runs show $W/runs/broken", "runs/broken/config.yaml",
     ("invalid config $W/runs/broken/config.yaml", "line $LINE", "Fix:")),
    ("validate-data-jsonl", "validate $W/good.yaml data.train=$W/bad.jsonl", "bad.jsonl",
     ("data.train: $W/bad.jsonl line $LINE", "is not UTF-8 text", "Fix: save the file as UTF-8")),
    ("validate-data-csv", "validate $W/good.yaml data.train=$W/bad.csv", "bad.csv",
     ("data.train: $W/bad.csv line $LINE", "is not UTF-8 text", "Fix:")),
    ("eval-data", "eval $MODEL --data $W/bad.jsonl", "bad.jsonl",
     ("--data: $W/bad.jsonl line $LINE", "is not UTF-8 text", "Fix:")),
]


def _argv(args: str, world: Path, model: Path) -> list[str]:
    return [a.replace("$W", str(world)).replace("$MODEL", str(model)) for a in args.split()]


@pytest.mark.parametrize("case", ENCODING, ids=[c[0] for c in ENCODING])
def test_a_byte_that_is_not_utf8_is_one_line_naming_path_and_line(case, world, tiny_random):
    _, args, faulty, phrases = case
    _prove_not_utf8(world / faulty)
    line = _line_of_bad_byte(world / faulty)
    before = snapshot(world, tiny_random)
    r = run_distft(*_argv(args, world, tiny_random), env=user_env(DISTFT_CACHE=world.parent / "cache"))
    check_failure(r, 2, tuple(p.replace("$W", str(world)).replace("$LINE", str(line)) for p in phrases))
    assert_unchanged(before, snapshot(world, tiny_random))


def test_runs_list_flags_the_unreadable_run_and_lists_the_others(world):
    _prove_not_utf8(world / "runs" / "broken" / "config.yaml")
    before = snapshot(world)
    r = run_distft("runs", "list", world / "runs")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    rows = {line.split()[0]: line for line in r.stdout.splitlines()[1:] if line.strip()}
    assert set(rows) == {"first", "second", "broken"}, r.stdout
    assert "unfinished" in rows["first"] and "unfinished" in rows["second"]
    line = _line_of_bad_byte(world / "runs" / "broken" / "config.yaml")
    assert "unreadable" in rows["broken"] and f"line {line}" in rows["broken"] and "not UTF-8" in rows["broken"]
    assert f"distft runs show {world / 'runs' / 'broken'}" in rows["broken"]
    assert_unchanged(before, snapshot(world))


def test_a_yaml_key_set_twice_names_both_lines(world):
    text = (world / "dup.yaml").read_text()
    assert "lr" not in yaml.safe_load(text)["train"]  # the fault: PyYAML keeps the second section only
    lines = [i for i, line in enumerate(text.splitlines(), 1) if line == "train:"]
    assert len(lines) == 2
    before = snapshot(world)
    r = run_distft("validate", world / "dup.yaml")
    check_failure(r, 2, (f"invalid config {world / 'dup.yaml'}",
                         f"train: set twice, at line {lines[0]} and line {lines[1]}", "Fix:"))
    assert_unchanged(before, snapshot(world))


NON_FINITE = [
    ("file-inf", "validate $W/inf.yaml", "train.lr: inf is not a finite number", "override"),
    ("override-inf", "validate $W/good.yaml train.lr=.inf", "override train.lr: inf is not a finite number", None),
    ("override-nan", "validate $W/good.yaml train.epochs=nan", "override train.epochs: nan is not a finite number",
     None),
]


@pytest.mark.parametrize("case", NON_FINITE, ids=[c[0] for c in NON_FINITE])
def test_a_non_finite_number_is_refused_naming_the_field(case, world, tiny_random):
    _, args, phrase, absent = case
    # The fault: YAML reads these as floats, and a float field took them before.
    assert math.isinf(yaml.safe_load((world / "inf.yaml").read_text())["train"]["lr"])
    assert math.isinf(yaml.safe_load(".inf")) and math.isnan(float("nan"))
    before = snapshot(world)
    r = run_distft(*_argv(args, world, tiny_random))
    check_failure(r, 2, (phrase, "Fix:"))
    if absent:
        assert absent not in r.stderr
    assert_unchanged(before, snapshot(world))


def test_a_misspelt_override_suggests_the_key_and_says_it_came_from_the_command_line(world):
    from distft.config.schema import TrainConfig

    assert "learnig_rate" not in TrainConfig.model_fields  # the fault: an unknown key
    before = snapshot(world)
    r = run_distft("validate", world / "good.yaml", "train.learnig_rate=1e-3")
    check_failure(r, 2, ("override train.learnig_rate: unknown key; did you mean `lr`?",))
    assert "warmup_ratio" not in r.stderr
    assert_unchanged(before, snapshot(world))


# ---------------------------------------------------------------- function level


@pytest.mark.parametrize("key, valid_from, expected", [
    ("learnig_rate", "train", "`lr`"),
    ("learning_rate", "train", "`lr`"),
    ("lrr", "train", "`lr`"),
    ("batch_size", "train", "`micro_batch_size` or `global_batch_size`"),
    ("num_train_epochs", "train", "`epochs`"),
    ("epoch", "train", "`epochs`"),
    ("warmup_steps", "train", "`warmup_ratio`"),
    ("logging_steps", "train", "`log_every`"),
    ("max_length", "model", "`max_seq_len`"),
    ("seq_len", "model", "`max_seq_len`"),
    ("lora_alpha", "lora", "`alpha`"),
    ("rank", "lora", "`r`"),
])
def test_suggestions_use_other_tools_names_and_word_spelling(key, valid_from, expected):
    from distft.config.load import _suggest
    from distft.config.schema import LoraSettings, ModelConfig, TrainConfig

    valid = list({"train": TrainConfig, "model": ModelConfig, "lora": LoraSettings}[valid_from].model_fields)
    assert _suggest(key, valid) == f"did you mean {expected}?"


def test_no_suggestion_for_a_key_like_nothing():
    from distft.config.load import _suggest

    assert _suggest("zzz", ["lr", "epochs"]).startswith("valid keys: epochs, lr")


def test_override_wording_only_for_values_from_the_command_line(tmp_path):
    from distft.config import ConfigError, load_config

    path = tmp_path / "c.yaml"
    path.write_text("stage: sft\ndata:\n  train: x.jsonl\ntrain:\n  lrr: 1\n")
    with pytest.raises(ConfigError) as e:
        load_config(path, ["train.epochs=inf", "trian.lr=1"])
    assert e.value.problems[0].startswith("override trian: unknown top-level key; did you mean `train`?")
    assert "train.lrr: unknown key; did you mean `lr`?" in e.value.problems  # from the file: no "override"
    assert "override train.epochs: inf is not a finite number. Fix: set a finite value." in e.value.problems


def test_duplicates_nested_and_in_lists_are_found_and_merge_keys_are_not(tmp_path):
    from distft.config import ConfigError, read_yaml

    path = tmp_path / "c.yaml"
    path.write_text("stages:\n  - stage: sft\n    train:\n      lr: 1\n      lr: 2\n")
    with pytest.raises(ConfigError, match=r"stages\.0\.train\.lr: set twice, at line 4 and line 5"):
        read_yaml(path)
    path.write_text("base: &b {lr: 1, epochs: 2}\ntrain:\n  <<: *b\n  lr: 3\n")
    assert read_yaml(path)["train"] == {"lr": 3, "epochs": 2}


def test_every_float_field_refuses_non_finite_values():
    from pydantic import ValidationError

    from distft.config.schema import RewardSpec, TrainConfig

    for bad in (float("inf"), float("-inf"), float("nan"), "nan"):
        with pytest.raises(ValidationError, match="finite"):
            TrainConfig(lr=bad)
        with pytest.raises(ValidationError, match="finite"):
            RewardSpec(functions={"exact_match": bad})


def test_tune_says_override_too():
    from distft.config import ConfigError
    from distft.config.search import load_search
    from faults import REPO

    with pytest.raises(ConfigError) as e:
        load_search(str(REPO / "configs" / "tune_quickstart.yaml"), ["train.learnig_rate=1e-3"])
    assert e.value.problems == ["override train.learnig_rate: unknown key; did you mean `lr`?"]


def test_a_control_character_in_a_config_is_one_line_and_runs_list_goes_on(tmp_path):
    """PyYAML's reader refuses control characters when the loader is built: that too is one line, naming the line."""
    from faults import check_failure, run_distft, snapshot, assert_unchanged

    cfg = tmp_path / "c.yaml"
    cfg.write_bytes(b"train:\n  lr: 1\n\x07b: 2\n")
    before = snapshot(tmp_path)
    r = run_distft("validate", cfg)
    check_failure(r, 2, ("malformed YAML at line 3: character #x0007 is a control character",
                         "Fix: remove that character."))
    assert_unchanged(before, snapshot(tmp_path))
