"""Per-token GRPO-family policy loss on [N] vectors: ratio, PPO clip, KL estimators.

This is the one place the per-token maths lives. Every backend (reference, torch, triton, liger)
calls `per_token_policy_loss`; the backends differ only in how they get ``logps`` out of the [N, V]
lm_head product. Loss types (grpo, dr_grpo, ...) are not known here: `fastdash.algo` turns one into
per-token weights, and the kernels compute loss = sum_t token_weights_t * l_t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")


@dataclass
class PolicyLossOutput:
    """loss: 0-d fp32 with grad; logps/entropy: [N] fp32 detached; metrics: 0-d tensors (no host sync)."""

    loss: torch.Tensor
    logps: torch.Tensor
    entropy: torch.Tensor | None = None
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)


def kl_per_token(logps: torch.Tensor, ref_logps: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from samples of pi.

    k1 = logp - r; k2 = 0.5 (logp - r)^2; k3 = exp(r - logp) - (r - logp) - 1 (unbiased, >= 0).
    """
    if estimator == "k3":
        d = ref_logps - logps
        return torch.exp(d) - d - 1.0
    if estimator == "k1":
        return logps - ref_logps
    if estimator == "k2":
        return 0.5 * (logps - ref_logps) ** 2
    raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")


def per_token_policy_loss(
    logps: torch.Tensor,
    advantages: torch.Tensor,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    *,
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    pg_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped-surrogate loss plus beta * KL, per token: l_t = w_t pg_t + beta KL_t.

    Args:
        logps: [N] fp32 log-probs of the sampled tokens under the current policy (may need grad).
        advantages: [N] advantage of each token's sequence (already broadcast to tokens).
        old_logps: [N] log-probs under the sampling policy; None means K = 1 (ratio = 1, but the
            gradient is the vanilla policy gradient because old = logps.detach()).
        ref_logps: [N] reference-policy log-probs; required when beta > 0.
        epsilon, epsilon_high: ratio clipped to [1 - epsilon, 1 + epsilon_high]; epsilon_high
            defaults to epsilon.
        pg_weights: [N] detached weights w_t of the policy-gradient term only (rollout correction,
            `fastdash.correction`); None = 1, bit for bit the unweighted loss.
    Returns:
        per_token_loss [N] (fp32, differentiable in logps) and per-token metrics (detached):
        ``clipped`` [N] bool, where the clipped branch is active (no gradient from the surrogate),
        and ``kl`` [N] when beta > 0.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    dt = torch.float64 if logps.dtype == torch.float64 else torch.float32  # fp64 for the test oracle
    old = logps.detach() if old_logps is None else old_logps.to(dt)
    adv = advantages.to(dt)
    ratio = torch.exp(logps - old)
    clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_hi)
    loss = -torch.minimum(ratio * adv, clipped_ratio * adv)
    if pg_weights is not None:
        loss = loss * pg_weights.detach().to(dt)
    with torch.no_grad():
        clipped = ((ratio < 1.0 - epsilon) & (adv < 0)) | ((ratio > 1.0 + eps_hi) & (adv > 0))
    metrics = {"clipped": clipped}
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0 (got beta=%r, ref_logps=None)" % beta)
        kl = kl_per_token(logps, ref_logps.to(dt), kl_estimator)
        loss = loss + beta * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def check_loss_args(token_weights, n_tokens: int, beta: float, ref_logps, kl_estimator: str, epsilon: float) -> None:
    """ValueErrors for the public entry points (naming field, expected and actual)."""
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError(f"ref_logps is required when beta != 0, got beta={beta} and ref_logps=None")
    if epsilon < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon}")
    if not isinstance(token_weights, torch.Tensor):
        raise ValueError("token_weights is required: a [N] float tensor, e.g. fastdash.algo.loss_token_weights(...)"
                         f", got {type(token_weights).__name__}")
    if token_weights.shape != (n_tokens,) or not token_weights.is_floating_point():
        raise ValueError(f"token_weights must be a [N] = [{n_tokens}] float tensor, got "
                         f"{tuple(token_weights.shape)} {token_weights.dtype}")
