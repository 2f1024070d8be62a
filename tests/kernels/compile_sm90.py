"""Compile the Triton kernels for sm_90 (H100/H200) as they are launched, without a GPU.

Run as a script (the kernel tests' conftest turns on TRITON_INTERPRET, under which triton.jit
returns interpreter objects): `python tests/kernels/compile_sm90.py [--all-configs]`.

"As launched": the arguments go through Triton's own launch-time binder (the same specialisation
`kernel[grid](...)` computes: pointers 16-byte aligned, integers divisible by 16 marked so), at
the Qwen2.5-0.5B head shape (N = 16384, V = 151936, H = 896) with the chunk and split sizes the
launchers pick for 132 SMs (second chunk onwards: dX accumulates). Prints per kernel and config: registers, dynamic
shared memory, local memory (spills / stack) from the cubin (cuobjdump -res-usage), the software pipeline's depth
(copies of the loop's operand tiles in shared memory, from the TTGIR) and resident CTAs per SM.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import MockTensor, create_function_from_signature

from fastdash_kernels import triton_backward as B
from fastdash_kernels import triton_logprob as F
from fastdash_kernels import triton_segment as S
from fastdash_kernels import triton_single as T

TARGET = GPUTarget("cuda", 90, 32)
N, V, H = 16384, 151936, 896
MAX_SHARED = 227 * 1024
SMS = 132  # H100 SXM / H200: the launchers' grids for this count
REGS_PER_SM, SHARED_PER_SM, MAX_WARPS_PER_SM = 65536, 228 * 1024, 64


def _ptr(dt):
    return MockTensor(dt)  # data_ptr() = 0: aligned, as torch's allocations are


def cases(dtype=torch.bfloat16):
    """(name, kernel, args, constexpr kwargs) for every kernel as the launchers call it."""
    f32, i64, i8, i32 = torch.float32, torch.int64, torch.int8, torch.int32
    pr = F.prec(dtype)
    vc = B.chunk_vocab(N, V, dtype.itemsize)
    n_vt, n_mt = triton.cdiv(vc, B.TILE_V), triton.cdiv(N, B.TILE_M)
    blocks = dict(BLOCK_M=B.TILE_M, BLOCK_V=B.TILE_V, PREC=pr, CAST=False)
    x, w = _ptr(dtype), _ptr(dtype)
    splits = F.fwd_splits(N, V, SMS)
    vpad = triton.cdiv(V, B.TILE_V) * B.TILE_V
    c1 = T.chunk_tokens(N, V, dtype.itemsize)  # the single pass's token chunk
    n_vt1, n_mt1 = triton.cdiv(V, B.TILE_V), triton.cdiv(c1, B.TILE_M)
    split1 = B.dx_split(n_mt1, n_vt1, H, SMS)  # the single pass's dX vocabulary split
    out = [
        ("fwd", F._logprob_fwd_kernel, (x, w, _ptr(i64), _ptr(f32), _ptr(f32), _ptr(f32), N, V, H, H, H, 0, 1.0),
         dict(SPLITS=splits, SAVE_TMAX=True, STORE_Z=False, **blocks)),
        ("fwd store z", F._logprob_fwd_kernel, (x, w, _ptr(i64), _ptr(f32), _ptr(f32), _ptr(f32), c1, V, H, H, H,
                                                vpad, 1.0),
         dict(SPLITS=F.fwd_splits(c1, V, SMS), SAVE_TMAX=False, STORE_Z=True, **blocks)),
        ("dz from z", T._dz_from_z_kernel, (_ptr(f32), _ptr(i64), _ptr(f32), _ptr(f32), _ptr(dtype), _ptr(i8), c1, V,
                                            vpad, 1.0, 2.0**-12), dict(FILTER=True, BLOCK_M=B.TILE_M, BLOCK_V=B.TILE_V)),
        ("dw accumulate", B._dw_kernel, (_ptr(dtype), x, _ptr(i32), _ptr(i32), _ptr(f32), 0, vpad, c1, V, H, H,
                                         n_vt1, n_mt1, 0), dict(SPLIT=1, MODE=0, ACCUM=True, **blocks)),
        ("dx split", B._dx_kernel, (_ptr(dtype), w, _ptr(i32), _ptr(i32), _ptr(f32), 0, vpad, c1, V, H, H, n_vt1,
                                    c1 * H), dict(ACCUM=False, SPLIT=split1, **blocks)),
        ("dz", B._dz_kernel, (x, w, _ptr(i64), _ptr(f32), _ptr(f32), _ptr(f32), _ptr(dtype), _ptr(i8), vc, vc, N, V,
                              H, H, H, 1.0, 2.0**-12), dict(FILTER=True, **blocks)),
        ("dx", B._dx_kernel, (_ptr(dtype), w, _ptr(i32), _ptr(i32), _ptr(f32), vc, vc, N, V, H, H, n_vt, 0),
         dict(ACCUM=True, **blocks)),
    ]
    for mode, split in ((0, 1), (1, 4), (2, 4)):
        out.append((f"dw mode {mode}", B._dw_kernel, (_ptr(dtype), x, _ptr(i32), _ptr(i32),
                                                      _ptr(dtype if mode == 0 else f32), vc, vc, N, V, H, H, n_vt, n_mt,
                                                      vc * H),
                    dict(SPLIT=split, MODE=mode, **blocks)))
    return out


def compile_as_launched(kernel, args, kwargs, cfg):
    fn = getattr(kernel, "fn", kernel)  # the autotuner wraps the JITFunction
    kw = {**kwargs, **cfg.all_kwargs()}
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*args, **kw)
    opts, sig, constexprs, attrs = fn._pack_args(backend, kw, bound, spec, opts)
    return triton.compile(ASTSource(fn, sig, constexprs, attrs), target=TARGET, options=opts.__dict__)


def resources(cubin: bytes) -> dict:
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True).stdout
    return {k: int(v) for k, v in re.findall(r"(REG|STACK|LOCAL):(\d+)", out)}


def _one(job):
    name, dtype, cfg_index = job
    name_, kernel, args, kwargs = next(c for c in cases(dtype) if c[0] == name)
    configs = getattr(kernel, "configs", None) or [triton.Config({}, num_warps=4)]
    cfg = configs[cfg_index]
    k = compile_as_launched(kernel, args, kwargs, cfg)
    assert k.asm["cubin"], name
    r = resources(k.asm["cubin"])
    ctas = occupancy(r.get("REG", 255), k.metadata.shared, cfg.num_warps)
    line = (f"{name:<13} {str(dtype).split('.')[-1]:<9} {str(cfg.kwargs):<18} warps {cfg.num_warps} "
            f"stages {cfg.num_stages}: regs {r.get('REG')}, shared {k.metadata.shared} B, "
            f"local (spills/stack) {r.get('LOCAL')} B, tile buffers {tile_buffers(k.asm['ttgir'])}, "
            f"CTAs/SM {ctas} ({ctas * cfg.num_warps} warps)")
    return line, k.metadata.shared


def tile_buffers(ttgir: str) -> int:
    """Copies of the loop's operand tiles in shared memory: the software pipeline's depth (1 = no
    pipelining: each load waits for the previous tile's MMA)."""
    depth = [int(d) for d in re.findall(r"local_alloc : \(\) -> !ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    return max(depth, default=1)


def occupancy(regs: int, shared: int, warps: int) -> int:
    """Resident CTAs per SM on sm_90: registers (allocated per warp in 256-register units), shared
    memory (1 KiB reserved per CTA), the 64-warp and 32-CTA limits."""
    per_warp = -(-regs * 32 // 256) * 256
    by_regs = REGS_PER_SM // per_warp // warps
    by_shared = SHARED_PER_SM // (shared + 1024)
    return min(by_regs, by_shared, MAX_WARPS_PER_SM // warps, 32)


def main(all_configs: bool) -> int:
    jobs = []
    for name, kernel, _, _ in cases():
        n_cfg = len(getattr(kernel, "configs", None) or [None]) if all_configs else 1
        jobs += [(name, torch.bfloat16, i) for i in range(n_cfg)]
    if all_configs:
        jobs += [(name, torch.float32, 0) for name in ("fwd", "dz", "dx", "dw mode 0")]
    with ProcessPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(_one, jobs))
    k = triton.compile(ASTSource(S._segment_sum_kernel, {"x_ptr": "*fp32", "cu_ptr": "*i32", "out_ptr": "*fp32",
                                                         "BLOCK": "constexpr"}, {"BLOCK": 1024}), target=TARGET)
    assert k.asm["cubin"]
    for line, _ in results:
        print(line)
    too_big = [line for line, shared in results if shared > MAX_SHARED]
    assert not too_big, too_big
    print("compiled", len(results) + 1)
    return 0


if __name__ == "__main__":
    sys.exit(main("--all-configs" in sys.argv))
