"""Triton kernel: per-sequence sums over packed segments. Imported only when Triton is used."""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _segment_sum_kernel(x_ptr, cu_ptr, out_ptr, BLOCK: tl.constexpr):
    # One program per sequence; it walks its own [start, end) range, so ragged lengths cost no padding.
    seq = tl.program_id(0)
    start = tl.load(cu_ptr + seq).to(tl.int64)
    end = tl.load(cu_ptr + seq + 1).to(tl.int64)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(start, end, BLOCK):
        idx = off + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + idx, mask=idx < end, other=0.0).to(tl.float32)
    tl.store(out_ptr + seq, tl.sum(acc, axis=0))


def segment_sum_triton(values: torch.Tensor, cu_seqlens: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """[N] -> [B] fp32 per-sequence sums."""
    n_seq = cu_seqlens.numel() - 1
    out = torch.empty(n_seq, device=values.device, dtype=torch.float32)
    if n_seq > 0:
        _segment_sum_kernel[(n_seq,)](values.contiguous(), cu_seqlens.contiguous(), out, BLOCK=block)
    return out
