"""Triton backward of the fused log-prob: dZ tiles, then dX and dW GEMMs that own their outputs.

Per chunk of Vc vocabulary entries (an N x Vc dZ scratch in the weight dtype, at most
SCRATCH_BYTES; chunks run over the vocabulary, not the tokens, because the output re-read per chunk
is then dX (N x H) rather than dW (V x H), V / N times smaller for LLM vocabularies):
  1. `_dz_kernel`, grid (N / TILE_M, Vc / TILE_V): recompute the z tile from the saved lse,
     dZ = g (onehot(y) - exp(z - lse)) / T, stored to the scratch; a tile is skipped (flag = 1,
     nothing computed or stored) when its upstream gradients are all zero, or, with filtering on,
     when the forward's saved per-tile maxima prove every entry small (below).
  2. `_dx_kernel`, grid (H / BLOCK_D, N / TILE_M, SPLIT): each program accumulates its dX tile over the
     chunk's kept vocabulary tiles in registers (dZ tile @ W tile per step), then adds it to the
     previous chunks' sum (a read-modify-write of a tile no other program touches) or, for a single
     chunk, stores it in the output dtype. When the token blocks are too few to give every SM two
     programs (`dx_split`, from the SM count), SPLIT > 1 splits the vocabulary: fp32 partials summed
     in a fixed order. No atomics; fixed reduction order.
  3. `_dw_kernel`, grid (H / BLOCK_D, Vc / TILE_V, SPLIT): each program owns a dW tile and reduces
     over the kept token blocks (dZ^T tile @ X tile); the tile is complete and stored once. When a
     vocabulary is too small to fill the GPU, SPLIT > 1 splits the tokens: deterministic mode
     writes the partials and sums them in a fixed order; otherwise one fp32 atomic add per element
     per split (SPLIT-way contention).
Skipped tiles reach dX / dW as index lists of the kept ones (`skip_lists`, built on the device from
the flags), not as an `if` around the loads: Triton software-pipelines only loops whose loads are not
under data-dependent control flow, and the list keeps the loop branch-free (sm_90: 2 tile buffers in
flight instead of 1; tests/kernels/compile_sm90.py).
So dX and dW are bit-identical from run to run when deterministic (the default).

Gradient filtering (CCE's, filter_eps = tau). A tile (rows R, columns J) is skipped when no row's
target is in J and exp(tilemax_t - lse_t) < tau for every t in R, i.e. p_tj < tau on the whole tile.
Each dropped entry is |dZ_tj| = |g_t| p_tj / T < |g_t| tau / T, so
  |dX_td error| <= sum_{skipped j} |g_t| / T p_tj |W_jd|    (sum_{skipped j} p_tj < min(1, V tau))
  |dW_jd error| <= sum_{skipped t} |g_t| / T p_tj |X_td|.
Random weights give flat softmaxes where nothing is skipped; trained heads give peaked ones.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .sms import num_sms
from .triton_tiles import INTERPRET, TILE_M, TILE_V, config, load_tile, prec, tuned, z_tile

SCRATCH_BYTES = 512 * 2**20  # dZ scratch per chunk; tests lower it to run several chunks

DZ_CONFIGS = [config(8, s, BLOCK_K=k) for k, s in ((64, 3), (64, 4), (128, 2), (128, 3))]
GEMM_CONFIGS = [config(w, s, BLOCK_D=d) for d, w, s in ((128, 8, 3), (64, 4, 3), (64, 8, 4), (128, 8, 4),
                                                         (256, 8, 3))]


@tuned(DZ_CONFIGS, key=["V", "H"], fixed={"BLOCK_K": 64, "num_warps": 4})
@triton.jit
def _dz_kernel(x_ptr, w_ptr, y_ptr, lse_ptr, g_ptr, tmax_ptr, dz_ptr, flag_ptr, v0, VC, N, V, H,
               stride_x, stride_w, inv_t, filter_eps,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr, PREC: tl.constexpr,
               CAST: tl.constexpr, FILTER: tl.constexpr):
    mt, vt = tl.program_id(0), tl.program_id(1)
    rows = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < N
    rows = rows.to(tl.int64)
    local = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)  # column within the chunk
    cols = v0 + local
    cmask = cols < V
    g = tl.load(g_ptr + rows, mask=rmask, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=rmask, other=0.0)
    y = tl.load(y_ptr + rows, mask=rmask, other=-1)
    skip = tl.max(tl.abs(g), axis=0) == 0.0
    if FILTER:
        gvt = v0 // BLOCK_V + vt  # the forward's tile index
        pmax = tl.exp(tl.load(tmax_ptr + gvt * N + rows, mask=rmask, other=float("-inf")) - lse)
        lo = gvt * BLOCK_V
        has_target = tl.sum(((y >= lo) & (y < lo + BLOCK_V) & rmask).to(tl.int32), axis=0) > 0
        skip = skip | ((tl.max(tl.where(rmask, pmax, 0.0), axis=0) < filter_eps) & (has_target == 0))
    tl.store(flag_ptr + mt * tl.num_programs(1) + vt, skip.to(tl.int8))
    if skip == 0:
        z = z_tile(x_ptr, w_ptr, rows, cols, rmask, cmask, H, stride_x, stride_w, inv_t,
                   BLOCK_M, BLOCK_V, BLOCK_K, PREC, CAST)
        p = tl.exp(z - lse[:, None])
        dz = (tl.where(cols[None, :] == y[:, None], 1.0, 0.0) - p) * (g * inv_t)[:, None]
        tl.store(dz_ptr + rows[:, None] * VC + local[None, :], dz.to(dz_ptr.dtype.element_ty),
                 mask=rmask[:, None] & cmask[None, :])


@tuned(GEMM_CONFIGS, key=["V", "H", "ACCUM", "SPLIT"], fixed={"BLOCK_D": 64, "num_warps": 4},
       restore_value=["dx_ptr"])
@triton.jit
def _dx_kernel(dz_ptr, w_ptr, list_ptr, count_ptr, dx_ptr, v0, VC, N, V, H, stride_w, n_vt, part_stride,
               ACCUM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
               PREC: tl.constexpr, CAST: tl.constexpr, SPLIT: tl.constexpr = 1):
    # SPLIT > 1: program_id(2) takes every SPLIT-th kept vocabulary tile and stores an fp32 partial at
    # dx_ptr + split * part_stride (the caller sums them in a fixed order): small N still fills the SMs.
    dt, mt, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # H blocks vary fastest: shared dZ rows
    rows = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rmask = rows < N
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < H
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # The row block's kept tiles, listed by skip_lists: no data-dependent `if` around the loads, so
    # Triton software-pipelines the loop (the tile index is one more pipelined load).
    for i in range(split, tl.load(count_ptr + mt), SPLIT):
        vt = tl.load(list_ptr + mt * n_vt + i)
        local = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
        cmask = v0 + local < V
        dz = load_tile(dz_ptr, rows, local, rmask, cmask, VC, CAST)  # [BLOCK_M, BLOCK_V]
        w = load_tile(w_ptr, v0 + local, ds, cmask, dmask, stride_w, CAST)  # [BLOCK_V, BLOCK_D]
        acc = tl.dot(dz, w, acc, input_precision=PREC)
    mask = rmask[:, None] & dmask[None, :]
    if SPLIT > 1:
        tl.store(dx_ptr + split * part_stride + rows[:, None] * H + ds[None, :], acc, mask=mask)
    else:
        out = dx_ptr + rows[:, None] * H + ds[None, :]
        if ACCUM:
            acc += tl.load(out, mask=mask, other=0.0)
        tl.store(out, acc.to(dx_ptr.dtype.element_ty), mask=mask)


@tuned(GEMM_CONFIGS, key=["V", "H", "SPLIT", "ACCUM"], fixed={"BLOCK_D": 64, "num_warps": 4},
       restore_value=["dw_ptr"])
@triton.jit
def _dw_kernel(dz_ptr, x_ptr, list_ptr, count_ptr, dw_ptr, v0, VC, N, V, H, stride_x, n_vt, n_mt, part_stride,
               SPLIT: tl.constexpr, MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr,
               BLOCK_D: tl.constexpr, PREC: tl.constexpr, CAST: tl.constexpr, ACCUM: tl.constexpr = False):
    # MODE 0: owned tile, stored once (ACCUM: added to what it holds, the single pass's token chunks);
    # 1: fp32 atomic add (SPLIT > 1, non-deterministic);
    # 2: this split's partial at dw_ptr + split * part_stride (summed in a fixed order by the caller).
    dt, vt, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # neighbours share a dZ column slab
    local = (vt * BLOCK_V + tl.arange(0, BLOCK_V)).to(tl.int64)
    cmask = v0 + local < V
    ds = dt * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = ds < H
    acc = tl.zeros([BLOCK_V, BLOCK_D], dtype=tl.float32)
    for i in range(split, tl.load(count_ptr + vt), SPLIT):  # the column's kept row blocks (skip_lists)
        mt = tl.load(list_ptr + vt * n_mt + i)
        rows = (mt * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
        rmask = rows < N
        dz = load_tile(dz_ptr, rows, local, rmask, cmask, VC, CAST)  # [BLOCK_M, BLOCK_V]
        x = load_tile(x_ptr, rows, ds, rmask, dmask, stride_x, CAST)  # [BLOCK_M, BLOCK_D]
        acc = tl.dot(tl.trans(dz), x, acc, input_precision=PREC)
    mask = cmask[:, None] & dmask[None, :]
    if MODE == 0:
        out = dw_ptr + (v0 + local)[:, None] * H + ds[None, :]
        if ACCUM:
            acc += tl.load(out, mask=mask, other=0.0)
        tl.store(out, acc.to(dw_ptr.dtype.element_ty), mask=mask)
    elif MODE == 1:  # into the chunk's own zeroed fp32 buffer
        tl.atomic_add(dw_ptr + local[:, None] * H + ds[None, :], acc, mask=mask)
    else:
        tl.store(dw_ptr + split * part_stride + local[:, None] * H + ds[None, :], acc, mask=mask)


def chunk_vocab(n, v, itemsize) -> int:
    """Vocabulary entries per backward chunk: the dZ scratch [N, Vc] stays within SCRATCH_BYTES."""
    c = max(TILE_V, SCRATCH_BYTES // max(n * itemsize, 1) // TILE_V * TILE_V)
    return min(c, triton.cdiv(v, TILE_V) * TILE_V)


DW_SPLIT = None  # tests force a split; None = split only when the dW tiles cannot fill two waves
DX_SPLIT = None  # likewise for dX's vocabulary reduction


def dw_split(n_mt, vc, h, sms) -> int:
    if DW_SPLIT is not None:
        return max(1, min(DW_SPLIT, n_mt))
    tiles = triton.cdiv(vc, TILE_V) * triton.cdiv(h, 128)
    if tiles >= 2 * sms or vc * h * 4 > 64 * 2**20:  # big chunks: ownership; partials too big
        return 1
    return max(1, min(n_mt, triton.cdiv(2 * sms, tiles)))


def dx_split(n_mt, n_vt, h, sms) -> int:
    """Vocabulary splits of dX: its owned [TILE_M, 128] tiles alone are too few when the tokens are
    (the single pass's 512-token chunks give 4 x 7 = 28 at H = 896): split until two waves of SMs."""
    if DX_SPLIT is not None:
        return max(1, min(DX_SPLIT, n_vt))
    tiles = n_mt * triton.cdiv(h, 128)
    return 1 if tiles >= 2 * sms else max(1, min(n_vt, triton.cdiv(2 * sms, tiles)))


def skip_lists(flags, n_mt, n_vt):
    """The kept (flag 0) tiles as index lists, ascending: per row block its vocabulary tiles (dX) and
    per vocabulary tile its row blocks (dW), with their counts (int32, on the device: no host sync).
    flags: the dZ kernel's [n_mt, n_vt] skip flags, row-major from its first element."""
    skip = flags.reshape(-1)[: n_mt * n_vt].view(n_mt, n_vt)
    keep = skip == 0
    rows = torch.argsort(skip, dim=1, stable=True).to(torch.int32)  # kept first, in tile order
    cols = torch.argsort(skip.t(), dim=1, stable=True).to(torch.int32).contiguous()
    return rows, keep.sum(1, dtype=torch.int32), cols, keep.sum(0, dtype=torch.int32)


def dx_chunk(dz, weight, lists, dx, v0, vc, n, tiles, accum, blocks):
    """dX of one vocabulary chunk into dx [n, H] (ACCUM: added to it), split over the vocabulary when
    the owned tiles alone would leave SMs idle (fp32 partials summed in a fixed order)."""
    h, v = dx.shape[1], weight.shape[0]
    n_mt = triton.cdiv(n, TILE_M)
    split = dx_split(n_mt, tiles, h, num_sms(dx.device))
    target = dx if split == 1 else torch.empty(split, n, h, device=dx.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(h, meta["BLOCK_D"]), n_mt, split)  # noqa: E731
    _dx_kernel[grid](dz, weight, lists[0], lists[1], target, v0, vc, n, v, h, weight.stride(0), tiles, n * h,
                     ACCUM=accum, SPLIT=split, **blocks, **_dx_kernel.fixed_meta)
    if split > 1:
        acc = target[0].clone()
        for s in range(1, split):  # fixed order: bit-identical from run to run
            acc += target[s]
        if accum:
            dx += acc
        else:
            dx.copy_(acc)


def logprob_backward(hidden, weight, targets, lse, g, temperature, *, tile_max=None, filter_eps=None,
                     deterministic=True, stats=None, need_dw=True):
    """-> dX [N, H] (hidden dtype), dW [V, H] (weight dtype; None without need_dw: a frozen head) for
    upstream dL/dlogp = g.

    stats: a dict to receive 'tiles' and 'skipped_tiles' counts (a host sync; tests and benchmarks)."""
    hidden, weight = hidden.contiguous(), weight.contiguous()
    n, h = hidden.shape
    v = weight.shape[0]
    if n == 0:
        return torch.zeros_like(hidden), torch.zeros_like(weight) if need_dw else None
    if filter_eps is not None and tile_max is None:
        raise ValueError("filter_eps needs the forward's tile maxima (logprob_forward(save_tile_max=True))")
    g = g.float().contiguous()
    blocks = dict(BLOCK_M=TILE_M, BLOCK_V=TILE_V, PREC=prec(hidden.dtype),
                  CAST=INTERPRET and hidden.dtype != torch.float32)
    vc = chunk_vocab(n, v, weight.element_size())
    one_chunk = vc >= v
    n_mt, n_vt = triton.cdiv(n, TILE_M), triton.cdiv(min(vc, v), TILE_V)
    dz = torch.empty(n, vc, device=hidden.device, dtype=weight.dtype)
    flags = torch.empty(n_mt, n_vt, device=hidden.device, dtype=torch.int8)
    dx = torch.empty(n, h, device=hidden.device, dtype=hidden.dtype if one_chunk else torch.float32)
    dw = torch.empty_like(weight) if need_dw else None
    for i, v0 in enumerate(range(0, v, vc)):
        tiles = triton.cdiv(min(vc, v - v0), TILE_V)
        _dz_kernel[(n_mt, tiles)](
            hidden, weight, targets, lse, g, tile_max if tile_max is not None else lse, dz, flags, v0, vc, n, v, h,
            hidden.stride(0), weight.stride(0), 1.0 / temperature, float(filter_eps or 0.0),
            FILTER=filter_eps is not None, **blocks, **_dz_kernel.fixed_meta)
        lists = skip_lists(flags, n_mt, tiles)
        dx_chunk(dz, weight, lists, dx, v0, vc, n, tiles, i > 0, blocks)
        if need_dw:
            _dw_chunk(dz, hidden, lists, dw, v0, vc, tiles, n_mt, deterministic, blocks)
        if stats is not None:
            stats["tiles"] = stats.get("tiles", 0) + n_mt * tiles
            stats["skipped_tiles"] = stats.get("skipped_tiles", 0) + int(n_mt * tiles - lists[1].sum())
    return dx.to(hidden.dtype), dw


def _dw_chunk(dz, hidden, lists, dw, v0, vc, tiles, n_mt, deterministic, blocks):
    n, h = hidden.shape
    v = dw.shape[0]
    rows = min(vc, v - v0)
    split = dw_split(n_mt, rows, h, num_sms(dw.device))
    mode = 0 if split == 1 else (2 if deterministic else 1)
    if mode == 0:
        target = dw
    elif mode == 1:
        target = torch.zeros(rows, h, device=dw.device, dtype=torch.float32)
    else:
        target = torch.empty(split, rows, h, device=dw.device, dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(h, meta["BLOCK_D"]), tiles, split)  # noqa: E731
    _dw_kernel[grid](dz, hidden, lists[2], lists[3], target, v0, vc, n, v, h, hidden.stride(0), tiles, n_mt, rows * h,
                     SPLIT=split, MODE=mode, **blocks, **_dw_kernel.fixed_meta)
    if mode == 1:
        dw[v0:v0 + rows] = target
    elif mode == 2:
        acc = target[0].clone()
        for s in range(1, split):  # fixed order: bit-identical from run to run
            acc += target[s]
        dw[v0:v0 + rows] = acc
