"""The data that flows through one step: samples out of the rollout, micro-batches into backprop.

Everything here is plain data. Producers: rollout engines make `Completion`s, the trainer turns them
into `Sample`s (adding reward and advantage; old / reference log-probs by `dataclasses.replace`), the
packer (`fastdash.packing`) turns kept samples into `MicroBatch`es. Samples are frozen: nobody mutates
what they are given.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Completion:
    """One generated completion, as an engine returns it."""

    prompt_ids: list[int]
    completion_ids: list[int]  # includes the EOS token when the sample stopped at EOS
    truncated: bool  # hit max_completion_length without EOS
    sampler_logps: list[float] | None = None  # per-token log-probs from the engine, when it gives them
    policy_version: int = 0  # optimizer steps the generating weights had taken (set by the trainer / worker)
    # tools (multi-turn): 1 = a sampled token, 0 = a tool / template token between turns (never trained);
    # None = every token sampled. sampler_logps then cover the 1s only.
    completion_mask: list[int] | None = None
    episode: object | None = None  # tools: the sample's `fastdash.tools.Episode` (stats, messages)


@dataclass(frozen=True)
class Sample:
    """A completion with its reward and group-relative advantage, ready for the filter and packer.

    `uid` is the sample's index in the step's batch: micro-batches carry it so per-sample data
    (advantage, old / reference log-probs) can be gathered back in any packing order.
    """

    uid: int
    prompt_ids: list[int]
    completion_ids: list[int]
    truncated: bool
    reward: float = 0.0
    advantage: float = 0.0
    old_logps: torch.Tensor | None = None  # [len(completion_ids)] fp32, when an old-policy pass ran
    ref_logps: torch.Tensor | None = None  # [len(completion_ids)] fp32, when beta > 0
    entropy: torch.Tensor | None = None  # [len(completion_ids)] fp32 under the sampling policy (top_entropy_quantile)
    sampler_logps: list[float] | None = None  # the engine's own log-probs (vLLM), for the mismatch metric
    policy_version: int = 0  # optimizer steps the weights that generated it had taken
    # tools: 1 = sampled token, 0 = tool / template token (in the sequence, out of the loss); None = all 1.
    # Every per-token field above (old / ref / sampler log-probs, entropy) has one entry per 1.
    completion_mask: tuple[int, ...] | None = None
    messages: list[dict] | None = None  # tools: the transcript as chat messages (completions.jsonl logs it)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.completion_ids)

    @property
    def loss_ids(self) -> list[int]:
        """The completion tokens the loss sees (the sampled ones)."""
        if self.completion_mask is None:
            return self.completion_ids
        return [t for t, m in zip(self.completion_ids, self.completion_mask) if m]

    @property
    def num_loss_tokens(self) -> int:
        """Tokens the loss and every normaliser count (`loss_type` semantics: sampled tokens only)."""
        return len(self.completion_ids) if self.completion_mask is None else sum(self.completion_mask)


@dataclass(frozen=True)
class StepBatch:
    """What one optimizer step trains on, made once by `rollout`; `optimize` only reads it."""

    samples: tuple[Sample, ...]  # every sample of the step (metrics; dapo's normaliser counts the unmasked)
    kept: tuple[Sample, ...]  # those that reach the loss: loss mask and gradient filter passed
    normaliser: float  # the loss denominator, fixed before the first micro-batch
    masked: int = 0  # samples the loss mask dropped (empty, or truncated with mask_truncated_completions)
    entropy_threshold: float | None = None  # top_entropy_quantile: the step's entropy quantile (fastdash.loss_masks)
    rollout_metrics: dict | None = None  # the rollout's own metrics, on its first step batch

    @property
    def policy_version(self) -> int:
        """The oldest weights (optimizer steps taken) that generated any of its samples."""
        return min((s.policy_version for s in self.samples), default=0)


@dataclass
class MicroBatch:
    """One backprop micro-batch, packed (one row, `cu_seqlens`) or padded (B rows, attention mask).

    Loss tokens are the completion tokens. `logit_index[j]` is the flat position (in
    `input_ids.view(-1)`) whose hidden state predicts `targets[j]`; the fused loss only ever sees
    those N positions, never a [B, T, V] tensor.
    """

    input_ids: torch.Tensor  # [1, T] packed or [B, T] padded
    position_ids: torch.Tensor  # same shape; restarts at 0 per sample when packed
    attention_mask: torch.Tensor | None  # None when packed (required by transformers' packed path)
    cu_seqlens: torch.Tensor | None  # [S + 1] int32 over the packed row, None when padded
    max_seqlen: int
    logit_index: torch.Tensor  # [N] int64, flat positions of the hidden states that predict targets
    targets: torch.Tensor  # [N] int64, completion token ids
    token_sample: torch.Tensor  # [N] int64, 0..S-1: which sample of this micro-batch each token is in
    completion_cu_seqlens: torch.Tensor  # [S + 1] int32 over the N loss tokens, per sample
    advantages: torch.Tensor  # [S] fp32
    uids: list[int]  # [S] step-level sample ids
    old_logps: torch.Tensor | None = None  # [N] fp32
    ref_logps: torch.Tensor | None = None  # [N] fp32
    sampler_logps: torch.Tensor | None = None  # [N] fp32, the engine's, when every sample carries them
    # shared prompts (packing.collate_shared): per cu_seqlens segment, (start, length) of the prompt segment
    # it attends to before itself; (0, 0) for a prompt's own segment. None: segments attend to themselves only
    prefix: torch.Tensor | None = None  # [segments, 2] int64
    meta: dict = field(default_factory=dict)  # e.g. padding tokens, for metrics

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(x):
            return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x

        return MicroBatch(**{k: move(v) for k, v in self.__dict__.items()})
