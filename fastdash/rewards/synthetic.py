"""A synthetic reward for throughput benchmarks on random-weight models.

A random model never solves a real task: every reward would be 0, every advantage 0, and DASH's
gradient filter would drop whole steps. Here each prompt row carries a success probability
`p_success` and a `uid`; sample k of that prompt succeeds iff a uniform draw keyed by (uid, k) falls
below it. The reward ignores the completion text, so every benchmark arm (whatever tokens its
sampler happened to emit) gets the same rewards for the same prompts, and the filter drops the same
samples through the same mechanism as in a real run (|A| <= tau for all-equal groups).

`success_probabilities` draws the per-prompt probabilities from a symmetric Beta(a, a) (U-shaped
like real difficulty: many prompts always or never solved), with `a` solved so that the expected
fraction of mixed-reward groups (what the filter keeps) is the configured value.
"""
from __future__ import annotations

import math

import numpy as np


def _mixed_fraction(a: float, group_size: int) -> float:
    """P(a group of G Bernoulli(p) draws is neither all 0 nor all 1), p ~ Beta(a, a).

    E[p^G] = prod_{k<G} (a + k) / (2a + k) for Beta(a, a); by symmetry E[(1-p)^G] is the same."""
    all_one = math.prod((a + k) / (2 * a + k) for k in range(group_size))
    return 1.0 - 2.0 * all_one


def max_mixed_fraction(group_size: int) -> float:
    """The supremum (p = 1/2 for every prompt): 1 - 2 / 2^G."""
    return 1.0 - 2.0 ** (1 - group_size)


def beta_for_mixed_fraction(fraction: float, group_size: int) -> float:
    """The Beta(a, a) parameter whose expected mixed-group fraction is `fraction` (bisection in log a)."""
    top = max_mixed_fraction(group_size)
    if not 0.0 < fraction < top:
        raise ValueError(f"mixed_fraction={fraction} must lie in (0, {top:.4f}) for groups of {group_size} "
                         "(at 1 - 2/2^G every prompt already has p = 1/2)")
    lo, hi = -20.0, 20.0  # log a; the fraction rises monotonically with a
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _mixed_fraction(math.exp(mid), group_size) < fraction else (lo, mid)
    return math.exp((lo + hi) / 2)


def success_probabilities(n: int, mixed_fraction: float, group_size: int, seed: int) -> list[float]:
    """n per-prompt success probabilities whose expected mixed-group fraction is `mixed_fraction`."""
    a = beta_for_mixed_fraction(mixed_fraction, group_size)
    return np.random.default_rng([seed, 7]).beta(a, a, size=n).tolist()


def _draw(uid: int, k: int) -> float:
    return float(np.random.default_rng([int(uid), int(k), 11]).random())


def synthetic_reward(completion: str, answer: str, *, uid: int, p_success: float, sample: int, **row) -> float:
    """1.0 when sample `sample` of prompt `uid` succeeds. Trainers score whole groups through
    `synthetic_reward.batch`, which numbers the samples of each prompt itself."""
    return 1.0 if _draw(uid, sample) < p_success else 0.0


def _batch(completions: list[str], rows: list[dict]) -> list[float]:
    """Rows arrive as the trainer builds them (G consecutive copies per prompt); the k-th occurrence
    of a uid within the call is its sample k, so the rewards do not depend on the text."""
    seen: dict[int, int] = {}
    out = []
    for completion, row in zip(completions, rows):
        k = seen.get(row["uid"], 0)
        seen[row["uid"]] = k + 1
        out.append(synthetic_reward(completion, "", uid=row["uid"], p_success=row["p_success"], sample=k))
    return out


synthetic_reward.batch = _batch
