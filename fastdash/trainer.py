"""The DASH training step, top to bottom.

    step      = [rollout, when the buffer of step batches is empty] -> optimize(the next StepBatch)
    rollout   : prompts -> preemptive sampling (the engine calls of `cfg.preemptive_sampling`)
                -> rewards -> group advantages -> per step: loss mask + gradient filter (|A| > tau)
                -> the fixed normaliser -> old / reference log-probs of the kept samples (when needed)
    optimize  : micro-batches (packed under a token budget, or padded) -> forward in the compute dtype
                -> fused policy loss -> backward (accumulate) -> clip, AdamW on fp32 master weights
                -> weight sync to the engine

`rollout` produces immutable `StepBatch`es; `optimize` only reads them. Preemptive sampling (DASH:
one call for the step) and baseline GRPO (one call per micro-batch) differ only in the engine calls
of `rollout`; both then run the identical `optimize`. Setup (model, data, engine, optimizer, plan)
lives in `fastdash.runtime`; RNG and data position live in `TrainState`.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable

import torch

from fastdash import distributed
from fastdash.algo import gradient_filter, group_advantages, loss_mask, loss_normaliser, loss_token_weights
from fastdash.batch import Completion, Sample
from fastdash.correction import WeightStats, pg_weights, require_sampler_logps, sampler_old_logps
from fastdash.forward import compute_autocast, forward_hidden
from fastdash.metrics import inference_mismatch
from fastdash.oom import run_with_oom_backoff
from fastdash.packing import collate_packed, collate_padded, plan_microbatches, plan_padded_microbatches
from fastdash.rewards import score_completions
from fastdash.rollout.base import SamplingParams
from fastdash_kernels import fused_linear_logprob, fused_policy_loss

log = logging.getLogger("fastdash")


@dataclass
class TrainState:
    """Everything that decides what happens next: step counters, data position, RNG seeds."""

    step: int = 0  # optimizer steps done
    rollouts: int = 0  # rollouts done (generation rounds)
    epoch: int = 0
    cursor: int = 0  # next prompt index within the epoch's order
    samples: int = 0  # samples generated
    nonfinite_streak: int = 0
    counters: dict = field(default_factory=lambda: {"skipped_empty_steps": 0, "nonfinite_steps": 0,
                                                    "reward_failures": 0, "oom_retries": 0})


@dataclass(frozen=True)
class StepBatch:
    """What one optimizer step trains on, made once by `rollout`; `optimize` only reads it."""

    samples: tuple[Sample, ...]  # every sample of the step (metrics; dapo's normaliser counts them all)
    kept: tuple[Sample, ...]  # those that reach the loss: loss mask and gradient filter passed
    normaliser: float  # the loss denominator, fixed before the first micro-batch
    masked: int = 0  # samples the loss mask dropped (empty, or truncated with mask_truncated_completions)


class PromptSampler:
    """Epoch-wise permutation of problem indices, reproducible from (seed, epoch) alone."""

    def __init__(self, n: int, seed: int, shuffle: bool, state: TrainState):
        self.n, self.seed, self.shuffle, self.state = n, seed, shuffle, state

    def _order(self, epoch: int) -> list[int]:
        order = list(range(self.n))
        if self.shuffle:
            random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            order = self._order(self.state.epoch)
            take = min(k - len(out), self.n - self.state.cursor)
            out += order[self.state.cursor : self.state.cursor + take]
            self.state.cursor += take
            if self.state.cursor == self.n:
                self.state.epoch, self.state.cursor = self.state.epoch + 1, 0
        return out


class Trainer:
    def __init__(self, cfg, run, prompt_source: Callable[[int], list[dict]] | None = None):
        """`run` is a `fastdash.runtime.Run`. `prompt_source(k)` returns the next k problems (default:
        the run's training problems in a seeded epoch order); benchmarks pass one to give every arm
        the same prompts."""
        self.cfg, self.run = cfg, run
        self.model, self.engine, self.state, self.timer = run.model, run.engine, run.state, run.timer
        self.sampler = PromptSampler(len(run.train_problems), cfg.seed, cfg.shuffle, self.state)
        self.prompt_source = prompt_source or (lambda k: [run.train_problems[i] for i in self.sampler.take(k)])
        self.buffer: list[StepBatch] = []  # the step batches of the current rollout, K times over
        self.budget = self._initial_budget() if cfg.packing else None
        self.lm_head = self.model.get_output_embeddings()

    def _initial_budget(self) -> int:
        """Pinned budget, else the scheduler's plan, else room for the longest possible sample."""
        if isinstance(self.cfg.max_tokens_per_microbatch, int):
            return self.cfg.max_tokens_per_microbatch
        if self.run.plan is not None:
            return self.run.plan.max_tokens_per_microbatch
        return self.cfg.max_prompt_length + self.cfg.max_completion_length

    # ------------------------------------------------------------------ one step -----------------
    def step(self) -> dict:
        """One optimizer step; a rollout first when the buffer is empty. Returns the step's metrics."""
        rollout_metrics = self.rollout() if not self.buffer else {}
        batch = self.buffer.pop(0)
        metrics = {**rollout_metrics, **global_batch_stats(batch.samples), **self.optimize(batch)}
        self.state.step += 1
        return {"step": self.state.step, **metrics, **self.timer.pop_step()}

    # ------------------------------------------------------------------ rollout ------------------
    def rollout(self) -> dict:
        cfg, G, shape = self.cfg, self.cfg.num_generations, self.cfg.preemptive_sampling
        problems = self.prompt_source(shape.samples // G)  # the global rollout's; this rank takes its share
        ranges = distributed.step_shares(len(problems), shape.train_batch_size // G)
        problems = [problems[i] for lo, hi in ranges for i in range(lo, hi)]
        completions = self.preemptive_sampling([self.run.prompt_ids(p) for p in problems], ranges)
        require_sampler_logps(cfg, completions, self.engine.name)
        with self.timer("reward"):
            texts = [self.run.decode(c.completion_ids) for c in completions]
            rewards, failed = score_completions(self.run.reward_fn, texts, [p for p in problems for _ in range(G)])
            # over every rank's rewards (scale_rewards=batch needs the global std), then this rank's block
            everyone = distributed.all_gather_rows(torch.tensor(rewards, dtype=torch.float32))
            lo = distributed.rank() * len(rewards)
            advantages = group_advantages(everyone, G, cfg.scale_rewards)[lo : lo + len(rewards)]
        failed, n_samples = (int(v) for v in distributed.sum_floats(failed, len(completions)))
        self.state.counters["reward_failures"] += failed
        samples = [Sample(uid=i, prompt_ids=c.prompt_ids, completion_ids=c.completion_ids, truncated=c.truncated,
                          reward=r, advantage=a, sampler_logps=c.sampler_logps)
                   for i, (c, r, a) in enumerate(zip(completions, rewards, advantages.tolist()))]
        n = shape.train_batch_size // distributed.world_size()  # this rank's share of a step
        batches = [self.step_batch(samples[i : i + n]) for i in range(0, len(samples), n)]
        batches = self.old_and_ref_logps(batches)
        self.buffer = [b for _ in range(cfg.num_iterations) for b in batches]
        self.state.rollouts += 1
        self.state.samples += n_samples
        return {"reward/failures": failed, "rollout/samples": n_samples, "rollout/engine_calls": self.engine_calls}

    def preemptive_sampling(self, prompt_ids: list[list[int]],
                            ranges: list[tuple[int, int]] | None = None) -> list[Completion]:
        """The rollout's engine calls: one for the whole rollout under DASH, one per
        generation_batch_size samples otherwise (baseline GRPO: per micro-batch). Same samples either
        way: the seed and forced lengths are sliced per call from the rollout's.

        `ranges`: the rollout's prompt index ranges `prompt_ids` holds (a rank's shares; default all).
        A rank makes one call per one-process call holding its prompts, with that call's seed shifted
        so its rows draw the per-row seeds of the same rows of the one-process call (`shifted_seed`),
        and each sample's forced length: the union over ranks is the one-process rollout whenever a
        rank's prompts of a call are contiguous (DASH, baseline GRPO; not Mini, whose calls span several
        steps: rows after the first gap draw other seeds) and the engine seeds per row or prompt."""
        G, shape = self.cfg.num_generations, self.cfg.preemptive_sampling
        params = self._sampling_params()
        forced = (self.run.forced_lengths(self.state.rollouts, shape.samples)  # benchmarks only
                  if self.cfg.length_control_mean else None)
        per_call, out, self.engine_calls = shape.samples_per_call // G, [], 0
        with self.timer("generate"):
            self.engine.wake()
            for idx in _calls(ranges or [(0, len(prompt_ids))], per_call):
                first = idx[0] // per_call * per_call  # the one-process call's first prompt
                call = _call_params(params, forced, first * G, len(idx) * G)
                if forced and (idx[0] != first or idx[-1] - idx[0] + 1 != len(idx)):  # a rank's part of it
                    call = replace(call, forced_lengths=tuple(forced[i * G + j] for i in idx for j in range(G)))
                if idx[0] != first:
                    call = replace(call, seed=self._rows_on(call.seed, (idx[0] - first) * G, idx[0] - first))
                done = len(out) // G
                out += self._generate(prompt_ids[done : done + len(idx)], call)
                self.engine_calls += 1
            self.engine.sleep()
        return out

    def _rows_on(self, seed: int, rows: int, prompts: int) -> int:
        """The seed under which this call's first row draws what row `rows` (HF: per row) or prompt
        `prompts` (vLLM: per prompt) of the one-process call seeded `seed` draws."""
        return distributed.shifted_seed(seed, prompts if self.engine.name == "vllm" else rows)

    def _generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """One engine call; on OOM the engine's concurrency is halved and the call retried (same seed,
        so the same samples)."""
        rows = len(prompts) * self.cfg.num_generations

        def call(concurrency: int):
            self.engine.max_batch_size = concurrency
            return self.engine.generate(prompts, self.cfg.num_generations, params)

        def count(old: int, new: int) -> None:
            self.state.counters["oom_retries"] += 1

        return run_with_oom_backoff(call, min(self.engine.max_batch_size or rows, rows), on_backoff=count,
                                    what="generation batch", plan=self.run.plan)

    def _sampling_params(self) -> SamplingParams:
        c = self.cfg
        return SamplingParams(max_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, seed=c.seed * 7919 + self.state.rollouts)

    def step_batch(self, samples: list[Sample]) -> StepBatch:
        """The loss mask (empty / truncated), then DASH's gradient filter (|A| > tau, before any
        forward pass), then the step's normaliser over what is left."""
        cfg = self.cfg
        usable = loss_mask([len(s.completion_ids) for s in samples], [s.truncated for s in samples],
                           cfg.mask_truncated_completions)
        keep = usable.clone()
        if cfg.gradient_filtering:
            keep &= gradient_filter(torch.tensor([s.advantage for s in samples]), cfg.gradient_filtering_threshold)
        kept = tuple(s for s, k in zip(samples, keep.tolist()) if k)
        normaliser = loss_normaliser(cfg.loss_type, [len(s.completion_ids) for s in kept],
                                     [len(s.completion_ids) for s in samples], cfg.max_completion_length)
        return StepBatch(tuple(samples), kept, normaliser, masked=int((~usable).sum()))

    @torch.no_grad()
    def old_and_ref_logps(self, batches: list[StepBatch]) -> list[StepBatch]:
        """Log-probs under the sampling policy (Mini / Multi) and the reference (beta > 0) of every kept
        sample of the rollout, once, with the same packing and compute dtype as training. Skipped at
        K = 1 on-policy and beta = 0; with old_logprobs=sampler the engine's log-probs take the old
        pass's place (no forward)."""
        passes = {}
        if self.cfg.needs_old_logps and self.cfg.old_logprobs == "sampler":
            batches = [replace(b, kept=tuple(replace(s, old_logps=sampler_old_logps(s)) for s in b.kept))
                       for b in batches]
        elif self.cfg.needs_old_logps:
            passes["old_logps"] = self.model
        if self.cfg.beta > 0:
            passes["ref_logps"] = self.run.ref_model
        kept = [s for b in batches for s in b.kept]
        if not passes or not kept:
            return batches
        found: dict[int, dict] = {s.uid: {} for s in kept}
        with self.timer("logprob"):
            for name, model in passes.items():
                for mb, members in self._microbatches(kept):
                    with self._autocast():
                        hidden = forward_hidden(model, mb)
                    logps = fused_linear_logprob(*self._head_inputs(hidden, model), mb.targets,
                                                 temperature=self.cfg.temperature, backend=self.cfg.kernel)
                    cu = mb.completion_cu_seqlens.tolist()
                    for j, s in enumerate(members):
                        found[s.uid][name] = logps[cu[j] : cu[j + 1]].float().cpu()
        return [replace(b, kept=tuple(replace(s, **found[s.uid]) for s in b.kept)) for b in batches]

    # ------------------------------------------------------------------ optimize -----------------
    def optimize(self, batch: StepBatch) -> dict:
        kept = batch.kept
        n_kept, n_all, masked, adv = distributed.sum_floats(len(kept), len(batch.samples), batch.masked,
                                                            sum(abs(s.advantage) for s in kept))  # over ranks
        metrics = {"filter/kept_fraction": n_kept / n_all, "filter/kept_samples": int(n_kept),
                   "mask/dropped_samples": int(masked), "adv/abs_mean_kept": adv / n_kept if n_kept else 0.0}
        if not n_kept:
            self.state.counters["skipped_empty_steps"] += 1
            log.info("step %d: every sample was filtered (|A| <= %.3g) or masked: no forward, no optimizer step",
                     self.state.step + 1, self.cfg.gradient_filtering_threshold)
            return {**metrics, "loss": 0.0, "skipped": 1}
        with self.timer("backward"):
            if not kept:  # every sample of this rank (not of the step) filtered: zero gradients, no forward
                self.run.optimizer.zero_grad(set_to_none=True)
                stats = {"loss": 0.0, "microbatches": 0, "clip_fraction": 0.0, "tokens/loss": 0,
                         "tokens/padding": 0, "tokens/real": 0, **({"kl": 0.0} if self.cfg.beta > 0 else {})}
            elif self.cfg.packing:
                stats = run_with_oom_backoff(lambda budget: self._backward_all(batch, budget), self.budget,
                                             on_backoff=self._on_oom, plan=self.run.plan,
                                             min_budget=max(s.length for s in kept))
            else:
                stats = self._backward_all(batch, None)
            distributed.all_reduce_grads(self.model)  # the losses were normalised globally: sum = 1 process
        metrics.update(distributed.reduce_step_stats(stats))
        with self.timer("optimizer"):
            metrics.update(self._optimizer_step())
        with self.timer("sync"):
            self.engine.sync_weights(self.model)
        return metrics

    def _microbatches(self, samples: list[Sample], budget: int | None = None):
        device = self.run.device
        if self.cfg.packing:
            for idx in plan_microbatches([s.length for s in samples], budget or self.budget, allow_oversize=False):
                members = [samples[i] for i in idx]
                yield collate_packed(members).to(device), members
        else:
            for idx in plan_padded_microbatches(len(samples), self.cfg.micro_batch_size):
                members = [samples[i] for i in idx]
                yield collate_padded(members, self.run.pad_id).to(device), members

    def _autocast(self):
        """Forward passes in the compute dtype over fp32 master weights (mixed precision)."""
        return compute_autocast(self.run.device, self.run.compute_dtype)

    def _head_inputs(self, hidden: torch.Tensor, model) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden and lm_head weight in the compute dtype (the cast is differentiable, so the fp32
        master weight gets the gradient); the kernels accumulate in fp32 and return fp32 log-probs."""
        dtype = self.run.compute_dtype
        return hidden.to(dtype), model.get_output_embeddings().weight.to(dtype)

    def _on_oom(self, old_budget: int, new_budget: int) -> None:
        self.state.counters["oom_retries"] += 1
        self.budget = new_budget
        self.run.optimizer.zero_grad(set_to_none=True)

    def _backward_all(self, batch: StepBatch, budget: int | None) -> dict:
        """Forward + backward of every micro-batch; gradients accumulate into .grad."""
        self.run.optimizer.zero_grad(set_to_none=True)  # a retried attempt starts clean
        cfg, n_mb, tokens, pad, real = self.cfg, 0, 0, 0, 0
        loss_sum = clip_sum = kl_sum = torch.zeros((), device=self.run.device)  # on device: no sync per micro-batch
        pairs = []  # (trainer log-probs, engine log-probs) per sample, for the train/inference mismatch
        is_stats = WeightStats(cfg.rollout_is_cap)  # rollout correction's weights, when on
        for mb, members in self._microbatches(list(batch.kept), budget):
            with self._autocast():
                hidden = forward_hidden(self.model, mb)
            out = fused_policy_loss(
                *self._head_inputs(hidden, self.model), mb.targets, mb.completion_cu_seqlens, mb.advantages,
                token_weights=loss_token_weights(cfg.loss_type, mb.completion_cu_seqlens, batch.normaliser),
                old_logps=mb.old_logps, ref_logps=mb.ref_logps, pg_weights=pg_weights(cfg, mb, is_stats),
                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high,
                beta=cfg.beta, kl_estimator=cfg.kl_estimator, temperature=cfg.temperature, backend=cfg.kernel)
            out.loss.backward()
            n_tok = mb.targets.numel()
            loss_sum = loss_sum + out.loss.detach()
            clip_sum = clip_sum + out.metrics.get("clip_fraction", 0.0) * n_tok
            kl_sum = kl_sum + out.metrics.get("kl_mean", 0.0) * n_tok
            tokens, n_mb = tokens + n_tok, n_mb + 1
            pad, real = pad + mb.meta.get("padding_tokens", 0), real + mb.meta.get("real_tokens", 0)
            if members[0].sampler_logps is not None:
                cu = mb.completion_cu_seqlens.tolist()
                pairs += [(out.logps[cu[j] : cu[j + 1]], s.sampler_logps) for j, s in enumerate(members)]
        stats = {"loss": float(loss_sum), "microbatches": n_mb, "clip_fraction": float(clip_sum) / max(tokens, 1),
                 "tokens/loss": tokens, "tokens/padding": pad, "tokens/real": real}
        if cfg.beta > 0:
            stats["kl"] = float(kl_sum) / max(tokens, 1)
        if pairs:
            stats.update(inference_mismatch(*zip(*pairs)))
        stats.update(is_stats.metrics())
        return stats

    def _optimizer_step(self) -> dict:
        cfg, params = self.cfg, [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        if not torch.isfinite(norm):
            # never let a NaN/inf gradient touch the weights: skip, keep weights, count, stop if it persists
            self.run.optimizer.zero_grad(set_to_none=True)
            self.state.nonfinite_streak += 1
            self.state.counters["nonfinite_steps"] += 1
            log.warning("step %d: non-finite gradient norm; step skipped (%d in a row)",
                        self.state.step + 1, self.state.nonfinite_streak)
            if self.state.nonfinite_streak >= cfg.max_nonfinite_steps:
                raise RuntimeError(f"{self.state.nonfinite_streak} optimizer steps in a row had non-finite "
                                   "gradients; lower learning_rate or check the reward / data")
            return {"grad_norm": float("nan"), "skipped": 1}
        self.state.nonfinite_streak = 0
        self.run.optimizer.step()
        self.run.lr_scheduler.step()
        self.run.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": float(norm), "lr": self.run.lr_scheduler.get_last_lr()[0], "skipped": 0}


def _call_params(params: SamplingParams, forced: list[int] | None, start: int, count: int) -> SamplingParams:
    """Per-call parameters: the seed moves per call, the rollout's forced lengths are sliced per call."""
    return replace(params, seed=params.seed * 1009 + start,
                   forced_lengths=tuple(forced[start : start + count]) if forced else None)


def _calls(ranges: list[tuple[int, int]], per_call: int) -> list[list[int]]:
    """The global prompt indices of each engine call: those of `ranges` that one process would
    generate in the same call (one call per one-process call that holds any of them)."""
    calls: dict[int, list[int]] = {}
    for lo, hi in ranges:
        for i in range(lo, hi):
            calls.setdefault(i // per_call, []).append(i)
    return list(calls.values())


def global_batch_stats(samples: tuple[Sample, ...]) -> dict:
    """Reward and length statistics of the samples one optimizer step covers, on every rank."""
    rows = [(s.reward, len(s.completion_ids), s.truncated) for s in samples]
    if distributed.world_size() > 1:
        rows = [r for part in distributed.all_gather_objects(rows) for r in part]
    return batch_stats(rows)


def batch_stats(rows: list[tuple[float, int, bool]]) -> dict:
    """Mean / std reward, mean length and truncated fraction of (reward, completion length, truncated) rows."""
    rewards = torch.tensor([r for r, _, _ in rows])
    lengths = [n for _, n, _ in rows]
    truncated = [t for _, _, t in rows]
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rows) > 1 else 0.0,
            "completion/mean_length": sum(lengths) / len(rows),
            "completion/truncated_fraction": sum(truncated) / len(rows)}
