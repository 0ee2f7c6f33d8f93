"""Reward functions: Python scores for sampled responses, alone or weighted with a reward model.

A reward function is `fn(prompts, completions, references) -> list[float]`, one score
per sample: the prompt text the policy saw, the text it generated (special tokens
removed), and the dataset's reference answer (None when the row has none). The
built-in `exact_match` is a verifiable reward for tasks with one right answer; any
other `package.module:function` is imported by name.
"""

from __future__ import annotations

import pkgutil
from collections.abc import Callable, Sequence

RewardFn = Callable[[Sequence[str], Sequence[str], Sequence["str | None"]], Sequence[float]]


def normalize_answer(text: str) -> str:
    return " ".join(text.strip().split()).lower()


def exact_match(prompts, completions, references) -> list[float]:
    """1.0 when the completion equals the reference answer (case and spacing ignored), else 0.0."""
    return [float(ref is not None and normalize_answer(c) == normalize_answer(ref))
            for c, ref in zip(completions, references)]


BUILTIN: dict[str, RewardFn] = {"exact_match": exact_match}


class RewardFunctionError(ValueError):
    """A reward function that cannot be found or returned something unusable."""


def resolve(name: str) -> RewardFn:
    """A built-in by name, or `package.module:function` imported."""
    if name in BUILTIN:
        return BUILTIN[name]
    module_name, sep, attr = name.partition(":")
    if not sep or not module_name or not attr:
        raise RewardFunctionError(
            f"reward.functions: {name!r} is neither a built-in ({', '.join(BUILTIN)}) nor 'package.module:function'."
        )
    try:
        fn = pkgutil.resolve_name(name)
    except (ImportError, AttributeError, ValueError) as e:
        raise RewardFunctionError(f"reward.functions: cannot import {name!r}: {e}. Fix: the module must be "
                                  "importable on every worker (installed, or on PYTHONPATH).") from None
    if not callable(fn):
        raise RewardFunctionError(f"reward.functions: {name!r} is not callable.")
    return fn


def weighted_scores(functions: dict[str, float], prompts, completions, references) -> list[float]:
    """sum over functions of weight * fn(...), one float per sample; checks what each function returns."""
    total = [0.0] * len(completions)
    for name, weight in functions.items():
        scores = list(resolve(name)(prompts, completions, references))
        if len(scores) != len(completions):
            raise RewardFunctionError(f"reward function {name!r} returned {len(scores)} scores for "
                                      f"{len(completions)} completions; it must return one per completion.")
        for i, s in enumerate(scores):
            try:
                total[i] += weight * float(s)
            except (TypeError, ValueError):
                raise RewardFunctionError(f"reward function {name!r} returned {s!r} (item {i}); "
                                          "scores must be numbers.") from None
    return total
