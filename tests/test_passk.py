"""pass@k: the unbiased estimator against enumeration, the held-out evaluation, and a run's outputs."""
from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
import torch

from fastdash.batch import Completion
from fastdash.evaluate import evaluate, pass_at_k
from fastdash.runtime import build_run
from fastdash.train import run_training

from tests.conftest import tiny_config

EPS64 = torch.finfo(torch.float64).eps


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Fraction of the k-subsets of n samples (the first c correct) holding at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return Fraction(sum(any(i < c for i in s) for s in subsets), len(subsets))


def test_matches_enumeration_over_all_subsets():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                # n roundings of factors in [0, 1] and one subtraction: a few float64 ulps of 1
                assert abs(pass_at_k(n, c, k) - brute_force(n, c, k)) <= 2 * (n + 1) * EPS64, (n, c, k)


def test_matches_exact_binomials_where_floats_would_overflow():
    n = 2000  # C(2000, 1000) ~ 1e600: the textbook formula in floats overflows, the product does not
    for c, k in ((0, 7), (1, 1), (3, 10), (50, 1000), (1990, 5)):
        exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        assert abs(pass_at_k(n, c, k) - exact) <= 2 * (n + 1) * EPS64, (c, k)


def test_pass_at_1_is_the_fraction_correct():
    for n in range(1, 9):
        for c in range(n + 1):
            assert abs(pass_at_k(n, c, 1) - c / n) <= 2 * (n + 1) * EPS64


def test_edge_cases():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 0, 5) == 0.0  # nothing correct: exactly 0
    assert pass_at_k(5, 5, 1) == 1.0 and pass_at_k(5, 5, 5) == 1.0  # everything correct: exactly 1
    assert pass_at_k(5, 1, 5) == 1.0  # k = n: any correct sample is drawn
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(3, 1, 0)
    with pytest.raises(ValueError, match="c <= n"):
        pass_at_k(3, 4, 1)


class AnswerEngine:
    """Greedy: correct on even problems. Sampled: problem i gets i % (n + 1) correct answers out of n."""

    name = "answers"

    def __init__(self, run):
        self.run, self.calls = run, []
        self.index = {tuple(run.prompt_ids(p)): (i, p["answer"]) for i, p in enumerate(run.eval_problems)}

    def generate(self, prompts, n, params):
        self.calls.append((len(prompts), n, params.greedy))
        out = []
        for p in prompts:
            i, answer = self.index[tuple(p)]
            right = (i % 2 == 0) if params.greedy else i % (n + 1)
            for j in range(n):
                text = answer if j < right else answer + "0"
                out.append(Completion(list(p), self.run.tokenizer(text, add_special_tokens=False).input_ids,
                                      truncated=False))
        return out


def test_evaluate_reports_greedy_pass1_and_passk():
    cfg = tiny_config(num_eval_problems=20, num_eval_samples=4, eval_batch_size=10)
    run = build_run(cfg, with_plan=False)
    run.engine = AnswerEngine(run)
    e = evaluate(run, step=0)
    right = [i % 5 for i in range(20)]
    assert e["eval/accuracy_greedy"] == 0.5
    assert e["eval/pass@1"] == pytest.approx(sum(r / 4 for r in right) / 20, abs=1e-12)
    assert e["eval/pass@4"] == pytest.approx(sum(r > 0 for r in right) / 20, abs=1e-12)
    assert e["eval/accuracy_sampled"] == e["eval/pass@1"]
    # greedy: one completion per problem; sampled: 4 per problem, at most eval_batch_size per call
    assert run.engine.calls == [(10, 1, True)] * 2 + [(2, 4, False)] * 10


def test_no_sampled_evaluation_when_off():
    cfg = tiny_config(num_eval_problems=6, eval_sampled=False)
    run = build_run(cfg, with_plan=False)
    run.engine = AnswerEngine(run)
    assert set(evaluate(run, step=0)) == {"step", "eval/accuracy_greedy"}


def test_num_eval_samples_must_be_positive():
    with pytest.raises(ValueError, match="num_eval_samples"):
        tiny_config(num_eval_samples=0)


def test_short_run_reports_pass_at_k(tmp_path, capsys):
    from fastdash.train import report

    cfg = tiny_config(output_dir=str(tmp_path), max_steps=1, num_eval_problems=8, num_eval_samples=3,
                      plots=True)
    summary = run_training(cfg, tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for key in ("eval/pass@1_before", "eval/pass@1_after", "eval/pass@3_before", "eval/pass@3_after",
                "eval/accuracy_before", "eval/accuracy_after"):
        assert 0.0 <= on_disk[key] <= 1.0, key
    assert on_disk["eval/num_eval_samples"] == 3
    assert on_disk["eval/accuracy_sampled_after"] == on_disk["eval/pass@1_after"]
    evals = [json.loads(x) for x in (tmp_path / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 1]
    assert all({"eval/accuracy_greedy", "eval/pass@1", "eval/pass@3"} <= set(e) for e in evals)
    assert all(e["eval/pass@1"] <= e["eval/pass@3"] for e in evals)  # more draws never pass less often
    assert (tmp_path / "reward.png").exists()
    report(summary, tmp_path)
    table = capsys.readouterr().out
    assert "held-out pass@1, 3 samples per problem" in table and "held-out pass@3" in table
