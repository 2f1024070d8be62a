"""Held-out evaluation on problems never seen in SFT or RL: greedy accuracy, and pass@1 / pass@k from
`num_eval_samples` sampled completions per problem (the unbiased estimator of Chen et al. 2021)."""
from __future__ import annotations

import math

from fastdash.rewards import score_completions
from fastdash.rewards.weighted import accuracy_reward
from fastdash.rollout.base import SamplingParams


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k).

    Computed as the product 1 - prod_{j=n-c+1}^{n} (1 - k/j): the binomials themselves overflow a float
    for n in the hundreds, the product's terms all lie in [0, 1)."""
    if not 0 <= c <= n:
        raise ValueError(f"pass@k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass@k: need 1 <= k <= n (k samples drawn from the n generated), got n={n}, k={k}; "
                         "raise num_eval_samples")
    if n - c < k:  # every k-subset holds a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / j for j in range(n - c + 1, n + 1))


def _correct(run, params: SamplingParams, n: int) -> list[int]:
    """How many of `n` completions per held-out problem earn reward 1, in problem order."""
    cfg, problems = run.cfg, run.eval_problems
    per_call = max(1, cfg.eval_batch_size // n)  # eval_batch_size bounds the completions per engine call
    texts = []
    for i in range(0, len(problems), per_call):
        call_params = params if params.seed is None else SamplingParams(**{**params.__dict__,
                                                                           "seed": params.seed * 1009 + i})
        chunk = problems[i : i + per_call]
        completions = run.engine.generate([run.prompt_ids(p) for p in chunk], n, call_params)
        texts += [run.decode(c.completion_ids) for c in completions]
    rewards, _ = score_completions(accuracy_reward(run.reward_fn), texts, [p for p in problems for _ in range(n)])
    return [sum(r >= 1.0 for r in rewards[j * n : (j + 1) * n]) for j in range(len(problems))]


def _params(cfg, greedy: bool, seed: int | None) -> SamplingParams:
    return SamplingParams(max_tokens=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
                          top_k=cfg.top_k, greedy=greedy, seed=seed)


def accuracy(run, *, greedy: bool, seed: int = 0) -> float:
    """Mean reward (1 = correct) of one completion per held-out problem."""
    correct = _correct(run, _params(run.cfg, greedy, None if greedy else seed), 1)
    return sum(correct) / len(correct)


def pass_metrics(run, seed: int) -> dict:
    """eval/pass@1 and eval/pass@k (k = num_eval_samples) averaged over the held-out problems."""
    k = run.cfg.num_eval_samples
    correct = _correct(run, _params(run.cfg, False, seed), k)
    return {f"eval/pass@{m}": sum(pass_at_k(k, c, m) for c in correct) / len(correct) for m in sorted({1, k})}


def evaluate(run, step: int) -> dict:
    out = {"step": step, "eval/accuracy_greedy": accuracy(run, greedy=True)}
    if run.cfg.eval_sampled:
        out.update(pass_metrics(run, seed=run.cfg.seed + step))
        out["eval/accuracy_sampled"] = out["eval/pass@1"]  # the key before pass@k existed
    return out


def pass_keys(cfg) -> list[str]:
    """The pass@ keys every run reports (None where sampled evaluation is off)."""
    return [f"eval/pass@{m}" for m in sorted({1, cfg.num_eval_samples})]
