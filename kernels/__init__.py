"""fastdash_kernels: fused lm_head -> log-prob -> GRPO-family loss on packed tokens.

Importing this package never imports Triton; the Triton kernels load on first use.

    out = fused_policy_loss(hidden, lm_head.weight, targets, cu_seqlens, advantages,
                            loss_type="dr_grpo", normaliser=norm)
    out.loss.backward()
"""

from .api import BACKENDS, PolicyLossOutput, fused_linear_logprob, fused_policy_loss, resolve_backend
from .loss import KL_ESTIMATORS, LOSS_TYPES, kl_per_token, per_token_policy_loss
from .segment import segment_mean, segment_sum, segment_sum_torch

__all__ = [
    "BACKENDS", "KL_ESTIMATORS", "LOSS_TYPES", "PolicyLossOutput", "fused_linear_logprob", "fused_policy_loss",
    "kl_per_token", "per_token_policy_loss", "resolve_backend", "segment_mean", "segment_sum", "segment_sum_torch",
]
