"""What decides what a run does next: counters, data position (`TrainState`), and the seeded
epoch order of the training problems (`PromptSampler`). Checkpoints save and restore it."""
from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass
class TrainState:
    """Everything that decides what happens next: step counters, data position, RNG seeds."""

    step: int = 0  # optimizer steps done
    rollouts: int = 0  # rollouts done (generation rounds)
    epoch: int = 0
    cursor: int = 0  # next prompt index within the epoch's order
    samples: int = 0  # samples generated
    nonfinite_streak: int = 0
    counters: dict = field(default_factory=lambda: {"skipped_empty_steps": 0, "nonfinite_steps": 0,
                                                    "reward_failures": 0, "oom_retries": 0,
                                                    "stale_dropped_samples": 0})


class PromptSampler:
    """Epoch-wise permutation of problem indices, reproducible from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int, shuffle: bool, state: TrainState):
        self.n, self.seed, self.shuffle, self.state = n, seed, shuffle, state

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order(self.state.epoch)
            take = min(k - len(out), self.n - self.state.cursor)
            out += order[self.state.cursor : self.state.cursor + take]
            self.state.cursor += take
            if self.state.cursor == self.n:
                self.state.epoch, self.state.cursor = self.state.epoch + 1, 0
        return out
