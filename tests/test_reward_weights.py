"""reward_weights and multi_objective_aggregation (TRL's names and semantics): the advantage maths
against float64 references, and the weighted rewards through the real trainer step."""
from __future__ import annotations

import statistics

import pytest
import torch

from fastdash.algo import group_advantages, multi_reward_advantages
from fastdash.evaluate import evaluate
from fastdash.rewards.weighted import WeightedReward, build_reward
from fastdash.rewards.math import arithmetic_reward
from fastdash.trainer import Trainer
from tests.conftest import digit_sum_reward, tiny_config

EPS32 = torch.finfo(torch.float32).eps
G = 4


def _groups(xs: list[float]) -> list[list[float]]:
    return [xs[i : i + G] for i in range(0, len(xs), G)]


def ref_sum_then_normalize(rows: list[list[float]], w: list[float], scale: str) -> list[float]:
    """TRL: r = sum_k w_k r_k; A = (r - group mean) / (std + 1e-4), std per group, over the batch or none."""
    r = [sum(wk * x for wk, x in zip(w, row)) for row in rows]
    out = []
    for g in _groups(r):
        m = statistics.fmean(g)
        s = {"group": statistics.stdev(g), "batch": statistics.stdev(r), "none": None}[scale]
        out += [(x - m) / (s + 1e-4) if s is not None else x - m for x in g]
    return out


def ref_normalize_then_sum(rows: list[list[float]], w: list[float]) -> list[float]:
    """TRL (GDPO): each function normalised in its group, weighted sum, then normalised over the batch."""
    total = [0.0] * len(rows)
    for k, wk in enumerate(w):
        for gi, g in enumerate(_groups([row[k] for row in rows])):
            m, s = statistics.fmean(g), statistics.stdev(g)
            for j, x in enumerate(g):
                total[gi * G + j] += wk * (x - m) / (s + 1e-4)
    m, s = statistics.fmean(total), statistics.stdev(total)
    return [(t - m) / (s + 1e-4) for t in total]


def _rewards(seed: int = 0, m: int = 16, k: int = 3) -> list[list[float]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(m, k, generator=g, dtype=torch.float64) * 3 - 1
    x[:, 0] = (x[:, 0] > 0.3).double()  # a binary correctness reward beside two continuous ones
    return x.tolist()


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_sum_then_normalize_matches_the_float64_reference(scale):
    rows, w = _rewards(), [1.0, 0.5, -0.25]
    ref = ref_sum_then_normalize(rows, w, scale)
    got = multi_reward_advantages(torch.tensor(rows, dtype=torch.float64), w, G, scale, "sum_then_normalize")
    assert got.dtype == torch.float32
    # group_advantages works in fp32: inputs and means carry ~eps32 x max|r| each, then / std
    r = [sum(wk * x for wk, x in zip(w, row)) for row in rows]
    stds = [statistics.stdev(g) + 1e-4 for g in _groups(r)] if scale == "group" else [statistics.stdev(r) + 1e-4]
    tol = 4 * EPS32 * (max(map(abs, r)) / (min(stds) if scale != "none" else 1.0) + max(map(abs, ref)))
    assert max(abs(a - b) for a, b in zip(got.tolist(), ref)) <= tol


def test_normalize_then_sum_matches_the_float64_reference_and_ignores_scale_rewards():
    rows, w = _rewards(seed=1), [1.0, 0.5, -0.25]
    ref = ref_normalize_then_sum(rows, w)
    outs = [multi_reward_advantages(torch.tensor(rows, dtype=torch.float64), w, G, scale, "normalize_then_sum")
            for scale in ("group", "batch", "none")]
    # computed in float64, rounded once to fp32: half an fp32 ulp, plus float64 noise
    for a, b in zip(outs[0].tolist(), ref):
        assert abs(a - b) <= EPS32 * abs(b) + 64 * torch.finfo(torch.float64).eps * max(map(abs, ref))
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])  # TRL: scale_rewards not applied
    # and it is not the default aggregation in disguise
    assert not torch.allclose(outs[0], multi_reward_advantages(torch.tensor(rows), w, G, "group"), atol=1e-3)


def test_one_reward_of_weight_one_is_exactly_the_plain_group_advantage():
    rows = _rewards(seed=2, k=1)
    plain = group_advantages(torch.tensor([r[0] for r in rows], dtype=torch.float32), G, "group")
    assert torch.equal(multi_reward_advantages(torch.tensor(rows, dtype=torch.float64), [1.0], G), plain)


def test_advantage_shapes_and_names_are_checked():
    with pytest.raises(ValueError, match="K = 2"):
        multi_reward_advantages(torch.zeros(8, 3), [1.0, 1.0], G)
    with pytest.raises(ValueError, match="multi_objective_aggregation"):
        multi_reward_advantages(torch.zeros(8, 2), [1.0, 1.0], G, aggregation="mean")


def length_reward(completion: str, answer: str, **_) -> float:
    return len(completion) / 8


@pytest.mark.parametrize("aggregation", ["sum_then_normalize", "normalize_then_sum"])
def test_the_trainer_weights_every_function_and_logs_each(scripted_run, aggregation):
    cfg, run = scripted_run(multi_objective_aggregation=aggregation, gradient_filtering=False)
    w = [1.0, -0.5]
    run.reward_fn = WeightedReward([digit_sum_reward, length_reward], ["digit_sum", "length"], w)
    trainer = Trainer(cfg, run)
    trainer.rollout()  # generate, score, advantages: the step's first half (optimize only reads the result)
    samples, row = trainer.buffer[0].samples, trainer.buffer[0].rollout_metrics
    texts = [run.decode(s.completion_ids) for s in samples]
    parts = [[digit_sum_reward(t, ""), length_reward(t, "")] for t in texts]
    assert len({p[0] for p in parts}) > 1 and len({p[1] for p in parts}) > 1  # both functions vary
    assert [s.reward for s in samples] == [w[0] * a + w[1] * b for a, b in parts]  # reward/mean is the weighted sum
    if aggregation == "sum_then_normalize":  # fp32 maths (group_advantages): ~eps32 x max|r| / std
        ref = ref_sum_then_normalize(parts, w, cfg.scale_rewards)
        r = [s.reward for s in samples]
        stds = [statistics.stdev(g) + 1e-4 for g in _groups(r) if len(set(g)) > 1]  # equal groups: exactly 0
        tol = 4 * EPS32 * (max(map(abs, r)) / min(stds) + max(map(abs, ref)))
    else:  # float64 maths, rounded once to fp32
        ref = ref_normalize_then_sum(parts, w)
        tol = 2 * EPS32 * max(map(abs, ref))
    assert max(abs(s.advantage - x) for s, x in zip(samples, ref)) <= tol
    assert row["rewards/digit_sum/mean"] == pytest.approx(statistics.fmean(p[0] for p in parts), rel=1e-12)
    assert row["rewards/length/std"] == pytest.approx(statistics.stdev(p[1] for p in parts), rel=1e-12)


def always_one(completion: str, answer: str, **_) -> float:
    return 1.0


def test_held_out_accuracy_scores_with_the_first_function(scripted_run):
    cfg, run = scripted_run(num_eval_problems=12, eval_sampled=False)
    run.reward_fn = arithmetic_reward
    alone = evaluate(run, 0)["eval/accuracy_greedy"]
    assert alone < 1.0  # a random model: the weighted sum (always_one adds 1) would read as 100% accuracy
    run.reward_fn = WeightedReward([arithmetic_reward, always_one], ["arithmetic", "one"], [1.0, 1.0])
    assert evaluate(run, 0)["eval/accuracy_greedy"] == alone


def test_build_reward_from_the_config():
    assert build_reward("arithmetic") is arithmetic_reward  # the default path: the plain function, unchanged
    assert build_reward(["arithmetic"], [1.0]) is arithmetic_reward
    both = build_reward(["arithmetic", "fastdash.rewards.math:gsm8k_reward", "arithmetic"], [1.0, 0.5, 2.0])
    assert both.names == ["arithmetic_0", "gsm8k_reward", "arithmetic_2"] and both.weights == [1.0, 0.5, 2.0]
    assert both("4", "4") == 1.0 + 0.5 + 2.0 and both("#### 4", "4") == 0.5  # the weighted sum
    assert isinstance(build_reward("arithmetic", [0.5]), WeightedReward)  # a weight other than 1 is kept


@pytest.mark.parametrize("overrides, key", [
    (dict(reward_weights=[1.0, 2.0]), "reward_weights"),  # one function (the task's), two weights
    (dict(reward=["arithmetic", "math"], reward_weights=[1.0]), "reward_weights"),
    (dict(reward=["arithmetic"], reward_weights=["heavy"]), "reward_weights"),
    (dict(reward=["arithmetic"], reward_weights=[float("nan")]), "reward_weights"),
    (dict(reward=[]), "reward"),
    (dict(multi_objective_aggregation="mean"), "multi_objective_aggregation"),
])
def test_bad_reward_settings_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"config: {key}="):
        tiny_config(**overrides)


def test_reward_lists_and_weights_parse_from_the_command_line():
    from fastdash.config import load_config

    cfg = load_config(None, ["reward=[arithmetic, math]", "reward_weights=[1, 0.25]",
                             "multi_objective_aggregation=normalize_then_sum"])
    assert cfg.reward == ["arithmetic", "math"] and cfg.reward_weights == [1, 0.25]
