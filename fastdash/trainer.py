"""The DASH training step, top to bottom.

    rollout:  prompts -> engine (one call per generation_batch_size samples) -> rewards
              -> group advantages -> [old / reference log-probs of the samples that will be kept]
    optimize: gradient filter (|A| > tau, before any forward) -> fixed normaliser
              -> micro-batches (packed under a token budget, or padded) -> fused loss -> backward
              -> clip, step, schedule -> weight sync to the engine

Preemptive sampling is `generation_batch_size >= train_batch_size`: one engine call fills the step
(or several steps: Mini, Multi). Baseline GRPO is `generation_batch_size = micro_batch_size`: many
small calls for the same samples. Both then run the identical optimize().
Setup (model, data, engine, optimizer, plan) lives in `fastdash.runtime`; RNG and data position live
in `TrainState`, the one object a checkpoint needs besides weights and optimizer.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch

from fastdash.algo import gradient_filter, group_advantages, loss_normaliser, loss_token_weights
from fastdash.batch import Sample
from fastdash.forward import forward_hidden
from fastdash.packing import collate_packed, collate_padded, plan_microbatches, plan_padded_microbatches
from fastdash.rewards import score_completions
from fastdash.rollout.base import SamplingParams
from fastdash.oom import run_with_oom_backoff
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
    def __init__(self, cfg, run):
        """`run` is a `fastdash.runtime.Run`: model, tokenizer, engine, problems, reward, optimizer."""
        self.cfg, self.run = cfg, run
        self.model, self.tok, self.engine = run.model, run.tokenizer, run.engine
        self.state = run.state
        self.sampler = PromptSampler(len(run.train_problems), cfg.seed, cfg.shuffle, self.state)
        self.timer = run.timer
        self.buffer: list[list[Sample]] = []  # step batches of the current rollout
        self.budget = self._initial_budget() if cfg.packing else None
        self.lm_head = self.model.get_output_embeddings()

    def _initial_budget(self) -> int:
        """Pinned budget, else the scheduler's plan, else room for the longest possible sample."""
        if isinstance(self.cfg.max_tokens_per_microbatch, int):
            return self.cfg.max_tokens_per_microbatch
        if self.run.plan is not None:
            return self.run.plan.max_tokens_per_microbatch
        return self.cfg.max_prompt_length + self.cfg.max_completion_length

    # ------------------------------------------------------------------ rollout ------------------
    def rollout(self) -> dict:
        cfg, G = self.cfg, self.cfg.num_generations
        n_prompts = cfg.rollout_size // G
        problems = [self.run.train_problems[i] for i in self.sampler.take(n_prompts)]
        prompt_ids = [self.run.prompt_ids(p) for p in problems]
        params = self._sampling_params()
        forced = (self.run.forced_lengths(self.state.rollouts, cfg.rollout_size)  # benchmarks only
                  if cfg.length_control_mean else None)
        completions = []
        per_call = cfg.generation_batch_size // G  # baseline GRPO: many small calls, DASH: one
        with self.timer("generate"):
            self.engine.wake()
            for i in range(0, n_prompts, per_call):
                completions += self._generate(prompt_ids[i : i + per_call], self._call_params(params, forced, i * G, per_call * G))
            self.engine.sleep()
        with self.timer("reward"):
            texts = [self.run.decode(c.completion_ids) for c in completions]
            rows = [p for p in problems for _ in range(G)]
            rewards, failed = score_completions(self.run.reward_fn, texts, rows)
            advantages = group_advantages(torch.tensor(rewards), G, cfg.scale_rewards)
        self.state.counters["reward_failures"] += failed
        samples = [Sample(uid=i, group=i // G, prompt_ids=c.prompt_ids, completion_ids=c.completion_ids,
                          truncated=c.truncated, reward=r, advantage=float(a), sampler_logps=c.sampler_logps)
                   for i, (c, r, a) in enumerate(zip(completions, rewards, advantages.tolist()))]
        self._old_and_ref_logps(self._kept(samples))
        steps = [samples[i : i + cfg.train_batch_size] for i in range(0, len(samples), cfg.train_batch_size)]
        self.buffer = [batch for _ in range(cfg.num_iterations) for batch in steps]
        self.state.rollouts += 1
        self.state.samples += len(samples)
        return {"reward/failures": failed, "rollout/samples": len(samples)}

    def _generate(self, prompts: list[list[int]], params: SamplingParams):
        """One engine call; on OOM the engine's concurrency is halved and the call retried (same seed,
        so the same samples), when the engine exposes `max_batch_size` (the HF engine)."""
        if not hasattr(self.engine, "max_batch_size"):
            return self.engine.generate(prompts, self.cfg.num_generations, params)
        rows = len(prompts) * self.cfg.num_generations

        def call(concurrency: int):
            self.engine.max_batch_size = concurrency
            return self.engine.generate(prompts, self.cfg.num_generations, params)

        def shrink(old: int, new: int) -> None:
            self.state.counters["oom_retries"] += 1

        return run_with_oom_backoff(call, min(self.engine.max_batch_size or rows, rows), on_backoff=shrink,
                                    what="generation batch", plan=self.run.plan)

    def _sampling_params(self) -> SamplingParams:
        c = self.cfg
        return SamplingParams(max_tokens=c.max_completion_length, temperature=c.temperature, top_p=c.top_p,
                              top_k=c.top_k, seed=c.seed * 7919 + self.state.rollouts)

    @staticmethod
    def _call_params(params: SamplingParams, forced: list[int] | None, start: int, count: int) -> SamplingParams:
        """Per-call parameters: the seed moves per call, the rollout's forced lengths are sliced per call."""
        return SamplingParams(**{**params.__dict__, "seed": params.seed * 1009 + start,
                                 "forced_lengths": tuple(forced[start : start + count]) if forced else None})

    def _kept(self, samples: list[Sample]) -> list[Sample]:
        """The samples that reach the loss: DASH's gradient filter (|A| > tau), minus empty and, with
        mask_truncated_completions, truncated completions."""
        keep = [True] * len(samples)
        if self.cfg.gradient_filtering:
            advantages = torch.tensor([s.advantage for s in samples])
            keep = gradient_filter(advantages, self.cfg.gradient_filtering_threshold).tolist()
        return [s for s, k in zip(samples, keep)
                if k and s.completion_ids and not (self.cfg.mask_truncated_completions and s.truncated)]

    @torch.no_grad()
    def _old_and_ref_logps(self, kept: list[Sample]) -> None:
        """Log-probs under the sampling policy (Mini / Multi) and the reference (beta > 0), computed
        once per rollout with the same packing as training. Skipped at K = 1 on-policy and beta = 0."""
        passes = []
        if self.cfg.needs_old_logps:
            passes.append(("old_logps", self.model))
        if self.cfg.beta > 0:
            passes.append(("ref_logps", self.run.ref_model))
        if not passes or not kept:
            return
        with self.timer("logprob"):
            for attr, model in passes:
                for mb, members in self._microbatches(kept):
                    hidden = forward_hidden(model, mb)
                    logps = fused_linear_logprob(hidden, model.get_output_embeddings().weight, mb.targets,
                                                 temperature=self.cfg.temperature, backend=self.cfg.kernel)
                    cu = mb.completion_cu_seqlens.tolist()
                    for j, s in enumerate(members):
                        setattr(s, attr, logps[cu[j] : cu[j + 1]].float().cpu())

    # ------------------------------------------------------------------ optimize -----------------
    def _microbatches(self, samples: list[Sample], budget: int | None = None):
        device = self.run.device
        if self.cfg.packing:
            groups = plan_microbatches([s.length for s in samples], budget or self.budget,
                                       allow_oversize=False)
            for idx in groups:
                members = [samples[i] for i in idx]
                yield collate_packed(members).to(device), members
        else:
            for idx in plan_padded_microbatches(len(samples), self.cfg.micro_batch_size):
                members = [samples[i] for i in idx]
                yield collate_padded(members, self.run.pad_id).to(device), members

    def optimize(self, samples: list[Sample]) -> dict:
        cfg = self.cfg
        kept = self._kept(samples)  # the gradient filter, before any forward pass
        metrics = {"filter/kept_fraction": len(kept) / len(samples), "filter/kept_samples": len(kept),
                   "adv/abs_mean_kept": (sum(abs(s.advantage) for s in kept) / len(kept)) if kept else 0.0}
        if not kept:
            self.state.counters["skipped_empty_steps"] += 1
            log.info("step %d: every sample was filtered (|A| <= %.3g): no forward, no optimizer step",
                     self.state.step + 1, cfg.gradient_filtering_threshold)
            return {**metrics, "loss": 0.0, "skipped": 1}
        normaliser = loss_normaliser(cfg.loss_type, [len(s.completion_ids) for s in kept],
                                     [len(s.completion_ids) for s in samples], cfg.max_completion_length)
        with self.timer("backward"):
            if cfg.packing:
                stats = run_with_oom_backoff(lambda budget: self._backward_all(kept, normaliser, budget),
                                             self.budget, on_backoff=self._on_oom, plan=self.run.plan,
                                             min_budget=max(s.length for s in kept))
            else:
                stats = self._backward_all(kept, normaliser, None)
        metrics.update(stats)
        with self.timer("optimizer"):
            metrics.update(self._optimizer_step())
        with self.timer("sync"):
            self.engine.sync_weights(self.model)
        return metrics

    def _on_oom(self, old_budget: int, new_budget: int) -> None:
        self.state.counters["oom_retries"] += 1
        self.budget = new_budget
        self.run.optimizer.zero_grad(set_to_none=True)

    def _backward_all(self, kept: list[Sample], normaliser: float, budget: int | None) -> dict:
        """Forward + backward of every micro-batch; gradients accumulate into .grad."""
        self.run.optimizer.zero_grad(set_to_none=True)  # a retried attempt starts clean
        cfg, n_mb, tokens, pad = self.cfg, 0, 0, 0
        loss_sum = clip_sum = kl_sum = torch.zeros((), device=self.run.device)  # summed on device: no sync per micro-batch
        pairs = []  # (trainer log-probs, engine log-probs) per sample, for the train/inference mismatch
        for mb, members in self._microbatches(kept, budget):
            hidden = forward_hidden(self.model, mb)
            out = fused_policy_loss(
                hidden, self.lm_head.weight, mb.targets, mb.completion_cu_seqlens, mb.advantages,
                token_weights=loss_token_weights(cfg.loss_type, mb.completion_cu_seqlens, normaliser),
                old_logps=mb.old_logps, ref_logps=mb.ref_logps,
                epsilon=cfg.epsilon, epsilon_high=cfg.epsilon_high, beta=cfg.beta,
                kl_estimator=cfg.kl_estimator, temperature=cfg.temperature,
                backend=cfg.kernel)
            out.loss.backward()
            n_tok = mb.targets.numel()
            loss_sum = loss_sum + out.loss.detach()
            clip_sum = clip_sum + out.metrics.get("clip_fraction", 0.0) * n_tok
            kl_sum = kl_sum + out.metrics.get("kl_mean", 0.0) * n_tok
            tokens, n_mb = tokens + n_tok, n_mb + 1
            pad += mb.meta.get("padding_tokens", 0)
            if members[0].sampler_logps is not None:
                cu = mb.completion_cu_seqlens.tolist()
                pairs += [(out.logps[cu[j] : cu[j + 1]], s.sampler_logps) for j, s in enumerate(members)]
        stats = {"loss": float(loss_sum), "microbatches": n_mb, "clip_fraction": float(clip_sum) / max(tokens, 1),
                 "tokens/loss": tokens, "tokens/padding": pad}
        if cfg.beta > 0:
            stats["kl"] = float(kl_sum) / max(tokens, 1)
        if pairs:
            from fastdash.rollout.vllm import inference_mismatch

            stats.update(inference_mismatch(*zip(*pairs)))
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

    # ------------------------------------------------------------------ one step -----------------
    def step(self) -> dict:
        """One optimizer step; a rollout first when the buffer is empty. Returns the step's metrics."""
        rollout_metrics = self.rollout() if not self.buffer else {}
        batch = self.buffer.pop(0)
        metrics = {**rollout_metrics, **batch_stats(batch), **self.optimize(batch)}
        self.state.step += 1
        return {"step": self.state.step, **metrics, **self.timer.pop_step()}


def batch_stats(batch: list[Sample]) -> dict:
    """Reward and length statistics of the samples one optimizer step trains on."""
    rewards = torch.tensor([s.reward for s in batch])
    lengths = [len(s.completion_ids) for s in batch]
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(batch) > 1 else 0.0,
            "completion/mean_length": sum(lengths) / len(batch),
            "completion/truncated_fraction": sum(s.truncated for s in batch) / len(batch)}
