"""Compile the Triton kernels for sm_90 (H100) down to cubin without a GPU.

The interpreter runs the kernels' maths on CPU but skips the real lowering (layouts, shared
memory, dot shapes); this catches kernels that would not compile on the GPU. Runs in a subprocess
because the conftest turns TRITON_INTERPRET on, and triton.jit then returns interpreter objects.
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastdash_kernels import triton_logprob as m, triton_segment as s
tgt = GPUTarget("cuda", 90, 32)
common = {"N": "i32", "V": "i32", "H": "i32", "stride_x": "i32", "stride_w": "i32", "inv_t": "fp32",
          "BLOCK_M": "constexpr", "BLOCK_V": "constexpr", "BLOCK_K": "constexpr", "PREC": "constexpr"}
blocks = {"BLOCK_M": m.BLOCK_M, "BLOCK_V": m.BLOCK_V, "BLOCK_K": m.BLOCK_K}
for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee")):
    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i64", "logp_ptr": "*fp32", "lse_ptr": "*fp32",
           "ent_ptr": "*fp32", **common, "HAS_ENT": "constexpr"}
    k = triton.compile(ASTSource(m._logprob_fwd_kernel, sig, {**blocks, "PREC": prec, "HAS_ENT": True}),
                       target=tgt, options={"num_warps": m.NUM_WARPS})
    assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024, (dt, k.metadata.shared)
    sig = {"x_ptr": f"*{dt}", "w_ptr": f"*{dt}", "y_ptr": "*i64", "lse_ptr": "*fp32", "g_ptr": "*fp32",
           "dx_ptr": "*fp32", "dw_ptr": "*fp32", **common}
    k = triton.compile(ASTSource(m._logprob_bwd_kernel, sig, {**blocks, "PREC": prec}),
                       target=tgt, options={"num_warps": m.NUM_WARPS})
    assert k.asm["cubin"] and k.metadata.shared <= 227 * 1024, (dt, k.metadata.shared)
k = triton.compile(ASTSource(s._segment_sum_kernel, {"x_ptr": "*fp32", "cu_ptr": "*i32", "out_ptr": "*fp32",
                                                     "BLOCK": "constexpr"}, {"BLOCK": 1024}), target=tgt)
assert k.asm["cubin"]
print("compiled")
"""


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
