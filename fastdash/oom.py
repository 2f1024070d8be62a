"""Run-time OOM back-off: halve a budget and retry when a step runs out of memory.

The plan (`fastdash.scheduler`) is a prediction; fragmentation or a sample mix it did not foresee
can still run out of memory. The trainer wraps generation and backprop in `run_with_oom_backoff`,
which retries the whole call at half the budget and tells the caller, so later steps keep it.
"""
from __future__ import annotations

import gc
import logging
import weakref
from typing import Callable, TypeVar

import torch

log = logging.getLogger(__name__)
T = TypeVar("T")
_releasable: "weakref.WeakSet" = weakref.WeakSet()  # buffers kept across steps, freed before a retry


def register_releasable(obj) -> None:
    """`obj.release()` frees memory it keeps between calls (static decode's KV buffers); every OOM
    back-off calls it before retrying. Held weakly: registering keeps nothing alive."""
    _releasable.add(obj)


def is_oom_error(e: BaseException) -> bool:
    """CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    msg = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in msg or "can't allocate memory" in msg)


def run_with_oom_backoff(
    run: Callable[[int], T],
    budget: int,
    *,
    max_retries: int = 3,
    min_budget: int = 1,
    is_oom: Callable[[BaseException], bool] = is_oom_error,
    what: str = "backprop token budget",
    plan=None,
    on_backoff: Callable[[int, int], None] | None = None,
) -> T:
    """`run(budget)`; on an OOM halve the budget (not below `min_budget`), free caches and retry.

    `run` must start from a clean state on every call (the trainer re-packs the kept samples and
    zeroes partial gradients), so a retried step gives the same result. `on_backoff(old, new)`
    lets the caller keep the smaller budget for later steps. After `max_retries` OOMs, or an OOM
    at `min_budget`, raises RuntimeError naming the budgets tried and the plan (a `MemoryPlan`).
    """
    tried = []
    while True:
        tried.append(budget)
        try:
            return run(budget)
        except BaseException as e:  # noqa: B902 - filtered by is_oom, everything else re-raised
            if not is_oom(e):
                raise
            msg = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is released.
        _free_caches()
        new = max(min_budget, budget // 2)
        if len(tried) > max_retries or new == budget:
            table = f"\n{plan.to_table()}" if plan is not None else ""
            raise RuntimeError(f"out of memory at {what} {budget} after trying {tried} "
                               f"({len(tried) - 1} back-offs, max_retries={max_retries}); "
                               f"last error: {msg}{table}")
        log.warning("OOM at %s %d (%s): halving to %d and retrying", what, budget, msg, new)
        if on_backoff is not None:
            on_backoff(budget, new)
        budget = new


def _free_caches() -> None:
    for obj in list(_releasable):  # buffers kept across steps (static decode): the retry needs the room
        obj.release()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
