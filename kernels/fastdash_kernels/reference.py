"""Plain-PyTorch references that materialise the [N, V] logits. For tests and as an oracle only."""

from __future__ import annotations

import torch

from .loss import per_token_policy_loss


def logprob_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp_t = z[y_t] - logsumexp(z), z = W x_t / T; returns ([N] logps, [N] entropy).

    Computed in fp32, or in fp64 when hidden is fp64 (the oracle the tests compare against).
    Differentiable through hidden and weight by plain autograd (entropy too).
    """
    dt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    logits = (hidden.to(dt) @ weight.to(dt).t()) / temperature  # [N, V]: the tensor the kernels avoid
    logsm = torch.log_softmax(logits, dim=-1)
    logps = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logps, entropy


def policy_loss_reference(
    hidden, weight, targets, cu_seqlens, advantages, *, token_weights, old_logps=None, ref_logps=None,
    epsilon=0.2, epsilon_high=None, beta=0.0, kl_estimator="k3", temperature=1.0, pg_weights=None, **variants,
):
    """Loop-over-sequences oracle: returns (loss, logps, entropy, per-token metrics).

    Deliberately written without the segment helpers: each sequence is sliced in Python, so it
    checks the packed broadcasts and reductions independently. fp64 throughout for fp64 hidden.
    `variants`: objective, importance_sampling_level, delta, ... of `per_token_policy_loss`.
    """
    logps, entropy = logprob_reference(hidden, weight, targets, temperature)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    adv_tok = torch.cat(
        [advantages[i].to(logps.dtype).expand(bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
        + [logps.new_zeros(0)]
    )
    per_tok, metrics = per_token_policy_loss(
        logps, adv_tok, old_logps, ref_logps, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
        kl_estimator=kl_estimator, pg_weights=pg_weights, cu_seqlens=cu_seqlens, **variants,
    )
    w = token_weights.to(logps.dtype)
    total = logps.new_zeros(())
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            total = total + (per_tok[lo:hi] * w[lo:hi]).sum()
    return total, logps, entropy, metrics
