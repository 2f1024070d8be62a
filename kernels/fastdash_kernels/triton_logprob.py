"""Triton fused lm_head -> log-prob: tiles of z = W x / T, never an [N, V] tensor.

Forward (`_logprob_fwd_kernel`, a 2-D grid: TILE_M-token blocks x vocabulary splits). Each program
walks its split's vocabulary tiles (tile s, s + S, s + 2S, ...), z tile by tl.dot over H with fp32
accumulation, online max / sum-exp from -inf, the target logit and sum p (z - max) for the entropy,
and writes per-split partials; `_combine` merges the S partials (exact log-sum-exp algebra) into
logp, lse and entropy. S > 1 only when the token blocks alone would leave SMs idle (small N). With
filtering on it also saves each (token, vocabulary tile) maximum logit for the backward's skip test.

Backward: `triton_backward.py` (dZ tiles, then dX and dW GEMMs that own their outputs: no atomics
and a fixed reduction order). Cost model: COST_MODEL.md.

Imported only when the Triton backend is used (import triton at module top is fine here).
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .sms import num_sms
from .triton_backward import logprob_backward
from .triton_tiles import INTERPRET, TILE_M, TILE_V, config, prec, tuned, z_tile

# 8 warps: a 128 x 128 fp32 accumulator is 64 registers a thread (4 warps reach the 255 cap).
FWD_CONFIGS = [config(8, s, BLOCK_K=k) for k, s in ((64, 3), (64, 4), (128, 2), (128, 3))]


@tuned(FWD_CONFIGS, key=["V", "H", "SPLITS"], fixed={"BLOCK_K": 64, "num_warps": 4})
@triton.jit
def _logprob_fwd_kernel(x_ptr, w_ptr, y_ptr, part_ptr, tmax_ptr, z_ptr, N, V, H, stride_x, stride_w, stride_z, inv_t,
                        SPLITS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
                        PREC: tl.constexpr, CAST: tl.constexpr, SAVE_TMAX: tl.constexpr, STORE_Z: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(1)
    rmask = rows < N
    rows = rows.to(tl.int64)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - m)
    s = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum exp(z - m) * (z - m), for the entropy
    zy = tl.zeros([BLOCK_M], dtype=tl.float32)
    n_tiles = tl.cdiv(V, BLOCK_V)
    for tile in range(split, n_tiles, SPLITS):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V)
        cmask = cols < V
        z = z_tile(x_ptr, w_ptr, rows, cols.to(tl.int64), rmask, cmask, H, stride_x, stride_w, inv_t,
                   BLOCK_M, BLOCK_V, BLOCK_K, PREC, CAST)
        tile_max = tl.max(z, axis=1)
        if SAVE_TMAX:
            tl.store(tmax_ptr + tile * N + rows, tile_max, mask=rmask)
        if STORE_Z:  # the single pass (triton_single.py) turns these fp32 logits into dZ in place
            tl.store(z_ptr + rows[:, None] * stride_z + cols[None, :], z, mask=rmask[:, None] & cmask[None, :])
        m_new = tl.maximum(m, tile_max)
        alpha = tl.exp(m - m_new)  # m = -inf on the first tile gives 0, not nan (m_new is finite)
        zs = z - m_new[:, None]  # -inf on padding columns
        p = tl.exp(zs)
        # Re-centre the old sum on m_new; on the first tile l = 0 and m - m_new = -inf, so skip it.
        shift = tl.where(l > 0, m - m_new, 0.0) * l
        s = alpha * (s + shift) + tl.sum(p * tl.where(cmask[None, :], zs, 0.0), axis=1)
        l = l * alpha + tl.sum(p, axis=1)
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), axis=1)
        m = m_new
    # partials [4, SPLITS, N]: m, l, s, zy
    base = part_ptr + split * N + rows
    tl.store(base, m, mask=rmask)
    tl.store(base + SPLITS * N, l, mask=rmask)
    tl.store(base + 2 * SPLITS * N, s, mask=rmask)
    tl.store(base + 3 * SPLITS * N, zy, mask=rmask)


def _combine(part):
    """[4, S, N] partials -> logp, lse, entropy [N]. Every split holds >= 1 real column, so m is finite."""
    m, l, s, zy = part
    big = m.amax(0)
    a = torch.exp(m - big)  # [S, N]
    total = (a * l).sum(0)
    s_all = (a * (s + (m - big) * l)).sum(0)  # sum exp(z - big) (z - big)
    log_l = torch.log(total)
    # Differences taken against the max before adding it back, so large |z| loses nothing.
    return (zy.sum(0) - big) - log_l, big + log_l, log_l - s_all / total


FWD_SPLITS = None  # tests force a split count; None = enough programs for two waves of SMs


def fwd_splits(n, v, sms) -> int:
    """Vocabulary splits of the forward: token blocks x splits >= 2 x SMs (no cap but the tile count:
    the single pass's 512-token chunks are 4 blocks, 66 splits on 132 SMs)."""
    tiles = triton.cdiv(v, TILE_V)
    want = FWD_SPLITS or triton.cdiv(2 * sms, triton.cdiv(n, TILE_M))
    return max(1, min(want, tiles))


def _check(hidden, weight):
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight dtypes must match, got {hidden.dtype} and {weight.dtype}")
    if not (os.environ.get("TRITON_INTERPRET") == "1" or hidden.is_cuda):
        raise ValueError("backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tests)")


def logprob_forward(hidden, weight, targets, temperature, want_entropy, save_tile_max=False, z_out=None):
    """-> logps [N] fp32, lse [N] fp32, entropy [N] fp32 or None, tile max [V / TILE_V, N] or None.
    z_out: an [>= N, >= V] fp32 buffer (row-contiguous) that receives the logits z / T."""
    _check(hidden, weight)
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        e = hidden.new_empty(0, dtype=torch.float32)
        return e, e.clone(), (e.clone() if want_entropy else None), None
    splits = fwd_splits(n, v, num_sms(hidden.device))
    part = torch.empty(4, splits, n, device=hidden.device, dtype=torch.float32)
    tmax = torch.empty(triton.cdiv(v, TILE_V), n, device=hidden.device, dtype=torch.float32) if save_tile_max \
        else part
    kern = _logprob_fwd_kernel
    kern[(triton.cdiv(n, TILE_M), splits)](
        hidden, weight, targets, part, tmax, part if z_out is None else z_out, n, v, h, hidden.stride(0),
        weight.stride(0), 0 if z_out is None else z_out.stride(0), 1.0 / temperature,
        SPLITS=splits, BLOCK_M=TILE_M, BLOCK_V=TILE_V, PREC=prec(hidden.dtype),
        CAST=INTERPRET and hidden.dtype != torch.float32, SAVE_TMAX=save_tile_max, STORE_Z=z_out is not None,
        **kern.fixed_meta,
    )
    logps, lse, ent = _combine(part)
    return logps, lse, (ent if want_entropy else None), (tmax if save_tile_max else None)


class _TritonLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy, opts):
        filt = opts.get("filter_eps") is not None
        logps, lse, ent, tmax = logprob_forward(hidden, weight, targets, temperature, want_entropy, filt)
        ctx.save_for_backward(hidden, weight, targets, lse, *([tmax] if filt else []))
        ctx.temperature, ctx.opts = temperature, opts
        if ent is None:
            return logps, logps.new_empty(0)
        ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        hidden, weight, targets, lse, *tmax = ctx.saved_tensors
        dx, dw = logprob_backward(hidden, weight, targets, lse, g_logp, ctx.temperature,
                                  tile_max=tmax[0] if tmax else None, need_dw=ctx.needs_input_grad[1], **ctx.opts)
        return dx, dw, None, None, None, None


def logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, **opts):
    """([N] fp32 logps with grad through hidden and weight, [N] detached entropy or None).

    opts: deterministic (default True), filter_eps (None = exact; see triton_backward)."""
    logps, ent = _TritonLogprob.apply(hidden, weight, targets.long().contiguous(), float(temperature),
                                      return_entropy, opts)
    return logps, (ent if return_entropy else None)
