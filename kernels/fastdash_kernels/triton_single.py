"""The 6NHV single pass: log-probs, loss and dX / dW together, for losses whose gradient is known
per token as soon as its log-prob is (the grad-in-forward path of `fused_policy_loss`).

The recompute design (triton_logprob + triton_backward) computes the logits twice, once for the
log-sum-exp and again for dZ (8NHV). Here each chunk of C tokens is processed once:
  1. the forward kernel (`_logprob_fwd_kernel`, STORE_Z) writes the chunk's fp32 logits z / T to a
     [C, V] buffer while it forms lse, logp and the entropy (2CHV);
  2. the loss's gradient g = dL/dlogp of the chunk comes from the caller (`grad_fn`);
  3. `_dz_from_z_kernel` turns the stored logits into dZ = g (onehot(y) - exp(z - lse)) / T in the
     weight dtype, one tile per program; a tile is skipped (flag 1) when its g are all zero or, with
     filter_eps, when every p < filter_eps and no target lies in it (the bound of triton_backward);
  4. the owned-tile GEMMs of triton_backward: dX of the chunk (2CHV, stored once) and dW += dZ^T X
     (2CHV; the chunk's dW tiles are added to the previous chunks' in a fixed order: deterministic).
The logits stay fp32 (bf16 would put 2^-8 |z| of error into every p); C is chosen so the fp32 logits
and the dZ buffer together fit SCRATCH_BYTES (V = 151,936 bf16: 576 tokens per chunk). Extra
memory: those two buffers and an fp32 dW accumulator when there is more than one chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import triton_backward as B
from .triton_logprob import logprob_forward
from .triton_tiles import INTERPRET, TILE_M, TILE_V, config, prec, tuned

SCRATCH_BYTES = 512 * 2**20  # logits + dZ of one token chunk; tests lower it to run several chunks


@tuned([config(w, s) for w, s in ((4, 2), (8, 2), (8, 3))], key=["V"], fixed={"num_warps": 4})
@triton.jit
def _dz_from_z_kernel(z_ptr, y_ptr, lse_ptr, g_ptr, dz_ptr, flag_ptr, N, V, stride_z, inv_t, filter_eps,
                      BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, FILTER: tl.constexpr):
    mt, vt = tl.program_id(0), tl.program_id(1)
    rows = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    cols = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cmask = cols < V
    mask = rmask[:, None] & cmask[None, :]
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    z = tl.load(z_ptr + rows[:, None] * stride_z + cols[None, :], mask=mask, other=float("-inf"))
    p = tl.exp(z - lse[:, None])  # 0 on padding
    onehot = cols[None, :] == y[:, None]
    skip = tl.max(tl.abs(g), axis=0) == 0.0
    if FILTER:
        has_target = tl.sum(tl.where(onehot & mask, 1, 0)) > 0
        skip = skip | ((tl.max(tl.max(p, axis=1), axis=0) < filter_eps) & (has_target == 0))
    tl.store(flag_ptr + mt * tl.num_programs(1) + vt, skip.to(tl.int8))
    if skip == 0:
        dz = (tl.where(onehot, 1.0, 0.0) - p) * (g * inv_t)[:, None]
        tl.store(dz_ptr + rows[:, None] * stride_z + cols[None, :], dz.to(dz_ptr.dtype.element_ty), mask=mask)


def chunk_tokens(n: int, v: int, itemsize: int) -> int:
    """Tokens per chunk: fp32 logits + dZ in the weight dtype of [C, V] within SCRATCH_BYTES."""
    vpad = triton.cdiv(v, TILE_V) * TILE_V
    c = max(TILE_M, SCRATCH_BYTES // (vpad * (4 + itemsize)) // TILE_M * TILE_M)
    return min(c, triton.cdiv(max(n, 1), TILE_M) * TILE_M)


def logprob_fwd_bwd_single(hidden, weight, targets, temperature, return_entropy, grad_fn, *, filter_eps=None,
                           stats=None, need_dw=True):
    """Same contract as torch_backend.logprob_fwd_bwd (logps, entropy or None, loss, dX, dW); always
    deterministic. stats: a dict to receive 'tiles' and 'skipped_tiles' counts (tests)."""
    hidden, weight, targets = hidden.contiguous(), weight.contiguous(), targets.long().contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    logps = torch.empty(n, device=dev, dtype=torch.float32)
    ent = torch.empty(n, device=dev, dtype=torch.float32) if return_entropy else None
    loss = torch.zeros((), device=dev, dtype=torch.float32)
    dx = torch.empty_like(hidden)
    if n == 0:
        return logps, ent, loss, dx, torch.zeros_like(weight) if need_dw else None
    c = chunk_tokens(n, v, weight.element_size())
    vpad, n_vt = triton.cdiv(v, TILE_V) * TILE_V, triton.cdiv(v, TILE_V)
    z = torch.empty(c, vpad, device=dev, dtype=torch.float32)
    dz = torch.empty(c, vpad, device=dev, dtype=weight.dtype)
    flags = torch.empty(triton.cdiv(c, TILE_M), n_vt, device=dev, dtype=torch.int8)
    dw = torch.empty(v, h, device=dev, dtype=weight.dtype if c >= n else torch.float32) if need_dw else None
    blocks = dict(BLOCK_M=TILE_M, BLOCK_V=TILE_V, PREC=prec(hidden.dtype),
                  CAST=INTERPRET and hidden.dtype != torch.float32)
    for i, lo in enumerate(range(0, n, c)):
        hi = min(lo + c, n)
        x, y, n_c = hidden[lo:hi], targets[lo:hi], hi - lo
        n_mt = triton.cdiv(n_c, TILE_M)
        logps[lo:hi], lse, e, _ = logprob_forward(x, weight, y, temperature, return_entropy, z_out=z)
        if return_entropy:
            ent[lo:hi] = e
        loss_c, g = grad_fn(lo, hi, logps[lo:hi])
        loss = loss + loss_c
        _dz_from_z_kernel[(n_mt, n_vt)](z, y, lse, g.float().contiguous(), dz, flags, n_c, v, vpad,
                                        1.0 / temperature, float(filter_eps or 0.0), BLOCK_M=TILE_M,
                                        BLOCK_V=TILE_V, FILTER=filter_eps is not None, **_dz_from_z_kernel.fixed_meta)
        lists = B.skip_lists(flags, n_mt, n_vt)
        B.dx_chunk(dz, weight, lists, dx[lo:hi], 0, vpad, n_c, n_vt, False, blocks)  # split over V for SMs
        grid_dw = lambda meta: (triton.cdiv(h, meta["BLOCK_D"]), n_vt, 1)  # noqa: E731
        if need_dw:  # a frozen head (LoRA) gets no dW
            B._dw_kernel[grid_dw](dz, x, lists[2], lists[3], dw, 0, vpad, n_c, v, h, x.stride(0), n_vt, n_mt, 0,
                                  SPLIT=1, MODE=0, ACCUM=i > 0, **blocks, **B._dw_kernel.fixed_meta)
        if stats is not None:
            stats["tiles"] = stats.get("tiles", 0) + n_mt * n_vt
            stats["skipped_tiles"] = stats.get("skipped_tiles", 0) + int(n_mt * n_vt - lists[1].sum())
    return logps, ent, loss, dx, dw.to(weight.dtype) if need_dw else None
