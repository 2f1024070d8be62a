"""Fused policy loss, forward + backward, per backend (pytest-benchmark).

    pytest benchmarks/bench_kernels.py --benchmark-only            # CPU: small shapes
    pytest benchmarks/bench_kernels.py --benchmark-only -k cuda    # GPU: Qwen2.5 lm_head shapes

extra_info per run: tokens/s, achieved TFLOP/s counted against the 6NHV floor (the least work any
fwd + bwd can do without skipping), that as a fraction of the device's dense bf16 peak, the floor
measured in the same run as cuBLAS GEMMs of the same shapes (z = X W^T, dX = dZ W, dW = dZ^T X) and
the run's time over it, the cost model's prediction (kernels/COST_MODEL.md), and on CUDA the peak
memory above the inputs (the [N, V] logits a backend allocates show up here).

Backends: triton (deterministic, the default), triton-nondet, triton-filter (filter_eps = 2^-12, on
peaked logits, where skipping fires; on random heads it never does), torch, liger, cce, reference.
"""

from __future__ import annotations

import pytest
import torch

from devices import peak_bf16_tflops
from fastdash.models import PRESETS, QWEN_VOCAB
from fastdash_kernels import cost_model, fused_policy_loss

CUDA = torch.cuda.is_available()
QWEN_HEADS = {n: p["hidden_size"] for n, p in PRESETS.items() if n.startswith("qwen2.5-")}  # V = QWEN_VOCAB
VARIANTS = {  # name -> (backend, extra fused_policy_loss kwargs)
    "triton": ("triton", {}),
    "triton-nondet": ("triton", {"deterministic": False}),
    "triton-single": ("triton", {"single_pass": True}),  # the 6NHV single pass (triton_single.py)
    "triton-recompute": ("triton", {"single_pass": False}),  # forward + recompute (8NHV)
    "triton-filter": ("triton", {"filter_eps": 2.0**-12}),
    "torch": ("torch", {}),
    "liger": ("liger", {}),
    "cce": ("cce", {}),
    "cce-filter": ("cce", {"filter_eps": "auto"}),
    "reference": ("reference", {}),
}
_FLOORS: dict = {}


def _peak_tflops():
    return peak_bf16_tflops()  # the one table of device peaks (benchmarks/devices.py)


def _setup(n, h, v, dtype, device, seq_len=512, seed=0, peaked=False):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g) * h**-0.5
    y = torch.randint(0, v, (n,), generator=g)
    if peaked:  # hidden states aimed at their targets' rows: a trained head's peaked softmax
        wy = w[y]
        x = 60.0 * wy / (wy * wy).sum(-1, keepdim=True) + 0.05 * torch.randn(n, h, generator=g)
    else:
        x = torch.randn(n, h, generator=g) * 0.5
    x, w = x.to(device, dtype).requires_grad_(True), w.to(device, dtype).requires_grad_(True)
    bounds = list(range(0, n, seq_len)) + [n]
    cu = torch.tensor(bounds, dtype=torch.int32, device=device)
    adv = torch.randn(len(bounds) - 1, generator=g).to(device)
    old = torch.full((n,), -3.0, device=device)
    tok_w = torch.full((n,), 1.0 / n, device=device)  # dapo: a token sum over the normaliser n
    return x, w, y.to(device), cu, adv, old, tok_w


def _cuda_time_ms(fn, iters=5):
    fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def _cublas_floor_ms(n, h, v, dtype):
    """The 6NHV work as three cuBLAS GEMMs of the fused kernel's shapes, in this run, on this GPU."""
    if (n, h, v) not in _FLOORS:
        x = torch.randn(n, h, device="cuda", dtype=dtype)
        w = torch.randn(v, h, device="cuda", dtype=dtype)
        z = torch.empty(n, v, device="cuda", dtype=dtype)
        dx, dw = torch.empty_like(x), torch.empty_like(w)

        def gemms():
            torch.mm(x, w.t(), out=z)
            torch.mm(z, w, out=dx)
            torch.mm(z.t(), x, out=dw)

        _FLOORS[(n, h, v)] = _cuda_time_ms(gemms)
        del x, w, z, dx, dw
        torch.cuda.empty_cache()
    return _FLOORS[(n, h, v)]


def _run_case(benchmark, variant, n, h, v, dtype, device, rounds):
    backend, kw = VARIANTS[variant]
    if backend == "liger":
        pytest.importorskip("liger_kernel")
    if backend == "cce":
        pytest.importorskip("cut_cross_entropy")
    x, w, y, cu, adv, old, tok_w = _setup(n, h, v, dtype, device, peaked=variant.endswith("filter"))

    def step():
        x.grad = w.grad = None
        out = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=tok_w, backend=backend, **kw)
        out.loss.backward()
        if CUDA:
            torch.cuda.synchronize()  # time the kernels, not the launch queue

    step()  # warm-up: Triton autotuning / compilation stays out of the timings
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
    info = dict(backend=variant, n=n, h=h, v=v, dtype=str(dtype), device=torch.cuda.get_device_name() if CUDA else "cpu",
                tokens_per_s=n / sec, tflops_vs_6nhv=tflops, fraction_of_peak=(tflops / peak) if peak else None,
                floor_ms_at_peak=(floor / peak / 1e9) if peak else None)
    if CUDA:
        info["floor_ms_cublas"] = _cublas_floor_ms(n, h, v, dtype)
        info["x_cublas_floor"] = sec * 1e3 / info["floor_ms_cublas"]
        gpu = next((k for k in cost_model.GPUS if k in torch.cuda.get_device_name()), None)
        pick = cost_model.single_triton if cost_model.single_pass_pays(n, h, v) else cost_model.new_triton
        model = {"triton": pick, "triton-nondet": pick, "triton-single": cost_model.single_triton,
                 "triton-recompute": cost_model.new_triton, "torch": cost_model.torch_chunked}.get(variant)
        model = model and model(n, h, v)
        if gpu and model:
            info["model_ms"] = model.time_ms(gpu)
    benchmark.extra_info.update(info)


@pytest.mark.skipif(CUDA, reason="CPU shapes; on CUDA run the -k cuda cases")
@pytest.mark.parametrize("variant", ["torch", "liger", "reference"])
@pytest.mark.parametrize("n,h,v", [(512, 64, 4000), (2048, 128, 8192)])
def test_cpu_policy_loss(benchmark, variant, n, h, v):
    benchmark.group = f"policy_loss cpu N={n} H={h} V={v}"
    _run_case(benchmark, variant, n, h, v, torch.float32, "cpu", rounds=3)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("n", [4096, 16384])
@pytest.mark.parametrize("model", list(QWEN_HEADS))
def test_cuda_policy_loss(benchmark, variant, n, model):
    h, v = QWEN_HEADS[model], QWEN_VOCAB
    if variant == "reference" and n * v * 4 * 3 > 0.6 * torch.cuda.get_device_properties(0).total_memory:
        pytest.skip("reference would not fit: it materialises fp32 [N, V] logits and their grad")
    benchmark.group = f"policy_loss cuda {model} N={n}"
    _run_case(benchmark, variant, n, h, v, torch.bfloat16, "cuda", rounds=5)
