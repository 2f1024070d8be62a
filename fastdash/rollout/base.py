"""The rollout engine protocol: what the trainer needs from anything that generates.

Engines take tokenised prompts and return `Completion`s in prompt order, `n` consecutive
completions per prompt (the G samples of a group stay together). The trainer calls
`sync_weights` once per optimizer step, before the next `generate`, so samples stay on-policy.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch

from fastdash.batch import Completion

ENGINES = ("auto", "hf", "vllm")  # engine=auto: `fastdash.rollout.resolve_engine`
HF_DECODES = ("auto", "compact", "static", "generate")  # the HF engine's decode loop (rollout/hf.py)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    greedy: bool = False
    seed: int | None = None  # per-call seed; None = continue the engine's RNG stream
    # Benchmarks only: force EOS after exactly this many tokens per completion (length-controlled
    # generation, DESIGN.md section 7), one entry per returned completion (len(prompts) * n).
    forced_lengths: tuple[int, ...] | None = None


@runtime_checkable
class Engine(Protocol):
    name: str
    # Sequences decoded at once; the trainer halves it on an out-of-memory error and retries the call.
    # None = all of a call's rows (HF), or an engine that schedules its own batch (vLLM: max_num_seqs).
    max_batch_size: int | None

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, in order: [p0 x n, p1 x n, ...]."""
        ...

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Make the engine's weights equal to `model`'s (no-op when it shares them)."""
        ...

    def sleep(self) -> None:
        """Free generation memory (KV cache) while the trainer runs backprop."""
        ...

    def wake(self) -> None:
        ...


def stop_engine(engine) -> None:
    """Stop an engine that owns processes or process groups (vLLM's `shutdown`, optional in the
    protocol); an engine without one has nothing to stop."""
    shutdown = getattr(engine, "shutdown", None)
    if shutdown is not None:
        shutdown()


def eos_ids_of(model, tokenizer) -> tuple[int, ...]:
    """Every id that ends a completion: the tokenizer's EOS first, then generation_config's (an int or
    a list: Qwen2.5-Instruct has two)."""
    ids = [tokenizer.eos_token_id]
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += list(gen) if isinstance(gen, (list, tuple)) else [gen]
    out = tuple(dict.fromkeys(int(i) for i in ids if i is not None))
    if not out:
        raise ValueError("neither the tokenizer nor the model's generation_config has an eos_token_id; "
                         "set tokenizer.eos_token so completions can stop")
    return out
