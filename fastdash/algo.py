"""The paper's maths, in one place: advantages, the gradient filter, the loss normaliser.

The per-token policy loss itself (PPO-clip + KL estimators) lives beside the fused kernel in
`fastdash_kernels.loss`, because every kernel backend must share it; it is re-exported here under
its paper name so this file reads as the whole algorithm.
"""
from __future__ import annotations

import torch

from fastdash_kernels.loss import per_token_policy_loss as policy_loss  # noqa: F401  (re-export)

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
ADVANTAGE_EPS = 1e-4  # the paper's code: (r - mean) / (std + 1e-4)


def group_advantages(rewards: torch.Tensor, num_generations: int, scale_rewards: str = "group") -> torch.Tensor:
    """Group-relative advantages. rewards: [M] with the G samples of each prompt consecutive.

    group: (r - mean_g) / (std_g + 1e-4), torch's unbiased std (the paper's code, GRPO).
    batch: (r - mean_g) / (std over the whole batch + 1e-4).
    none:  r - mean_g (Dr. GRPO: no std scaling).
    """
    if rewards.dim() != 1 or rewards.numel() % num_generations:
        raise ValueError(f"rewards must be [M] with M a multiple of num_generations={num_generations}, "
                         f"got shape {tuple(rewards.shape)}")
    grouped = rewards.float().view(-1, num_generations)
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if scale_rewards == "group":
        centred = centred / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    elif scale_rewards == "batch":
        centred = centred / (rewards.float().std() + ADVANTAGE_EPS)
    elif scale_rewards != "none":
        raise ValueError(f"scale_rewards must be group, batch or none, got {scale_rewards!r}")
    return centred.view(-1)


def gradient_filter(advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """DASH's gradient filter: keep samples with |A| > tau. Returns a bool mask [M].

    With binary rewards, G = 4 and std scaling, |A| is in {0, 0.5, 0.866, 1.5}: any tau in (0, 0.5)
    drops exactly the zero-variance groups (all right or all wrong), which carry no PG signal.
    """
    return advantages.abs() > threshold


def loss_normaliser(loss_type: str, kept_lengths: list[int], all_lengths: list[int],
                    max_completion_length: int) -> float:
    """The step's loss denominator, fixed before its first micro-batch (DESIGN.md section 3).

    Fixing it per step (not per micro-batch) makes the gradient independent of how the kept samples
    are split or packed. `kept_lengths` are the completion lengths of the samples that reach the
    loss; `all_lengths` those of every sample of the step (before the filter).
      grpo:    number of kept samples (each sample's token-mean counts once)
      bnpo:    kept completion tokens (token mean over what is trained on)
      dr_grpo: kept samples x max_completion_length (the paper's code re-averages over kept rows)
      dapo:    all completion tokens of the step, filtered ones included (DAPO's token-level mean)
    Under data parallelism these sums are all-reduced over ranks before use (`global_sum`).
    """
    if loss_type == "grpo":
        value = len(kept_lengths)
    elif loss_type == "bnpo":
        value = sum(kept_lengths)
    elif loss_type == "dr_grpo":
        value = len(kept_lengths) * max_completion_length
    elif loss_type == "dapo":
        value = sum(all_lengths)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return float(global_sum(value))


def loss_token_weights(loss_type: str, completion_cu_seqlens: torch.Tensor, normaliser) -> torch.Tensor:
    """Per-token weights w [N] fp32 with loss = sum_t w_t l_t: what the fused kernel is handed.

      grpo:                  w_t = 1 / (len(seq(t)) * normaliser)  (a token mean per sequence)
      bnpo, dr_grpo, dapo:   w_t = 1 / normaliser                  (a token sum)
    `normaliser` is the step's `loss_normaliser` (a float, or a tensor on the tokens' device).
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    cu = completion_cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    n = int(cu[-1]) if cu.numel() else 0
    w = torch.ones(n, dtype=torch.float32, device=cu.device)
    if loss_type == "grpo":
        w = torch.repeat_interleave(1.0 / lengths.clamp(min=1).float(), lengths, output_size=n)
    return w / normaliser


def global_sum(value: float) -> float:
    """Sum over data-parallel ranks (identity in a single process)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = torch.tensor([float(value)], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())
    return float(value)
