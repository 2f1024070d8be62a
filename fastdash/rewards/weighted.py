"""Several reward functions, weighted: TRL's `reward_funcs` + `reward_weights`.

`reward: [math, pkg.mod:format_reward]` with `reward_weights: [1.0, 0.1]` scores every completion
with each function (failure-safe, as `score_completions`); the trainer turns the [N, K] scores into
one advantage per sample (`fastdash.algo.multi_reward_advantages`, `multi_objective_aggregation`).
"""
from __future__ import annotations

import math

import torch

from fastdash.rewards import RewardFn, get_reward_fn, score_completions


class WeightedReward:
    """K reward functions with their names and weights.

    Called as a plain reward function it returns the weighted sum (what `reward/mean` reports).
    Held-out accuracy scores with `primary`, the first function: list the correctness reward first.
    """

    def __init__(self, fns: list[RewardFn], names: list[str], weights: list[float]):
        if not len(fns) == len(names) == len(weights) or not fns:
            raise ValueError(f"reward_weights: {len(weights)} weights for {len(fns)} reward functions; "
                             "give one weight per function")
        self.fns, self.names, self.weights = list(fns), list(names), [float(w) for w in weights]
        self.primary = self.fns[0]
        self.__name__ = "+".join(self.names)

    def __call__(self, completion: str, answer: str, **row) -> float:
        return sum(w * fn(completion, answer, **row) for fn, w in zip(self.fns, self.weights))


def build_reward(spec: str | list[str], weights: list[float] | None = None) -> RewardFn:
    """`reward` (one name / dotted path, or a list of them) and `reward_weights` -> one reward.

    A single function with weight 1 (or no weights) stays the plain function, so the default path
    is exactly what it was; anything else is a `WeightedReward`."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    if weights is None:
        weights = [1.0] * len(specs)
    if len(weights) != len(specs):
        raise ValueError(f"config: reward_weights={weights!r}: {len(weights)} weights for {len(specs)} reward "
                         f"functions (reward={spec!r}); give one weight per function")
    fns = [get_reward_fn(s) for s in specs]
    if len(fns) == 1 and weights[0] == 1.0:
        return fns[0]
    return WeightedReward(fns, _unique(s.replace(":", ".").rsplit(".", 1)[-1] for s in specs), weights)


def _unique(names) -> list[str]:
    """Metric names: a function listed twice gets its position appended (`rewards/math_1/mean`)."""
    names = list(names)
    return [f"{n}_{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def reward_parts(fn: RewardFn) -> tuple[list[RewardFn], list[str], list[float]]:
    """(functions, names, weights) of any reward: a plain function is one part of weight 1."""
    if isinstance(fn, WeightedReward):
        return fn.fns, fn.names, fn.weights
    return [fn], [getattr(fn, "__name__", "reward")], [1.0]


def score_parts(fn: RewardFn, completions: list[str], rows: list[dict]) -> tuple[torch.Tensor, int]:
    """Every function's scores: ([N, K] float64, failures summed over functions)."""
    fns, _, _ = reward_parts(fn)
    columns, failed = [], 0
    for part in fns:
        scores, n_failed = score_completions(part, completions, rows)
        columns.append(torch.tensor(scores, dtype=torch.float64))
        failed += n_failed
    return torch.stack(columns, dim=1) if completions else torch.zeros(0, len(fns), dtype=torch.float64), failed


def part_metrics(scores: torch.Tensor, names: list[str]) -> dict:
    """`rewards/<name>/mean` and `/std` of each function (TRL's names), when there are several."""
    if len(names) < 2:
        return {}
    std = scores.std(dim=0) if scores.shape[0] > 1 else torch.zeros(len(names), dtype=scores.dtype)
    return {k: v for i, name in enumerate(names)
            for k, v in ((f"rewards/{name}/mean", float(scores[:, i].mean())), (f"rewards/{name}/std", float(std[i])))}


def accuracy_reward(fn: RewardFn) -> RewardFn:
    """The function held-out accuracy counts (reward >= 1): the first of several, else `fn` itself."""
    return fn.primary if isinstance(fn, WeightedReward) else fn


def check_weights(weights) -> str | None:
    """Why `reward_weights` is unusable, or None: a list of finite numbers."""
    if not isinstance(weights, (list, tuple)) or not weights:
        return "must be a non-empty list of numbers, one per reward function, e.g. [1.0, 0.5]"
    for w in weights:
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
            return f"{w!r} is not a finite number"
    return None
