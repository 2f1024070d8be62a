"""Round-robin data-parallel generation: order, sharding, forced lengths, errors, sync fan-out."""
from __future__ import annotations

import pytest

from fastdash.batch import Completion
from fastdash.rollout.base import SamplingParams
from fastdash.rollout.multi import RoundRobinEngine


class Echo:
    """Completion = [engine id, prompt's first token, sample index, forced length or 0]."""

    def __init__(self, h):
        self.h, self.calls, self.synced = h, [], 0

    def generate(self, prompts, n, params):
        self.calls.append([p[0] for p in prompts])
        forced = params.forced_lengths or [0] * (len(prompts) * n)
        return [Completion(p, [self.h, p[0], j, forced[i * n + j]], truncated=False)
                for i, p in enumerate(prompts) for j in range(n)]

    def sync_weights(self, model):
        self.synced += 1

    def sleep(self):
        pass

    def wake(self):
        pass


def test_round_robin_order_and_sharding():
    engines = [Echo(0), Echo(1), Echo(2)]
    rr = RoundRobinEngine(engines)
    prompts = [[10 + i] for i in range(7)]
    forced = tuple(range(100, 114))
    out = rr.generate(prompts, 2, SamplingParams(max_tokens=4, forced_lengths=forced, seed=5))
    assert [c.prompt_ids for c in out] == [p for p in prompts for _ in range(2)]
    assert [c.completion_ids[0] for c in out] == [i % 3 for i in range(7) for _ in range(2)]
    assert [c.completion_ids[3] for c in out] == list(forced)  # each sample keeps its forced length
    assert engines[0].calls == [[10, 13, 16]] and engines[1].calls == [[11, 14]] and engines[2].calls == [[12, 15]]
    rr.sync_weights(None)
    assert all(e.synced == 1 for e in engines)


def test_failing_engine_raises():
    class Broken(Echo):
        def generate(self, prompts, n, params):
            raise RuntimeError("server down")

    with pytest.raises(RuntimeError, match="server down"):
        RoundRobinEngine([Echo(0), Broken(1)]).generate([[1], [2]], 1, SamplingParams(max_tokens=2))


def test_fewer_prompts_than_engines():
    out = RoundRobinEngine([Echo(0), Echo(1), Echo(2)]).generate([[7]], 3, SamplingParams(max_tokens=2))
    assert [c.completion_ids[:3] for c in out] == [[0, 7, 0], [0, 7, 1], [0, 7, 2]]
