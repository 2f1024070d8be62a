"""Memory measurement for the scheduler: how much is free, and what one forward+backward costs.

The planner (`fastdash.scheduler`) is pure arithmetic over numbers that come from here, so tests
can swap the measurement for a fake. Two real probes:

- `CudaMemoryProbe`: `torch.cuda.mem_get_info` for free/total, `max_memory_allocated` around the
  probed call for its peak. Exact up to the caching allocator's fragmentation.
- `CpuMemoryProbe`: `/proc/meminfo` MemAvailable (or a cgroup limit, or a configured budget) for
  free, and the process's peak resident set (VmHWM) for the peak. The peak is reset by writing "5"
  to `/proc/self/clear_refs` (Linux >= 4.0) and the baseline is taken after `gc.collect()` and
  glibc's `malloc_trim(0)`, so memory freed by earlier calls but kept by malloc is not counted as
  free headroom. Resolution is a page; in the tests the measured peak of a tiny model's step is
  within 25% (+ 8 MiB) of a fresh measurement at an un-probed size.

Also here: the memory model's pieces (parameter bytes, KV cache bytes per token, the activation
fit) and the probe step (one worst-case forward + backward under the trainer's autocast). The
run-time OOM back-off is `fastdash.oom`.
"""
from __future__ import annotations

import ctypes
import gc
import math
import re
import time
from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

_KIB = 1024


@runtime_checkable
class MemoryProbe(Protocol):
    """What the planner needs to know about one device's memory."""

    device: torch.device

    def total_bytes(self) -> int:
        """Capacity of the device (or the configured budget)."""
        ...

    def free_bytes(self) -> int:
        """Bytes that can still be allocated now."""
        ...

    def measure(self, fn: Callable[[], object]) -> int:
        """Run `fn` and return its peak memory above the state before the call, in bytes."""
        ...

    def empty_cache(self) -> None:
        """Give cached-but-unused memory back (after an OOM, before a measurement)."""
        ...


class CudaMemoryProbe:
    def __init__(self, device: torch.device | str | int | None = None):
        self.device = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
        self.clock = time.perf_counter  # `measure` synchronizes, so wall time around it is device time

    def total_bytes(self) -> int:
        return int(torch.cuda.mem_get_info(self.device)[1])

    def free_bytes(self) -> int:
        # Memory the caching allocator holds but does not use is free to this process too.
        reserved_unused = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        return int(torch.cuda.mem_get_info(self.device)[0] + reserved_unused)

    def measure(self, fn: Callable[[], object]) -> int:
        torch.cuda.synchronize(self.device)
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        fn()
        torch.cuda.synchronize(self.device)
        return int(torch.cuda.max_memory_allocated(self.device) - base)

    def empty_cache(self) -> None:
        gc.collect()
        torch.cuda.empty_cache()


def _proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M)
    if m is None:
        raise RuntimeError(f"/proc/self/status has no {field} line; the CPU memory probe needs Linux")
    return int(m.group(1))


def _mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        m = re.search(r"^MemAvailable:\s+(\d+) kB", f.read(), re.M)
    avail = int(m.group(1)) * _KIB
    # In a container the cgroup limit can be far below what the host reports.
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        with open("/sys/fs/cgroup/memory.current") as f:
            used = int(f.read())
        if limit != "max":
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the baseline may then include cached heap
        pass


class CpuMemoryProbe:
    """Process RSS based probe. `memory_budget` (bytes) caps what the run may use in total."""

    def __init__(self, memory_budget: int | None = None, clock: Callable[[], float] = time.perf_counter):
        self.device = torch.device("cpu")
        self.memory_budget = memory_budget
        self.clock = clock  # time.process_time on a shared machine (with one torch thread)

    def rss_bytes(self) -> int:
        return _proc_status_kib("VmRSS") * _KIB

    def total_bytes(self) -> int:
        if self.memory_budget is not None:
            return int(self.memory_budget)
        with open("/proc/meminfo") as f:
            return int(re.search(r"^MemTotal:\s+(\d+) kB", f.read(), re.M).group(1)) * _KIB

    def free_bytes(self) -> int:
        self.empty_cache()
        if self.memory_budget is not None:
            return max(0, int(self.memory_budget) - self.rss_bytes())
        return _mem_available_bytes()

    def peak_rss_bytes(self) -> int:
        """Peak resident set since the last `reset_peak` (or the process start)."""
        return _proc_status_kib("VmHWM") * _KIB

    def reset_peak(self) -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def measure(self, fn: Callable[[], object]) -> int:
        self.empty_cache()
        base = self.rss_bytes()
        self.reset_peak()
        fn()
        return max(0, self.peak_rss_bytes() - base)

    def empty_cache(self) -> None:
        # Young generations only: probe tensors die by refcount; a full collection over the heap
        # transformers builds costs ~0.4 s a call and the plan makes a dozen of them.
        gc.collect(1)
        _malloc_trim()


def default_probe(device: torch.device | str, memory_budget: int | None = None) -> MemoryProbe:
    device = torch.device(device)
    if device.type == "cuda":
        if memory_budget is not None:
            raise ValueError("memory_budget applies to CPU runs only; on CUDA the free memory is measured")
        return CudaMemoryProbe(device)
    if device.type == "cpu":
        return CpuMemoryProbe(memory_budget)
    raise ValueError(f"no memory probe for device type {device.type!r} (expected 'cuda' or 'cpu')")


# ---------------------------------------------------------------------------------------------
# The memory model: what the fixed part is, and a fit of the activation peak


@dataclass(frozen=True)
class ActivationFit:
    """Activation peak above the resting state: c + s * T + q * T^2 bytes (c, s, q >= 0)."""

    c: float
    s: float
    q: float = 0.0

    def __call__(self, tokens: int) -> float:
        return self.c + self.s * tokens + self.q * tokens * tokens

    def max_tokens(self, room: float) -> int:
        """Largest T whose peak fits in `room` bytes."""
        if self.q > 0:
            return int((-self.s + math.sqrt(self.s**2 + 4 * self.q * (room - self.c))) / (2 * self.q))
        return int((room - self.c) // self.s)


def fit_activation(points: list[tuple[int, int]]) -> ActivationFit:
    """Least-squares fit of (T, peak) points: quadratic with 3+ distinct T, else linear.

    A fit with a negative coefficient falls back to the simpler model, and finally to the
    steepest line through the origin, which over-estimates every point: the safe side.
    """
    ts = torch.tensor([float(t) for t, _ in points], dtype=torch.float64)
    ps = torch.tensor([float(p) for _, p in points], dtype=torch.float64)
    t_max, p_max = float(ts.max()), float(ps.max())
    x = ts / t_max  # scaled so the least-squares problem is well conditioned
    for degree in (2, 1):
        if len(set(ts.tolist())) > degree:
            basis = torch.stack([x**k for k in range(degree + 1)], dim=1)
            coef = torch.linalg.lstsq(basis, ps.unsqueeze(1), driver="gelsd").solution.view(-1).tolist()
            if degree == 2 and abs(coef[2]) < 1e-6 * p_max:
                continue  # no curvature beyond rounding: the linear fit is the exact one
            if min(coef) >= 0 and coef[1] > 0:
                return ActivationFit(*(ck / t_max**k for k, ck in enumerate(coef)))
    return ActivationFit(0.0, max(1.0, float((ps / ts).max())))


def model_bytes(model: torch.nn.Module) -> tuple[int, int, int]:
    """(weights + buffers bytes, trainable param bytes, trainable param count)."""
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    weights += sum(b.numel() * b.element_size() for b in model.buffers())
    trainable = [p for p in model.parameters() if p.requires_grad]
    return weights, sum(p.numel() * p.element_size() for p in trainable), sum(p.numel() for p in trainable)


def allocated_model_bytes(model: torch.nn.Module, device: torch.device) -> int:
    """Bytes of the model's weights, buffers and existing grads that live on `device`'s type."""
    on = [p for p in model.parameters() if p.device.type == device.type]
    grads = [p.grad for p in on if p.grad is not None]
    buffers = [b for b in model.buffers() if b.device.type == device.type]
    return sum(t.numel() * t.element_size() for t in on + grads + buffers)


def copy_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Bytes of a copy of the model's weights and buffers cast to `dtype` (floating tensors only, as
    `module.to(dtype)` does): a reference model or an engine's compute-dtype copy."""
    size = torch.tensor([], dtype=dtype).element_size()
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * (size if t.is_floating_point() else t.element_size()) for t in tensors)


def kv_bytes_per_token(config, dtype_bytes: int) -> int:
    """2 (K and V) x layers x kv_heads x head_dim x dtype bytes, from a transformers config."""
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * config.num_hidden_layers * kv_heads * head_dim * dtype_bytes


# ---------------------------------------------------------------------------------------------
# The probe step: one worst-case forward + backward


def packed_probe_batch(tokens: int, sample_len: int, vocab_size: int, device, seed: int = 0):
    """One packed row of `tokens` tokens: samples of `sample_len` (the last may be shorter),
    position ids restarting per sample. Returns (input_ids [1, T], position_ids [1, T])."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab_size, (1, tokens), generator=g)
    position_ids = (torch.arange(tokens) % sample_len).unsqueeze(0)
    return input_ids.to(device), position_ids.to(device)


def probe_forward_backward(
    model: torch.nn.Module,
    tokens: int,
    sample_len: int,
    completion_len: int,
    chunk_size: int = 1024,
    compute_dtype: torch.dtype | None = None,
) -> None:
    """Forward + backward over a packed row of `tokens` tokens of worst-case samples.

    Mirrors the trainer's step: body forward to hidden states under the trainer's autocast
    (`compute_dtype`; None or fp32: none) through the packed attention backend of
    `fastdash.attention` (varlen on CUDA, sdpa with position ids on CPU); only the completion
    positions go through the lm_head, hidden states and head weight cast to the compute dtype as the
    trainer hands them to the fused kernel, in chunks of `chunk_size` rows whose [chunk, V] logits are
    freed before the next (the fused kernel never holds [N, V]); then backward through the body.
    Gradients accumulate into `.grad`.
    """
    from fastdash.attention import packed_attention_kwargs, use_packed_attention
    from fastdash.forward import _decoder, compute_autocast

    device = next(model.parameters()).device
    vocab = model.get_output_embeddings().weight.shape[0]
    input_ids, position_ids = packed_probe_batch(tokens, sample_len, vocab, device)
    use_packed_attention(model)  # the backend the trainer's packed micro-batches use
    starts = list(range(0, tokens, sample_len)) + [tokens]
    attn_kwargs = packed_attention_kwargs(model, torch.tensor(starts, dtype=torch.int32), min(tokens, sample_len))
    prompt_len = sample_len - completion_len
    pos = position_ids.view(-1)
    # The hidden state at position p predicts token p + 1: completion targets start at prompt_len.
    loss_pos = torch.nonzero((pos >= prompt_len - 1) & (pos < sample_len - 1)).view(-1)
    loss_pos = loss_pos[loss_pos + 1 < tokens]
    targets = input_ids.view(-1)[loss_pos + 1]

    with compute_autocast(device, compute_dtype):
        hidden = _decoder(model)(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                                  use_cache=False, **attn_kwargs).last_hidden_state.view(tokens, -1)
    h = hidden.detach().requires_grad_(True)
    head = model.get_output_embeddings()
    dtype = compute_dtype or head.weight.dtype
    weight, bias = head.weight.to(dtype), None if head.bias is None else head.bias.to(dtype)
    for idx, tgt in zip(loss_pos.split(chunk_size), targets.split(chunk_size)):
        logits = F.linear(h[idx].to(dtype), weight, bias).float()  # [chunk, V]
        F.cross_entropy(logits, tgt, reduction="sum").div(max(1, targets.numel())).backward()
        del logits
    hidden.backward(h.grad)


def ensure_grads(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """Allocate missing `.grad`s (zeros) so a probe's peak does not count them; returns the
    parameters that had none, whose `.grad` the caller sets back to None afterwards."""
    missing = [p for p in model.parameters() if p.requires_grad and p.grad is None]
    for p in missing:
        p.grad = torch.zeros_like(p)
    return missing


def measure_activations(model: torch.nn.Module, probe: MemoryProbe, step: Callable[[int], object],
                        times: dict[int, float] | None = None) -> Callable[[int], int]:
    """`f(T) -> bytes`: the peak above resting state (weights + grads allocated) of `step(T)`.
    When `times` is given, `times[T]` gets the seconds of `step(T)` by `probe.clock`.

    The caller allocates the grads first (`ensure_grads`) and restores them afterwards (see
    `fastdash.scheduler.plan_memory`); each call zeroes them, overwriting existing values.
    """

    def f(tokens: int) -> int:
        model.zero_grad(set_to_none=False)
        clock = getattr(probe, "clock", time.perf_counter)

        def timed_step():  # times the step alone, not the probe's cache clearing around it
            t0 = clock()
            step(tokens)
            if probe.device.type == "cuda":
                torch.cuda.synchronize(probe.device)
            if times is not None:  # best of repeated calls: other load only ever adds time
                times[tokens] = min(clock() - t0, times.get(tokens, math.inf))

        return probe.measure(timed_step)

    return f
