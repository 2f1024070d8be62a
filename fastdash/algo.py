"""The paper's maths, in one place: preemptive sampling, advantages, the gradient filter, the loss
mask, the loss normaliser (and, with `loss_token_weights`, everything a loss type means).

The per-token policy loss itself (PPO-clip + KL estimators) lives beside the fused kernel in
`fastdash_kernels.loss`, because every kernel backend must share it; kernels receive generic per-token
weights from here and know nothing of loss types.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

CLIP_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")  # PPO's clipped surrogate, four normalisers
LOSS_TYPES = CLIP_LOSS_TYPES + ("cispo", "sapo")  # + their own surrogates (TRL's names; docs/losses.md)
SCALE_REWARDS = ("group", "batch", "none")
ADVANTAGE_EPS = 1e-4  # the paper's code: (r - mean) / (std + 1e-4)


@dataclass(frozen=True)
class PreemptiveSampling:
    """How one rollout is generated and consumed (the paper's section 3).

    DASH's preemptive sampling generates a whole step's samples (or several steps': Mini, Multi) in
    one engine call, then backprops them in small micro-batches; baseline GRPO makes one small call
    per micro-batch for the same samples. Either way the samples, and so the maths, are the same.
    """

    samples: int  # samples per rollout (one generation round)
    samples_per_call: int  # samples per engine call (generation_batch_size)
    engine_calls: int  # engine calls per rollout
    steps: int  # optimizer steps that consume one rollout
    train_batch_size: int  # samples per optimizer step
    num_iterations: int  # K: optimizer passes over each step batch

    @property
    def needs_old_logps(self) -> bool:
        """The PPO ratio's denominator needs its own pass only when a sample is trained on after the
        policy moved: K > 1 (Multi) or a rollout that feeds several steps (Mini). Else ratio = 1."""
        return self.num_iterations > 1 or self.samples > self.train_batch_size


def preemptive_sampling(generation_batch_size: int, train_batch_size: int, num_iterations: int,
                        num_generations: int) -> PreemptiveSampling:
    """The rollout shape the batch-size knobs describe; ValueError (naming the key) when they don't fit."""
    for key, value in (("train_batch_size", train_batch_size), ("generation_batch_size", generation_batch_size)):
        if value <= 0 or value % num_generations:
            raise ValueError(f"config: {key}={value}: must be a positive multiple of num_generations={num_generations}")
    small, big = sorted((generation_batch_size, train_batch_size))
    if big % small:
        raise ValueError(f"config: generation_batch_size={generation_batch_size}: one of generation_batch_size and "
                         f"train_batch_size={train_batch_size} must divide the other")
    if num_iterations <= 0:
        raise ValueError(f"config: num_iterations={num_iterations}: must be > 0")
    samples = big
    return PreemptiveSampling(samples=samples, samples_per_call=generation_batch_size,
                              engine_calls=samples // generation_batch_size,
                              steps=samples // train_batch_size * num_iterations,
                              train_batch_size=train_batch_size, num_iterations=num_iterations)


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
    elif scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {SCALE_REWARDS}, got {scale_rewards!r}")
    return centred.view(-1)


MULTI_OBJECTIVE_AGGREGATIONS = ("sum_then_normalize", "normalize_then_sum")


def multi_reward_advantages(rewards: torch.Tensor, weights: list[float], num_generations: int,
                            scale_rewards: str = "group", aggregation: str = "sum_then_normalize") -> torch.Tensor:
    """Advantages from K reward functions (TRL's reward_weights, multi_objective_aggregation).

    rewards: [M, K], the G samples of each prompt consecutive; returns [M] fp32.
    sum_then_normalize: r = sum_k w_k r_k, then `group_advantages(r, scale_rewards)` (one function with
        weight 1 is exactly `group_advantages`).
    normalize_then_sum (GDPO): each function's rewards normalised within the group, (r_k - mean_g) /
        (std_g + 1e-4); their weighted sum; then over the whole batch, (r - mean) / (std + 1e-4).
        As in TRL, scale_rewards does not apply: the per-function step already scales.
    """
    if rewards.dim() != 2 or rewards.shape[1] != len(weights):
        raise ValueError(f"rewards must be [M, K] with K = {len(weights)} reward functions, "
                         f"got shape {tuple(rewards.shape)}")
    w = torch.tensor(weights, dtype=torch.float64)
    if aggregation == "sum_then_normalize":
        return group_advantages((rewards.double() * w).sum(dim=1), num_generations, scale_rewards)
    if aggregation != "normalize_then_sum":
        raise ValueError(f"multi_objective_aggregation must be one of {MULTI_OBJECTIVE_AGGREGATIONS}, "
                         f"got {aggregation!r}")
    if rewards.shape[0] % num_generations:
        raise ValueError(f"rewards must hold whole groups of num_generations={num_generations}, "
                         f"got {rewards.shape[0]} rows")
    grouped = rewards.double().view(-1, num_generations, len(weights))
    per_fn = (grouped - grouped.mean(dim=1, keepdim=True)) / (grouped.std(dim=1, keepdim=True) + ADVANTAGE_EPS)
    total = (per_fn * w).sum(dim=2).view(-1)
    return ((total - total.mean()) / (total.std() + ADVANTAGE_EPS)).float()


def gradient_filter(advantages: torch.Tensor, threshold: float) -> torch.Tensor:
    """DASH's gradient filter: keep samples with |A| > tau. Returns a bool mask [M].

    With binary rewards, G = 4 and std scaling, |A| is in {0, 0.5, 0.866, 1.5}: any tau in (0, 0.5)
    drops exactly the zero-variance groups (all right or all wrong), which carry no PG signal.
    """
    return advantages.abs() > threshold


def loss_mask(completion_lengths: list[int], truncated: list[bool], mask_truncated_completions: bool) -> torch.Tensor:
    """Samples the loss can use at all, apart from the filter: not empty, and not truncated when
    `mask_truncated_completions` (DAPO's overlong filtering). Returns a bool mask [M]."""
    keep = torch.tensor([n > 0 for n in completion_lengths], dtype=torch.bool)
    if mask_truncated_completions:
        keep &= ~torch.tensor(truncated, dtype=torch.bool)
    return keep


def loss_normaliser(loss_type: str, kept_lengths: list[int], usable_lengths: list[int],
                    max_completion_length: int) -> float:
    """The step's loss denominator, fixed before its first micro-batch (DESIGN.md section 3).

    Fixing it per step (not per micro-batch) makes the gradient independent of how the kept samples
    are split or packed. `kept_lengths` are the completion lengths of the samples that reach the
    loss; `usable_lengths` those of every sample of the step that the loss mask lets through
    (`loss_mask`: not empty, not a masked truncated completion), before the gradient filter.
      grpo, sapo:   number of kept samples (each sample's token-mean counts once)
      bnpo:         kept completion tokens (token mean over what is trained on)
      dr_grpo:      kept samples x max_completion_length (the paper's code re-averages over kept rows)
      dapo, cispo:  the step's usable completion tokens (DAPO's token-level mean, TRL's
                    num_items_in_batch). Samples the gradient filter dropped count: they are tokens of
                    the batch whose loss happens to be ~0. Masked truncated completions do not: TRL
                    zeroes their completion mask before counting, as our bnpo does.
    Every value is a sum over samples, so under data parallelism each rank passes its own samples and
    the caller sums the results over ranks (the trainer, `distributed.sum_floats`): maths here, no
    collectives.
    """
    if loss_type in ("grpo", "sapo"):
        value = len(kept_lengths)
    elif loss_type == "bnpo":
        value = sum(kept_lengths)
    elif loss_type == "dr_grpo":
        value = len(kept_lengths) * max_completion_length
    elif loss_type in ("dapo", "cispo"):
        value = sum(usable_lengths)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return float(value)


def loss_token_weights(loss_type: str, completion_cu_seqlens: torch.Tensor, normaliser,
                       num_tokens: int | None = None) -> torch.Tensor:
    """Per-token weights w [N] fp32 with loss = sum_t w_t l_t: what the fused kernel is handed.

      grpo, sapo:                   w_t = 1 / (len(seq(t)) * normaliser)  (a token mean per sequence)
      bnpo, dr_grpo, dapo, cispo:   w_t = 1 / normaliser                  (a token sum)
    (TRL's pairing: sapo normalises as grpo, cispo as dapo; `policy_objective` gives the surrogate.)
    `normaliser` is the step's `loss_normaliser` (a float, or a tensor on the tokens' device).
    `num_tokens` (N, when the caller knows it) spares a device-to-host read of cu_seqlens[-1].
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    cu = completion_cu_seqlens.long()
    lengths = cu[1:] - cu[:-1]
    n = num_tokens if num_tokens is not None else (int(cu[-1]) if cu.numel() else 0)
    w = torch.ones(n, dtype=torch.float32, device=cu.device)
    if loss_type in ("grpo", "sapo"):
        w = torch.repeat_interleave(1.0 / lengths.clamp(min=1).float(), lengths, output_size=n)
    return w / normaliser


def policy_objective(loss_type: str) -> str:
    """The per-token surrogate a loss type names (`fastdash_kernels.loss`): cispo and sapo their own,
    every other type PPO's clip. The normaliser is the other half (`loss_normaliser`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    return loss_type if loss_type in ("cispo", "sapo") else "clip"


def policy_loss_options(cfg) -> dict:
    """`fused_policy_loss`'s surrogate keywords for a config (TRL's names, docs/losses.md)."""
    return dict(objective=policy_objective(cfg.loss_type), importance_sampling_level=cfg.importance_sampling_level,
                delta=cfg.delta, sapo_temperature_pos=cfg.sapo_temperature_pos,
                sapo_temperature_neg=cfg.sapo_temperature_neg, use_bias_correction_kl=cfg.use_bias_correction_kl)
