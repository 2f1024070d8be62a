"""Memory-aware scheduler: choose the backprop token budget and the generation concurrency from
measured memory (`plan_memory` -> `MemoryPlan`); `run_with_oom_backoff` halves a budget on OOM.

Memory model (DESIGN.md section 6), on the device that trains:

    fixed      = weights + grads (param dtype) + optimizer state + reference weights (beta > 0)
    backprop   = fixed + c + s * T + q * T^2    T = packed tokens per micro-batch
    generation = fixed + B * (kv_per_token * L + logits_per_seq)    B = concurrent sequences

c, s, q come from probe forward+backward passes over packed rows of worst-case samples (L =
max_prompt_length + max_completion_length), so a late long sample cannot OOM an accepted plan.
q ~ 0 with varlen attention (its T * L term is linear at fixed L, CPU included); attending over the
whole packed row with a block mask (transformers' sdpa path) makes it > 0, and a probe at the
chosen budget verifies it.
Budgets fill `safety` x (free + already-resident bytes). Measurement lives in `fastdash.memory`;
this module is arithmetic over its numbers, testable with a fake probe.
"""
from __future__ import annotations

import functools
import logging
import math
from typing import Callable

import torch

from fastdash.memory import (  # noqa: F401 - re-exported: the scheduler's API in one place
    ActivationFit,
    MemoryProbe,
    allocated_model_bytes,
    default_probe,
    ensure_grads,
    fit_activation,
    is_oom_error,
    kv_bytes_per_token,
    measure_activations,
    model_bytes,
    probe_forward_backward,
    run_with_oom_backoff,
)

from fastdash.memory_plan import MemoryPlan, MemoryPlanError  # noqa: F401 - re-exported

log = logging.getLogger(__name__)
GiB = 1024**3

# Optimizer state bytes per trainable parameter (AdamW: exp_avg + exp_avg_sq in fp32).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd_momentum": 4}
LOGITS_COPIES = 4  # [B, V] fp32 tensors alive per generation step (logits, processed, probs, ...)


def _check_pin(name: str, value, fraction: bool = False):
    """None for 'auto', else the value: a positive int, or with `fraction` a float in (0, 1]."""
    if value == "auto":
        return None
    number = isinstance(value, (int, float) if fraction else int) and not isinstance(value, bool)
    if not (number and (0 < value <= 1 if fraction else value > 0)):
        raise ValueError(f"{name} must be 'auto' or {'a float in (0, 1]' if fraction else 'a positive int'}, "
                         f"got {value!r}")
    return value


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

    `samples_per_step` (train_batch_size) caps the token budget (one micro-batch for the whole
    step) and gives micro-batches per step; `samples_per_generation` (default: the same) caps the
    generation concurrency: the HF engine's sequences per `generate` call, or vLLM's
    `max_num_seqs`. Pinned values (not "auto") are kept and checked: a warning says when one is
    predicted not to fit. `probe_step(T)` runs one forward+backward over T packed tokens (default:
    `fastdash.memory.probe_forward_backward`, worst-case samples); `activation_fn(T) -> peak
    bytes` replaces the measurement altogether (tests);
    `resident_bytes` (default: the model's weights and allocated grads on the probe's device) is
    what the free measurement already excludes but the fixed part counts. With vLLM, planning assumes
    it shares this device; `vllm_sleep` means it frees weights and KV cache during backprop.
    """
    if engine not in ("hf", "vllm"):
        raise ValueError(f"engine must be 'hf' or 'vllm', got {engine!r}")
    if optimizer not in OPTIMIZER_STATE_BYTES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {optimizer!r}")
    if not 0 < safety <= 1:
        raise ValueError(f"safety must be in (0, 1], got {safety}")
    pin_tokens = _check_pin("max_tokens_per_microbatch", max_tokens_per_microbatch)
    pin_gen = _check_pin("generation_concurrency", generation_concurrency)
    pin_util = _check_pin("gpu_memory_utilization", gpu_memory_utilization, fraction=True)
    L = max_prompt_length + max_completion_length
    M = samples_per_step
    M_gen = samples_per_generation or samples_per_step
    device = next(model.parameters()).device
    probe = probe if probe is not None else default_probe(device, memory_budget)

    # ---- fixed part
    weights, grad_bytes, n_trainable = model_bytes(model)
    opt_bytes = n_trainable * OPTIMIZER_STATE_BYTES[optimizer]
    ref_bytes = weights if beta > 0 else 0
    fixed = weights + grad_bytes + opt_bytes + ref_bytes

    # ---- probe set-up first: its first-call allocations (imports, thread pools, kernels) and the
    # grads it allocates are resident when the free memory is measured
    restore, times, measured = [], {}, None
    try:
        if activation_fn is None:
            restore = ensure_grads(model)
            if probe_step is None:
                probe_step = functools.partial(probe_forward_backward, model, sample_len=L,
                                               completion_len=max_completion_length)
            activation_fn = measured = measure_activations(model, probe, probe_step, times)
            try:
                activation_fn(L)  # warm-up; its peak is measured again below
            except BaseException as e:
                if not is_oom_error(e):
                    raise
                raise MemoryPlanError(f"one worst-case sample of {L} tokens runs out of memory in the probe "
                                      f"forward+backward ({str(e).splitlines()[0][:200]})") from None

        # ---- measured capacity
        total, free = probe.total_bytes(), probe.free_bytes()
        if resident_bytes is None:
            resident_bytes = allocated_model_bytes(model, probe.device)
        usable = int(safety * (free + resident_bytes))
        dynamic = usable - fixed
        need_msg = (f"measured free {free / GiB:.3f} GiB + resident {resident_bytes / GiB:.3f} GiB, "
                    f"x safety {safety} = {usable / GiB:.3f} GiB usable; fixed part (weights {weights / GiB:.3f} "
                    f"+ grads {grad_bytes / GiB:.3f} + optimizer {opt_bytes / GiB:.3f} + reference "
                    f"{ref_bytes / GiB:.3f}) = {fixed / GiB:.3f} GiB")
        if dynamic <= 0:
            raise MemoryPlanError(f"the fixed part alone does not fit: {need_msg}")

        # ---- generation (before backprop: a colocated vLLM that stays awake takes its share first)
        dtype_bytes = kv_dtype_bytes or next(model.parameters()).element_size()
        kv_tok = kv_bytes_per_token(model.config, dtype_bytes)
        kv_seq = kv_tok * L
        warnings: list[str] = []
        util = None
        train_dynamic = dynamic
        if engine == "hf":
            per_seq = kv_seq + LOGITS_COPIES * 4 * model.config.vocab_size
            gen_fit = dynamic // per_seq
            gen_batch = pin_gen or min(M_gen, gen_fit)
            gen_peak = fixed + gen_batch * per_seq
        else:
            # vLLM holds its own weight copy, its activations/graphs (overhead) and the KV cache.
            vllm_room = dynamic if vllm_sleep else dynamic // 2
            if pin_util is not None:
                vllm_room = int(pin_util * total)
            gen_fit = max(0, (vllm_room - weights - vllm_overhead_bytes) // kv_seq)
            gen_batch = pin_gen or min(M_gen, gen_fit)
            vllm_bytes = weights + vllm_overhead_bytes + gen_batch * kv_seq
            if pin_util is None and not vllm_sleep:
                vllm_bytes = min(vllm_bytes, vllm_room)
            util = pin_util if pin_util is not None else math.floor(100 * max(vllm_bytes, 1) / total) / 100
            gen_peak = fixed + int(util * total)
            if not vllm_sleep:
                train_dynamic = dynamic - int(util * total)
        if gen_fit < 1 and pin_gen is None:
            raise MemoryPlanError(f"not even one generation sequence of {L} tokens fits "
                                  f"({kv_seq / GiB:.3f} GiB KV cache each): {need_msg}")
        if pin_gen is not None and pin_gen > gen_fit:
            warnings.append(f"generation_concurrency={pin_gen} is over the {gen_fit} sequences predicted to fit; "
                            "expect OOM back-off in generation")
        if pin_util is not None and gen_peak > usable:
            warnings.append(f"gpu_memory_utilization={pin_util} plus the trainer's fixed part needs "
                            f"{gen_peak / GiB:.3f} GiB, over the {usable / GiB:.3f} GiB usable")

        # ---- activations: worst-case probe, then verify at the chosen budget
        points: list[tuple[int, int]] = []
        for n in sorted({min(n, M) for n in probe_samples}):
            t = n * L
            if points and fit_activation(points)(t) > train_dynamic:
                break
            repeats = probe_repeats if activation_fn is measured else 1
            points.append((t, max(int(activation_fn(t)) for _ in range(repeats))))
        fit = fit_activation(points)
        if points[0][1] > train_dynamic:
            raise MemoryPlanError(f"one worst-case sample of {L} tokens needs {points[0][1] / GiB:.3f} GiB of "
                                  f"activations, {train_dynamic / GiB:.3f} GiB left after the fixed part: {need_msg}")
        tokens = _solve_tokens(fit, train_dynamic, L, M, need_msg)
        tokens = _verify_tokens(activation_fn, points, tokens, train_dynamic, verify_rounds, L)
        memory_tokens, fastest = tokens, None
        if throughput_aware and times:
            fastest = _fastest_tokens(times, tokens)
            tokens = min(tokens, fastest or tokens)
        probed = max(t for t, _ in points[:len(probe_samples)])
        fit = fit_activation(points if tokens <= probed else sorted(p for p in points if p[0] <= tokens)[-3:])
        auto_tokens = tokens
        tokens = pin_tokens or auto_tokens
        if pin_tokens is not None:
            if pin_tokens < L:
                warnings.append(f"max_tokens_per_microbatch={pin_tokens} is below the longest sample ({L} tokens)")
            if pin_tokens > auto_tokens and fit(pin_tokens) > train_dynamic:
                warnings.append(f"max_tokens_per_microbatch={pin_tokens} is predicted to need "
                                f"{(fixed + fit(pin_tokens)) / GiB:.3f} GiB, over the {usable / GiB:.3f} GiB usable "
                                f"(the largest that fits: {memory_tokens}); expect OOM back-off")
        per_mb = max(1, tokens // L)
        train_peak = int(fixed + fit(tokens))
        train_budget = fixed + train_dynamic

        return MemoryPlan(
            device=str(probe.device), engine=engine, total_bytes=int(total), free_bytes=int(free),
            resident_bytes=int(resident_bytes), safety=safety, usable_bytes=usable,
            weights_bytes=weights, grads_bytes=grad_bytes, optimizer_bytes=opt_bytes, reference_bytes=ref_bytes,
            fixed_bytes=fixed, activation_base_bytes=fit.c, activation_bytes_per_token=fit.s,
            activation_bytes_per_token_sq=fit.q, probe_points=points,
            sample_len=L, samples_per_step=M, max_tokens_per_microbatch=tokens, backprop_peak_bytes=train_peak,
            backprop_headroom_bytes=int(train_budget - train_peak), microbatches_per_step=math.ceil(M / per_mb),
            kv_bytes_per_token=kv_tok, generation_concurrency=gen_batch, generation_peak_bytes=int(gen_peak),
            generation_headroom_bytes=int(usable - gen_peak), gpu_memory_utilization=util,
            vllm_sleep=vllm_sleep if engine == "vllm" else None,
            memory_max_tokens=memory_tokens, fastest_tokens=fastest,
            pinned=[k for k, v in (("max_tokens_per_microbatch", pin_tokens),
                                   ("max_num_seqs" if engine == "vllm" else "generation_concurrency", pin_gen),
                                   ("gpu_memory_utilization", pin_util)) if v is not None],
            warnings=warnings,
        )
    finally:
        for p in restore:
            p.grad = None
