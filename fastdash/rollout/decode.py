"""A compacting decode loop for HF causal LMs: every decode step costs only the rows still running.

`model.generate` keeps all rows of a batch decoding until the longest one ends; with the paper's
long-tailed lengths a 64-row batch then spends ~3x the row-steps of the tokens it keeps. Here:

- prefill a group of prompts (left padded, lm_head on the last position only), sample each row's
  first token from the prefill logits. With `share_prompts`, a prompt that several rows of the group
  share (a GRPO group's G samples) is prefilled once, and its KV and last logits are copied to each of
  its rows (docs/shared-prompts.md);
- decode one token per step for the live rows; a row that stopped (any EOS id, its forced length, or
  max_tokens) leaves the batch at once: its row is dropped from the KV cache
  (`DynamicCache.batch_select_indices`), the attention mask and the position ids, and leading
  columns no live row attends to are cut off. Slack: none, a row costs exactly
  `len(completion) - 1` decode row-steps (its first token comes from the prefill);
- continuous admission: with `max_batch_size` smaller than the call, waiting prompts are prefilled
  as rows leave and merged into the running cache. A `DynamicLayer` holds plain [B, H, S, D]
  key / value tensors and RoPE is applied before caching, so rows of different lengths can share
  one cache: the narrower side is left padded along S with masked zeros and both are concatenated
  along B. Sliding-window, linear-attention or quantised cache layers do not allow this (they keep
  per-layer windows / states); `supports(model)` says so and the engine falls back to `generate`.

Sampling uses transformers' own warpers in `generate`'s order (temperature, top-k, top-p), after the
EOS ban of forced lengths (a custom processor, which `generate` also runs before the warpers).
Randomness is per row: row r of a call draws its uniforms from a `torch.Generator` seeded with
(seed, r), one uniform per token, and samples by inverse CDF (float64 sums), so a row's samples
depend on the call's seed and its index only, never on which rows share its batch.

Log-probs are vLLM's `processed_logprobs`: log_softmax of the processed logits (after temperature,
top-k, top-p and the forced-length EOS ban) at the sampled token; with top-k / top-p off this is the
trainer's log_softmax(logits / T). Greedy: log_softmax(logits). A forced EOS gets 0.0 (probability 1),
as the vLLM engine's forced path.
"""
from __future__ import annotations

import inspect
from collections import deque
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import DynamicCache, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from fastdash.rollout.base import SamplingParams

ADMIT_FRACTION = 8  # admit waiting prompts once 1/8 of the slots are free: fewer, larger prefills


@dataclass
class DecodeStats:
    """Work done, summed over calls: what the tests and benchmarks check."""

    prefill_calls: int = 0
    prefill_rows: int = 0  # rows admitted by a prefill (their first token sampled from it)
    prefill_tokens: int = 0  # prompt tokens prefilled, padding excluded (each distinct prompt once when shared)
    decode_steps: int = 0  # decode forwards
    decode_row_steps: int = 0  # rows fed to decode forwards (the cost that compaction cuts)
    padded_row_steps: int = 0  # padding rows of static-shape decode forwards (static_decode; 0 here)
    tokens: int = 0  # tokens returned


@dataclass
class RowResult:
    ids: list[int] = field(default_factory=list)
    logps: list[float] = field(default_factory=list)
    truncated: bool = False


def row_seed(seed: int, index: int) -> int:
    """Row `index`'s generator seed for a call seeded `seed`; distinct for distinct pairs, < 2**63."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)


def supports(model) -> str | None:
    """None when the compacting loop can run `model`, else why not (the engine then uses generate)."""
    try:
        cache = DynamicCache(config=model.config)
    except Exception as e:  # a config transformers cannot build a cache for
        return f"DynamicCache(config) failed: {e}"
    kinds = {type(layer).__name__ for layer in cache.layers}
    if cache.layers and kinds != {"DynamicLayer"}:
        return f"cache layers {sorted(kinds)} keep windows or states that rows cannot be merged in"
    return None


def _cache_kwarg(model) -> str:
    """transformers renamed `past_key_values` to `cache` during 5.x; use what this model takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def warpers(params: SamplingParams) -> list:
    """transformers' warpers in `generate`'s order, only those that change anything (as generate)."""
    if params.greedy:
        return []
    out = []
    if params.temperature != 1.0:
        out.append(TemperatureLogitsWarper(params.temperature))
    if params.top_k:
        out.append(TopKLogitsWarper(top_k=params.top_k))
    if params.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=params.top_p))
    return out


class Decoder:
    """One call's decode loop. `rows`: prompt ids, one entry per completion (a prompt's n samples
    are n rows); `seed`: the call's seed (row r draws from row_seed(seed, r)); `stats`: added to;
    `share_prompts`: prefill each distinct prompt of an admitted group once (rows copy its KV)."""

    def __init__(self, model, rows: list[list[int]], params: SamplingParams, *, eos_ids: tuple[int, ...],
                 pad_id: int, max_batch_size: int | None, seed: int, stats: DecodeStats,
                 share_prompts: bool = False):
        if params.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {params.max_tokens}")
        self.model, self.rows, self.params, self.stats = model, rows, params, stats
        self.device = next(model.parameters()).device
        self.eos_ids, self.pad_id, self.share_prompts = eos_ids, pad_id, share_prompts
        self.eos = torch.tensor(eos_ids, device=self.device)
        self.cap = max(1, min(max_batch_size or len(rows), len(rows)))
        self.warpers = warpers(params)
        self.forced = (torch.tensor(params.forced_lengths, device=self.device)
                       if params.forced_lengths is not None else None)
        self.uniforms = None if params.greedy else torch.stack([
            torch.rand(params.max_tokens, dtype=torch.float64, generator=torch.Generator().manual_seed(row_seed(seed, r)))
            for r in range(len(rows))]).to(self.device)
        self.cache_kw = _cache_kwarg(model)
        self.results = [RowResult() for _ in rows]
        # live state, one entry per running row: global row index, next input token, position
        self.live = torch.zeros(0, dtype=torch.long, device=self.device)
        self.cache, self.mask = None, None
        self.last = self.pos = self.live

    # ------------------------------------------------------------------ loop ---------------------
    @torch.no_grad()
    def run(self) -> list[RowResult]:
        waiting = deque(range(len(self.rows)))
        admit_at = 1 if self.cap == len(self.rows) else max(1, self.cap // ADMIT_FRACTION)
        while waiting or self.live.numel():
            free = self.cap - self.live.numel()
            if waiting and (free >= admit_at or not self.live.numel()):
                self._admit([waiting.popleft() for _ in range(min(free, len(waiting)))])
            else:
                self._decode_step()
        return self.results

    def _admit(self, new: list[int]) -> None:
        prompts, of_row = _distinct([self.rows[r] for r in new]) if self.share_prompts else (
            [self.rows[r] for r in new], None)
        width = max(map(len, prompts))  # the same as without sharing: the same prompts, once each
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):  # left padding: every prompt ends at the last column
            ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[i, width - len(p):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # as generate's position ids
        cache = DynamicCache(config=self.model.config)
        logits = self._forward(ids, mask, pos, cache)
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += len(new)
        self.stats.prefill_tokens += sum(map(len, prompts))
        if of_row is not None:  # each row gets its own copy of its prompt's KV (rows then diverge)
            of_row = torch.tensor(of_row, device=self.device)
            cache.batch_select_indices(of_row)
            logits, mask, pos = logits[of_row], mask[of_row], pos[of_row]
        rows = torch.tensor(new, device=self.device)
        tokens = self._sample(logits, rows)
        self._merge(rows, tokens, mask.sum(-1), mask, cache)

    def _decode_step(self) -> None:
        ones = torch.ones((self.live.numel(), 1), dtype=self.mask.dtype, device=self.device)
        self.mask = torch.cat([self.mask, ones], dim=1)
        logits = self._forward(self.last[:, None], self.mask, self.pos[:, None], self.cache)
        self.stats.decode_steps += 1
        self.stats.decode_row_steps += self.live.numel()
        tokens = self._sample(logits, self.live)
        self.last, self.pos = tokens, self.pos + 1
        self._compact(self._record(self.live, tokens))

    def _forward(self, ids, mask, pos, cache) -> torch.Tensor:
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                         logits_to_keep=1, **{self.cache_kw: cache})
        return out.logits[:, -1, :].float()

    # ------------------------------------------------------------------ sampling -----------------
    def _sample(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Next token per row (global indices `rows`), recording log-probs; forced EOS at length L."""
        t = torch.tensor([len(self.results[r].ids) for r in rows.tolist()], device=self.device)
        scores = logits
        if self.forced is not None:  # ban every EOS before the forced length (in place: our own logits)
            early = (t < self.forced[rows] - 1)[:, None]
            scores[:, self.eos] = scores[:, self.eos].masked_fill(early, float("-inf"))
        for w in self.warpers:
            scores = w(None, scores)
        probs = torch.softmax(scores, dim=-1)  # one fused pass; filtered tokens are 0
        if self.params.greedy:
            tokens = scores.argmax(-1)
        else:
            tokens = _inverse_cdf(probs, self.uniforms[rows, t])
        # log p: the fp32 probability's relative error (a few ulps) is a few 1e-7 nats absolute
        logps = probs.gather(-1, tokens[:, None])[:, 0].double().log()
        if self.forced is not None:  # the forced EOS itself: probability 1
            stop = t == self.forced[rows] - 1
            tokens = torch.where(stop, self.eos_ids[0], tokens)
            logps = torch.where(stop, 0.0, logps)
        for r, tok, lp in zip(rows.tolist(), tokens.tolist(), logps.tolist()):
            self.results[r].ids.append(tok)
            self.results[r].logps.append(lp)
        self.stats.tokens += len(tokens)
        return tokens

    # ------------------------------------------------------------------ bookkeeping --------------
    def _record(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Which of `rows` keep running after emitting `tokens` (bool per row)."""
        n = torch.tensor([len(self.results[r].ids) for r in rows.tolist()], device=self.device)
        stopped = torch.isin(tokens, self.eos)
        full = ~stopped & (n >= self.params.max_tokens)
        for r in rows[full].tolist():
            self.results[r].truncated = True
        return ~(stopped | full)

    def _merge(self, rows, tokens, pos, mask, cache) -> None:
        """Add prefilled rows that keep running to the live batch (pad the narrower cache on the left)."""
        keep = self._record(rows, tokens)
        if not keep.any():
            return
        idx = keep.nonzero()[:, 0]
        cache.batch_select_indices(idx)
        rows, tokens, pos, mask = rows[idx], tokens[idx], pos[idx], mask[idx]
        if self.cache is None or not self.live.numel():
            self.cache, self.mask, self.live, self.last, self.pos = cache, mask, rows, tokens, pos
            return
        width = max(self.mask.shape[1], mask.shape[1])
        for old, add in zip(self.cache.layers, cache.layers):
            old.keys = torch.cat([_pad_left(old.keys, width), _pad_left(add.keys, width)])
            old.values = torch.cat([_pad_left(old.values, width), _pad_left(add.values, width)])
        self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
        self.live = torch.cat([self.live, rows])
        self.last, self.pos = torch.cat([self.last, tokens]), torch.cat([self.pos, pos])

    def _compact(self, keep: torch.Tensor) -> None:
        """Drop stopped rows from cache, mask and positions; cut columns no live row attends to."""
        if bool(keep.all()):
            return
        idx = keep.nonzero()[:, 0]
        self.cache.batch_select_indices(idx)
        self.mask, self.live, self.last, self.pos = self.mask[idx], self.live[idx], self.last[idx], self.pos[idx]
        if not idx.numel():
            return
        first = int(self.mask.any(0).to(torch.int8).argmax())  # first column some live row attends to
        if first > 0:
            self.mask = self.mask[:, first:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Token i with probability probs[i] / sum(probs) per row, from one uniform u per row. Two levels
    (block sums, then the chosen block's cumsum; float64 across blocks) cost about one pass over the
    vocabulary, where a float64 cumsum of the row costs ~4 passes and torch.multinomial ~9 on CPU."""
    rows, vocab = probs.shape
    full = vocab // block * block
    sums = probs[:, :full].unflatten(-1, (-1, block)).sum(-1)
    if full < vocab:
        sums = torch.cat([sums, probs[:, full:].sum(-1, keepdim=True)], dim=-1)
    cdf = sums.double().cumsum(-1)
    target = u * cdf[:, -1]
    b = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=cdf.shape[1] - 1)
    before = cdf.gather(-1, b) - sums.gather(-1, b).double()
    cols = b * block + torch.arange(block, device=probs.device)  # the chosen block's columns
    inner = probs.gather(-1, cols.clamp(max=vocab - 1)).masked_fill(cols >= vocab, 0).cumsum(-1, dtype=torch.float64)
    j = torch.searchsorted(inner, target[:, None] - before, right=True).clamp(max=block - 1)
    idx = (b * block + j)[:, 0].clamp(max=vocab - 1)
    # rounding at a block or row end (measure zero) must never emit a zero-probability token
    zero = probs.gather(-1, idx[:, None])[:, 0] == 0
    return torch.where(zero, probs.argmax(-1), idx) if bool(zero.any()) else idx


def _distinct(prompts: list[list[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct prompts in first-seen order, and each input's index among them."""
    index: dict[tuple[int, ...], int] = {}
    of_row = [index.setdefault(tuple(p), len(index)) for p in prompts]
    return [list(p) for p in index], of_row


def _pad_left(t: torch.Tensor, width: int) -> torch.Tensor:
    """Left pad the sequence axis (dim 1 of a mask, dim -2 of keys / values) to `width` with zeros."""
    if t.dim() == 2:
        return F.pad(t, (width - t.shape[1], 0))
    return F.pad(t, (0, 0, width - t.shape[-2], 0))


def decode(model, rows, params, **kwargs) -> list[RowResult]:
    return Decoder(model, rows, params, **kwargs).run()
