"""Token-budget micro-batches: plan which samples go together and lay them out.

Two layouts of the same samples, both as `fastdash.batch.MicroBatch`:

- packed (the default, `packing: true`): the samples of a micro-batch are laid end to end in one
  row `[1, T]`, `position_ids` restart at 0 per sample and `cu_seqlens` marks the boundaries, so no
  token is padding and attention never crosses a sample boundary (see `fastdash.attention`);
- padded (the baseline arm, GRPO / TRL style): `B` consecutive samples, right-padded to the longest,
  with an attention mask `[B, T]`;
- shared (packed, `share_prompts`): samples with the same prompt hold it once, `[prompt, c1, c2, ...]`,
  and the budget counts the tokens computed (`collate_shared`, docs/shared-prompts.md).

Either way the loss only sees the N completion tokens: `logit_index[j]` is the flat position whose
hidden state predicts `targets[j]`, and `fastdash.forward.forward_hidden` returns exactly those N
hidden states, so the fused loss kernel never touches a padded `[B, T, V]` tensor.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from fastdash.batch import MicroBatch, Sample

__all__ = [
    "plan_microbatches",
    "plan_padded_microbatches",
    "microbatch_cost",
    "collate_packed",
    "collate_padded",
    "collate_shared",
    "plan_shared_microbatches",
]

# Attention's share of the cost of a sample of L tokens is ~ L^2 / ATTN_SCALE against L for the
# linear layers: per layer, attention does ~4 L^2 H flops and the projections + MLP ~24 L H^2, so
# they break even near L = 6 H (H = 896 for Qwen2.5-0.5B, 1536 for 1.5B). 4096 sits in between.
ATTN_SCALE = 4096.0


def microbatch_cost(lengths: Sequence[int], attn_scale: float = ATTN_SCALE) -> float:
    """Relative compute of one micro-batch: tokens plus attention's quadratic share."""
    return float(sum(lengths)) + sum(L * L for L in lengths) / attn_scale


def plan_microbatches(
    lengths: list[int], max_tokens: int, *, allow_oversize: bool = False, attn_scale: float = ATTN_SCALE
) -> list[list[int]]:
    """Split samples of the given token lengths into micro-batches of at most `max_tokens` tokens.

    Returns a list of micro-batches, each a sorted list of indices into `lengths`; every index
    appears exactly once and no sample is split. Deterministic: equal lengths are ordered by index.

    The method (balance first, then few bins):
      1. samples are taken longest first;
      2. for a bin count k, each sample goes to the cheapest bin (cost = tokens + sum L^2 /
         `attn_scale`, see `microbatch_cost`) that still has room for it: longest-processing-time
         scheduling under the token budget, which balances the step's compute across micro-batches;
      3. k is the smallest count for which (2) places every sample, searched between the lower
         bound ceil(total / max_tokens) and the count of first-fit-decreasing (binary search: the
         greedy almost always succeeds at the lower bound or one above). If the balanced greedy
         fails even at FFD's count (rare adversarial lengths), FFD's own bins are used.
    Micro-batches come out most expensive first, so the first one allocates the step's peak memory.

    A sample longer than `max_tokens` raises `ValueError` naming both numbers, unless
    `allow_oversize=True`, in which case it gets a micro-batch of its own.
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be > 0, got {max_tokens}")
    for i, L in enumerate(lengths):
        if L <= 0:
            raise ValueError(f"sample {i} has length {L}; every sample needs at least 1 token")
    oversize = [i for i, L in enumerate(lengths) if L > max_tokens]
    if oversize and not allow_oversize:
        i = max(oversize, key=lambda j: (lengths[j], -j))
        raise ValueError(
            f"sample {i} has {lengths[i]} tokens (prompt + completion), more than "
            f"max_tokens_per_microbatch={max_tokens}; raise the budget, lower max_completion_length, "
            f"or pass allow_oversize=True to give such samples a micro-batch of their own"
        )
    bins: list[list[int]] = [[i] for i in oversize]
    rest = [i for i, L in enumerate(lengths) if L <= max_tokens]
    if rest:
        order = sorted(rest, key=lambda i: (-lengths[i], i))
        ffd = _first_fit_decreasing(order, lengths, max_tokens)
        lo = max(1, math.ceil(sum(lengths[i] for i in rest) / max_tokens))
        hi = len(ffd)
        best = None
        while lo <= hi:  # smallest k in [lo, hi] where the balanced greedy places everything
            k = (lo + hi) // 2
            packed = _balanced_greedy(order, lengths, max_tokens, k, attn_scale)
            if packed is None:
                lo = k + 1
            else:
                best, hi = packed, k - 1
        bins += best if best is not None else ffd
    bins = [sorted(b) for b in bins if b]
    bins.sort(key=lambda b: (-microbatch_cost([lengths[i] for i in b], attn_scale), b[0]))
    return bins


def _first_fit_decreasing(order: list[int], lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        for b, r in enumerate(room):
            if lengths[i] <= r:
                bins[b].append(i)
                room[b] -= lengths[i]
                break
        else:
            bins.append([i])
            room.append(max_tokens - lengths[i])
    return bins


def _balanced_greedy(
    order: list[int], lengths: Sequence[int], max_tokens: int, k: int, attn_scale: float
) -> list[list[int]] | None:
    bins: list[list[int]] = [[] for _ in range(k)]
    tokens = [0] * k
    cost = [0.0] * k
    for i in order:
        L = lengths[i]
        best = -1
        for b in range(k):  # cheapest bin with room; ties go to the lower bin index
            if tokens[b] + L <= max_tokens and (best < 0 or cost[b] < cost[best]):
                best = b
        if best < 0:
            return None
        bins[best].append(i)
        tokens[best] += L
        cost[best] += L + L * L / attn_scale
    return bins


def plan_padded_microbatches(n: int, micro_batch_size: int) -> list[list[int]]:
    """Baseline layout: consecutive chunks of `micro_batch_size` samples (the last may be short)."""
    if micro_batch_size <= 0:
        raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
    return [list(range(s, min(s + micro_batch_size, n))) for s in range(0, n, micro_batch_size)]


# --------------------------------------------------------------------------------------------------
# collation


def _check_sample(s: Sample) -> None:
    if len(s.prompt_ids) == 0:
        # The first completion token is predicted from the last prompt position; with no prompt
        # that position would belong to the previous sample of the packed row.
        raise ValueError(f"sample uid={s.uid} has an empty prompt; at least 1 prompt token is required")
    for name in ("old_logps", "ref_logps"):
        x = getattr(s, name)
        if x is not None and x.numel() != s.num_loss_tokens:
            raise ValueError(
                f"sample uid={s.uid}: {name} has {x.numel()} entries, expected {s.num_loss_tokens} "
                f"(one per sampled completion token)"
            )
    if s.completion_mask is not None and len(s.completion_mask) != len(s.completion_ids):
        raise ValueError(f"sample uid={s.uid}: completion_mask has {len(s.completion_mask)} entries for "
                         f"{len(s.completion_ids)} completion tokens")


def _per_token(samples: Sequence[Sample], name: str) -> torch.Tensor | None:
    xs = [getattr(s, name) for s in samples]
    if all(x is None for x in xs):
        return None
    if any(x is None for x in xs):
        missing = [s.uid for s, x in zip(samples, xs) if x is None]
        raise ValueError(f"{name} is set on some samples but missing on uids {missing}")
    return torch.cat([x.detach().reshape(-1).float().cpu() for x in xs])


def _sampler_per_token(samples: Sequence[Sample]) -> torch.Tensor | None:
    """The engine's log-probs [N] when every sample has them (rollout correction needs all or none)."""
    if any(s.sampler_logps is None for s in samples):
        return None
    for s in samples:
        if len(s.sampler_logps) != s.num_loss_tokens:
            raise ValueError(f"sample uid={s.uid}: sampler_logps has {len(s.sampler_logps)} entries, expected "
                             f"{s.num_loss_tokens} (one per sampled completion token)")
    return torch.cat([torch.as_tensor(s.sampler_logps, dtype=torch.float32).reshape(-1).cpu() for s in samples])


def _loss_fields(samples: Sequence[Sample], logit_index: torch.Tensor) -> dict:
    """The fields shared by both layouts: everything indexed by loss token or by sample."""
    comp_lens = torch.tensor([s.num_loss_tokens for s in samples], dtype=torch.int64)
    completion_cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    completion_cu[1:] = comp_lens.cumsum(0)
    targets = torch.tensor([t for s in samples for t in s.loss_ids], dtype=torch.int64)
    return dict(
        logit_index=logit_index,
        targets=targets,
        token_sample=torch.repeat_interleave(torch.arange(len(samples)), comp_lens),
        completion_cu_seqlens=completion_cu,
        advantages=torch.tensor([float(s.advantage) for s in samples], dtype=torch.float32),
        uids=[s.uid for s in samples],
        old_logps=_per_token(samples, "old_logps"),
        ref_logps=_per_token(samples, "ref_logps"),
        sampler_logps=_sampler_per_token(samples),
    )


def _loss_positions(s: Sample, first: int) -> torch.Tensor:
    """Flat positions predicting the sample's loss tokens: `first` predicts completion token 0."""
    return _loss_tokens_only(s, torch.arange(first, first + len(s.completion_ids)))


def _loss_tokens_only(s: Sample, predictors: torch.Tensor) -> torch.Tensor:
    """`predictors[j]` predicts completion token j; tool / template tokens (completion_mask 0) are
    skipped: in the sequence, never a target."""
    if s.completion_mask is None:
        return predictors
    return predictors[torch.tensor(s.completion_mask, dtype=torch.bool)]


def collate_packed(samples: list[Sample]) -> MicroBatch:
    """Lay samples end to end in one row `[1, T]` with no padding.

    For a sample at offset o with prompt length p and completion length c, positions
    o+p-1 ... o+p+c-2 predict its completion tokens 0 ... c-1.
    """
    if not samples:
        raise ValueError("collate_packed needs at least one sample")
    ids: list[int] = []
    pos: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    seqlens: list[int] = []
    offset = 0
    for s in samples:
        _check_sample(s)
        p, c = len(s.prompt_ids), len(s.completion_ids)
        ids += s.prompt_ids
        ids += s.completion_ids
        pos.append(torch.arange(p + c))
        index.append(_loss_positions(s, offset + p - 1))
        seqlens.append(p + c)
        offset += p + c
    cu = torch.zeros(len(samples) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64).unsqueeze(0),  # [1, T]
        position_ids=torch.cat(pos).unsqueeze(0),  # [1, T]
        attention_mask=None,
        cu_seqlens=cu,  # [S + 1]
        max_seqlen=max(seqlens),
        meta={"padding_tokens": 0, "real_tokens": offset},
        **_loss_fields(samples, torch.cat(index)),
    )


def shared_units(samples: Sequence[Sample], max_tokens: int) -> list[list[int]]:
    """Samples with the same prompt (a group's kept completions), as runs that each hold the prompt once
    and fit `max_tokens` (prompt + their completions): a group over the budget splits into several runs,
    each with its own copy of the prompt. Indices into `samples`, groups in first-seen order."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(i)
    units = []
    for prompt, members in groups.items():
        run, size = [], len(prompt)
        for i in members:
            c = len(samples[i].completion_ids)
            if run and size + c > max_tokens:
                units.append(run)
                run, size = [], len(prompt)
            run.append(i)
            size += c
        units.append(run)
    return units


def plan_shared_microbatches(samples: Sequence[Sample], max_tokens: int) -> list[list[int]]:
    """`plan_microbatches` over prompt runs (`shared_units`): the budget counts the tokens computed,
    each run's prompt once. A sample longer than the budget raises as in plan_microbatches."""
    if any(s.length > max_tokens for s in samples):
        plan_microbatches([s.length for s in samples], max_tokens)  # raises, naming the sample
    units = shared_units(samples, max_tokens)
    sizes = [len(samples[u[0]].prompt_ids) + sum(len(samples[i].completion_ids) for i in u) for u in units]
    return [[i for b in bin_ for i in units[b]] for bin_ in plan_microbatches(sizes, max_tokens)]


def collate_shared(samples: list[Sample]) -> MicroBatch:
    """Packed, each run of consecutive samples with the same prompt holding it once: [prompt, c1, c2, ...].
    Segments (cu_seqlens) are the prompt and each completion; `prefix` points a completion's segment at
    its prompt (fastdash.attention.shared_prefix_attention), and its positions continue the prompt's.
    Completion token 0 is predicted by the prompt's last position (shared by the run), token j > 0 by
    the completion's position j - 1. Same loss fields, in the same sample order, as collate_packed."""
    if not samples:
        raise ValueError("collate_shared needs at least one sample")
    ids: list[int] = []
    pos: list[torch.Tensor] = []
    index: list[torch.Tensor] = []
    seqlens: list[int] = []
    prefix: list[tuple[int, int]] = []
    offset, prompt_at, last, prompt_tokens = 0, 0, None, 0
    for s in samples:
        _check_sample(s)
        p, c = len(s.prompt_ids), len(s.completion_ids)
        if s.prompt_ids != last:  # a new run: its prompt segment
            ids += s.prompt_ids
            pos.append(torch.arange(p))
            seqlens.append(p)
            prefix.append((0, 0))
            prompt_at, last = offset, s.prompt_ids
            offset, prompt_tokens = offset + p, prompt_tokens + p
        ids += s.completion_ids
        pos.append(torch.arange(p, p + c))
        seqlens.append(c)
        prefix.append((prompt_at, p))
        # position of completion token j's predictor: the prompt's last for j = 0, else offset + j - 1
        at = torch.cat([torch.tensor([prompt_at + p - 1]), torch.arange(offset, offset + c - 1)])[:c]
        index.append(_loss_tokens_only(s, at))
        offset += c
    cu = torch.zeros(len(seqlens) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(seqlens).cumsum(0)
    return MicroBatch(
        input_ids=torch.tensor(ids, dtype=torch.int64).unsqueeze(0),  # [1, T]
        position_ids=torch.cat(pos).unsqueeze(0),  # [1, T]
        attention_mask=None,
        cu_seqlens=cu,  # [segments + 1]
        max_seqlen=max(seqlens),
        prefix=torch.tensor(prefix, dtype=torch.int64),  # [segments, 2]
        # real_tokens: the tokens computed; saved_prompt_tokens: what collate_packed would compute more
        meta={"padding_tokens": 0, "real_tokens": offset,
              "saved_prompt_tokens": sum(len(s.prompt_ids) for s in samples) - prompt_tokens},
        **_loss_fields(samples, torch.cat(index)),
    )


def collate_padded(samples: list[Sample], pad_token_id: int) -> MicroBatch:
    """Right-pad samples into `[B, T]` rows with an attention mask (the baseline layout)."""
    if not samples:
        raise ValueError("collate_padded needs at least one sample")
    for s in samples:
        _check_sample(s)
    B, T = len(samples), max(s.length for s in samples)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.int64)
    attention_mask = torch.zeros((B, T), dtype=torch.int64)
    index = []
    for b, s in enumerate(samples):
        p, c = len(s.prompt_ids), len(s.completion_ids)
        input_ids[b, : p + c] = torch.tensor(s.prompt_ids + s.completion_ids, dtype=torch.int64)
        attention_mask[b, : p + c] = 1
        index.append(_loss_positions(s, b * T + p - 1))
    real = sum(s.length for s in samples)
    return MicroBatch(
        input_ids=input_ids,  # [B, T]
        # right padding: real tokens sit at 0..L-1 in every row, so plain aranges are their positions
        position_ids=torch.arange(T).unsqueeze(0).expand(B, T).contiguous(),
        attention_mask=attention_mask,  # [B, T]
        cu_seqlens=None,
        max_seqlen=T,
        meta={"padding_tokens": B * T - real, "real_tokens": real},
        **_loss_fields(samples, torch.cat(index)),
    )


def microbatches(samples: list[Sample], *, budget: int | None, micro_batch_size: int, pad_id: int,
                 device, share_prompts: bool = False) -> list[tuple[MicroBatch, list[Sample]]]:
    """(micro-batch on `device`, its samples) pairs: packed under `budget` tokens (`share_prompts`: each
    prompt once per micro-batch, the budget counting computed tokens), or (budget None) padded
    `micro_batch_size` samples at a time."""
    if budget is not None and share_prompts:
        groups = [[samples[i] for i in idx] for idx in plan_shared_microbatches(samples, budget)]
        return [(collate_shared(g).to(device), g) for g in groups]
    if budget is not None:
        groups = [[samples[i] for i in idx] for idx in plan_microbatches([s.length for s in samples], budget,
                                                                          allow_oversize=False)]
        return [(collate_packed(g).to(device), g) for g in groups]
    groups = [[samples[i] for i in idx] for idx in plan_padded_microbatches(len(samples), micro_batch_size)]
    return [(collate_padded(g, pad_id).to(device), g) for g in groups]
