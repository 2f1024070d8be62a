"""Which tokens' policy-gradient term counts, beyond the loss mask and the gradient filter (docs/losses.md).

Both masks multiply only the policy-gradient term (the KL term stays on every token), as TRL does:

top_entropy_quantile = rho ("Beyond the 80/20 rule"): a token keeps its policy term when its entropy is at
  least the (1 - rho) quantile (linear interpolation, torch.quantile's) of the entropies of every loss
  token of the optimizer step, over all ranks. TRL takes the quantile per micro-batch; that makes the
  gradient depend on how the step is split, so here it is taken once per step, before the first micro-
  batch, from a no-grad pass of the policy over the step's kept samples (the old-log-prob pass when it
  runs, else a pass of its own). The entropies are then those of the policy that sampled the batch: at
  num_iterations = 1 these are the weights being trained (TRL's values); for Multi / Mini the selection
  stays that of the sampling policy over the K passes. Filtered samples (|A| <= tau) are not in the
  quantile: they reach no forward pass and carry no policy gradient.
off_policy_mask_threshold = d (DeepSeek-V3.2's off-policy sequence mask): a sequence with A < 0 loses its
  policy term when mean_t (log pi_sampler - log pi_current) > d, the sampler being the engine's log-
  probs when it returns them, else the old-policy pass. Per sequence, so split-independent as it is.
"""
from __future__ import annotations

import torch

from fastdash import distributed
from fastdash_kernels.loss import sequence_mean

# Entropies within this relative distance below the threshold count as at it: tokens that share a context
# (the first token of every sample of a group) have equal entropies in exact arithmetic, and fp32 rounding,
# which depends on the packing, must not decide which of them keep their policy term.
TIE_RTOL = 1e-5


def quantile(values: torch.Tensor, q: float) -> float:
    """torch.quantile(values, q) (linear interpolation) in fp64, for any size (torch's is capped at 2**24)."""
    v = values.double().flatten().sort().values
    pos = q * (v.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, v.numel() - 1)
    return float(v[lo] + (v[hi] - v[lo]) * (pos - lo))


def step_entropy_threshold(kept, top_entropy_quantile: float) -> float | None:
    """The step's entropy threshold over every rank's kept tokens (a collective: every rank calls it once
    per step batch). `kept`: the samples, with `entropy` [len] set. None when no rank has a token."""
    mine = [s.entropy.reshape(-1).double() for s in kept if len(s.completion_ids)]
    local = torch.cat(mine) if mine else torch.zeros(0, dtype=torch.float64)
    everyone = torch.cat(distributed.all_gather_objects(local))
    if not everyone.numel():
        return None
    return quantile(everyone, 1.0 - top_entropy_quantile)


def top_entropy_mask(entropy: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] float 1/0: entropy >= threshold, up to the tie tolerance (TRL keeps >= the quantile too)."""
    return (entropy.double() >= threshold - TIE_RTOL * abs(threshold)).float()


@torch.no_grad()
def off_policy_sequence_mask(logps: torch.Tensor, sampling_logps: torch.Tensor, advantages: torch.Tensor,
                             cu_seqlens: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] float 1/0: keep a token unless its sequence has A < 0 and mean (sampling - current) > threshold.
    logps, sampling_logps [N]; advantages [N] (per token, each its sequence's)."""
    kl = sequence_mean(sampling_logps.double() - logps.detach().double(), cu_seqlens)
    return ((advantages >= 0) | (kl <= threshold)).float()


class MaskStats:
    """Token counts of what each mask dropped, summed on the device over the step's micro-batches."""

    def __init__(self):
        self.parts: dict[str, list[torch.Tensor]] = {}

    def add(self, name: str, mask: torch.Tensor) -> torch.Tensor:
        self.parts.setdefault(name, []).append(torch.stack([(mask == 0).sum().float(), mask.new_tensor(mask.numel())]))
        return mask

    def metrics(self) -> dict:
        out = {}
        for name, parts in self.parts.items():  # token fractions: reduce_step_stats token-weights them over ranks
            dropped, n = torch.stack(parts).double().sum(0).tolist()
            out[f"mask/{name}_masked_fraction"] = dropped / n if n else 0.0
        return out


def policy_weights(cfg, mb, members, entropy_threshold: float | None, base, stats: MaskStats):
    """The micro-batch's `pg_weights` for fused_policy_loss: the rollout-correction weights `base` (None,
    a [N] tensor or a function of the current log-probs, `fastdash.correction.pg_weights`) times the masks.
    Returns base unchanged when no mask is on."""
    fixed = None
    if entropy_threshold is not None:
        entropy = torch.cat([s.entropy.reshape(-1) for s in members]).to(mb.targets.device)
        fixed = stats.add("entropy", top_entropy_mask(entropy, entropy_threshold))
    sampling = mb.sampler_logps if mb.sampler_logps is not None else mb.old_logps
    if cfg.off_policy_mask_threshold is None or sampling is None:  # no sampler / old log-probs: KL 0, all kept
        return base if fixed is None else (fixed if base is None else _times(base, fixed))
    cu = mb.completion_cu_seqlens
    adv = mb.advantages[mb.token_sample.to(mb.advantages.device)]

    def weights(logps: torch.Tensor) -> torch.Tensor:
        w = stats.add("off_policy", off_policy_sequence_mask(logps, sampling.to(logps.device), adv.to(logps.device),
                                                            cu, cfg.off_policy_mask_threshold))
        if fixed is not None:
            w = w * fixed
        b = base(logps) if callable(base) else base
        return w if b is None else w * b

    return weights


def _times(base, fixed: torch.Tensor):
    if callable(base):
        return lambda logps: base(logps) * fixed
    return base * fixed
