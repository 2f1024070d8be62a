"""Triton fused lm_head -> log-prob: tiles of z = W x / T, never an [N, V] tensor.

Forward (`_logprob_fwd_kernel`, one program per BLOCK_M tokens): loop over vocab tiles, each tile
z = tl.dot over H in BLOCK_K steps with fp32 accumulation, online max / sum-exp (max starts at -inf),
gather of the target logit, and optionally sum p*z for the entropy. Writes logp, lse (and entropy):
O(N) memory.

Backward (`_logprob_bwd_kernel`, one program per (token tile, vocab tile)): recompute the z tile,
dZ = g (onehot - exp(z - lse)) / T, then dX += dZ W and dW += dZ^T X with fp32 atomics, H in
BLOCK_K steps. Total 8NHV; tiles whose upstream gradients are all zero exit early (zero-advantage
tokens with beta = 0 cost nothing in the backward).

Imported only when the Triton backend is used (import triton at module top is fine here).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

# Tile sizes. The interpreter (TRITON_INTERPRET=1) only needs them >= 16 for tl.dot.
BLOCK_M, BLOCK_V, BLOCK_K = 64, 128, 64
NUM_WARPS = 8


@triton.jit
def _z_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_x, stride_w, inv_t,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for k0 in range(0, H, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < H
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PREC)
    # Padding columns get -inf so they vanish from max and sum-exp.
    return tl.where(cmask[None, :], acc * inv_t, float("-inf"))


@triton.jit
def _logprob_fwd_kernel(x_ptr, w_ptr, y_ptr, logp_ptr, lse_ptr, ent_ptr, N, V, H, stride_x, stride_w, inv_t,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        PREC: tl.constexpr, HAS_ENT: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - m)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - m) * (z - m), for the entropy
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = _z_tile(x_ptr, w_ptr, rows, cols.to(tl.int64), rmask, cmask, H, stride_x, stride_w, inv_t,
                    BLOCK_M, BLOCK_V, BLOCK_K, PREC)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # m = -inf on the first tile gives 0, not nan (m_new is finite)
        zs = z - m_new[:, None]  # -inf on padding columns
        p = tl.exp(zs)
        if HAS_ENT:
            # Re-centre the old sum on m_new; on the first tile l = 0 and m - m_new = -inf, so skip it.
            shift = tl.where(l > 0, m - m_new, 0.0) * l
            s = alpha * (s + shift) + tl.sum(p * tl.where(cmask[None, :], zs, 0.0), axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    log_l = tl.log(l)
    # Differences taken against the max before adding it back, so large |z| loses nothing.
    tl.store(logp_ptr + rows, (zy - m) - log_l, mask=rmask)
    tl.store(lse_ptr + rows, m + log_l, mask=rmask)
    if HAS_ENT:
        tl.store(ent_ptr + rows, log_l - s / l, mask=rmask)


@triton.jit
def _logprob_bwd_kernel(x_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, dx_ptr, dw_ptr, N, V, H, stride_x, stride_w, inv_t,
                        BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows = rows.to(tl.int64)
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    # Tiles with no upstream gradient (zero advantage, beta = 0) skip the recompute entirely.
    if tl.max(tl.abs(g), axis=0) > 0.0:
        cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        cols = cols.to(tl.int64)
        y = tl.load(y_ptr + rows, mask=rmask, other=-1)
        lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
        z = _z_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_x, stride_w, inv_t,
                    BLOCK_M, BLOCK_V, BLOCK_K, PREC)
        p = tl.exp(z - lse[:, None])
        dz = (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p) * (g * inv_t)[:, None]
        dz = tl.where(rmask[:, None] & cmask[None, :], dz, 0.0).to(x_ptr.dtype.element_ty)
        for k0 in range(0, H, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            kmask = ks < H
            x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            w = tl.load(w_ptr + cols[:, None] * stride_w + ks[None, :], mask=cmask[:, None] & kmask[None, :], other=0.0)
            dx = tl.dot(dz, w.to(dz.dtype), input_precision=PREC)  # [BLOCK_M, BLOCK_K]
            tl.atomic_add(dx_ptr + rows[:, None] * H + ks[None, :], dx, mask=rmask[:, None] & kmask[None, :])
            dw = tl.dot(tl.trans(dz), x, input_precision=PREC)  # [BLOCK_V, BLOCK_K]
            tl.atomic_add(dw_ptr + cols[:, None] * H + ks[None, :], dw, mask=cmask[:, None] & kmask[None, :])


def _prec(dtype):
    # fp32 inputs: exact fp32 dots (tests compare at 1e-5); bf16/fp16: tensor cores, fp32 accumulate.
    return "ieee" if dtype == torch.float32 else "tf32"


def _check(hidden, weight, targets):
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes must match, got {hidden.dtype} and {weight.dtype}")
    if not (os.environ.get("TRITON_INTERPRET") == "1" or hidden.is_cuda):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")


def logprob_forward(hidden, weight, targets, temperature, want_entropy):
    """-> logps [N] fp32, lse [N] fp32, entropy [N] fp32 or None."""
    _check(hidden, weight, targets)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    logps = torch.empty(n, device=hidden.device, dtype=torch.float32)
    lse = torch.empty_like(logps)
    ent = torch.empty_like(logps) if want_entropy else None
    if n > 0:
        grid = (triton.cdiv(n, BLOCK_M),)
        _logprob_fwd_kernel[grid](
            hidden, weight, targets, logps, lse, ent if want_entropy else logps, n, v, h,
            hidden.stride(0), weight.stride(0), 1.0 / temperature,
            BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K, PREC=_prec(hidden.dtype), HAS_ENT=want_entropy,
            num_warps=NUM_WARPS,
        )
    return logps, lse, ent


def logprob_backward(hidden, weight, targets, lse, g, temperature):
    """-> dX [N, H] (hidden dtype), dW [V, H] (weight dtype) for upstream dL/dlogp = g."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    dx = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    if n > 0:
        grid = (triton.cdiv(n, BLOCK_M), triton.cdiv(v, BLOCK_V))
        _logprob_bwd_kernel[grid](
            hidden, weight, targets, lse, g.float().contiguous(), dx, dw, n, v, h,
            hidden.stride(0), weight.stride(0), 1.0 / temperature,
            BLOCK_M=BLOCK_M, BLOCK_V=BLOCK_V, BLOCK_K=BLOCK_K, PREC=_prec(hidden.dtype), num_warps=NUM_WARPS,
        )
    return dx.to(hidden.dtype), dw.to(weight.dtype)


class _TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy):
        logps, lse, ent = logprob_forward(hidden, weight, targets, temperature, want_entropy)
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        if ent is None:
            return logps, logps.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        dx, dw = logprob_backward(hidden, weight, targets, lse, g_logp, ctx.temperature)
        return dx, dw, None, None, None


def logprob(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """([N] fp32 logps with grad through hidden and weight, [N] detached entropy or None)."""
    logps, ent = _TritonLogprob.apply(hidden, weight, targets.long().contiguous(), float(temperature), return_entropy)
    return logps, (ent if return_entropy else None)


def logprob_fwd_bwd(hidden, weight, targets, temperature, return_entropy, grad_fn):
    """Same contract as torch_backend.logprob_fwd_bwd. Here the gradients are formed right after the
    forward kernel, still by recomputing the tiles (8NHV): the tile kernels never hold a full row of
    logits, so the one-pass 6NHV form lives in the chunked torch backend."""
    targets = targets.long().contiguous()
    logps, lse, ent = logprob_forward(hidden, weight, targets, temperature, return_entropy)
    loss, g = grad_fn(0, hidden.shape[0], logps)
    dx, dw = logprob_backward(hidden, weight, targets, lse, g, temperature)
    return logps, ent, loss, dx, dw
