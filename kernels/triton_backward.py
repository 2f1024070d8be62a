"""Triton backward of the fused log-prob: dZ tiles, then dX and dW GEMMs that own their outputs.

Per chunk of C tokens (C x V dZ scratch in the weight dtype, at most SCRATCH_BYTES):
  1. `_dz_kernel`, grid (C / TILE_M, V / TILE_V): recompute the z tile from the saved lse,
     dZ = g (onehot(y) - exp(z - lse)) / T, stored to the scratch; a tile is skipped (flag = 1,
     nothing computed or stored) when its upstream gradients are all zero, or, with filtering on,
     when the forward's saved per-tile maxima prove every entry small (below).
  2. `_dx_kernel`, grid (C / TILE_M, H / BLOCK_D): each program accumulates its dX tile over the
     whole vocabulary in registers (dZ tile @ W tile per step, flagged tiles skipped) and stores
     it once. No atomics; the reduction order over the vocabulary is fixed.
  3. `_dw_kernel`, grid (V / TILE_V, H / BLOCK_D, SPLIT): each program owns a dW tile and reduces
     over the chunk's tokens (dZ^T tile @ X tile), then adds it to dW (read-modify-write of a tile
     no other program touches). dW sums chunks in order. When a vocabulary is too small to fill
     the GPU, SPLIT > 1 splits the tokens: deterministic mode writes the partials and sums them in
     a fixed order; otherwise one fp32 atomic add per element per split (SPLIT-way contention).
So dX and dW are bit-identical from run to run when deterministic (the default).

Gradient filtering (CCE's, filter_eps = tau). A tile (rows R, columns J) is skipped when no row's
target is in J and exp(tilemax_t - lse_t) < tau for every t in R, i.e. p_tj < tau on the whole tile.
Each dropped entry is |dZ_tj| = |g_t| p_tj / T < |g_t| tau / T, so per token
  |dX_t error| <= |g_t| / T * sum_{skipped j} p_tj * max_j |W_j|       (sum_{skipped} p_tj < min(1, V tau))
  |dW_j error| <= sum_t |g_t| / T * p_tj * max_t |X_t|                 over the rows skipped at j.
Random weights give flat softmaxes where nothing is skipped; trained heads give peaked ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_tiles import INTERPRET, TILE_M, TILE_V, config, load_tile, prec, tuned, z_tile

SCRATCH_BYTES = 512 * 2**20  # dZ scratch per chunk; tests lower it to run several chunks

DZ_CONFIGS = [config(w, s, BLOCK_K=k) for k in (64, 128) for w, s in ((4, 3), (8, 3), (8, 4))]
GEMM_CONFIGS = [config(w, s, BLOCK_D=d) for d in (64, 128, 256) for w, s in ((4, 3), (8, 3), (8, 4))]


@tuned(DZ_CONFIGS, key=["V", "H"], fixed={"BLOCK_K": 64, "num_warps": 4})
@triton.jit
def _dz_kernel(x_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, tmax_ptr, dz_ptr, flag_ptr, row0, C, N, V, H,
               stride_x, stride_w, inv_t, filter_eps,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
               CAST: tl.constexpr, FILTER: tl.constexpr):
    mt, vt = tl.program_id(0), tl.program_id(1)
    local = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = local < C
    rows = (row0 + local).to(tl.int64)
    cols = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cmask = cols < V
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    skip = tl.max(tl.abs(g), axis=0) == 0.0
    if FILTER:
        pmax = tl.exp(tl.load(tmax_ptr + vt * N + rows, mask=rmask, other=float("-inf")) - lse)
        has_target = tl.sum(((y >= vt * BLOCK_V) & (y < vt * BLOCK_V + BLOCK_V) & rmask).to(tl.int32), axis=0) > 0
        skip = skip | ((tl.max(tl.where(rmask, pmax, 0.0), axis=0) < filter_eps) & (has_target == 0))
    tl.store(flag_ptr + mt * tl.num_programs(1) + vt, skip.to(tl.int8))
    if skip == 0:
        z = z_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_x, stride_w, inv_t,
                   BLOCK_M, BLOCK_V, BLOCK_K, PREC, CAST)
        p = tl.exp(z - lse[:, None])
        dz = (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p) * (g * inv_t)[:, None]
        tl.store(dz_ptr + local.to(tl.int64)[:, None] * V + cols[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@tuned(GEMM_CONFIGS, key=["V", "H"], fixed={"BLOCK_D": 64, "num_warps": 4})
@triton.jit
def _dx_kernel(dz_ptr, w_ptr, flag_ptr, dx_ptr, row0, C, V, H, stride_w, n_vt,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
               CAST: tl.constexpr):
    mt, dt = tl.program_id(0), tl.program_id(1)
    local = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = local < C
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < H
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for vt in range(0, n_vt):
        if tl.load(flag_ptr + mt * n_vt + vt) == 0:
            cols = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
            cmask = cols < V
            dz = load_tile(dz_ptr, local, cols, rmask, cmask, V, CAST)  # [BLOCK_M, BLOCK_V]
            w = load_tile(w_ptr, cols, ds, cmask, dmask, stride_w, CAST)  # [BLOCK_V, BLOCK_D]
            acc = tl.dot(dz, w, acc, input_precision=PREC)
    out = dx_ptr + (row0 + local)[:, None] * H + ds[None, :]
    tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=rmask[:, None] & dmask[None, :])


@tuned(GEMM_CONFIGS, key=["V", "H", "SPLIT"], fixed={"BLOCK_D": 64, "num_warps": 4}, restore_value=["dw_ptr"])
@triton.jit
def _dw_kernel(dz_ptr, x_ptr, flag_ptr, dw_ptr, row0, C, V, H, stride_x, n_vt, n_mt, part_stride,
               SPLIT: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr):
    # MODE 0: owned tile, read-modify-write; 1: fp32 atomic add (SPLIT > 1, non-deterministic);
    # 2: write this split's partial at dw_ptr + split * part_stride (summed in order by the caller).
    vt, dt, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    cols = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cmask = cols < V
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < H
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for mt in range(split, n_mt, SPLIT):
        if tl.load(flag_ptr + mt * n_vt + vt) == 0:
            local = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
            rmask = local < C
            dz = load_tile(dz_ptr, local, cols, rmask, cmask, V, CAST)  # [BLOCK_M, BLOCK_V]
            x = load_tile(x_ptr, row0 + local, ds, rmask, dmask, stride_x, CAST)  # [BLOCK_M, BLOCK_D]
            acc = tl.dot(tl.trans(dz), x, acc, input_precision=PREC)
    mask = cmask[:, None] & dmask[None, :]
    offs = cols[:, None] * H + ds[None, :]
    if MODE == 0:
        tl.store(dw_ptr + offs, tl.load(dw_ptr + offs, mask=mask, other=0.0) + acc, mask=mask)
    elif MODE == 1:
        tl.atomic_add(dw_ptr + offs, acc, mask=mask)
    else:
        tl.store(dw_ptr + split * part_stride + offs, acc, mask=mask)


def chunk_tokens(n, v, itemsize) -> int:
    """Tokens per backward chunk: the dZ scratch [C, V] stays within SCRATCH_BYTES."""
    c = max(TILE_M, SCRATCH_BYTES // max(v * itemsize, 1) // TILE_M * TILE_M)
    return min(c, triton.cdiv(n, TILE_M) * TILE_M)


DW_SPLIT = None  # tests force a split; None = split only when the dW tiles cannot fill two waves


def dw_split(n_mt, v, h, device) -> int:
    if DW_SPLIT is not None:
        return max(1, min(DW_SPLIT, n_mt))
    from .triton_logprob import num_sms

    tiles = triton.cdiv(v, TILE_V) * triton.cdiv(h, 128)
    if tiles >= 2 * num_sms(device) or v * h * 4 > 64 * 2**20:  # big heads: ownership; partials would be huge
        return 1
    return max(1, min(n_mt, triton.cdiv(2 * num_sms(device), tiles)))


def logprob_backward(hidden, weight, targets, lse, g, temperature, *, tile_max=None, filter_eps=None,
                     deterministic=True, stats=None):
    """-> dX [N, H] (hidden dtype), dW [V, H] (weight dtype) for upstream dL/dlogp = g.

    stats: a dict to receive 'tiles' and 'skipped_tiles' counts (a host sync; tests and benchmarks)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    dx = torch.empty(hidden.shape, device=hidden.device, dtype=hidden.dtype)
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    if n == 0:
        return dx, dw.to(weight.dtype)
    if filter_eps is not None and tile_max is None:
        raise ValueError("filter_eps needs the forward's tile maxima (logprob_forward(save_tile_max=True))")
    g = g.float().contiguous()
    cast, pr, inv_t = INTERPRET and hidden.dtype != torch.float32, prec(hidden.dtype), 1.0 / temperature
    n_vt = triton.cdiv(v, TILE_V)
    c = chunk_tokens(n, v, weight.element_size())
    dz = torch.empty(c, v, device=hidden.device, dtype=weight.dtype)
    flags = torch.empty(triton.cdiv(c, TILE_M), n_vt, device=hidden.device, dtype=torch.int8)
    blocks = dict(BLOCK_M=TILE_M, BLOCK_V=TILE_V, PREC=pr, CAST=cast)
    for lo in range(0, n, c):
        rows = min(c, n - lo)
        n_mt = triton.cdiv(rows, TILE_M)
        _dz_kernel[(n_mt, n_vt)](
            hidden, weight, targets, lse, g, tile_max if tile_max is not None else lse, dz, flags, lo, rows, n, v, h,
            hidden.stride(0), weight.stride(0), inv_t, float(filter_eps or 0.0),
            FILTER=filter_eps is not None, **blocks, **_dz_kernel.fixed_meta)
        grid_dx = lambda meta: (n_mt, triton.cdiv(h, meta["BLOCK_D"]))  # noqa: E731
        _dx_kernel[grid_dx](dz, weight, flags, dx, lo, rows, v, h, weight.stride(0), n_vt, **blocks,
                            **_dx_kernel.fixed_meta)
        _dw_accumulate(dz, hidden, flags, dw, lo, rows, n_mt, n_vt, deterministic, blocks)
        if stats is not None:
            stats["tiles"] = stats.get("tiles", 0) + n_mt * n_vt
            stats["skipped_tiles"] = stats.get("skipped_tiles", 0) + int(flags[:n_mt].sum())
    return dx, dw.to(weight.dtype)


def _dw_accumulate(dz, hidden, flags, dw, lo, rows, n_mt, n_vt, deterministic, blocks):
    v, h = dw.shape
    split = dw_split(n_mt, v, h, dw.device)
    mode = 0 if split == 1 else (2 if deterministic else 1)
    target = dw if mode < 2 else torch.empty(split, v, h, device=dw.device, dtype=torch.float32)
    grid = lambda meta: (n_vt, triton.cdiv(h, meta["BLOCK_D"]), split)  # noqa: E731
    _dw_kernel[grid](dz, hidden, flags, target, lo, rows, v, h, hidden.stride(0), n_vt, n_mt, v * h,
                     SPLIT=split, MODE=mode, **blocks, **_dw_kernel.fixed_meta)
    if mode == 2:
        for s in range(split):  # fixed order: bit-identical from run to run
            dw += target[s]
