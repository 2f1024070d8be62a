"""Advantages, the gradient filter and the normaliser, against hand-computed values."""
from __future__ import annotations

import itertools
import math

import pytest
import torch

from fastdash.algo import gradient_filter, group_advantages, loss_normaliser
from tests.numerics import assert_fp32_close


def test_group_advantages_std_scaled_like_the_paper():
    r = [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    a = group_advantages(torch.tensor(r), 4, "group")
    expected = []  # by hand in float64: (r - mean) / (unbiased std + 1e-4), per group of 4
    for g in (r[:4], r[4:]):
        mean = sum(g) / 4
        std = math.sqrt(sum((x - mean) ** 2 for x in g) / 3)
        expected += [(x - mean) / (std + 1e-4) for x in g]
    assert_fp32_close(a, torch.tensor(expected, dtype=torch.float64), n_terms=4, what="group advantages")


def test_unscaled_advantages_are_centred_rewards():
    r = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert torch.equal(group_advantages(r, 2, "none"), torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_binary_rewards_g4_abs_advantages_take_four_values():
    values = set()
    for bits in itertools.product([0.0, 1.0], repeat=4):
        values |= {round(abs(x), 3) for x in group_advantages(torch.tensor(bits), 4).tolist()}
    assert values == {0.0, 0.5, 0.866, 1.5}


@pytest.mark.parametrize("tau", [0.01, 0.1, 0.49])
def test_filter_drops_exactly_zero_variance_groups_for_tau_below_half(tau):
    r = torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0, 1, 0, 0, 0, 1, 1, 0, 1])
    keep = gradient_filter(group_advantages(r, 4), tau)
    assert keep.tolist() == [False] * 8 + [True] * 8


def test_filter_is_strictly_greater_than_tau():
    a = torch.tensor([-0.5, 0.5, 0.4999, 0.5001, 0.0])
    assert gradient_filter(a, 0.5).tolist() == [False, False, False, True, False]


def test_normalisers():
    kept, all_ = [3, 5], [3, 5, 7, 1]
    assert loss_normaliser("grpo", kept, all_, 10) == 2
    assert loss_normaliser("bnpo", kept, all_, 10) == 8
    assert loss_normaliser("dr_grpo", kept, all_, 10) == 20
    assert loss_normaliser("dapo", kept, all_, 10) == 16
    with pytest.raises(ValueError, match="loss_type"):
        loss_normaliser("ppo", kept, all_, 10)


def test_bad_reward_shape_is_reported():
    with pytest.raises(ValueError, match="num_generations=4"):
        group_advantages(torch.ones(6), 4)
