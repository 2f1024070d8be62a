"""fastdash_kernels: fused lm_head -> log-prob -> PPO-clip policy loss on packed tokens.

Importing this package never imports Triton; the Triton kernels load on first use.

    w = fastdash.algo.loss_token_weights("dr_grpo", cu_seqlens, normaliser)  # the loss type lives there
    out = fused_policy_loss(hidden, lm_head.weight, targets, cu_seqlens, advantages, token_weights=w)
    out.loss.backward()
"""

from .api import BACKENDS, fused_linear_logprob, fused_policy_loss, resolve_backend
from .loss import KL_ESTIMATORS, PolicyLossOutput, kl_per_token, per_token_policy_loss
from .segment import segment_mean, segment_sum, segment_sum_torch

__all__ = [
    "BACKENDS", "KL_ESTIMATORS", "PolicyLossOutput", "fused_linear_logprob", "fused_policy_loss",
    "kl_per_token", "per_token_policy_loss", "resolve_backend", "segment_mean", "segment_sum", "segment_sum_torch",
]
