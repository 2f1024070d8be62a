"""End-to-end benchmark under pytest-benchmark (harness.py measures, report.py summarises).

    pytest benchmarks/ --benchmark-only                      # paper-shaped size (gpu size on CUDA) + learning
    pytest benchmarks/bench_e2e.py --benchmark-only -k paper     # the paper-shaped size only (~6 min, 2 cores)
    pytest benchmarks/bench_e2e.py --benchmark-only -k learning  # tiny-arith: accuracy after equal samples
    pytest benchmarks/bench_e2e.py --benchmark-only -k smoke     # seconds: the harness end to end
    FASTDASH_BENCH_SEEDS=1 FASTDASH_BENCH_STEPS=3 pytest ...     # other run shapes

Each test is one interleaved suite (every arm, every seed). pytest-benchmark times that whole suite
as one round; the per-arm figures, paired per seed, are in the test's extra_info and in
benchmarks/results/e2e-<size>-<device>-<date>.{json,md,png} (the smoke run writes to a temp dir).
"""
from __future__ import annotations

import os

import pytest
import torch

import harness

ENV = os.environ.get
MAIN = harness.default_size("gpu" if torch.cuda.is_available() else "cpu")


def _suite(benchmark, size: str, out_dir) -> dict:
    seeds = int(ENV("FASTDASH_BENCH_SEEDS", "0")) or None
    kwargs = dict(seeds=range(seeds) if seeds else None, steps=int(ENV("FASTDASH_BENCH_STEPS", "0")) or None,
                  warmup=int(ENV("FASTDASH_BENCH_WARMUP", "1")), out_dir=out_dir)
    report = benchmark.pedantic(harness.run_suite, args=(size,), kwargs=kwargs, rounds=1, iterations=1)
    benchmark.group = f"e2e-{size}-{report['device']}"
    benchmark.extra_info.update(
        arms={a: {k: v[k] for k in ("total_s", "phases", "samples_per_s", "tokens_per_s", "kept_fraction",
                                    "padding_fraction", "step_mem_bytes") if k in v} | {
            "reduction_vs_grpo_pct": v.get("reduction_vs_grpo"), "x_fastdash_time": v.get("x_fastdash_time")}
              for a, v in report["arms"].items()},
        targets=report["targets"], trl_skipped=report["trl"]["skipped"], report=report.get("outputs", {}).get("json"))
    return report


@pytest.mark.parametrize("size", [MAIN, "learning"])
def test_e2e(benchmark, size):
    report = _suite(benchmark, size, harness.RESULTS)
    assert set(harness.DEFAULT_ARMS) <= set(report["arms"])


def test_e2e_smoke(benchmark, tmp_path):
    report = _suite(benchmark, "smoke", tmp_path)
    assert all(a["total_s"] > 0 for a in report["arms"].values())
