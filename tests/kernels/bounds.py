"""Float64 references and error bounds derived from the magnitudes involved (no tuned tolerances).

A kernel computes z = W x / T in fp32 (products of fp32 or bf16 inputs, fp32 sums), then softmax
statistics, then dZ = g (onehot - p) / T and dX = dZ W, dW = dZ^T X. First-order rounding-error
analysis, with the sqrt(n) growth of a length-n sum of independent roundings and ULPS units of
slack, gives for each output a bound built from the float64 values:
  logits   err_z   = ULPS eps sqrt(H) max_j |z_tj|      (per token: every logit of its row)
  log-prob err_lp  = 2 err_z + ULPS eps (|logp| + sqrt(V))   (z_y, the lse and log of a V-term sum)
  entropy  err_H   = err_z sum_j p_j |log p_j + H| + ULPS eps sqrt(V) (sum p |z - max z| + H)
                      (dH/dz_j = -p_j (log p_j + H), first order in the logit errors)
  dZ       |e_dz|  <= |g| (|onehot - p| ULPS eps + p err_lp) / T + dg |onehot - p| / T
                      (p = exp(z - lse) has relative error err_lp)
  dX       e_dz @ |W| + ULPS eps sqrt(V) (|dZ| @ |W|);   dW likewise with sqrt(N) and |X|.
dg is the error of the upstream gradient itself (policy loss: |d g / d logp| err_lp). Outputs
stored in bf16 add one bf16 rounding; dZ cast to bf16 before the GEMMs (CUDA) adds eps_bf16 |dZ|.
"""

from __future__ import annotations

import math

import torch

ULPS = 4.0
EPS32 = torch.finfo(torch.float32).eps
EPS_BF16 = torch.finfo(torch.bfloat16).eps


def logprob_bounds(x, w, y, temperature, g, dg=None, out_dtype=torch.float32, lowp_operands=False):
    """Float64 reference and per-element error bounds of (logps, entropy, dX, dW) for upstream g.

    x [N, H], w [V, H] as the kernel received them (their values are taken as exact); g [N] the
    upstream dL/dlogp; dg [N] a bound on the error of g (default 0). Returns (ref, bound), dicts.
    """
    X, W = x.detach().double(), w.detach().double()
    n, h = X.shape
    v = W.shape[0]
    g = g.detach().double()
    dg = torch.zeros_like(g) if dg is None else dg.detach().double()
    z = X @ W.t() / temperature
    lsm = torch.log_softmax(z, dim=-1)
    p = lsm.exp()
    lp = lsm.gather(-1, y.long()[:, None]).squeeze(-1)
    ent = -(p * lsm).sum(-1)
    onehot = torch.nn.functional.one_hot(y.long(), v).double()
    dz = g[:, None] * (onehot - p) / temperature
    ref = dict(logps=lp, entropy=ent, dX=dz @ W, dW=dz.t() @ X)

    err_z = ULPS * EPS32 * math.sqrt(h) * z.abs().amax(-1)  # [N]
    err_lp = 2 * err_z + ULPS * EPS32 * (lp.abs() + math.sqrt(v))
    spread = (p * (z - z.amax(-1, keepdim=True)).abs()).sum(-1)
    sens = (p * (lsm + ent[:, None]).abs()).sum(-1)
    err_h = err_z * sens + ULPS * EPS32 * math.sqrt(v) * (spread + ent)
    adz = dz.abs()
    rel = ULPS * EPS32 + (EPS_BF16 if lowp_operands else 0.0)
    e_dz = (g.abs()[:, None] * ((onehot - p).abs() * rel + p * err_lp[:, None])
            + dg[:, None] * (onehot - p).abs()) / temperature
    bound = dict(
        logps=err_lp,
        entropy=err_h,
        dX=e_dz @ W.abs() + ULPS * EPS32 * math.sqrt(v) * (adz @ W.abs()),
        dW=e_dz.t() @ X.abs() + ULPS * EPS32 * math.sqrt(max(n, 1)) * (adz.t() @ X.abs()),
    )
    if out_dtype == torch.bfloat16:  # one rounding of the stored result (gradients come back in bf16)
        for k in ("dX", "dW"):
            bound[k] = bound[k] + EPS_BF16 * ref[k].abs()
    return ref, bound


def assert_within(got, ref, bound, what):
    """|got - ref| <= bound elementwise (ref, bound float64); the message names the worst element."""
    got = got.detach().double()
    assert got.shape == ref.shape, f"{what}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    if not got.numel():
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - ref).abs()
    ratio = err / bound.clamp(min=1e-300)
    i = int(ratio.argmax())
    assert (err <= bound).all(), (f"{what}: |got - ref| = {err.flatten()[i]:.3g} > bound {bound.flatten()[i]:.3g} "
                                  f"at flat index {i} (ref {ref.flatten()[i]:.6g}, got {got.flatten()[i]:.6g})")


def policy_loss_bounds(x, w, y, temperature, loss_of_logps, **kw):
    """Float64 reference and bounds for a token-level loss L(logps) = sum_t f_t(logp_t).

    loss_of_logps maps float64 logps [N] to (loss, per-token weighted terms [N]). The upstream
    gradient g = dL/dlogp and its error bound |dg/dlogp| err_lp (dg/dlogp is diagonal: each term
    depends on its own token) come from float64 autograd. Returns (ref, bound) with a 'loss' entry.
    """
    lp = logprob_bounds(x, w, y, temperature, torch.zeros(x.shape[0], device=x.device))[0]["logps"].requires_grad_(True)
    loss, terms = loss_of_logps(lp)
    (g,) = torch.autograd.grad(loss, lp, create_graph=True)
    h = torch.autograd.grad(g.sum(), lp, allow_unused=True)[0] if g.requires_grad else None
    h = torch.zeros_like(g) if h is None else h
    err_lp = logprob_bounds(x, w, y, temperature, g, **kw)[1]["logps"]
    ref, bound = logprob_bounds(x, w, y, temperature, g.detach(), dg=h.abs().detach() * err_lp, **kw)
    n = max(x.shape[0], 1)
    ref["loss"] = loss.detach()
    bound["loss"] = (g.abs() * err_lp).sum().detach() + ULPS * EPS32 * math.sqrt(n) * terms.abs().sum().detach()
    return ref, bound
