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

With `async_generation` (beyond DASH) `submit_ahead` hands the engine calls of the next rollouts to a
generation worker before each step, and `rollout` takes its completions instead of generating them:
the rest of the step is unchanged (`fastdash.rollout.pipeline` has the schedule).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import replace
from typing import Callable

import torch

from fastdash import distributed, fsdp
from fastdash.algo import gradient_filter, loss_mask, loss_normaliser, loss_token_weights, multi_reward_advantages
from fastdash.algo import policy_loss_options
from fastdash.batch import Completion, Sample, StepBatch
from fastdash.correction import WeightStats, pg_weights, require_sampler_logps, sampler_old_logps
from fastdash.forward import compute_autocast
from fastdash.lora import reference_pass
from fastdash.loss_masks import MaskStats, policy_weights, step_entropy_threshold
from fastdash.metrics import global_batch_stats, inference_mismatch
from fastdash.oom import run_with_oom_backoff
from fastdash.packing import microbatches
from fastdash.rewards.weighted import part_metrics, reward_parts, score_parts
from fastdash.rollout.base import SamplingParams
from fastdash.state import PromptSampler, TrainState  # noqa: F401 - re-exported (checkpoints, benchmarks)
from fastdash.tools.metrics import tool_metrics
from fastdash_kernels import fused_linear_logprob, fused_policy_loss

log = logging.getLogger("fastdash")


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
        self.pipeline = None  # async_generation: the generation worker, started by the first step
        self.budget = self._initial_budget() if cfg.packing else None
        self.sharded = fsdp.is_sharded(self.model)  # parallelism=fsdp: every rank runs as many forwards
        # a group's prompt once per packed micro-batch (docs/shared-prompts.md); not yet sharded or LoRA
        self._share_prompts = cfg.share_prompts is not False and not self.sharded and not cfg.lora_r

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
        if self.cfg.async_generation:
            self.submit_ahead()  # rollouts up to step + max_staleness are generating meanwhile
        batch = self.next_batch()
        self.last_batch = batch  # the completions table (log_completions) reads its samples
        metrics = {**(batch.rollout_metrics or {}), **global_batch_stats(batch.samples),
                   "policy/staleness": self.state.step - batch.policy_version, **self.optimize(batch)}
        self.state.step += 1
        return {"step": self.state.step, **metrics, **self.timer.pop_step()}

    def next_batch(self) -> StepBatch:
        """The buffer's next step batch (a rollout first when it is empty). A batch staler than the run
        allows (a resume with a smaller max_staleness) is dropped, counted, and the next one taken."""
        allowed = self.cfg.steps_per_generation - 1 + (self.cfg.max_staleness if self.cfg.async_generation else 0)
        while True:
            if not self.buffer:
                self.rollout()
            batch = self.buffer.pop(0)
            if self.state.step - batch.policy_version <= allowed:
                return batch
            self.state.counters["stale_dropped_samples"] = \
                self.state.counters.get("stale_dropped_samples", 0) + len(batch.samples)
            log.warning("step %d: dropped a step batch of %d samples generated at step %d (staleness %d > %d)",
                        self.state.step + 1, len(batch.samples), batch.policy_version,
                        self.state.step - batch.policy_version, allowed)

    # ------------------------------------------------------------------ async generation ---------
    def submit_ahead(self) -> None:
        """async_generation: submit rollouts until those of steps up to step + max_staleness are
        generating, each with the weights of now (its policy version); see `rollout.pipeline`."""
        if self.pipeline is None:
            from fastdash.rollout.pipeline import GenerationPipeline

            self.pipeline = GenerationPipeline.for_run(self.cfg, self.run)
        last = min(self.state.step + self.cfg.max_staleness, self.run.total_steps - 1)  # none past the run's end
        while self.state.rollouts <= last:
            problems, ranges = self.rank_problems()  # with several ranks each worker generates its rank's share
            calls = self.engine_calls([self.run.prompt_ids(p) for p in problems], ranges)
            with self.timer("sync"):
                self.pipeline.submit(self.state.rollouts, self.state.step, problems,
                                     [(prompts, self.cfg.num_generations, params) for prompts, params in calls])
            self.state.rollouts += 1

    def drain(self) -> None:
        """Turn every in-flight rollout into step batches (a checkpoint then holds no in-flight work:
        the resumed run trains exactly those, and submits the rest with the same schedule)."""
        while self.pipeline is not None and self.pipeline.pending:
            self.rollout()

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()
            self.pipeline = None

    # ------------------------------------------------------------------ rollout ------------------
    def rollout(self) -> None:
        """One rollout's samples into the buffer, as step batches (K times over)."""
        cfg, G, shape = self.cfg, self.cfg.num_generations, self.cfg.preemptive_sampling
        metrics = {}
        if self.pipeline is not None:  # async: the oldest submitted rollout, generated meanwhile
            with self.timer("generate"):
                request, completions, metrics["async/worker_generate_s"] = self.pipeline.take()
                self.state.counters["oom_retries"] += request.oom_retries  # the worker's own back-offs
            problems, metrics["rollout/index"] = request.problems, request.index
        else:
            metrics["rollout/index"] = self.state.rollouts
            problems, ranges = self.rank_problems()
            completions = self.preemptive_sampling([self.run.prompt_ids(p) for p in problems], ranges)
            for c in completions:
                c.policy_version = self.state.step
        require_sampler_logps(cfg, completions, self.engine.name)
        with self.timer("reward"):
            texts = [self.run.decode(c.completion_ids) for c in completions]
            rows = [p for p in problems for _ in range(G)]
            if any(c.episode is not None for c in completions):  # tools: rewards see the transcript's messages
                rows = [{**row, "completion_messages": c.episode.messages} for row, c in zip(rows, completions)]
                metrics.update(tool_metrics(completions))
            # [N, K]: each reward function's scores (K = 1 unless reward lists several)
            scores, failed = score_parts(self.run.reward_fn, texts, rows)
            _, names, weights = reward_parts(self.run.reward_fn)
            # over every rank's rewards (scale_rewards=batch needs the global std), then this rank's block
            everyone = distributed.all_gather_rows(scores)
            lo = distributed.rank() * len(completions)
            advantages = multi_reward_advantages(everyone, weights, G, cfg.scale_rewards,
                                                 cfg.multi_objective_aggregation)[lo : lo + len(completions)]
            rewards = (scores * torch.tensor(weights, dtype=torch.float64)).sum(dim=1).tolist()  # weighted sum
            metrics.update(part_metrics(everyone, names))
        failed, n_samples = (int(v) for v in distributed.sum_floats(failed, len(completions)))
        self.state.counters["reward_failures"] += failed
        samples = [Sample(uid=i, prompt_ids=c.prompt_ids, completion_ids=c.completion_ids, truncated=c.truncated,
                          reward=r, advantage=a, sampler_logps=c.sampler_logps, policy_version=c.policy_version,
                          completion_mask=None if c.completion_mask is None else tuple(c.completion_mask),
                          messages=None if c.episode is None else c.episode.messages)
                   for i, (c, r, a) in enumerate(zip(completions, rewards, advantages.tolist()))]
        n = shape.train_batch_size // distributed.world_size()  # this rank's share of a step
        batches = [self.step_batch(samples[i : i + n]) for i in range(0, len(samples), n)]
        batches = self.old_and_ref_logps(batches)
        if cfg.top_entropy_quantile < 1:  # once per step, before its first micro-batch: see fastdash.loss_masks
            batches = [replace(b, entropy_threshold=step_entropy_threshold(b.kept, cfg.top_entropy_quantile))
                       for b in batches]
        metrics.update({"reward/failures": failed, "rollout/samples": n_samples,
                        "rollout/engine_calls": shape.engine_calls})
        batches[0] = replace(batches[0], rollout_metrics=metrics)
        self.buffer += [b for _ in range(cfg.num_iterations) for b in batches]
        if self.pipeline is None:  # async counts a rollout when it is submitted
            self.state.rollouts += 1
        self.state.samples += n_samples

    def rank_problems(self) -> tuple[list[dict], list[tuple[int, int]]]:
        """The next rollout's problems this rank generates and trains, and their index ranges in it."""
        G, shape = self.cfg.num_generations, self.cfg.preemptive_sampling
        problems = self.prompt_source(shape.samples // G)  # the global rollout's; this rank takes its share
        ranges = distributed.step_shares(len(problems), shape.train_batch_size // G)
        return [problems[i] for lo, hi in ranges for i in range(lo, hi)], ranges

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
        out = []
        with self.timer("generate"):
            self.engine.wake()
            for prompts, params in self.engine_calls(prompt_ids, ranges):
                out += self._generate(prompts, params)
            self.engine.sleep()
        return out

    def engine_calls(self, prompt_ids: list[list[int]],
                     ranges: list[tuple[int, int]] | None = None) -> list[tuple[list[list[int]], SamplingParams]]:
        """(prompts, parameters) of each engine call of rollout `state.rollouts` (see `preemptive_sampling`)."""
        G, shape = self.cfg.num_generations, self.cfg.preemptive_sampling
        params = self._sampling_params()
        forced = (self.run.forced_lengths(self.state.rollouts, shape.samples)  # benchmarks only
                  if self.cfg.length_control_mean else None)
        per_call, calls, done = shape.samples_per_call // G, [], 0
        for idx in distributed.call_prompts(ranges or [(0, len(prompt_ids))], per_call):
            first = idx[0] // per_call * per_call  # the one-process call's first prompt
            call = _call_params(params, forced, first * G, len(idx) * G)
            if forced and (idx[0] != first or idx[-1] - idx[0] + 1 != len(idx)):  # a rank's part of it
                call = replace(call, forced_lengths=tuple(forced[i * G + j] for i in idx for j in range(G)))
            if idx[0] != first:
                call = replace(call, seed=self._rows_on(call.seed, (idx[0] - first) * G, idx[0] - first))
            calls.append((prompt_ids[done : done + len(idx)], call))
            done += len(idx)
        return calls

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
        usable = loss_mask([s.num_loss_tokens for s in samples], [s.truncated for s in samples],
                           cfg.mask_truncated_completions)
        keep = usable.clone()
        if cfg.gradient_filtering:
            keep &= gradient_filter(torch.tensor([s.advantage for s in samples]), cfg.gradient_filtering_threshold)
        kept = tuple(s for s, k in zip(samples, keep.tolist()) if k)
        # sampled tokens only: tool / template tokens between turns count in no normaliser
        # a sum over samples: each rank's share, summed over the trainer ranks (the global normaliser)
        normaliser, = distributed.sum_floats(loss_normaliser(
            cfg.loss_type, [s.num_loss_tokens for s in kept],
            [s.num_loss_tokens for s, u in zip(samples, usable.tolist()) if u], cfg.max_completion_length))
        return StepBatch(tuple(samples), kept, normaliser, masked=int((~usable).sum()))

    @torch.no_grad()
    def old_and_ref_logps(self, batches: list[StepBatch]) -> list[StepBatch]:
        """Log-probs under the sampling policy (Mini / Multi) and the reference (beta > 0) of every kept
        sample of the rollout, once, with the same packing and compute dtype as training. Skipped at K = 1
        on-policy and beta = 0; with old_logprobs=sampler the engine's log-probs replace the old pass."""
        passes = {}
        if self.cfg.needs_old_logps and self.cfg.old_logprobs == "sampler":
            batches = [replace(b, kept=tuple(replace(s, old_logps=sampler_old_logps(s)) for s in b.kept))
                       for b in batches]
        elif self.cfg.needs_old_logps:
            passes["old_logps"] = self.model
        if self.cfg.beta > 0:
            passes["ref_logps"] = self.run.ref_model
        if self.cfg.top_entropy_quantile < 1 and "old_logps" not in passes:
            passes["entropy"] = self.model  # the policy's entropies, when no old pass gives them
        kept = [s for b in batches for s in b.kept]
        if not passes or not (kept or self.sharded):  # sharded: a rank with none still runs the padding
            return batches
        found: dict[int, dict] = {s.uid: {} for s in kept}

        def logprobs(hidden, weight, entropy=False):
            out = fused_linear_logprob(*self._head_inputs(hidden, weight), mb.targets, return_entropy=entropy,
                                       temperature=self.cfg.temperature, backend=self.cfg.kernel)
            return out if entropy else (out, None)

        with self.timer("logprob"):
            for name, model in passes.items():
                with reference_pass(model) if name == "ref_logps" else contextlib.nullcontext():  # LoRA: base
                    policy = self.cfg.top_entropy_quantile < 1 and name in ("old_logps", "entropy")
                    for mb, members in self._microbatches(kept, model=model, fallback=batches[0].samples[0]):
                        logps, ent = fsdp.head_forward(model, mb, functools.partial(logprobs, entropy=policy),
                                                       self._autocast)
                        cu = mb.completion_cu_seqlens.tolist()
                        for j, s in enumerate(members):  # a dummy (FSDP's padding) has no members
                            if name != "entropy":
                                found[s.uid][name] = logps[cu[j] : cu[j + 1]].float().cpu()
                            if ent is not None:
                                found[s.uid]["entropy"] = ent[cu[j] : cu[j + 1]].float().cpu()
            fsdp.reshard_all(self.model)  # FSDP's root keeps its gathered weights after a no-grad forward
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
            if self.cfg.packing and kept and not self.sharded:  # FSDP: one rank's OOM retry would desync
                stats = run_with_oom_backoff(lambda budget: self._backward_all(batch, budget), self.budget,
                                             on_backoff=self._on_oom, plan=self.run.plan,
                                             min_budget=max(s.length for s in kept))
            else:
                stats = self._backward_all(batch, None)
            if not self.sharded:  # FSDP reduce-scatters in the backward
                distributed.all_reduce_grads(self.model)  # losses normalised globally: sum = 1 process
        metrics.update(distributed.reduce_step_stats(stats))
        with self.timer("optimizer"):
            metrics.update(self._optimizer_step())
        with self.timer("sync"):  # sharded (FSDP): a collective, the engine gathers what it needs
            self.engine.sync_weights(self.model)
        if getattr(self.engine, "sync_bytes", None) is not None:  # LoRA: the adapters' bytes only
            metrics["sync/bytes"] = self.engine.sync_bytes
        return metrics

    def _microbatches(self, samples: list[Sample], budget: int | None = None, *, fallback: Sample, model=None):
        """This rank's micro-batches (packed under the budget, or padded); sharded, padded to the most any
        rank has with dummies of `fallback` (members [], loss x 0): every rank runs as many FSDP forwards."""
        def make(part):
            return microbatches(part, budget=(budget or self.budget) if self.cfg.packing else None,
                                micro_batch_size=self.cfg.micro_batch_size, pad_id=self.run.pad_id,
                                device=self.run.device, share_prompts=self._share_prompts)

        mbs = make(samples)
        missing = fsdp.pad_count(len(mbs)) - len(mbs) if self.sharded and model in (None, self.model) else 0
        return mbs + [(make([fallback])[0][0], [])] * missing if missing else mbs

    def _autocast(self):
        """Forward passes in the compute dtype over fp32 master weights (mixed precision)."""
        return compute_autocast(self.run.device, self.run.compute_dtype)

    def _head_inputs(self, hidden: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden and lm_head weight in the compute dtype (the cast is differentiable, so the fp32
        master weight gets the gradient); the kernels accumulate in fp32 and return fp32 log-probs."""
        return hidden.to(self.run.compute_dtype), weight.to(self.run.compute_dtype)

    def _on_oom(self, old_budget: int, new_budget: int) -> None:
        self.state.counters["oom_retries"] += 1
        self.budget = new_budget
        self.run.optimizer.zero_grad(set_to_none=True)

    def _backward_all(self, batch: StepBatch, budget: int | None) -> dict:
        """Forward + backward of every micro-batch; gradients accumulate into .grad."""
        self.run.optimizer.zero_grad(set_to_none=True)  # a retried attempt starts clean
        cfg, n_mb, n_pad, tokens, pad, real = self.cfg, 0, 0, 0, 0, 0
        loss_sum = torch.zeros((), device=self.run.device)  # on device: no sync per micro-batch
        token_sums = {}  # the kernel's token-mean metrics (clip fractions, KL, entropy) x tokens, on device
        pairs = []  # (trainer log-probs, engine log-probs) per sample, for the train/inference mismatch
        is_stats, mask_stats = WeightStats(cfg.rollout_is_cap), MaskStats()  # rollout correction's weights, masks

        def policy_loss(hidden, weight):
            return fused_policy_loss(
                *self._head_inputs(hidden, weight), mb.targets, mb.completion_cu_seqlens, mb.advantages,
                token_weights=loss_token_weights(cfg.loss_type, mb.completion_cu_seqlens, batch.normaliser,
                                                 num_tokens=mb.targets.numel()),
                old_logps=mb.old_logps, ref_logps=mb.ref_logps,
                return_entropy=cfg.kernel not in ("cce", "liger"),  # free in the same pass elsewhere, not there
                pg_weights=policy_weights(cfg, mb, members, batch.entropy_threshold, pg_weights(cfg, mb, is_stats),
                                          mask_stats),
                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, **policy_loss_options(cfg),
                beta=cfg.beta, kl_estimator=cfg.kl_estimator, temperature=cfg.temperature, backend=cfg.kernel)

        for mb, members in self._microbatches(list(batch.kept), budget, fallback=batch.samples[0]):
            if not members:
                fsdp.head_forward(self.model, mb, fsdp.zero_loss, self._autocast).backward()
                n_pad += 1
                continue
            out = fsdp.head_forward(self.model, mb, policy_loss, self._autocast)
            out.loss.backward()
            n_tok = mb.targets.numel()
            loss_sum = loss_sum + out.loss.detach()
            for key, value in out.metrics.items():
                token_sums[key] = token_sums.get(key, 0.0) + value * n_tok
            tokens, n_mb = tokens + n_tok, n_mb + 1
            pad, real = pad + mb.meta.get("padding_tokens", 0), real + mb.meta.get("real_tokens", 0)
            if members[0].sampler_logps is not None:
                cu = mb.completion_cu_seqlens.tolist()
                pairs += [(out.logps[cu[j] : cu[j + 1]], s.sampler_logps) for j, s in enumerate(members)]
        means = {key: float(v) / max(tokens, 1) for key, v in token_sums.items()}
        stats = {"loss": float(loss_sum), "microbatches": n_mb, "clip_fraction": means.get("clip_fraction", 0.0),
                 "tokens/loss": tokens, "tokens/padding": pad, "tokens/real": real,
                 **({"fsdp/padding_microbatches": n_pad} if self.sharded else {})}
        for key, name in (("clip_low_fraction", "clip/low_fraction"), ("clip_high_fraction", "clip/high_fraction"),
                          ("clip_delta_fraction", "clip/delta_fraction"), ("entropy_mean", "entropy/mean")):
            if key in means:
                stats[name] = means[key]
        if cfg.beta > 0:
            stats["kl"] = means.get("kl_mean", 0.0)
        if pairs:
            stats.update(inference_mismatch(*zip(*pairs)))
        stats.update(is_stats.metrics())
        stats.update(mask_stats.metrics())
        return stats

    def _optimizer_step(self) -> dict:
        cfg, params = self.cfg, [p for p in self.model.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else math.inf)
        norm = fsdp.local(norm)  # sharded gradients: a DTensor norm over every rank's shards
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
