"""End-to-end DASH vs GRPO benchmark under pytest-benchmark (the logic is in harness.py).

    pytest benchmarks/bench_e2e.py --benchmark-only
    FASTDASH_BENCH_DEVICE=gpu FASTDASH_BENCH_STEPS=3 FASTDASH_BENCH_SEEDS=1 pytest benchmarks/bench_e2e.py --benchmark-only

One session fixture runs the interleaved measurement once (every arm, every seed) and writes
benchmarks/results/e2e-<device>-<date>.{json,png,md}. Each arm's test then replays that arm's
per-seed totals into pytest-benchmark, so its table shows the same numbers, measured side by side
in one process; the reductions against GRPO go into extra_info. Never part of the test pass.
"""
from __future__ import annotations

import os

import pytest

import harness

ENV = os.environ.get


@pytest.fixture(scope="session")
def e2e_report():
    seeds = tuple(range(int(ENV("FASTDASH_BENCH_SEEDS", "3"))))
    return harness.run_suite(ENV("FASTDASH_BENCH_DEVICE") or None, seeds=seeds,
                             steps=int(ENV("FASTDASH_BENCH_STEPS", "0")) or None,
                             warmup=int(ENV("FASTDASH_BENCH_WARMUP", "1")))


def _replay(benchmark, durations: list[float]) -> None:
    """Feed measured durations to pytest-benchmark as its rounds: a clock that advances by the next
    recorded duration each time the target runs, so nothing is re-run outside the interleaving."""
    clock, it = [0.0], iter(durations)
    benchmark._timer = lambda: clock[0]  # read by pedantic's runner when it is built

    def advance():
        clock[0] += next(it)

    benchmark.pedantic(advance, rounds=len(durations), iterations=1)


@pytest.mark.parametrize("arm", harness.DEFAULT_ARMS)
def test_e2e_arm(benchmark, e2e_report, arm):
    a = e2e_report["arms"][arm]
    per_seed = [r for r in e2e_report["raw_steps"] if r["arm"] == arm and r["timed"]]
    seeds = sorted({r["seed"] for r in per_seed})
    totals = [sum(r["wall_s"] for r in per_seed if r["seed"] == s) for s in seeds]
    benchmark.group = f"e2e-{e2e_report['device']}"
    benchmark.extra_info.update(
        phases_s=a["phases"], samples_per_s=a["samples_per_s"], tokens_per_s=a["tokens_per_s"],
        reduction_vs_grpo_pct=a.get("reduction_vs_grpo"), samples=a["samples"],
        learning=a["learning"], report=e2e_report.get("outputs", {}).get("json"))
    _replay(benchmark, totals)


@pytest.mark.parametrize("arm", tuple(harness.TRL_ARMS))
def test_e2e_trl(benchmark, e2e_report, arm):
    """Arm 5 (TRL GRPOTrainer, see trl_arm.py): in the report only when trl could be run."""
    if arm not in e2e_report["arms"]:
        pytest.skip(e2e_report["trl"]["skipped"] or f"{arm} was not measured")
    test_e2e_arm(benchmark, e2e_report, arm)
    benchmark.extra_info["x_fastdash_time"] = e2e_report["arms"][arm].get("x_fastdash_time")
