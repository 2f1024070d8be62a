"""Reward functions: a registry by name, user functions by dotted path, and failure-safe scoring.

A reward function has the signature ``fn(completion: str, answer: str, **row) -> float``, where
``row`` holds the problem's other fields (e.g. ``tests`` for code). It may carry a ``batch``
attribute, ``fn.batch(completions, rows) -> list[float]``, which ``score_completions`` prefers
(the code reward uses it to run sandboxes in parallel).
"""

from __future__ import annotations

import importlib
import logging
from math import isinf, isnan  # (the name `math` is the submodule here)
from collections import Counter
from typing import Callable

from fastdash.rewards.code import code_reward
from fastdash.rewards.math import arithmetic_reward, gsm8k_reward, math_reward
from fastdash.rewards.tools import final_answer_reward

logger = logging.getLogger("fastdash")

RewardFn = Callable[..., float]

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "gsm8k": gsm8k_reward,
    "arithmetic": arithmetic_reward,
    "code": code_reward,
    "final_answer": final_answer_reward,  # tools: the text after the last tool response
}


def get_reward_fn(name_or_path: str) -> RewardFn:
    """A registry name (``math``, ``gsm8k``, ``arithmetic``, ``code``) or a dotted path to a user
    function: ``pkg.module:func`` or ``pkg.module.func``."""
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"reward: expected a registry name or a dotted path, got {name_or_path!r}")
    if name_or_path in REWARDS:
        return REWARDS[name_or_path]
    if ":" in name_or_path:
        module_name, _, attr = name_or_path.partition(":")
    elif "." in name_or_path:
        module_name, _, attr = name_or_path.rpartition(".")
    else:
        raise ValueError(
            f"reward: unknown name {name_or_path!r}; expected one of {sorted(REWARDS)} "
            "or a dotted path 'pkg.module:func'"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"reward: cannot import module {module_name!r} for {name_or_path!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise ValueError(f"reward: module {module_name!r} has no attribute {attr!r}")
    if not callable(fn):
        raise ValueError(f"reward: {name_or_path!r} is not callable (got {type(fn).__name__})")
    return fn


def _check(value) -> tuple[float, str | None]:
    """(reward, None) for a finite number, else (0.0, kind of failure)."""
    if value is None:
        return 0.0, "returned None"
    if isinstance(value, bool):
        return float(value), None
    if isinstance(value, (str, bytes)):
        return 0.0, f"returned a string ({value[:20]!r}), not a number"
    try:
        x = float(value)
    except (TypeError, ValueError):
        return 0.0, f"returned a non-number ({type(value).__name__})"
    if isnan(x):
        return 0.0, "returned NaN"
    if isinf(x):
        return 0.0, "returned inf"
    return x, None


def score_completions(
    fn: RewardFn, completions: list[str], rows: list[dict]
) -> tuple[list[float], int]:
    """Score each completion against its row; returns (rewards, n_failed).

    A reward that raises, or returns None, NaN, inf or a non-number, scores 0.0 and is counted in
    ``n_failed``. Failures are logged once per kind per call, with a count and one example, never
    one line per sample. ``rows[i]`` must hold ``answer``; its other fields go to ``fn`` as kwargs.
    """
    if len(completions) != len(rows):
        raise ValueError(
            f"score_completions: {len(completions)} completions but {len(rows)} rows"
        )
    name = getattr(fn, "__name__", repr(fn))
    failures: Counter = Counter()
    examples: dict[str, str] = {}
    raw: list | None = None

    batch = getattr(fn, "batch", None)
    if batch is not None and completions:
        try:
            raw = list(batch(completions, rows))
            if len(raw) != len(completions):
                raise ValueError(f"batch returned {len(raw)} rewards for {len(completions)} completions")
        except Exception as e:  # fall back to one call per sample
            logger.warning("reward %s: batch scoring failed (%s: %s); scoring one by one",
                           name, type(e).__name__, e)
            raw = None

    rewards: list[float] = []
    for i, (completion, row) in enumerate(zip(completions, rows)):
        if raw is not None:
            value = raw[i]
        else:
            kwargs = {k: v for k, v in row.items() if k not in ("completion", "answer")}
            try:
                value = fn(completion, row.get("answer", ""), **kwargs)
            except Exception as e:
                kind = f"raised {type(e).__name__}"
                failures[kind] += 1
                examples.setdefault(kind, str(e)[:200])
                rewards.append(0.0)
                continue
        x, kind = _check(value)
        if kind is not None:
            failures[kind] += 1
            examples.setdefault(kind, repr(value)[:200])
        rewards.append(x)

    for kind, count in failures.items():
        logger.warning("reward %s %s for %d of %d completions (scored 0.0); e.g. %s",
                       name, kind, count, len(completions), examples[kind])
    return rewards, sum(failures.values())


# WeightedReward / build_reward (several functions, weighted): fastdash.rewards.weighted, which imports this
__all__ = [
    "REWARDS",
    "get_reward_fn",
    "score_completions",
    "math_reward",
    "gsm8k_reward",
    "arithmetic_reward",
    "code_reward",
]
