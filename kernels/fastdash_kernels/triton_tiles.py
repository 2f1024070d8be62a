"""Shared Triton pieces: tile sizes, the z = W x / T tile, autotuning that the interpreter skips.

Tiles are TILE_M tokens x TILE_V vocabulary entries everywhere (forward, dZ, dX, dW), because the
forward's per-tile maximum logits and the backward's skip flags are indexed by that grid; what is
tuned is the reduction step (BLOCK_K over H, BLOCK_D over H for the gradient GEMMs), warps and
pipeline stages.

Under TRITON_INTERPRET=1 (CPU tests) one fixed config runs and every loaded tile is cast to fp32
before tl.dot: the interpreter's bf16 dot is wrong, and fp32 of bf16 values is exact, so the maths
tested is the GPU's (bf16 operands, fp32 accumulation).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# 128 x 128 tiles on the GPU (64 FLOP per byte of bf16 operands: half the L2 traffic of 64 x 128);
# 64 rows under the interpreter keeps CPU tests on small shapes covering several tiles.
TILE_M, TILE_V = (64 if INTERPRET else 128), 128


def prec(dtype: torch.dtype) -> str:
    """tl.dot input precision: exact fp32 products for fp32 inputs; bf16/fp16 use tensor cores anyway."""
    return "ieee" if dtype == torch.float32 else "tf32"


# FASTDASH_AUTOTUNE=quick: only each kernel's first config (the cost model's pick), so nothing is timed
# per new shape; scripts/gpu_check.py sets it, where the GPU window cannot afford every config's compile.
QUICK_AUTOTUNE = os.environ.get("FASTDASH_AUTOTUNE") == "quick"


def tuned(configs, key, fixed, restore_value=None):
    """triton.autotune on a GPU; under the interpreter the kernel runs with the `fixed` meta-parameters
    (launchers pass them as keyword arguments: `launch_meta()`)."""
    def wrap(kernel):
        if INTERPRET:
            kernel.fixed_meta = fixed
            return kernel
        tuned_kernel = triton.autotune(configs=configs[:1] if QUICK_AUTOTUNE else configs, key=key,
                                       restore_value=restore_value or [])(kernel)
        tuned_kernel.fixed_meta = {}
        return tuned_kernel
    return wrap


def config(num_warps, num_stages, **meta):
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


@triton.jit
def load_tile(ptr, rows, cols, rmask, cmask, stride, CAST: tl.constexpr):
    t = tl.load(ptr + rows[:, None] * stride + cols[None, :], mask=rmask[:, None] & cmask[None, :], other=0.0)
    if CAST:
        t = t.to(tl.float32)
    return t


@triton.jit
def z_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_x, stride_w, inv_t,
           BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
           CAST: tl.constexpr):
    """[BLOCK_M, BLOCK_V] fp32 logits / T; padding columns are -inf (they vanish from max and sum-exp)."""
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        x = load_tile(x_ptr, rows, ks, rmask, kmask, stride_x, CAST)
        w = load_tile(w_ptr, cols, ks, cmask, kmask, stride_w, CAST)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    return tl.where(cmask[None, :], acc * inv_t, float("-inf"))
