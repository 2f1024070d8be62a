"""Plain-PyTorch references that materialise the [N, V] logits. For tests and as an oracle only."""

from __future__ import annotations

import torch

from .loss import per_token_policy_loss


def logprob_reference(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """logp_t = z[y_t] - logsumexp(z), z = W x_t / T in fp32; returns ([N] logps, [N] entropy).

    Differentiable through hidden and weight by plain autograd (entropy too).
    """
    logits = (hidden.float() @ weight.float().t()) / temperature  # [N, V]: the tensor the kernels avoid
    logsm = torch.log_softmax(logits, dim=-1)
    logps = logsm.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logps, entropy


def policy_loss_reference(
    hidden, weight, targets, cu_seqlens, advantages, *, old_logps=None, ref_logps=None, loss_type="dr_grpo",
    epsilon=0.2, epsilon_high=None, beta=0.0, kl_estimator="k3", temperature=1.0, normaliser,
):
    """Loop-over-sequences oracle: returns (loss, logps, entropy, per-token metrics).

    Deliberately written without the segment helpers: each sequence is sliced in Python and
    'grpo' takes the mean of each slice, so it checks the packed reductions independently.
    """
    logps, entropy = logprob_reference(hidden, weight, targets, temperature)
    bounds = [int(b) for b in cu_seqlens.tolist()]
    adv_tok = torch.cat(
        [advantages[i].float().expand(bounds[i + 1] - bounds[i]) for i in range(len(bounds) - 1)]
        + [torch.zeros(0, device=hidden.device)]
    )
    per_tok, metrics = per_token_policy_loss(
        logps, adv_tok, old_logps, ref_logps, epsilon=epsilon, epsilon_high=epsilon_high, beta=beta,
        kl_estimator=kl_estimator,
    )
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(len(bounds) - 1):
        seg = per_tok[bounds[i] : bounds[i + 1]]
        if seg.numel():
            total = total + (seg.mean() if loss_type == "grpo" else seg.sum())
    return total / normaliser, logps, entropy, metrics
