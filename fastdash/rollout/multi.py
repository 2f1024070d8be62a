"""Data-parallel generation over several engines: the paper's H inference servers.

Prompt i goes to engine i % H (round robin, as the paper's client does), the engines run in
parallel threads, and completions come back in the original order. Weight sync, sleep and wake
go to every engine. A failing engine raises (the paper's client only printed it and left holes).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from fastdash.batch import Completion
from fastdash.rollout.base import SamplingParams, stop_engine


class RoundRobinEngine:
    name = "round_robin"
    max_batch_size = None  # vLLM schedules its own batch (max_num_seqs, from the plan)

    def __init__(self, engines: list):
        if not engines:
            raise ValueError("RoundRobinEngine needs at least one engine")
        self.engines = engines
        self.pool = ThreadPoolExecutor(max_workers=len(engines), thread_name_prefix="fastdash-gen")

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        H = len(self.engines)
        shards = [list(range(h, len(prompts), H)) for h in range(H)]
        futures = [self.pool.submit(self.engines[h].generate, [prompts[i] for i in idx], n,
                                    self._shard_params(params, idx, n, h))
                   for h, idx in enumerate(shards) if idx]
        out: list[Completion | None] = [None] * (len(prompts) * n)
        for (h, idx), fut in zip([(h, idx) for h, idx in enumerate(shards) if idx], futures):
            got = fut.result()  # re-raises an engine's error here
            if len(got) != len(idx) * n:
                raise RuntimeError(f"engine {h} returned {len(got)} completions for {len(idx) * n}")
            for k, i in enumerate(idx):
                out[i * n : (i + 1) * n] = got[k * n : (k + 1) * n]
        return out

    @staticmethod
    def _shard_params(params: SamplingParams, idx: list[int], n: int, h: int) -> SamplingParams:
        forced = None
        if params.forced_lengths is not None:
            forced = tuple(params.forced_lengths[i * n + j] for i in idx for j in range(n))
        seed = None if params.seed is None else params.seed * 131 + h  # distinct streams per engine
        return replace(params, forced_lengths=forced, seed=seed)

    def sync_weights(self, model) -> None:
        from fastdash.fsdp import gathered

        with gathered(model):  # FSDP: gathered once for every engine
            for e in self.engines:
                e.sync_weights(model)

    def shutdown(self) -> None:
        for e in self.engines:
            stop_engine(e)

    def sleep(self) -> None:
        for e in self.engines:
            e.sleep()

    def wake(self) -> None:
        for e in self.engines:
            e.wake()
