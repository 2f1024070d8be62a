"""Math / GSM8K / arithmetic rewards, the registry and failure-safe scoring."""

import logging
import math
import sys
import types

import pytest

from fastdash.rewards import REWARDS, get_reward_fn, score_completions
from fastdash.rewards.math import (arithmetic_reward, extract_boxed, extract_gsm8k, gsm8k_reward,
                                   math_reward)


@pytest.mark.parametrize("text, expected", [
    (r"so \boxed{5}", "5"),
    (r"first \boxed{1} then \boxed{2}", "2"),
    (r"\boxed{\frac{1}{2}}", r"\frac{1}{2}"),
    (r"\boxed{\left( 3, \frac{\pi}{2} \right)}", r"\left( 3, \frac{\pi}{2} \right)"),
    (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),
    (r"\fbox{7}", "7"),
    (r"\boxed 9.", "9."),
    (r"\boxed{x^{2^{3}}} done", "x^{2^{3}}"),
    ("no box here", None),
    (r"\boxed{unclosed {", None),
])
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips.\n#### 72", "72"),
    ("#### 1,000", "1000"),
    ("The answer is -5.", "-5"),
    ("#### 3\nthen rambling 99", "3"),
    ("it costs $1,234.50 in total", "1234.50"),
    ("no digits", None),
])
def test_extract_gsm8k(text, expected):
    assert extract_gsm8k(text) == expected


# (completion, gold, reward): gold answers in MATH / MATH-500 format.
MATH_CASES = [
    (r"... so the answer is $\boxed{\frac{1}{2}}$.", r"\frac{1}{2}", 1.0),
    (r"$\boxed{0.5}$", r"\frac{1}{2}", 1.0),
    (r"$\boxed{1/2}$", r"\frac{1}{2}", 1.0),
    (r"\boxed{\dfrac{1}{2}}", r"\frac12", 1.0),
    (r"\boxed{(3,\pi/2)}", r"\left( 3, \frac{\pi}{2} \right)", 1.0),
    (r"\boxed{[2, 5)}", "[2,5)", 1.0),
    (r"\boxed{(2, 5)}", "[2,5)", 0.0),
    (r"\boxed{\sqrt{8}}", r"2\sqrt{2}", 1.0),
    (r"\boxed{10\text{ cm}}", "10", 1.0),
    (r"\boxed{\$18}", "18", 1.0),
    (r"\boxed{1,000}", "1000", 1.0),
    (r"\boxed{-3}", "-3", 1.0),
    (r"\boxed{3}", "-3", 0.0),
    (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{2}\sqrt{3}", 1.0),
    (r"\boxed{x^2+1}", "1+x^2", 1.0),
    (r"\boxed{5}", "6", 0.0),
    ("the answer is 1/2", r"\frac{1}{2}", 0.0),  # no box: 0
    (r"\boxed{\text{(C)}}", "C", 1.0),
    ("", "1", 0.0),
]


@pytest.mark.parametrize("completion, gold, expected", MATH_CASES)
def test_math_reward(completion, gold, expected):
    assert math_reward(completion, gold) == expected


@pytest.mark.parametrize("completion, gold, expected", [
    ("She pays 3*6 = 18 dollars.\n#### 18", "18", 1.0),
    ("#### 1,000", "1000", 1.0),
    ("So the total is $1,000.", "1000", 1.0),
    (r"The answer is \boxed{-4}", "-4", 1.0),
    ("#### 72.0", "72", 1.0),
    ("#### 71", "72", 0.0),
    ("I don't know", "72", 0.0),
])
def test_gsm8k_reward(completion, gold, expected):
    assert gsm8k_reward(completion, gold) == expected


def test_arithmetic_reward():
    assert arithmetic_reward("579", "579") == 1.0
    assert arithmetic_reward(" 579\n", "579") == 1.0
    assert arithmetic_reward("578", "579") == 0.0
    assert arithmetic_reward("579 apples", "579") == 0.0
    assert arithmetic_reward("", "579") == 0.0


def test_math_reward_off_main_thread():
    # math-verify's signal timeouts only work in the main thread: the reward must still work.
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(2) as pool:
        assert pool.submit(math_reward, r"\boxed{0.5}", r"\frac{1}{2}").result() == 1.0


def test_registry_by_name():
    assert set(REWARDS) >= {"math", "gsm8k", "arithmetic", "code"}
    assert get_reward_fn("math") is math_reward
    assert get_reward_fn("arithmetic") is arithmetic_reward


@pytest.fixture
def user_module(monkeypatch):
    mod = types.ModuleType("fd_user_rewards")
    mod.length_reward = lambda completion, answer, **row: float(len(completion) == int(answer))
    monkeypatch.setitem(sys.modules, "fd_user_rewards", mod)
    return mod


@pytest.mark.parametrize("path", ["fd_user_rewards:length_reward", "fd_user_rewards.length_reward"])
def test_registry_by_dotted_path(user_module, path):
    fn = get_reward_fn(path)
    assert fn is user_module.length_reward
    assert fn("abc", "3") == 1.0


@pytest.mark.parametrize("bad", ["nosuchreward", "fd_no_such_module:f", "fd_user_rewards:missing", ""])
def test_registry_errors(user_module, bad):
    with pytest.raises(ValueError):
        get_reward_fn(bad)


def test_score_completions_failures_scored_zero_and_logged_once(caplog):
    def flaky(completion, answer, **row):
        if completion == "raise":
            raise RuntimeError("boom")
        return {"nan": math.nan, "none": None, "str": "x", "ok": 1.0, "true": True}[completion]

    completions = ["ok", "raise", "raise", "raise", "nan", "none", "str", "true"]
    rows = [{"answer": "1", "extra": i} for i in range(len(completions))]
    with caplog.at_level(logging.WARNING, logger="fastdash"):
        rewards, n_failed = score_completions(flaky, completions, rows)
    assert rewards == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert n_failed == 6
    raised = [r for r in caplog.records if "RuntimeError" in r.getMessage()]
    assert len(raised) == 1 and "3 of 8" in raised[0].getMessage()
    assert len(caplog.records) == 4  # one line per kind: raised, NaN, None, non-number


def test_score_completions_passes_row_fields():
    seen = []

    def fn(completion, answer, **row):
        seen.append((completion, answer, row))
        return 0.5

    rewards, n_failed = score_completions(fn, ["a"], [{"answer": "g", "prompt": "p", "tests": [1]}])
    assert rewards == [0.5] and n_failed == 0
    assert seen == [("a", "g", {"prompt": "p", "tests": [1]})]


def test_score_completions_length_mismatch():
    with pytest.raises(ValueError):
        score_completions(math_reward, ["a", "b"], [{"answer": "1"}])


def test_score_completions_math_registry():
    rows = [{"answer": r"\frac{1}{2}"}] * 3
    rewards, n_failed = score_completions(get_reward_fn("math"),
                                          [r"\boxed{0.5}", r"\boxed{2}", "none"], rows)
    assert rewards == [1.0, 0.0, 0.0] and n_failed == 0
