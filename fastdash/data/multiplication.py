"""The built-in tool task: multi-digit multiplication, where calling the `python` tool pays.

Prompts `"123*45="`, answers the product `"5535"`. A 0.6M-parameter model cannot multiply 3 by 2
digits in its head, but it can copy the operands into a tool call and the tool's output into its
answer. Held-out pairs are chosen by a fixed hash, as in `arithmetic`, so no held-out problem is
ever trained on. The reward (`rewards.tools.final_answer_reward`) reads only the text after the last
tool response: the tool's own output never counts as the answer.
"""
from __future__ import annotations

import random

from fastdash.data.arithmetic import is_heldout


def make_problems(n: int, *, split: str = "train", seed: int = 0, digits: tuple[int, int] = (3, 2)) -> list[dict]:
    if split not in ("train", "heldout"):
        raise ValueError(f"multiplication split must be 'train' or 'heldout', got {split!r}")
    rng = random.Random(f"multiplication-{split}-{seed}-{digits}")
    out, seen = [], set()
    while len(out) < n:
        a = rng.randint(10 ** (digits[0] - 1), 10 ** digits[0] - 1)
        b = rng.randint(10 ** (digits[1] - 1), 10 ** digits[1] - 1)
        if is_heldout(a, b) != (split == "heldout") or (split == "heldout" and (a, b) in seen):
            continue
        seen.add((a, b))
        out.append({"prompt": f"{a}*{b}=", "answer": str(a * b)})
    return out
