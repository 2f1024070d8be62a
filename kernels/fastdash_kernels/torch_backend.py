"""Chunked-over-tokens torch backend: never holds more than a [C, V] slice of the logits.

Two entry points, shared by every non-Triton caller:
- `logprob` (autograd Function): forward keeps only lse per token; backward recomputes each chunk's
  logits (8NHV).
- `logprob_fwd_bwd`: when the caller can give the per-token upstream gradient as soon as a chunk's
  log-probs are known (token-level losses), the chunk's softmax is turned into dZ right away and
  dX, dW are formed in the same pass (6NHV, no recompute).
Plain torch ops only, so it runs on CPU and traces under torch.compile.
"""

from __future__ import annotations

from typing import Callable

import torch

# Budget for one chunk of fp32 logits, in elements (2**27 fp32 = 512 MiB; V = 151936 -> 883 tokens).
CHUNK_ELEMENTS = 2**27


def chunk_rows(n_tokens: int, vocab: int) -> int:
    return max(1, min(max(n_tokens, 1), CHUNK_ELEMENTS // max(vocab, 1)))


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with fp32 output; bf16/fp16 operands stay low precision on CUDA (fp32 accumulate)."""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16) and a.dtype == b.dtype:
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()


def chunk_logits(x: torch.Tensor, weight: torch.Tensor, temperature: float) -> torch.Tensor:
    z = mm_f32(x, weight.t())  # [C, V] fp32
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _chunk_stats(z, y, want_entropy):
    """lse, logp and (optionally) entropy of one [C, V] fp32 logit chunk.

    Both are formed from z - max (not z - lse with a rounded lse, nor lse - sum p z): exact when
    the logits are large, e.g. all near -5e4.
    """
    m = z.amax(dim=-1, keepdim=True)
    zs = z - m  # [C, V]
    log_l = torch.logsumexp(zs, dim=-1)
    logp = zs.gather(-1, y.unsqueeze(-1)).squeeze(-1) - log_l
    ent = None
    if want_entropy:
        # H = -sum p (zs - log_l) = log_l - sum p zs
        ent = log_l - (torch.softmax(zs, dim=-1) * zs).sum(-1)
    return m.squeeze(-1) + log_l, logp, ent


def _dz_(z, y, lse, g, temperature):
    """In place: z <- dL/dz = g (onehot(y) - softmax(z)) / T for one chunk."""
    z.sub_(lse.unsqueeze(-1)).exp_().mul_(-g.unsqueeze(-1))
    z.scatter_add_(-1, y.unsqueeze(-1), g.unsqueeze(-1))
    if temperature != 1.0:
        z.mul_(1.0 / temperature)
    return z


def _grads_from_dz(dz, x, weight, dx_out, dw_acc):
    """dx_out <- dZ W; dw_acc += dZ^T X (dw_acc None: a frozen head, no dW). On CUDA dZ drops to the
    weight dtype (fp32 accumulate)."""
    if dz.is_cuda:
        dz = dz.to(weight.dtype)
    dx_out.copy_(mm_f32(dz, weight))
    if dw_acc is not None:
        dw_acc.add_(mm_f32(dz.t(), x))


class _ChunkedLogprob(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, want_entropy):
        n, vocab = hidden.shape[0], weight.shape[0]
        logps = hidden.new_empty(n, dtype=torch.float32)
        lse = hidden.new_empty(n, dtype=torch.float32)
        ent = hidden.new_empty(n, dtype=torch.float32) if want_entropy else None
        c = chunk_rows(n, vocab)
        for lo in range(0, n, c):
            hi = min(lo + c, n)
            z = chunk_logits(hidden[lo:hi], weight, temperature)
            lse[lo:hi], logps[lo:hi], e = _chunk_stats(z, targets[lo:hi], want_entropy)
            if want_entropy:
                ent[lo:hi] = e
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature = temperature
        if ent is None:
            return logps, hidden.new_empty(0, dtype=torch.float32)
        ctx.mark_non_differentiable(ent)
        return logps, ent

    @staticmethod
    def backward(ctx, g_logp, _g_ent):
        hidden, weight, targets, lse = ctx.saved_tensors
        n, vocab = hidden.shape[0], weight.shape[0]
        dx = torch.zeros(hidden.shape, device=hidden.device, dtype=torch.float32)
        need_dw = ctx.needs_input_grad[1]  # a frozen lm_head (LoRA): no [V, H] buffer, no dW GEMM
        dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
        g_logp = g_logp.float()
        c = chunk_rows(n, vocab)
        for lo in range(0, n, c):
            hi = min(lo + c, n)
            z = chunk_logits(hidden[lo:hi], weight, ctx.temperature)
            dz = _dz_(z, targets[lo:hi], lse[lo:hi], g_logp[lo:hi], ctx.temperature)
            _grads_from_dz(dz, hidden[lo:hi], weight, dx[lo:hi], dw)
        return dx.to(hidden.dtype), (dw.to(weight.dtype) if need_dw else None), None, None, None


def logprob(hidden, weight, targets, temperature=1.0, return_entropy=False):
    """([N] fp32 logps with grad through hidden and weight, [N] detached entropy or None)."""
    logps, ent = _ChunkedLogprob.apply(hidden, weight, targets.long(), float(temperature), return_entropy)
    return logps, (ent if return_entropy else None)


GradFn = Callable[[int, int, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def logprob_fwd_bwd(hidden, weight, targets, temperature, return_entropy, grad_fn: GradFn, need_dw=True):
    """One pass: log-probs, loss, and dX/dW for a loss whose gradient is per-token.

    grad_fn(lo, hi, logps[lo:hi]) -> (loss contribution of tokens lo:hi, dloss/dlogps [hi - lo]).
    Returns logps [N], entropy [N] or None, loss (0-d fp32), dX [N, H] (hidden dtype),
    dW [V, H] (weight dtype; None when not need_dw: a frozen head).
    """
    targets = targets.long()
    n, vocab = hidden.shape[0], weight.shape[0]
    logps = hidden.new_empty(n, dtype=torch.float32)
    ent = hidden.new_empty(n, dtype=torch.float32) if return_entropy else None
    loss = hidden.new_zeros((), dtype=torch.float32)
    dx = torch.empty(hidden.shape, device=hidden.device, dtype=torch.float32)
    dw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if need_dw else None
    c = chunk_rows(n, vocab)
    for lo in range(0, n, c):
        hi = min(lo + c, n)
        y = targets[lo:hi]
        z = chunk_logits(hidden[lo:hi], weight, temperature)
        lse, logps[lo:hi], e = _chunk_stats(z, y, return_entropy)
        if return_entropy:
            ent[lo:hi] = e
        loss_c, g = grad_fn(lo, hi, logps[lo:hi])
        loss = loss + loss_c
        dz = _dz_(z, y, lse, g.float(), temperature)
        _grads_from_dz(dz, hidden[lo:hi], weight, dx[lo:hi], dw)
    return logps, ent, loss, dx.to(hidden.dtype), (dw.to(weight.dtype) if need_dw else None)
