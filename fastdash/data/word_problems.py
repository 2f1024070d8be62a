"""The built-in chat task `arithmetic_chat`: one- and two-step arithmetic word problems for chat models.

Prompts are TRL conversational messages, ``[{"role": "user", "content": "Mia has 12 pens. ..."}]``,
and answers the integer result, which the `gsm8k` reward compares with the completion's final number.
Small instruct models (SmolLM2-135M) solve some of them out of the box, so RL has a signal from step 1.

Held-out problems are decided by a hash of the arithmetic alone (kind and numbers), not the wording,
so no held-out calculation is ever trained on under another name or object.
"""
from __future__ import annotations

import random

HELDOUT_PERCENT = 20
NAMES = ("Mia", "Tom", "Ava", "Leo", "Zoe", "Sam", "Ivy", "Ben", "Lily", "Max", "Nora", "Omar")
ITEMS = ("apples", "pens", "stickers", "marbles", "books", "cookies", "stamps", "shells")

# kind: (template, number ranges, answer). Every answer is a non-negative integer.
KINDS = {
    "add": ("{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
            ((2, 20), (2, 20)), lambda a, b: a + b),
    "sub": ("{name} has {a} {item} and gives {b} of them away. How many {item} does {name} have left?",
            ((10, 30), (1, 9)), lambda a, b: a - b),
    "mul": ("{name} buys {a} bags with {b} {item} in each bag. How many {item} does {name} buy in total?",
            ((2, 6), (2, 6)), lambda a, b: a * b),
    "add_sub": ("{name} has {a} {item}, finds {b} more and then loses {c}. How many {item} does {name} have?",
                ((5, 20), (1, 9), (1, 5)), lambda a, b, c: a + b - c),
}


def is_heldout(kind: str, numbers: tuple[int, ...]) -> bool:
    # A fixed multiplicative hash of the calculation: deterministic, independent of Python's hash seed.
    h = sum(ord(c) for c in kind)
    for x in numbers:
        h = h * 1_000_003 + x
    return (h * 2_654_435_761 >> 7) % 100 < HELDOUT_PERCENT


def heldout_capacity() -> int:
    """How many distinct held-out calculations exist (a bigger request could never be filled)."""
    total = 0
    for kind, (_, ranges, _) in KINDS.items():
        grids = [()]
        for lo, hi in ranges:
            grids = [g + (x,) for g in grids for x in range(lo, hi + 1)]
        total += sum(is_heldout(kind, g) for g in grids)
    return total


def word_problem(kind: str, numbers: tuple[int, ...], name: str, item: str) -> dict:
    template, _, answer = KINDS[kind]
    fields = dict(zip("abc", numbers), name=name, item=item)
    return {"prompt": [{"role": "user", "content": template.format(**fields)}],
            "answer": str(answer(*numbers)), "kind": kind}


def make_word_problems(n: int, *, split: str = "train", seed: int = 0) -> list[dict]:
    """`n` problems of the split drawn with `seed`; held-out calculations are distinct."""
    if split not in ("train", "heldout"):
        raise ValueError(f"arithmetic_chat split must be 'train' or 'heldout', got {split!r}")
    if n < 0:
        raise ValueError(f"number of problems must be >= 0, got {n}")
    if split == "heldout" and n > heldout_capacity():
        raise ValueError(f"arithmetic_chat has {heldout_capacity()} held-out problems; asked for {n}")
    rng = random.Random(f"arithmetic_chat-{split}-{seed}")
    kinds = sorted(KINDS)
    want_heldout = split == "heldout"
    out, seen = [], set()
    while len(out) < n:
        kind = rng.choice(kinds)
        numbers = tuple(rng.randint(lo, hi) for lo, hi in KINDS[kind][1])
        name, item = rng.choice(NAMES), rng.choice(ITEMS)
        if is_heldout(kind, numbers) != want_heldout or (want_heldout and (kind, numbers) in seen):
            continue
        seen.add((kind, numbers))
        out.append(word_problem(kind, numbers, name, item))
    return out
