"""Rollout correction: importance weights against the sampler's own log-probs (beyond DASH, issue 16).

The engine and the trainer never compute exactly the same probabilities (bf16 kernels, other attention
code, a sync that failed), so the samples come from pi_sampler, not from the policy the trainer thinks
generated them. With the ratio rho = pi_train / pi_sampler (pi_train: the trainer's log-prob of the
policy the PPO ratio's denominator refers to: the old-policy pass when it ran, else the current
log-probs, detached) the policy-gradient term of each token is multiplied by a detached weight w:

  tis (truncated IS):  w = min(rho, C)
  mis (masked IS):     w = rho if 1/C <= rho <= C else 0   (the token, or its whole sequence, is dropped)

`rollout_is_level: sequence` uses one ratio per sequence, the geometric mean of its token ratios,
exp(mean_t log rho_t), broadcast to the sequence's tokens. Not the product exp(sum_t log rho_t): the
product's spread grows with the length, so one cap C would mask or truncate nearly every long
reasoning trace on bf16 noise alone; the geometric mean bounds the mean per-token mismatch by log C
whatever the length (verl's "geometric" level, GSPO's sequence ratio).

With identical log-probs every ratio is exp(0) = 1 exactly, so every weight is 1 and the loss, the
gradient and the update are bit for bit those of `rollout_correction: none`.
"""
from __future__ import annotations

import torch

CORRECTIONS = ("none", "tis", "mis")
IS_LEVELS = ("token", "sequence")
OLD_LOGPROBS = ("trainer", "sampler")


@torch.no_grad()
def log_ratios(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cu_seqlens: torch.Tensor,
               level: str = "token") -> torch.Tensor:
    """log rho [N] fp64 per token; at sequence level each token holds its sequence's mean log-ratio."""
    if level not in IS_LEVELS:
        raise ValueError(f"rollout_is_level must be one of {IS_LEVELS}, got {level!r}")
    if train_logps.shape != sampler_logps.shape or train_logps.dim() != 1:
        raise ValueError(f"trainer and sampler log-probs must both be [N], got {tuple(train_logps.shape)} "
                         f"and {tuple(sampler_logps.shape)}")
    d = train_logps.detach().double() - sampler_logps.detach().to(train_logps.device).double()
    if level == "token":
        return d
    cu = cu_seqlens.to(d.device).long()
    lengths = cu[1:] - cu[:-1]
    seg = torch.repeat_interleave(torch.arange(lengths.numel(), device=d.device), lengths, output_size=d.numel())
    means = torch.zeros(lengths.numel(), dtype=d.dtype, device=d.device).index_add_(0, seg, d)
    means = means / lengths.clamp(min=1).to(d.dtype)
    return means[seg]


@torch.no_grad()
def rollout_is_weights(train_logps: torch.Tensor, sampler_logps: torch.Tensor, cu_seqlens: torch.Tensor,
                       mode: str, cap: float, level: str = "token") -> torch.Tensor:
    """Detached per-token weights [N] fp32 of the policy-gradient term (see the module docstring)."""
    if mode not in ("tis", "mis"):
        raise ValueError(f"rollout_is_weights: mode must be 'tis' or 'mis', got {mode!r}")
    if not cap > 1:
        raise ValueError(f"rollout_is_cap must be > 1, got {cap}")
    ratio = torch.exp(log_ratios(train_logps, sampler_logps, cu_seqlens, level))
    if mode == "tis":
        w = ratio.clamp(max=cap)
    else:
        w = torch.where((ratio >= 1.0 / cap) & (ratio <= cap), ratio, torch.zeros_like(ratio))
    return w.float()


class WeightStats:
    """Statistics of the step's weights, summed over micro-batches on the device (no sync per batch):
    mean, max, the fraction of tokens masked (w = 0) and of tokens at the cap (w >= C)."""

    def __init__(self, cap: float):
        self.cap, self.parts = cap, []

    def add(self, w: torch.Tensor) -> torch.Tensor:
        if w.numel():
            self.parts.append(torch.stack([w.sum(), w.max(), (w == 0).sum().to(w.dtype),
                                           (w >= self.cap).sum().to(w.dtype), w.new_tensor(w.numel())]))
        return w

    def metrics(self) -> dict:
        if not self.parts:
            return {}
        p = torch.stack(self.parts).double().cpu()
        n = float(p[:, 4].sum())  # names: distributed.reduce_step_stats maxes *_max, token-averages the rest
        return {"rollout_is/weight_mean": float(p[:, 0].sum()) / n, "rollout_is/weight_max": float(p[:, 1].max()),
                "rollout_is/masked_fraction": float(p[:, 2].sum()) / n,
                "rollout_is/capped_fraction": float(p[:, 3].sum()) / n}


def pg_weights(cfg, mb, stats: WeightStats):
    """What `fused_policy_loss(pg_weights=...)` gets for one micro-batch: None (no correction), a [N]
    tensor (weights against the trainer's old-policy pass), or a function of the current log-probs
    (no old-policy pass ran, or its place was taken by the sampler's log-probs: old_logprobs=sampler)."""
    mode = cfg.rollout_correction
    if mode == "none":
        return None
    if mb.sampler_logps is None:
        raise ValueError(f"rollout_correction={mode!r} needs the engine's per-token log-probs, and this "
                         "micro-batch has none; use an engine that returns them (engine=vllm) or "
                         "rollout_correction=none")
    cap, level, cu, sampler = cfg.rollout_is_cap, cfg.rollout_is_level, mb.completion_cu_seqlens, mb.sampler_logps
    if mb.old_logps is not None and cfg.old_logprobs == "trainer":
        return stats.add(rollout_is_weights(mb.old_logps, sampler, cu, mode, cap, level))
    return lambda logps: stats.add(rollout_is_weights(logps, sampler, cu, mode, cap, level))


def require_sampler_logps(cfg, completions, engine_name: str) -> None:
    """A clear error when an option needs the sampler's log-probs and the engine gave none."""
    wants = []
    if cfg.rollout_correction != "none":
        wants.append(f"rollout_correction={cfg.rollout_correction}")
    if cfg.old_logprobs == "sampler" and cfg.needs_old_logps:
        wants.append("old_logprobs=sampler")
    if wants and any(c.sampler_logps is None for c in completions):
        raise ValueError(f"{' and '.join(wants)} need the engine's per-token log-probs, but engine "
                         f"{engine_name!r} returned none; use engine=vllm (or an HF engine that returns "
                         "sampler_logps), or set rollout_correction=none and old_logprobs=trainer")


def sampler_old_logps(sample) -> torch.Tensor:
    """old_logprobs=sampler: the sampler's log-probs are the PPO ratio's denominator."""
    return torch.as_tensor(sample.sampler_logps, dtype=torch.float32).reshape(-1).cpu()

