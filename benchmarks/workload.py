"""What every benchmark arm is fed: one seeded list of prompt rows per seed, read in the same order.

Two workloads:
- `paper`: DASH's shape scaled down for a random-weight model. Prompts of varied, realistic length
  (gamma-distributed, tens of tokens) made of random characters of the model's tokenizer (one token
  each), each with a success probability for the synthetic reward (`fastdash.rewards.synthetic`),
  drawn so that the configured fraction of groups is mixed (what DASH's filter keeps). Completion
  lengths are forced by the trainer's `length_control_mean` (long-tailed, capped).
- `arith`: the built-in arithmetic problems (the shipped tiny model's learning task), in the order
  the trainer's own `PromptSampler` would draw them for the seed (the TRL arm draws the same).

A `PromptFeed` is the trainer's public `prompt_source`: each arm gets its own reader over the same
rows and logs the uids it drew per step, so the harness can check that the arms saw the same prompts.
"""
from __future__ import annotations

import numpy as np

from fastdash.data.arithmetic import make_problems
from fastdash.models import CHAR_VOCAB
from fastdash.rewards.synthetic import success_probabilities
from fastdash.state import PromptSampler, TrainState

PROMPT_CHARS = CHAR_VOCAB[3:]  # the char tokenizer's non-special symbols: one token per character
SYNTHETIC_REWARD = "fastdash.rewards.synthetic:synthetic_reward"
# Size keys that describe the workload, not the trainer (make_config strips them from the Config).
WORKLOAD_KEYS = ("workload", "mixed_fraction", "prompt_length_mean", "trl_micro_batch_size")


def prompt_lengths(n: int, mean: float, cap: int, seed: int) -> list[int]:
    """Gamma(4, mean / 4) lengths (a right tail like real questions), clipped to [8, cap]."""
    rng = np.random.default_rng([seed, 3])
    return [int(x) for x in np.clip(rng.gamma(4.0, mean / 4.0, size=n).round(), min(8, cap), cap)]


def paper_rows(n: int, *, seed: int, mean_length: float, max_length: int, mixed_fraction: float,
               group_size: int) -> list[dict]:
    rng = np.random.default_rng([seed, 5])
    p = success_probabilities(n, mixed_fraction, group_size, seed)
    rows = []
    for uid, length in enumerate(prompt_lengths(n, mean_length, max_length, seed)):
        text = "".join(rng.choice(PROMPT_CHARS, size=length))
        rows.append({"uid": uid, "prompt": text, "answer": "", "p_success": p[uid]})
    return rows


def arith_rows(n_problems: int, n_prompts: int, *, seed: int) -> list[dict]:
    """The arithmetic problems in PromptSampler's order for this seed (shuffled epochs)."""
    problems = make_problems(n_problems, split="train", seed=seed)
    order = PromptSampler(len(problems), seed, True, TrainState()).take(n_prompts)
    return [{**problems[i], "uid": i} for i in order]


def rows_for(size: dict, seed: int, n_prompts: int) -> list[dict]:
    """The seed's rows for a benchmark size (at least n_prompts of them)."""
    if size.get("workload", "arith") == "paper":
        return paper_rows(n_prompts, seed=seed, mean_length=size["prompt_length_mean"],
                          max_length=size["max_prompt_length"], mixed_fraction=size["mixed_fraction"],
                          group_size=size["num_generations"])
    return arith_rows(size["num_train_problems"], n_prompts, seed=seed)


class PromptFeed:
    """One arm's reader over a seed's rows: `feed(k)` is the next k rows (the trainer's prompt_source)."""

    def __init__(self, rows: list[dict]):
        self.rows, self.cursor = rows, 0
        self.drawn: list[int] = []  # uids drawn since the last `reset_log`

    def __call__(self, k: int) -> list[dict]:
        if self.cursor + k > len(self.rows):
            raise ValueError(f"the benchmark prepared {len(self.rows)} prompts and an arm asked for "
                             f"{self.cursor + k}: every arm must take the same number of steps")
        out = self.rows[self.cursor : self.cursor + k]
        self.cursor += k
        self.drawn += [r["uid"] for r in out]
        return out

    def reset_log(self) -> list[int]:
        drawn, self.drawn = self.drawn, []
        return drawn
