"""The built-in task: n-digit addition, seeded, with a held-out split that SFT and RL never see.

Prompts are `"123+045="`, answers `"8610"`: the sum 0168, zero-padded and written least significant
digit first. Fixed width puts every digit at a fixed position, and the reversed answer lets a model
emit each digit right after the carry it depends on: a 0.6M-parameter model learns it in minutes. A pair (a, b) is held out when a hash of it falls in
the bottom `HELDOUT_PERCENT`; train draws reject those pairs, so no held-out problem can leak
into SFT or RL whatever the seed.
"""
from __future__ import annotations

import random

HELDOUT_PERCENT = 5


def is_heldout(a: int, b: int) -> bool:
    # A fixed multiplicative hash: cheap, deterministic, independent of Python's hash seed.
    return ((a * 1_000_003 + b) * 2_654_435_761 >> 7) % 100 < HELDOUT_PERCENT


def problem(a: int, b: int, digits: int = 3) -> dict:
    return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=", "answer": f"{a + b:0{digits + 1}d}"[::-1]}


def make_problems(n: int, *, split: str = "train", seed: int = 0, digits: int = 3) -> list[dict]:
    """`n` problems of the split, drawn with `seed`; held-out problems are distinct pairs."""
    if split not in ("train", "heldout"):
        raise ValueError(f"arithmetic split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"number of problems must be >= 0, got {n}")
    rng = random.Random(f"arithmetic-{split}-{seed}-{digits}")
    hi = 10**digits - 1
    want_heldout = split == "heldout"
    out, seen = [], set()
    while len(out) < n:
        a, b = rng.randint(0, hi), rng.randint(0, hi)
        if is_heldout(a, b) != want_heldout or (want_heldout and (a, b) in seen):
            continue
        seen.add((a, b))
        out.append(problem(a, b, digits))
    return out

