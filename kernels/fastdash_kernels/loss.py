"""Per-token GRPO-family policy loss on [N] vectors: ratio, PPO clip (or CISPO / SAPO), KL estimators.

This is the one place the per-token maths lives. Every backend (reference, torch, triton, liger)
calls `per_token_policy_loss`; the backends differ only in how they get ``logps`` out of the [N, V]
lm_head product. Loss types (grpo, dr_grpo, ...) are not known here: `fastdash.algo` turns one into
per-token weights and an `objective` (the per-token surrogate), and the kernels compute
loss = sum_t token_weights_t * l_t.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

KL_ESTIMATORS = ("k1", "k2", "k3")
OBJECTIVES = ("clip", "cispo", "sapo")  # the per-token policy-gradient surrogate (see per_token_policy_loss)
IS_LEVELS = ("token", "sequence")  # importance_sampling_level of the PPO ratio (sequence: GSPO)


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


def sequence_mean(values: torch.Tensor, cu_seqlens: torch.Tensor) -> torch.Tensor:
    """[N] -> [N]: each token holds the mean of its sequence's values; differentiable, in values' dtype
    (fp64 stays fp64 for the test oracle). Empty sequences own no tokens, so never divide by 0."""
    cu = cu_seqlens.to(values.device).long()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=values.device), lengths,
                                  output_size=values.numel())
    sums = values.new_zeros(lengths.numel()).index_add(0, seg, values)
    return (sums / lengths.clamp(min=1).to(values.dtype))[seg]


def importance_ratio(logps: torch.Tensor, old_logps: torch.Tensor, level: str = "token",
                     cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """The PPO ratio per token, differentiable in logps.

    token:    r_t = exp(logp_t - old_t).
    sequence: r_t = exp(mean over t's sequence of (logp - old)), GSPO's length-normalised sequence
              ratio, the same for every token of a sequence (and clipped as one).
    """
    log_ratio = logps - old_logps
    if level == "sequence":
        if cu_seqlens is None:
            raise ValueError("importance_sampling_level='sequence' needs cu_seqlens (the sequence boundaries)")
        log_ratio = sequence_mean(log_ratio, cu_seqlens)
    elif level != "token":
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {level!r}")
    return torch.exp(log_ratio)


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
    objective: str = "clip",
    importance_sampling_level: str = "token",
    cu_seqlens: torch.Tensor | None = None,
    delta: float | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Policy-gradient surrogate plus beta * KL, per token: l_t = w_t pg_t + beta KL_t.

    With r the ratio (`importance_ratio`: per token, or GSPO's per sequence) and A the advantage:
      clip:  pg = -min(min(r, delta) A, clip(r, 1 - epsilon, 1 + epsilon_high) A); delta (None = off)
             is the two-sided clip's bound on the ratio when A < 0 (INTELLECT-2).
      cispo: pg = -sg[min(r, epsilon_high)] A logp (the capped importance weight, detached, times the
             log-prob; epsilon_high is the cap itself, as in TRL / ScaleRL, not 1 + epsilon_high).
      sapo:  pg = -(4 / tau) sigmoid(tau (r - 1)) A, tau = sapo_temperature_pos if A > 0 else _neg
             (a soft gate: its slope in r is 1 at r = 1 and decays away from it).
    KL_t is `kl_per_token`; use_bias_correction_kl multiplies it by r (DeepSeek-V3.2's importance-
    corrected estimate; TRL 1.16's default; ours is off, as the paper's plain k3).

    Args:
        logps: [N] fp32 log-probs of the sampled tokens under the current policy (may need grad).
        advantages: [N] advantage of each token's sequence (already broadcast to tokens).
        old_logps: [N] log-probs under the sampling policy; None means K = 1 (ratio = 1, but the
            gradient is the vanilla policy gradient because old = logps.detach()).
        ref_logps: [N] reference-policy log-probs; required when beta > 0.
        pg_weights: [N] detached weights w_t of the policy-gradient term only (rollout correction,
            loss masks); None = 1, bit for bit the unweighted loss.
        cu_seqlens: [B + 1] sequence boundaries over the N tokens; needed at sequence level.
    Returns:
        per_token_loss [N] (fp32, differentiable in logps) and per-token metrics (detached):
        ``clipped`` [N] bool (either side clipped: no gradient from the surrogate there),
        ``clipped_low`` / ``clipped_high`` [N] bool per side (r < 1 - eps with A < 0, r > 1 + eps_high
        with A > 0; cispo: the cap active with A > 0, as TRL counts it), ``clipped_delta`` (A < 0 and
        r > delta) when delta is set, and ``kl`` [N] when beta > 0.
    """
    eps_hi = epsilon if epsilon_high is None else epsilon_high
    dt = torch.float64 if logps.dtype == torch.float64 else torch.float32  # fp64 for the test oracle
    old = logps.detach() if old_logps is None else old_logps.to(dt)
    adv = advantages.to(dt)
    ratio = importance_ratio(logps, old, importance_sampling_level, cu_seqlens)
    loss, metrics = _surrogate(objective, ratio, adv, logps, epsilon, eps_hi, delta,
                               sapo_temperature_pos, sapo_temperature_neg)
    if pg_weights is not None:
        loss = loss * pg_weights.detach().to(dt)
    if beta != 0.0:
        if ref_logps is None:
            raise ValueError("ref_logps is required when beta != 0 (got beta=%r, ref_logps=None)" % beta)
        kl = kl_per_token(logps, ref_logps.to(dt), kl_estimator)
        if use_bias_correction_kl:
            kl = kl * ratio  # E_old[r k3] = E_current[k3]: the estimate under the policy being trained
        loss = loss + beta * kl
        metrics["kl"] = kl.detach()
    return loss, metrics


def _surrogate(objective, ratio, adv, logps, epsilon, eps_hi, delta, tau_pos, tau_neg):
    """(pg [N], clip metrics) of one objective (see per_token_policy_loss)."""
    with torch.no_grad():
        r = ratio.detach()
        low = (r < 1.0 - epsilon) & (adv < 0)
        high = (r > 1.0 + eps_hi) & (adv > 0)
    if objective == "clip":
        clipped_ratio = torch.clamp(ratio, 1.0 - epsilon, 1.0 + eps_hi)
        unclipped = ratio if delta is None else torch.clamp(ratio, max=delta)
        loss = -torch.minimum(unclipped * adv, clipped_ratio * adv)
    elif objective == "cispo":
        loss = -torch.clamp(ratio, max=eps_hi).detach() * adv * logps
        with torch.no_grad():
            low, high = torch.zeros_like(low), (r > eps_hi) & (adv > 0)
    elif objective == "sapo":
        tau = torch.where(adv > 0, torch.full_like(adv, tau_pos), torch.full_like(adv, tau_neg))
        loss = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
        low, high = torch.zeros_like(low), torch.zeros_like(high)  # a soft gate: nothing is hard-clipped
    else:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    metrics = {"clipped": low | high, "clipped_low": low, "clipped_high": high}
    if delta is not None and objective == "clip":
        metrics["clipped_delta"] = (r > delta) & (adv < 0)
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


def check_objective_args(objective: str, importance_sampling_level: str, delta, epsilon_high,
                         sapo_temperature_pos: float, sapo_temperature_neg: float) -> None:
    """ValueErrors for the objective's options (naming field, expected and actual)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if importance_sampling_level not in IS_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IS_LEVELS}, got {importance_sampling_level!r}")
    if delta is not None and objective != "clip":
        raise ValueError(f"delta bounds the clipped objective's ratio; objective={objective!r} has no such bound "
                         f"(got delta={delta})")
    if objective == "cispo" and epsilon_high is None:
        raise ValueError("objective='cispo' caps the importance weight at epsilon_high: pass it (e.g. 5.0)")
    if not (sapo_temperature_pos > 0 and sapo_temperature_neg > 0):
        raise ValueError(f"sapo temperatures must be > 0, got pos={sapo_temperature_pos}, neg={sapo_temperature_neg}")
