"""Memory-aware scheduler: choose the backprop token budget and the generation concurrency from
measured memory (`plan_memory` -> `MemoryPlan`). The run-time OOM back-off is `fastdash.oom`.

Memory model (DESIGN.md section 6), on the device that trains, in three steps:

    fixed      = weights + grads (param dtype, fp32 master) + optimizer state (fp32)
                 + reference weights (beta > 0, compute dtype)
                 + HF engine weights (compute dtype, when it is not the parameters' dtype)
    generation = fixed + B * (kv_per_token * L + logits_per_seq)    B = concurrent sequences
                 (vLLM: fixed + its share: own weights + overhead + KV cache)
    backprop   = fixed + c + s * T + q * T^2    T = packed tokens per micro-batch

c, s, q come from probe forward+backward passes, under the trainer's autocast, over packed rows of
worst-case samples (L = max_prompt_length + max_completion_length), so a late long sample cannot
OOM an accepted plan. q ~ 0 with varlen attention (its T * L term is linear at fixed L, CPU
included); attending over the whole packed row with a block mask (transformers' sdpa path) makes
it > 0, and a probe at the chosen budget verifies it.
Budgets fill `safety` x (free + already-resident bytes). Measurement lives in `fastdash.memory`;
this module is arithmetic over its numbers, testable with a fake probe.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from fastdash.memory import (
    ActivationFit,
    MemoryProbe,
    allocated_model_bytes,
    copy_bytes,
    default_probe,
    ensure_grads,
    fit_activation,
    kv_bytes_per_token,
    measure_activations,
    probe_forward_backward,
)
from fastdash.memory_plan import FixedPart, MemoryPlan, MemoryPlanError, Pins, Workload, fixed_part
from fastdash.oom import is_oom_error

log = logging.getLogger(__name__)
GiB = 1024**3

LOGITS_COPIES = 4  # [B, V] fp32 tensors alive per generation step (logits, processed, probs, ...)


def _solve_tokens(fit: ActivationFit, room: int, L: int, M: int, need_msg: str) -> int:
    """Largest whole number of worst-case samples' tokens (n * L) that fits in `room`, capped at
    the whole step (M samples)."""
    tokens = fit.max_tokens(room)
    if tokens < L:
        raise MemoryPlanError(f"one worst-case sample of {L} tokens is predicted to need {fit(L) / GiB:.3f} GiB "
                              f"of activations, {room / GiB:.3f} GiB left after the fixed part: {need_msg}")
    return min(tokens, M * L) // L * L


def _verify_tokens(activation_fn, points: list[tuple[int, int]], tokens: int, room: int, rounds: int, L: int) -> int:
    """Measure at the chosen budget; if it does not fit, bracket between the largest measured point
    that fits and the smallest that does not (secant, safe for convex growth) and try again.

    The extrapolation from small probes can miss growth that starts late (a T^2 attention mask,
    an allocator threshold). Appends its measurements to `points`; returns a budget that was
    measured to fit, or one inside the probed range when no measurement was needed.
    """
    failed = False
    for _ in range(rounds):
        measured = dict(points)
        if tokens in measured:
            failed = measured[tokens] > room
            break
        if not failed and tokens <= max(measured):
            break  # between probes that all fitted: the fit interpolates
        points.append((tokens, int(activation_fn(tokens))))
        if points[-1][1] <= room:
            return tokens
        failed = True
        t0, p0 = max(p for p in points if p[1] <= room)
        t1, p1 = min(p for p in points if p[1] > room)
        slope = (p1 - p0) / (t1 - t0)
        tokens = max(t0, (t0 + int((room - p0) // slope)) // L * L)
    if failed:  # out of rounds: fall back to the largest budget measured to fit
        tokens = max(t for t, p in points if p <= room)
    return tokens


def _fastest_tokens(times: dict[int, float], memory_tokens: int, tolerance: float = 0.85) -> int | None:
    """Where the probes' tokens/s stops growing: None when the largest probed size that fits is
    within `tolerance` of the best (bigger is about as fast: fill memory); else the largest
    probed size within `tolerance` of the best. Time per token grows with T when attention spans
    the whole packed row (sdpa with a block mask); with varlen attention it does not. The probes
    are single timings on possibly shared machines: only a clear slowdown (> 15%) stops the plan
    short of memory (measured on CPU: a 0.98 tolerance picked 1024 of a flat 512-2048 curve).
    """
    rates = {t: t / max(dt, 1e-9) for t, dt in times.items() if t <= memory_tokens}
    if not rates:
        return None
    best = max(rates.values())
    if rates[max(rates)] >= tolerance * best:
        return None
    return max(t for t, r in rates.items() if r >= tolerance * best)




@dataclass(frozen=True)
class Capacity:
    """The device's memory for this run: `usable` = safety x (measured free + already resident)."""

    total: int
    free: int
    resident: int
    safety: float
    fixed: FixedPart

    @property
    def usable(self) -> int:
        return int(self.safety * (self.free + self.resident))

    @property
    def dynamic(self) -> int:
        """What generation and backprop activations share."""
        return self.usable - self.fixed.total

    def describe(self) -> str:
        return (f"measured free {self.free / GiB:.3f} GiB + resident {self.resident / GiB:.3f} GiB, x safety "
                f"{self.safety} = {self.usable / GiB:.3f} GiB usable; fixed part ({self.fixed.describe()})")


@dataclass
class Generation:
    kv_per_token: int
    fit: int  # sequences predicted to fit
    concurrency: int
    peak: int
    train_room: int  # bytes left for backprop activations (less an awake vLLM's share)
    utilization: float | None = None  # vLLM only
    warnings: list[str] = field(default_factory=list)


@dataclass
class Backprop:
    tokens: int
    memory_tokens: int  # the largest budget that fits, before the throughput limit
    fastest: int | None
    fit: ActivationFit
    points: list[tuple[int, int]]
    warnings: list[str] = field(default_factory=list)


def _dtype_bytes(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# The three steps: fixed part (memory_plan.fixed_part), generation, backprop


def measure_capacity(model, probe: MemoryProbe, fixed: FixedPart, safety: float,
                     resident_bytes: int | None) -> Capacity:
    """`resident_bytes` (default: the model's weights and allocated grads on the probe's device) is
    what the free measurement already excludes but the fixed part counts."""
    if resident_bytes is None:
        resident_bytes = allocated_model_bytes(model, probe.device)
    cap = Capacity(int(probe.total_bytes()), int(probe.free_bytes()), int(resident_bytes), safety, fixed)
    if cap.dynamic <= 0:
        raise MemoryPlanError(f"the fixed part alone does not fit: {cap.describe()}")
    return cap


def plan_generation(model, w: Workload, cap: Capacity, pins: Pins, kv_dtype_bytes: int | None = None,
                    vllm_overhead_bytes: int = GiB) -> Generation:
    """Concurrent sequences of L tokens: KV cache in the compute dtype plus fp32 logits (HF), or
    vLLM's share of the device. Runs before backprop: an awake colocated vLLM takes its share first."""
    kv_tok = kv_bytes_per_token(model.config, kv_dtype_bytes or _dtype_bytes(w.compute_dtype))
    if w.engine == "hf":
        gen = _hf_generation(model, w, cap, pins, kv_tok)
    else:
        gen = _vllm_generation(copy_bytes(model, w.compute_dtype), w, cap, pins, kv_tok, vllm_overhead_bytes)
    L = w.sample_len
    if gen.fit < 1 and pins.generation is None:
        raise MemoryPlanError(f"not even one generation sequence of {L} tokens fits "
                              f"({kv_tok * L / GiB:.3f} GiB KV cache each): {cap.describe()}")
    if pins.generation is not None and pins.generation > gen.fit:
        gen.warnings.append(f"generation_concurrency={pins.generation} is over the {gen.fit} sequences predicted "
                            "to fit; expect OOM back-off in generation")
    if pins.utilization is not None and gen.peak > cap.usable:
        gen.warnings.append(f"gpu_memory_utilization={pins.utilization} plus the trainer's fixed part needs "
                            f"{gen.peak / GiB:.3f} GiB, over the {cap.usable / GiB:.3f} GiB usable")
    return gen


def _hf_generation(model, w: Workload, cap: Capacity, pins: Pins, kv_tok: int) -> Generation:
    per_seq = kv_tok * w.sample_len + LOGITS_COPIES * 4 * model.config.vocab_size
    fit = cap.dynamic // per_seq
    batch = pins.generation or min(w.generation_samples, fit)
    return Generation(kv_tok, fit, batch, cap.fixed.total + batch * per_seq, train_room=cap.dynamic)


def _vllm_generation(weights: int, w: Workload, cap: Capacity, pins: Pins, kv_tok: int, overhead: int) -> Generation:
    """vLLM holds its own compute-dtype weight copy, its activations/graphs (overhead) and the KV
    cache; asleep during backprop it frees them all, awake it keeps its share."""
    kv_seq = kv_tok * w.sample_len
    room = cap.dynamic if w.vllm_sleep else cap.dynamic // 2
    if pins.utilization is not None:
        room = int(pins.utilization * cap.total)
    fit = max(0, (room - weights - overhead) // kv_seq)
    batch = pins.generation or min(w.generation_samples, fit)
    vllm_bytes = weights + overhead + batch * kv_seq
    if pins.utilization is None and not w.vllm_sleep:
        vllm_bytes = min(vllm_bytes, room)
    util = pins.utilization if pins.utilization is not None else math.floor(100 * max(vllm_bytes, 1) / cap.total) / 100
    share = int(util * cap.total)
    return Generation(kv_tok, fit, batch, cap.fixed.total + share, utilization=util,
                      train_room=cap.dynamic if w.vllm_sleep else cap.dynamic - share)


def plan_backprop(activation_fn: Callable[[int], int], w: Workload, cap: Capacity, room: int, pins: Pins, *,
                  probe_samples=(1, 2, 4, 8), repeats: int = 1, verify_rounds: int = 4,
                  times: dict[int, float] | None = None) -> Backprop:
    """The token budget: probe 1, 2, 4, 8 worst-case samples (while the fit says they fit in `room`),
    solve the fit, verify by a probe at the chosen budget, stop short where tokens/s stops growing
    (when `times` has the probes' timings). A pinned budget only gets the 1- and 2-sample probes and
    is checked against their fit (a warning when it is predicted not to fit): pinning skips the sweep."""
    L, M = w.sample_len, w.samples_per_step
    if pins.tokens is not None:  # a pin is checked against a small fit, not searched for and verified
        probe_samples = tuple(n for n in probe_samples if n <= 2) or probe_samples[:1]
    points: list[tuple[int, int]] = []
    for n in sorted({min(n, M) for n in probe_samples}):
        t = n * L
        if points and fit_activation(points)(t) > room:
            break
        points.append((t, max(int(activation_fn(t)) for _ in range(repeats))))
    if points[0][1] > room:
        raise MemoryPlanError(f"one worst-case sample of {L} tokens needs {points[0][1] / GiB:.3f} GiB of "
                              f"activations, {room / GiB:.3f} GiB left after the fixed part: {cap.describe()}")
    fit = fit_activation(points)
    tokens = _solve_tokens(fit, room, L, M, cap.describe())
    if pins.tokens is not None:
        bp = Backprop(tokens, tokens, None, fit, points)  # tokens: predicted, not verified
        bp.warnings += _check_pinned_tokens(pins.tokens, bp, cap, room, L)
        bp.tokens = pins.tokens
        return bp
    tokens = _verify_tokens(activation_fn, points, tokens, room, verify_rounds, L)
    memory_tokens, fastest = tokens, None
    if times:
        fastest = _fastest_tokens(times, tokens)
        tokens = min(tokens, fastest or tokens)
    probed = max(t for t, _ in points[:len(probe_samples)])
    # the fit the plan reports: the probes, or the three measurements nearest the chosen budget
    fit = fit_activation(points if tokens <= probed else sorted(p for p in points if p[0] <= tokens)[-3:])
    return Backprop(tokens, memory_tokens, fastest, fit, points)


def _check_pinned_tokens(pinned: int, bp: Backprop, cap: Capacity, room: int, L: int) -> list[str]:
    warnings = []
    if pinned < L:
        warnings.append(f"max_tokens_per_microbatch={pinned} is below the longest sample ({L} tokens)")
    if pinned > bp.tokens and bp.fit(pinned) > room:
        warnings.append(f"max_tokens_per_microbatch={pinned} is predicted to need "
                        f"{(cap.fixed.total + bp.fit(pinned)) / GiB:.3f} GiB, over the {cap.usable / GiB:.3f} GiB "
                        f"usable (the largest that fits: {bp.memory_tokens}); expect OOM back-off")
    return warnings


@contextlib.contextmanager
def _probing(model, w: Workload, probe: MemoryProbe, probe_step, times: dict):
    """The measured activation function, set up before the free memory is measured: its first-call
    allocations (imports, thread pools, kernels) and the grads it allocates are then resident.
    The grads it allocated are dropped again on exit."""
    restore = ensure_grads(model)
    try:
        if probe_step is None:
            probe_step = functools.partial(probe_forward_backward, model, sample_len=w.sample_len,
                                           completion_len=w.max_completion_length, compute_dtype=w.compute_dtype)
        activation_fn = measure_activations(model, probe, probe_step, times)
        try:
            activation_fn(w.sample_len)  # warm-up; its peak is measured again by the plan
        except BaseException as e:
            if not is_oom_error(e):
                raise
            raise MemoryPlanError(f"one worst-case sample of {w.sample_len} tokens runs out of memory in the probe "
                                  f"forward+backward ({str(e).splitlines()[0][:200]})") from None
        yield activation_fn
    finally:
        for p in restore:
            p.grad = None


# ---------------------------------------------------------------------------------------------
# The plan


def plan_memory(
    model: torch.nn.Module,
    *,
    max_prompt_length: int,
    max_completion_length: int,
    samples_per_step: int,
    samples_per_generation: int | None = None,
    beta: float = 0.0,
    optimizer: str = "adamw",
    engine: str = "hf",
    vllm_sleep: bool = True,
    compute_dtype: torch.dtype | None = None,
    lora: bool = False,
    safety: float = 0.9,
    memory_budget: int | None = None,
    max_tokens_per_microbatch: int | str = "auto",
    generation_concurrency: int | str = "auto",
    gpu_memory_utilization: float | str = "auto",
    probe: MemoryProbe | None = None,
    probe_step: Callable[[int], object] | None = None,
    activation_fn: Callable[[int], int] | None = None,
    probe_samples: tuple[int, ...] = (1, 2, 4, 8),
    probe_repeats: int = 3,
    verify_rounds: int = 4,
    throughput_aware: bool = True,
    resident_bytes: int | None = None,
    kv_dtype_bytes: int | None = None,
    vllm_overhead_bytes: int = GiB,
) -> MemoryPlan:
    """Measure, then choose `max_tokens_per_microbatch` and the generation concurrency.

    The first ten keywords are the `Workload` (see there); `compute_dtype` (default: the
    parameters' dtype) is the trainer's autocast dtype, the one the probes run in and the reference
    model, KV cache and engine weights are held in. Pinned values (not "auto") are kept and checked:
    a warning says when one is predicted not to fit. `probe_step(T)` runs one forward+backward over
    T packed tokens (default: `fastdash.memory.probe_forward_backward`, worst-case samples);
    `activation_fn(T) -> peak bytes` replaces the measurement altogether (tests). With vLLM,
    planning assumes it shares this device. `resident_bytes`: see `measure_capacity`.
    """
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    compute_dtype = compute_dtype or next(model.parameters()).dtype
    w = Workload(max_prompt_length, max_completion_length, samples_per_step, samples_per_generation, beta,
                 optimizer, engine, vllm_sleep, compute_dtype, lora)
    pins = Pins.check(max_tokens_per_microbatch, generation_concurrency, gpu_memory_utilization)
    probe = probe if probe is not None else default_probe(next(model.parameters()).device, memory_budget)
    fixed = fixed_part(model, w)
    times: dict[int, float] = {}
    measuring = activation_fn is None
    with _probing(model, w, probe, probe_step, times) if measuring else contextlib.nullcontext(activation_fn) as act:
        cap = measure_capacity(model, probe, fixed, safety, resident_bytes)
        gen = plan_generation(model, w, cap, pins, kv_dtype_bytes, vllm_overhead_bytes)
        bp = plan_backprop(act, w, cap, gen.train_room, pins, probe_samples=probe_samples,
                           repeats=probe_repeats if measuring else 1, verify_rounds=verify_rounds,
                           times=times if throughput_aware else None)
    return _memory_plan(model, w, pins, probe, cap, gen, bp)


def _memory_plan(model, w: Workload, pins: Pins, probe: MemoryProbe, cap: Capacity, gen: Generation,
                 bp: Backprop) -> MemoryPlan:
    fixed, L = cap.fixed, w.sample_len
    train_peak = int(fixed.total + bp.fit(bp.tokens))
    return MemoryPlan(
        device=str(probe.device), engine=w.engine,
        master_dtype="float32" if w.lora else _dtype_name(next(model.parameters()).dtype),  # LoRA: the adapters'
        compute_dtype=_dtype_name(w.compute_dtype), total_bytes=cap.total, free_bytes=cap.free,
        resident_bytes=cap.resident, safety=cap.safety, usable_bytes=cap.usable,
        weights_bytes=fixed.weights, grads_bytes=fixed.grads, optimizer_bytes=fixed.optimizer,
        reference_bytes=fixed.reference, generation_weights_bytes=fixed.generation_weights, fixed_bytes=fixed.total,
        activation_base_bytes=bp.fit.c, activation_bytes_per_token=bp.fit.s, activation_bytes_per_token_sq=bp.fit.q,
        probe_points=bp.points, sample_len=L, samples_per_step=w.samples_per_step,
        max_tokens_per_microbatch=bp.tokens, backprop_peak_bytes=train_peak,
        backprop_headroom_bytes=int(fixed.total + gen.train_room - train_peak),
        microbatches_per_step=math.ceil(w.samples_per_step / max(1, bp.tokens // L)),
        kv_bytes_per_token=gen.kv_per_token, generation_concurrency=gen.concurrency,
        generation_peak_bytes=int(gen.peak), generation_headroom_bytes=int(cap.usable - gen.peak),
        gpu_memory_utilization=gen.utilization, vllm_sleep=w.vllm_sleep if w.engine == "vllm" else None,
        memory_max_tokens=bp.memory_tokens, fastest_tokens=bp.fastest, pinned=pins.names(w.engine),
        warnings=gen.warnings + bp.warnings, base_params=fixed.base_params, lora_adapter_bytes=fixed.adapter_bytes,
    )


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
