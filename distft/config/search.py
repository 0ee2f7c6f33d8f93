"""The `tune:` section of a config: a search space over any config path, checked before any trial runs.

The rest of the YAML is the base config every trial starts from; a trial is that config with
its sampled values set at their paths, exactly as `a.b=c` overrides would set them, so a
path is valid in the space iff it is valid on the command line. Every path is checked with
probe values (both ends and the middle of a range, every choice) against the full schema,
so a typo, a wrong type or an out-of-range bound fails here, naming `tune.space.<path>`.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import math
from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator

from distft.config.load import (
    ConfigError,
    _suggest,
    apply_overrides,
    build_config,
    mark_overrides,
    override_paths,
    read_yaml,
    unknown_keys,
)
from distft.config.schema import STAGE_CLASSES, DistftConfig, Section

DOMAINS = ("loguniform", "uniform", "randint", "choice", "grid")
# Stages whose training loop is a HF Trainer with ReportCallback, which honours early stops.
TUNABLE_STAGES = tuple(k for k, cls in STAGE_CLASSES.items() if cls.tunable)


class Domain(Section):
    """One searched value: exactly one of these keys, e.g. `{loguniform: [1e-4, 1e-2]}`."""

    loguniform: list[float] | None = Field(None, min_length=2, max_length=2)
    uniform: list[float] | None = Field(None, min_length=2, max_length=2)
    randint: list[int] | None = Field(None, min_length=2, max_length=2, description="[low, high), high excluded")
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1, description="every value, in every sample")

    @model_validator(mode="after")
    def _one_kind(self):
        set_ = [k for k in DOMAINS if getattr(self, k) is not None]
        if len(set_) != 1:
            raise ValueError(f"give exactly one of {', '.join(DOMAINS)} (got {', '.join(set_) or 'none'}), "
                             "e.g. {loguniform: [1.0e-4, 1.0e-2]} or {choice: [8, 16]}")
        lo_hi = self.loguniform or self.uniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{self.kind}: the low end must be below the high end (got {lo_hi})")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError(f"loguniform: both ends must be > 0 (got {self.loguniform}); use uniform for ranges "
                             "that include 0")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in DOMAINS if getattr(self, k) is not None)

    @property
    def values(self) -> list:
        return getattr(self, self.kind)

    def probes(self) -> list:
        """Values a sample can take, for checking the path and the field's type and bounds up front."""
        if self.kind in ("choice", "grid"):
            return list(self.values)
        lo, hi = self.values
        if self.kind == "randint":
            return [lo, hi - 1]
        mid = (lo * hi) ** 0.5 if self.kind == "loguniform" else (lo + hi) / 2
        # A range samples fractions even between whole ends (4..16 has a round middle): probe one,
        # so an integer field (method.lora.r) fails here, not in a trial.
        fraction = lo + 0.3719 * (hi - lo)
        return [lo, mid, fraction, hi]


class ASHASettings(Section):
    """Asynchronous successive halving; times are optimizer steps (the `step` of each eval report)."""

    grace_period: int | None = Field(None, ge=1, description="Steps before a trial can be stopped; "
                                                             "default: train.eval_every")
    reduction_factor: float = Field(
        4.0, gt=1, description="Keep the best 1/reduction_factor at each rung; 4 is Ray's ASHAScheduler default"
    )
    max_t: int | None = Field(None, ge=1, description="Steps of the longest trial; default: train.max_steps")


class TuneSettings(Section):
    """`distft tune`: what to search, how to judge trials, and how many run at once."""

    space: dict[str, Domain] = Field(..., min_length=1, description="config path -> domain")
    metric: str = Field("eval_loss", description="A reported metric, e.g. eval_loss (from each eval)")
    mode: Literal["min", "max"] = "min"
    num_samples: int = Field(8, ge=1, description="Samples drawn; each grid value is tried in every sample")
    max_concurrent_trials: int = Field(2, ge=1, description="Capped by what the cluster can host at once")
    search: Literal["random", "optuna"] = Field("random", description="optuna: TPE, needs distft[optuna]")
    scheduler: Literal["asha", "none"] = "asha"
    asha: ASHASettings = ASHASettings()
    seed: int = 0
    decision_timeout_s: float = Field(
        120.0, gt=0, description="How long a trial waits at an eval for the scheduler's continue/stop decision"
    )

    def trial_count(self) -> int:
        grid = 1
        for domain in self.space.values():
            if domain.kind == "grid":
                grid *= len(domain.values)
        return self.num_samples * grid

    def grace_period(self, cfg: DistftConfig) -> int:
        return self.asha.grace_period or cfg.stages[0].train.eval_every or 1

    def max_t(self, cfg: DistftConfig) -> int:
        # Unbounded when the length comes from epochs: rungs past a trial's end are never reached.
        return self.asha.max_t or cfg.stages[0].train.max_steps or 10**9


def override(path: str, value: Any) -> str:
    """`path=value` as a command-line override: JSON is valid YAML, so lists and strings survive."""
    return f"{path}={json.dumps(value)}"


def trial_raw(base_raw: dict, params: dict[str, Any]) -> dict:
    """The base config (without its `tune:` section) with a trial's values set at their paths."""
    raw = copy.deepcopy({k: v for k, v in base_raw.items() if k != "tune"})
    return apply_overrides(raw, [override(p, v) for p, v in params.items()], source="<trial>")


def trial_config(base_raw: dict, params: dict[str, Any]) -> DistftConfig:
    return build_config(trial_raw(base_raw, params), source="<trial>")


def parse_tune(raw: dict, source: str) -> TuneSettings:
    section = raw.get("tune")
    if not isinstance(section, dict):
        raise ConfigError(source, ["tune: missing. Fix: add a `tune:` section with at least `space:`, e.g.\n"
                                   "    tune:\n      space:\n        train.lr: {loguniform: [1.0e-4, 1.0e-2]}"])
    problems = unknown_keys({k: v for k, v in section.items() if k != "space"}, TuneSettings, "tune")
    space = section.get("space")
    if not space:
        problems.append("tune.space: nothing to search. Fix: map at least one config path to a domain, e.g.\n"
                        "      space:\n        train.lr: {loguniform: [1.0e-4, 1.0e-2]}")
    elif isinstance(space, dict):
        for path, domain in space.items():
            if isinstance(domain, dict):
                for key in domain:
                    if key not in DOMAINS:
                        problems.append(f"tune.space.{path}.{key}: unknown domain; {_suggest(str(key), list(DOMAINS))}")
            else:
                problems.append(f"tune.space.{path}: must be a mapping with one of {', '.join(DOMAINS)}, "
                                f"e.g. {{choice: [{domain!r}]}} (got {domain!r})")
    if problems:
        raise ConfigError(source, problems)
    try:
        return TuneSettings.model_validate(section)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            path = ".".join(str(p) for p in ("tune", *err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            got = err.get("input")
            got_text = f" (got {got!r})" if err["type"] != "value_error" and not isinstance(got, (dict, list)) else ""
            lines.append(f"{path}: {msg}{got_text}.")
        raise ConfigError(source, lines) from None


def space_problems(base_raw: dict, tune: TuneSettings) -> list[str]:
    """Each path, with each probe value, against the full schema; one line per bad path."""
    problems = []
    for path, domain in tune.space.items():
        if path.split(".")[0] == "tune":
            problems.append(f"tune.space.{path}: the search cannot change its own settings.")
            continue
        for value in domain.probes():
            try:
                trial_config(base_raw, {path: value})
            except ConfigError as e:
                mine = [p for p in e.problems if path in p or path.split(".")[-1] in p] or e.problems
                line = f"tune.space.{path} = {value!r}: {mine[0]}"
                if domain.kind in ("uniform", "loguniform") and "integer" in mine[0]:
                    lo, hi = domain.values
                    line += (f" {domain.kind} samples fractions; for a whole number use "
                             f"{{randint: [{math.ceil(lo)}, {math.floor(hi) + 1}]}} or {{choice: [...]}}.")
                problems.append(line)
                break
    return problems


def tune_problems(cfg: DistftConfig, tune: TuneSettings) -> list[str]:
    """Whether this base config can be searched at all, with these scheduler settings."""
    problems = []
    if len(cfg.stages) != 1:
        problems.append(f"stages: tune searches one stage, this config has {len(cfg.stages)}. Fix: tune a "
                        "single-stage config (e.g. the SFT stage); its best config can then feed a pipeline.")
    if cfg.scaling.elastic():
        problems.append("scaling.num_workers: trials have a fixed size (the search packs them onto the cluster). "
                        f"Fix: scaling.num_workers={cfg.scaling.num_workers} for the search.")
    kind = cfg.stages[0].stage
    if kind not in TUNABLE_STAGES:
        problems.append(f"stage: {kind} cannot be tuned yet (its loop does not take early-stop decisions). "
                        f"Tunable stages: {', '.join(TUNABLE_STAGES)}.")
    if not tune.metric.startswith("eval_"):
        problems.append(f"tune.metric: trials are judged at evals, whose metrics start with eval_ "
                        f"(got {tune.metric!r}). Fix: tune.metric=eval_{tune.metric.removeprefix('eval_') or 'loss'}.")
    if tune.search == "optuna":
        if importlib.util.find_spec("optuna") is None:
            problems.append("tune.search: optuna is not installed. Fix: pip install 'distft[optuna]', or "
                            "tune.search=random.")
        grids = [p for p, d in tune.space.items() if d.kind == "grid"]
        if grids:
            problems.append(f"tune.space.{grids[0]}: grid is not supported with tune.search=optuna. "
                            "Fix: use choice, or tune.search=random.")
    if tune.scheduler == "asha":
        train = cfg.stages[0].train
        grace = tune.grace_period(cfg)
        if train.eval_every is None and tune.asha.grace_period is None:
            problems.append("tune.asha.grace_period: ASHA compares trials at evals, and train.eval_every is unset "
                            "(one eval per epoch). Fix: set train.eval_every (steps), or tune.asha.grace_period.")
        elif train.eval_every and grace % train.eval_every:
            problems.append(f"tune.asha.grace_period: {grace} is not a multiple of train.eval_every="
                            f"{train.eval_every}; trials are only judged at evals. Fix: "
                            f"tune.asha.grace_period={max(train.eval_every, grace // train.eval_every * train.eval_every)}.")
        if train.max_steps and grace >= train.max_steps:
            problems.append(f"tune.asha.grace_period: {grace} steps is not below train.max_steps={train.max_steps}, "
                            "so ASHA could never stop a trial. Fix: a smaller grace period, or tune.scheduler=none.")
        max_t = tune.asha.max_t
        if max_t is not None and max_t <= grace:
            problems.append(f"tune.asha.max_t: {max_t} steps is not above the grace period ({grace}), so ASHA could "
                            "never stop a trial. Fix: a larger tune.asha.max_t (or unset it: train.max_steps).")
        elif max_t is not None and train.max_steps and max_t > train.max_steps:
            problems.append(f"tune.asha.max_t: {max_t} is past train.max_steps={train.max_steps}; ASHA would place "
                            f"rungs no trial reaches. Fix: tune.asha.max_t={train.max_steps}, or unset it.")
    return problems


def load_search(path: str, overrides: list[str] | tuple[str, ...] = ()) -> tuple[dict, TuneSettings, DistftConfig]:
    """(base raw config with its `tune:` section, the tune settings, the base config), or ConfigError."""
    raw = read_yaml(path)
    from_cli = override_paths(raw, overrides)
    apply_overrides(raw, overrides, source=str(path))
    try:
        tune = parse_tune(raw, str(path))
        cfg = build_config({k: v for k, v in raw.items() if k != "tune"}, source=str(path))
        problems = space_problems(raw, tune) + tune_problems(cfg, tune)
        if problems:
            raise ConfigError(str(path), problems)
    except ConfigError as e:
        raise ConfigError(e.source, mark_overrides(e.problems, from_cli)) from None
    return raw, tune, cfg
