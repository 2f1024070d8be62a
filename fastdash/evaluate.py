"""Held-out accuracy: greedy and sampled, on problems never seen in SFT or RL."""
from __future__ import annotations

from fastdash.rewards import score_completions
from fastdash.rollout.base import SamplingParams


def accuracy(run, *, greedy: bool, seed: int = 0) -> float:
    """Mean reward (1 = correct) of one completion per held-out problem."""
    cfg, problems = run.cfg, run.eval_problems
    params = SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_k=cfg.top_k, greedy=greedy, seed=None if greedy else seed)
    texts = []
    for i in range(0, len(problems), cfg.eval_batch_size):
        chunk = problems[i : i + cfg.eval_batch_size]
        completions = run.engine.generate([run.prompt_ids(p) for p in chunk], 1, params)
        texts += [run.decode(c.completion_ids) for c in completions]
    rewards, _ = score_completions(run.reward_fn, texts, problems)
    return sum(r >= 1.0 for r in rewards) / len(rewards)


def evaluate(run, step: int) -> dict:
    out = {"step": step, "eval/accuracy_greedy": accuracy(run, greedy=True)}
    if run.cfg.eval_sampled:
        out["eval/accuracy_sampled"] = accuracy(run, greedy=False, seed=run.cfg.seed + step)
    return out
