"""Public entry points: backend switch, `fused_linear_logprob`, `fused_policy_loss`."""

from __future__ import annotations

import functools
import importlib

import torch

from .loss import PolicyLossOutput, check_loss_args, check_objective_args, per_token_policy_loss
from .reference import logprob_reference
from .segment import _has_triton, broadcast_to_tokens

# The one list of kernel backends (fastdash.config imports it for `kernel=`).
BACKENDS = ("auto", "triton", "torch", "liger", "cce", "reference")


def resolve_backend(backend: str, hidden: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if hidden.is_cuda and _has_triton() else "torch"
    return backend


def _impl(backend: str):
    """Module with logprob(...) (and, but for cce, logprob_fwd_bwd(...)) for torch, triton or cce."""
    if backend == "triton":
        if not _has_triton():
            raise ImportError("backend='triton' needs the triton package: pip install 'fastdash[triton]'")
        return importlib.import_module(".triton_fwd_bwd", __package__)
    if backend == "cce":
        return importlib.import_module(".cce", __package__)
    return importlib.import_module(".torch_backend", __package__)


def _kernel_opts(backend: str, deterministic: bool, filter_eps) -> dict:
    """Options only the Triton and CCE kernels take; elsewhere asking for filtering is an error."""
    if filter_eps is not None and backend not in ("triton", "cce"):
        raise ValueError(f"filter_eps (gradient filtering) is offered by backend='triton' and 'cce', "
                         f"not {backend!r}; pass filter_eps=None")
    if backend == "triton":
        return dict(deterministic=deterministic, filter_eps=filter_eps)
    return dict(filter_eps=filter_eps) if backend == "cce" else {}


def _check_inputs(hidden, weight, targets, temperature):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if targets.shape != (hidden.shape[0],):
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def fused_linear_logprob(hidden, weight, targets, *, temperature=1.0, return_entropy=False, backend="auto",
                         deterministic=True, filter_eps=None):
    """Per-token log-probs of ``targets`` under softmax(hidden @ weight.T / temperature).

    hidden [N, H], weight [V, H] (lm_head, no bias), targets [N] int. Returns logps [N] fp32 with
    autograd through hidden and weight, and with return_entropy a second [N] fp32 entropy tensor
    (detached). backend: auto (triton on CUDA, else torch) | triton | torch | cce | reference.
    deterministic (triton): bit-identical dX/dW from run to run (fixed reduction order; the
    default, and free unless a small vocabulary makes dW split its tokens). filter_eps (triton,
    cce): skip gradient tiles whose softmax is provably below it (None = exact).
    """
    _check_inputs(hidden, weight, targets, temperature)
    b = resolve_backend(backend, hidden)
    if b == "liger":
        raise ValueError("backend='liger' is only offered for fused_policy_loss (liger has no public log-prob op)")
    if b == "reference":
        logps, ent = logprob_reference(hidden, weight, targets, temperature)
        ent = ent.detach()
    else:
        logps, ent = _impl(b).logprob(hidden, weight, targets, temperature, return_entropy,
                                      **_kernel_opts(b, deterministic, filter_eps))
    return (logps, ent) if return_entropy else logps


class _EagerLoss(torch.autograd.Function):
    """Loss whose dX, dW were formed during the forward; backward only scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, fwd_bwd, targets, temperature, return_entropy, grad_fn):
        logps, ent, loss, dx, dw = fwd_bwd(hidden, weight, targets, temperature, return_entropy, grad_fn)
        ctx.save_for_backward(dx, dw)
        ent = logps.new_empty(0) if ent is None else ent
        ctx.mark_non_differentiable(logps, ent)
        return loss, logps, ent

    @staticmethod
    def backward(ctx, g_loss, _g_logps, _g_ent):
        dx, dw = ctx.saved_tensors  # dw None: a frozen head (its fwd_bwd made no dW)
        return (g_loss * dx).to(dx.dtype), None if dw is None else (g_loss * dw).to(dw.dtype), \
            None, None, None, None, None


def _slice(t, lo, hi):
    return None if t is None else t[lo:hi]


def fused_policy_loss(
    hidden, weight, targets, cu_seqlens, advantages, *, token_weights, old_logps=None, ref_logps=None,
    pg_weights=None, epsilon=0.2, epsilon_high=None, beta=0.0, kl_estimator="k3", temperature=1.0,
    return_entropy=False, backend="auto", grad_in_forward=None, deterministic=True, filter_eps=None,
    single_pass=None, objective="clip", importance_sampling_level="token", delta=None, sapo_temperature_pos=1.0,
    sapo_temperature_neg=1.05, use_bias_correction_kl=False,
) -> PolicyLossOutput:
    """PPO-clip policy loss (+ beta KL) on packed completion tokens, straight from hidden states.

    hidden [N, H] (completion positions of B sequences end to end), weight [V, H], targets [N],
    cu_seqlens [B + 1], advantages [B], token_weights [N] float, old_logps / ref_logps [N] or None.
    Per token (see loss.per_token_policy_loss) l_t = -min(r A, clip(r, 1 - eps, 1 + eps_high) A)
    + beta KL_t, and loss = sum_t token_weights_t l_t. The weights carry the whole loss type
    (sequence means, the step's normaliser): `fastdash.algo.loss_token_weights` builds them.

    pg_weights (rollout correction, `fastdash.correction`): detached w_t multiplying only the
    policy-gradient term, l_t = w_t pg_t + beta KL_t; a [N] tensor, or a function of the detached
    current log-probs [N] -> [N] (weights against the policy being trained: then the gradient is
    formed after the forward, not in it). None: the unweighted loss, bit for bit.

    grad_in_forward (default: on when grad is enabled and hidden or weight needs it, torch/triton
    backends): the loss is token-level, so dL/dlogp_t is known as soon as logp_t is; dX and dW are
    then computed in the forward and backward only scales them. deterministic, filter_eps: as in
    `fused_linear_logprob`. single_pass (triton, grad in forward): True = the 6NHV single pass
    (kernels/fastdash_kernels/triton_single.py), False = forward + recompute (8NHV), None = the cost model's pick.

    objective (clip | cispo | sapo), importance_sampling_level (token | sequence: GSPO), delta,
    sapo_temperature_pos / _neg, use_bias_correction_kl: the surrogate and KL variants of
    `loss.per_token_policy_loss`. A sequence-level ratio needs a sequence's every log-prob before any
    of its gradients, so it (like a callable pg_weights) forms the gradient after the forward (8NHV).
    """
    _check_inputs(hidden, weight, targets, temperature)
    check_loss_args(token_weights, targets.shape[0], beta, ref_logps, kl_estimator, epsilon)
    check_objective_args(objective, importance_sampling_level, delta, epsilon_high, sapo_temperature_pos,
                         sapo_temperature_neg)
    n_seq = cu_seqlens.numel() - 1
    if advantages.shape != (n_seq,):
        raise ValueError(f"advantages must be [B] = [{n_seq}] (one per sequence), got {tuple(advantages.shape)}")
    for name, t in (("old_logps", old_logps), ("ref_logps", ref_logps),
                    ("pg_weights", None if callable(pg_weights) else pg_weights)):
        if t is not None and t.shape != targets.shape:
            raise ValueError(f"{name} must be [N] = [{targets.shape[0]}], got {tuple(t.shape)}")
    b = resolve_backend(backend, hidden)
    opts = _kernel_opts(b, deterministic, filter_eps)
    kw = dict(epsilon=epsilon, epsilon_high=epsilon_high, beta=beta, kl_estimator=kl_estimator)
    variants = dict(objective=objective, importance_sampling_level=importance_sampling_level, delta=delta,
                    sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                    use_bias_correction_kl=use_bias_correction_kl)
    n = hidden.shape[0]
    adv_tok = broadcast_to_tokens(advantages.float(), cu_seqlens, n)  # [N], no padding
    tok_w = token_weights.float()
    if b == "liger":
        from .liger import liger_policy_loss

        if (objective, importance_sampling_level, delta, use_bias_correction_kl) != ("clip", "token", None, False):
            raise ValueError("backend='liger' offers only the token-level clipped objective without delta or the "
                             "bias-corrected KL; use backend='torch' or 'triton' for objective / "
                             "importance_sampling_level / delta / use_bias_correction_kl")

        loss, logps, ent = liger_policy_loss(hidden, weight, targets, cu_seqlens, advantages, tok_w,
                                             old_logps=old_logps, ref_logps=ref_logps, temperature=temperature,
                                             return_entropy=return_entropy, pg_weights=pg_weights, **kw)
        return PolicyLossOutput(loss, logps, ent, token_metrics(logps, adv_tok, old_logps, ref_logps, ent, **kw))

    kw.update(variants)
    if grad_in_forward is None:
        grad_in_forward = torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
    if callable(pg_weights) or importance_sampling_level == "sequence":
        grad_in_forward = False  # these need every current log-prob (of a sequence) before any gradient
    if grad_in_forward and b in ("torch", "triton"):
        def grad_fn(lo, hi, lp):
            with torch.enable_grad():
                lp = lp.detach().requires_grad_(True)
                per_tok, _ = per_token_policy_loss(lp, adv_tok[lo:hi], _slice(old_logps, lo, hi),
                                                   _slice(ref_logps, lo, hi), pg_weights=_slice(pg_weights, lo, hi),
                                                   **kw)
                loss_c = (per_tok * tok_w[lo:hi]).sum()
                (g,) = torch.autograd.grad(loss_c, lp)
            return loss_c.detach(), g

        fwd_bwd = functools.partial(_impl(b).logprob_fwd_bwd, **opts, **({"single_pass": single_pass}
                                                                         if b == "triton" else {}),
                                    need_dw=weight.requires_grad)  # frozen head (LoRA): no [V, H] dW
        loss, logps, ent = _EagerLoss.apply(hidden, weight, fwd_bwd, targets, float(temperature),
                                            return_entropy, grad_fn)
        ent = ent if return_entropy else None
    else:
        if b == "reference":
            logps, ent = logprob_reference(hidden, weight, targets, temperature)
            ent = ent.detach() if return_entropy else None
        else:
            logps, ent = _impl(b).logprob(hidden, weight, targets, temperature, return_entropy, **opts)
        pg_w = pg_weights(logps.detach()) if callable(pg_weights) else pg_weights
        per_tok, _ = per_token_policy_loss(logps, adv_tok, old_logps, ref_logps, pg_weights=pg_w,
                                           cu_seqlens=cu_seqlens, **kw)
        loss = (per_tok * tok_w).sum()
        logps = logps.detach()
    return PolicyLossOutput(loss, logps, ent, token_metrics(logps, adv_tok, old_logps, ref_logps, ent,
                                                            cu_seqlens=cu_seqlens, **kw))


@torch.no_grad()
def token_metrics(logps, adv_tok, old_logps, ref_logps, entropy, **kw) -> dict[str, torch.Tensor]:
    """Token means as 0-d tensors: clip_fraction (either side) and per side clip_low_fraction,
    clip_high_fraction, clip_delta_fraction (delta set), kl_mean (beta != 0), entropy_mean (if given)."""
    _, m = per_token_policy_loss(logps, adv_tok, old_logps, ref_logps, **kw)
    denom = max(logps.numel(), 1)
    out = {"clip_fraction": m["clipped"].float().sum() / denom}
    for side in ("low", "high", "delta"):
        if f"clipped_{side}" in m:
            out[f"clip_{side}_fraction"] = m[f"clipped_{side}"].float().sum() / denom
    if "kl" in m:
        out["kl_mean"] = m["kl"].sum() / denom
    if entropy is not None:
        out["entropy_mean"] = entropy.sum() / denom
    return out
