"""Fused policy loss, forward + backward, per backend (pytest-benchmark).

    pytest benchmarks/bench_kernels.py --benchmark-only            # CPU: small shapes
    pytest benchmarks/bench_kernels.py --benchmark-only -k cuda    # GPU: Qwen2.5 lm_head shapes

extra_info per run: tokens/s, achieved TFLOP/s counted against the 6NHV floor (the least work any
fwd + bwd can do), that as a fraction of the device's dense bf16 peak, and on CUDA the peak memory
above the inputs (the [N, V] logits a backend allocates show up here).
"""

from __future__ import annotations

import pytest
import torch

from fastdash_kernels import fused_policy_loss

CUDA = torch.cuda.is_available()
QWEN_HEADS = {"qwen2.5-0.5b": 896, "qwen2.5-1.5b": 1536, "qwen2.5-3b": 2048}  # hidden sizes, V = 151936
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L4": 121.0}  # dense bf16


def _peak_tflops():
    if not CUDA:
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def _setup(n, h, v, dtype, device, seq_len=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, h, generator=g) * 0.5).to(device, dtype).requires_grad_(True)
    w = (torch.randn(v, h, generator=g) * h**-0.5).to(device, dtype).requires_grad_(True)
    y = torch.randint(0, v, (n,), generator=g).to(device)
    bounds = list(range(0, n, seq_len)) + [n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    adv = torch.randn(len(bounds) - 1, generator=g).to(device)
    old = torch.full((n,), -3.0, device=device)
    tok_w = torch.full((n,), 1.0 / n, device=device)  # dapo: a token sum over the normaliser n
    return x, w, y, cu, adv, old, tok_w


def _run_case(benchmark, backend, n, h, v, dtype, device, rounds):
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    x, w, y, cu, adv, old, tok_w = _setup(n, h, v, dtype, device)

    def step():
        x.grad = w.grad = None
        out = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=tok_w,
                                backend=backend)
        out.loss.backward()
        if CUDA:
            torch.cuda.synchronize()  # time the kernels, not the launch queue

    step()  # warm-up: Triton/torch.compile compilation stays out of the timings
    if CUDA:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        benchmark.extra_info["extra_peak_mib"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    benchmark.pedantic(step, rounds=rounds, warmup_rounds=1, iterations=1)
    sec = benchmark.stats.stats.mean
    floor = 6.0 * n * h * v
    tflops = floor / sec / 1e12
    peak = _peak_tflops()
    benchmark.extra_info.update(
        backend=backend, n=n, h=h, v=v, dtype=str(dtype), device=torch.cuda.get_device_name() if CUDA else "cpu",
        tokens_per_s=n / sec, tflops_vs_6nhv=tflops, fraction_of_peak=(tflops / peak) if peak else None,
        floor_ms_at_peak=(floor / peak / 1e9) if peak else None,
    )


@pytest.mark.skipif(CUDA, reason="CPU shapes; on CUDA run the -k cuda cases")
@pytest.mark.parametrize("backend", ["torch", "liger", "reference"])
@pytest.mark.parametrize("n,h,v", [(512, 64, 4000), (2048, 128, 8192)])
def test_cpu_policy_loss(benchmark, backend, n, h, v):
    benchmark.group = f"policy_loss cpu N={n} H={h} V={v}"
    _run_case(benchmark, backend, n, h, v, torch.float32, "cpu", rounds=3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "torch", "liger", "reference"])
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("model", list(QWEN_HEADS))
def test_cuda_policy_loss(benchmark, backend, n, model):
    h, v = QWEN_HEADS[model], 151936
    if backend == "reference" and n * v * 4 * 3 > 0.6 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("reference would not fit: it materialises fp32 [N, V] logits and their grad")
    benchmark.group = f"policy_loss cuda {model} N={n}"
    _run_case(benchmark, backend, n, h, v, torch.bfloat16, "cuda", rounds=5)
