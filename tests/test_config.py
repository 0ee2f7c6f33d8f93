"""Config loading: shorthand and multi-stage, overrides, derived values, and every error path."""

from __future__ import annotations

from pathlib import Path

import pytest

from distft.config import ConfigError, apply_overrides, build_config, dump_config, load_config

REPO = Path(__file__).resolve().parents[1]
BASE = {"stage": "sft", "data": {"train": "x.jsonl"}}


def problems(raw: dict, overrides=()) -> list[str]:
    raw = apply_overrides(dict(raw), list(overrides))
    with pytest.raises(ConfigError) as e:
        build_config(raw)
    return e.value.problems


@pytest.mark.parametrize("path", sorted([*(REPO / "configs").glob("*.yaml"), *(REPO / "configs" / "methods").glob("*.yaml")]),
                         ids=lambda p: p.name)
def test_every_shipped_config_loads_and_passes_preflight(path, monkeypatch):
    from distft.launch.preflight import absolutize_paths, preflight

    monkeypatch.setattr("os.cpu_count", lambda: 64)  # resources are checked per machine, not here
    cfg = absolutize_paths(load_config(path), REPO)
    assert cfg.stages, path
    notes = preflight(cfg, address=None)
    assert any("rows, format" in n for n in notes)


def test_single_stage_shorthand_fills_defaults():
    cfg = build_config(dict(BASE))
    assert [s.stage for s in cfg.stages] == ["sft"]
    assert cfg.stages[0].train.lr == 2e-4
    assert cfg.stages[0].loss_on() == "completion"
    assert cfg.model.trust_remote_code is False


def test_pretrain_defaults_to_text_and_full_loss():
    cfg = build_config({"stage": "pretrain", "data": {"train": "c.jsonl"}})
    assert cfg.stages[0].data.format == "text"
    assert cfg.stages[0].loss_on() == "all"


def test_multi_stage_inherits_shared_sections_and_stage_values_win():
    cfg = build_config(
        {
            "train": {"lr": 1e-3, "epochs": 2},
            "data": {"train": "shared.jsonl"},
            "stages": [
                {"stage": "pretrain", "name": "cpt", "data": {"train": "corpus.jsonl"}},
                {"stage": "sft", "train": {"lr": 5e-5}},
            ],
        }
    )
    cpt, sft = cfg.stages
    assert (cpt.train.lr, cpt.train.epochs, cpt.data.train) == (1e-3, 2, "corpus.jsonl")
    assert (sft.train.lr, sft.train.epochs, sft.data.train) == (5e-5, 2, "shared.jsonl")


def test_overrides_are_coerced_to_schema_types():
    raw = apply_overrides(dict(BASE), ["train.lr=1e-4", "scaling.num_workers=4", "scaling.use_gpu=true",
                                      "train.global_batch_size=64", "method.lora.target_modules=[q_proj,v_proj]"])
    cfg = build_config(raw)
    assert cfg.stages[0].train.lr == pytest.approx(1e-4)
    assert cfg.scaling.num_workers == 4 and cfg.scaling.use_gpu is True
    assert cfg.stages[0].method.lora.target_modules == ["q_proj", "v_proj"]


def test_override_can_address_one_stage_by_index():
    raw = {"stages": [{"stage": "sft", "data": {"train": "a"}}, {"stage": "sft", "name": "b", "data": {"train": "b"}}]}
    cfg = build_config(apply_overrides(raw, ["stages.1.train.lr=0.5"]))
    assert [s.train.lr for s in cfg.stages] == [2e-4, 0.5]
    with pytest.raises(ConfigError, match="not a valid list index"):
        apply_overrides(raw, ["stages.7.train.lr=1"])


def test_gradient_accumulation_is_derived_from_world_size():
    cfg = build_config({**BASE, "train": {"global_batch_size": 64, "micro_batch_size": 8}})
    t = cfg.stages[0].train
    assert [t.grad_accum(n) for n in (1, 2, 4, 8)] == [8, 4, 2, 1]
    assert "x 2 workers x 4 accumulation steps" in t.batch_plan(2)


def test_unknown_key_names_the_closest_valid_key():
    assert problems({**BASE, "train": {"lrr": 1}}) == ["train.lrr: unknown key; did you mean `lr`?"]
    (p,) = problems({**BASE, "method": {"name": "lora", "lora": {"rank": 8}}})
    assert p.startswith("method.lora.rank: unknown key") and "`r`" in p
    (p,) = problems({**BASE, "modle": {}})
    assert p == "modle: unknown top-level key; did you mean `model`?"


def test_unknown_key_inside_a_stage_list_keeps_its_path():
    (p,) = problems({"stages": [{"stage": "sft", "data": {"train": "a", "fromat": "alpaca"}}]})
    assert p == "stages.0.data.fromat: unknown key; did you mean `format`?"


def test_wrong_type_names_field_and_value():
    (p,) = problems(BASE, ["train.lr=fast"])
    assert p.startswith("train.lr:") and "valid number" in p and "'fast'" in p


def test_wrong_type_in_shared_section_is_reported_where_the_user_wrote_it():
    raw = {"train": {"epochs": "many"}, "stages": [{"stage": "sft", "data": {"train": "a"}}]}
    (p,) = problems(raw)
    assert p.startswith("train.epochs:")


def test_num_workers_below_one():
    (p,) = problems(BASE, ["scaling.num_workers=0"])
    assert p.startswith("scaling.num_workers:") and "greater than or equal to 1" in p


def test_global_batch_must_divide_and_the_fix_is_named():
    (p,) = problems({**BASE, "train": {"global_batch_size": 30, "micro_batch_size": 8}}, ["scaling.num_workers=2"])
    assert p.startswith("train.global_batch_size: 30 is not a multiple of")
    assert "train.global_batch_size=16" in p


def test_unknown_stage_and_method_list_the_choices():
    (p,) = problems({"stages": [{"stage": "kpo", "data": {"train": "a"}}]})
    assert "unknown stage 'kpo'" in p and "sft" in p and "ppo" in p and "kto" in p and "distill" in p
    (p,) = problems(BASE, ["method.name=lorra"])
    assert p.startswith("method.name:") and "'full', 'freeze', 'bitfit', 'lora', 'dora'" in p and "'ia3'" in p


def test_missing_data_section():
    assert problems({"stage": "sft"}) == ["data: required field is missing."]


def test_several_problems_are_reported_at_once():
    found = problems({**BASE, "train": {"lrr": 1}, "scaling": {"nodes": 2}})
    assert len(found) == 2


def test_malformed_yaml_points_at_the_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("stage: sft\ndata:\n  train: [unclosed\nmodel: {}\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad)
    assert "malformed YAML at line" in str(e.value)


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_malformed_override():
    with pytest.raises(ConfigError, match="not of the form a.b=value"):
        apply_overrides({}, ["train.lr"])


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(REPO / "configs" / "quickstart.yaml", ["train.lr=0.01"])
    dump_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg


def test_unknown_keys_and_type_errors_are_reported_together():
    found = problems(BASE, ["train.lrr=1", "scaling.num_workers=0"])
    assert found == ["train.lrr: unknown key; did you mean `lr`?",
                     "scaling.num_workers: Input should be greater than or equal to 1 (got 0)."]


def test_stages_must_be_a_list_of_mappings():
    assert problems({"stages": {"stage": "sft"}}) == ["stages: must be a non-empty list of stages, e.g. `- stage: sft`."]
    (p,) = problems({"stages": ["sft"]})
    assert p.startswith("stages.0: must be a mapping")


def test_an_elastic_range_is_min_and_max_workers():

    cfg = build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "scaling": {"num_workers": [1, 4]},
                        "run": {"max_failures": 3}, "train": {"global_batch_size": 24, "micro_batch_size": 2}})
    s = cfg.scaling
    assert (s.min_workers, s.num_workers, s.elastic(), list(s.world_sizes()), s.fewest_workers()) == (1, 4, True,
                                                                                                      [1, 2, 3, 4], 1)
    fixed = build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "scaling": {"num_workers": [2, 2]}})
    assert not fixed.scaling.elastic() and list(fixed.scaling.world_sizes()) == [2]


def test_an_elastic_config_round_trips(tmp_path):
    cfg = build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "scaling": {"num_workers": [1, 2]},
                        "run": {"max_failures": 3}})
    dump_config(cfg, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize("extra, expected", [
    ({"scaling": {"num_workers": [1, 2]}}, "run.max_failures: an elastic run shrinks or grows by restarting"),
    ({"scaling": {"num_workers": [2, 3]}, "run": {"max_failures": 3},
      "train": {"global_batch_size": 8, "micro_batch_size": 2}},
     "keeps the global batch at every size in between. Fix: set train.global_batch_size=12 (a multiple of 12)"),
    ({"scaling": {"num_workers": [3, 1]}}, "needs 1 <= min <= max (got [3, 1])"),
    ({"scaling": {"num_workers": [1, 2, 3]}}, "give a number of workers, or [min, max] for an elastic run"),
    ({"scaling": {"num_workers": [1, 2]}, "run": {"max_failures": 3},
      "strategy": {"name": "deepspeed", "zero_stage": 2}}, "do not resume at another worker count"),
])
def test_elastic_configs_that_cannot_work_are_refused_with_the_fix(extra, expected):
    with pytest.raises(ConfigError) as e:
        build_config({"stage": "sft", "data": {"train": "x.jsonl"}, **extra})
    assert expected in str(e.value), str(e.value)


def test_an_elastic_range_is_written_back_as_a_range_so_a_plain_override_replaces_it(tmp_path):
    from distft.config import dump_config, load_config

    cfg = build_config({"stage": "sft", "data": {"train": "x.jsonl"}, "scaling": {"num_workers": [1, 2]},
                        "run": {"max_failures": 3}})
    assert cfg.model_dump(mode="json")["scaling"]["num_workers"] == [1, 2]
    assert cfg.model_dump(mode="json", exclude_defaults=True)["scaling"] == {"num_workers": [1, 2]}
    dump_config(cfg, tmp_path / "c.yaml")
    fixed = load_config(tmp_path / "c.yaml", ["scaling.num_workers=4"])
    assert (fixed.scaling.num_workers, fixed.scaling.min_workers, fixed.scaling.elastic()) == (4, None, False)
