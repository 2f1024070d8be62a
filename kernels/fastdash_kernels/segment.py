"""Per-sequence reductions over packed segments (no padding).

Packed layout: the N completion tokens of B sequences laid end to end; ``cu_seqlens`` [B + 1]
(int32/int64, cu_seqlens[0] = 0, cu_seqlens[-1] = N) marks the boundaries. Sequence i owns tokens
cu_seqlens[i]:cu_seqlens[i + 1].

`segment_sum` has a Triton kernel (`triton_segment.py`, one program per sequence) and a torch
reference (`segment_sum_torch`, index_add); `segment_mean` is differentiable.
"""

from __future__ import annotations

import torch


def seq_lengths(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[B] lengths from [B + 1] boundaries."""
    return cu_seqlens[1:] - cu_seqlens[:-1]


def segment_ids(cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[N] int64 sequence index of every token. No host sync (output_size is given)."""
    lengths = seq_lengths(cu_seqlens).long()
    ids = torch.arange(lengths.numel(), device=cu_seqlens.device)
    return torch.repeat_interleave(ids, lengths, output_size=n_tokens)


def broadcast_to_tokens(per_seq: torch.Tensor, cu_seqlens: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """[B] -> [N]: each token gets its sequence's value (e.g. the advantage)."""
    return per_seq[segment_ids(cu_seqlens, n_tokens)]


def segment_sum_torch(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Reference: [N] -> [B] fp32 per-sequence sums (empty sequences give 0)."""
    n_seq = cu_seqlens.numel() - 1
    out = torch.zeros(n_seq, device=values.device, dtype=torch.float32)
    return out.index_add_(0, segment_ids(cu_seqlens, values.numel()), values.float())


def segment_sum(values: torch.Tensor, cu_seqlens: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[N] -> [B] fp32 per-sequence sums. backend: auto | triton | torch."""
    if backend == "auto":
        backend = "triton" if values.is_cuda and _has_triton() else "torch"
    if backend == "triton":
        from .triton_segment import segment_sum_triton

        return segment_sum_triton(values, cu_seqlens)
    if backend in ("torch", "reference", "liger"):
        return segment_sum_torch(values, cu_seqlens)
    raise ValueError(f"backend must be auto | triton | torch, got {backend!r}")


class _SegmentMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, cu_seqlens, backend):
        lengths = seq_lengths(cu_seqlens).clamp(min=1).float()
        ctx.save_for_backward(cu_seqlens, lengths)
        ctx.n = values.numel()
        return segment_sum(values.detach(), cu_seqlens, backend) / lengths

    @staticmethod
    def backward(ctx, grad):
        cu_seqlens, lengths = ctx.saved_tensors
        return broadcast_to_tokens(grad / lengths, cu_seqlens, ctx.n), None, None


def segment_mean(values: torch.Tensor, cu_seqlens: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """[N] -> [B] per-sequence means (0 for empty sequences), differentiable in ``values``."""
    return _SegmentMean.apply(values, cu_seqlens, backend)


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
