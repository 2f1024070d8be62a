"""The end-to-end benchmark harness itself (benchmarks/harness.py), at tiny sizes.

Checks that arms are fair (same prompts, samples per step, optimizer steps and seed; configs differ
only in the arm's own knobs) and that reductions come from measured times, paired per seed.
"""
from __future__ import annotations

import importlib.util
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness
_spec.loader.exec_module(harness)

TINY = dict(model="random:tiny", length_control_mean=3, max_completion_length=6, max_prompt_length=16,
            train_batch_size=8, micro_batch_size=4, num_generations=4, num_threads=1,
            num_train_problems=64, num_eval_problems=8, eval_batch_size=8)


def test_arms_differ_only_in_their_own_knobs():
    cfgs = {a: harness.make_config(a, TINY, seed=3) for a in harness.ARMS}
    allowed = {"generation_batch_size", "packing", "kernel", "max_tokens_per_microbatch",
               "gradient_filtering", "gradient_filtering_threshold"}
    base = cfgs["grpo"].to_dict()
    for arm, cfg in cfgs.items():
        diff = {k for k, v in cfg.to_dict().items() if base[k] != v}
        assert diff <= allowed, (arm, diff)
        assert cfg.seed == 3 and cfg.train_batch_size == 8 and cfg.model == "random:tiny"
    assert cfgs["grpo"].generation_batch_size == cfgs["grpo"].micro_batch_size == 4  # a call per micro-batch
    assert all(cfgs[a].generation_batch_size == 8 for a in ("no_gf", "dash", "fastdash"))  # one call per step
    assert not cfgs["no_gf"].gradient_filtering and cfgs["dash"].gradient_filtering
    assert cfgs["fastdash"].packing and not cfgs["dash"].packing and cfgs["grpo"].kernel == "reference"


def test_make_config_rejects_bad_generation_batch():
    with pytest.raises(ValueError, match="generation_batch_size"):
        harness.make_config("grpo", dict(TINY, micro_batch_size=6), seed=0)  # 6 does not divide 8


@pytest.mark.slow
def test_real_arms_see_identical_prompts_and_steps():
    raw = harness.measure(("grpo", "dash", "fastdash"), size=TINY, seeds=(0, 1), steps=2, warmup=1,
                          evaluate=False, log_fn=lambda *_: None)
    for seed in (0, 1):
        rows = {a: [r for r in raw["steps"] if r["arm"] == a and r["seed"] == seed] for a in ("grpo", "dash", "fastdash")}
        ref = rows["grpo"]
        assert [r["optimizer_step"] for r in ref] == [1, 2]
        assert all(len(r["prompts"]) == 2 and r["samples"] == 8 for r in ref)
        for arm, rs in rows.items():
            assert [r["prompts"] for r in rs] == [r["prompts"] for r in ref], arm
            assert [r["samples"] for r in rs] == [r["samples"] for r in ref], arm
            assert [r["optimizer_step"] for r in rs] == [1, 2], arm
            assert all(r["wall_s"] > 0 for r in rs)
    # different seeds draw different prompts (the seed reaches the data order)
    p0 = [r["prompts"] for r in raw["steps"] if r["arm"] == "grpo" and r["seed"] == 0]
    p1 = [r["prompts"] for r in raw["steps"] if r["arm"] == "grpo" and r["seed"] == 1]
    assert p0 != p1
    summary = harness.summarise(raw)
    assert summary["grpo"]["reduction_vs_grpo"] == 0.0
    assert summary["dash"]["samples"] == summary["grpo"]["samples"] == 8


def _fake_factory(sleep_s: dict):
    """ArmRuns around fake trainers that really sleep: the harness must time them itself."""
    def factory(arm, cfg):
        state = SimpleNamespace(step=0)
        sampler = SimpleNamespace(take=lambda k: list(range(k)))

        def step():
            sampler.take(cfg.prompts_per_step)
            time.sleep(sleep_s[arm])
            state.step += 1
            return {"time/generate_s": sleep_s[arm] / 2, "completion/mean_length": 3.0, "reward/mean": 0.5,
                    "filter/kept_fraction": 1.0}

        trainer = SimpleNamespace(sampler=sampler, step=step)
        return harness.ArmRun(cfg, SimpleNamespace(state=state), trainer)
    return factory


def test_reduction_comes_from_measured_times():
    def reduction(sleeps):
        raw = harness.measure(("grpo", "dash"), size=TINY, seeds=(0,), steps=3, warmup=1, evaluate=False,
                              factory=_fake_factory(sleeps), log_fn=lambda *_: None)
        return harness.summarise(raw)["dash"]["reduction_vs_grpo"]

    fast = reduction({"grpo": 0.06, "dash": 0.015})  # ideal 75 %
    slow = reduction({"grpo": 0.015, "dash": 0.06})  # ideal -300 %
    assert 50 < fast < 80, fast
    assert slow < -150, slow


def test_summary_pairs_reductions_per_seed_and_sums_timed_steps_only():
    def rec(arm, seed, step, wall, timed=True):
        return {"arm": arm, "seed": seed, "step": step, "timed": timed, "wall_s": wall,
                "phases": {p: 0.0 for p in harness.PHASES}, "samples": 8, "tokens": 24.0, "reward": 0.0,
                "kept_fraction": 1.0, "optimizer_step": step + 1}
    steps = [rec("grpo", 0, 0, 100.0, timed=False), rec("dash", 0, 0, 100.0, timed=False),  # warmup: ignored
             rec("grpo", 0, 1, 4.0), rec("dash", 0, 1, 2.0),
             rec("grpo", 1, 1, 10.0), rec("dash", 1, 1, 1.0)]
    s = harness.summarise({"steps": steps, "evals": [], "setup": []})
    # per seed: 50 % and 90 % -> median 70 %; an unpaired ratio of medians would give 78.6 %
    assert s["dash"]["reduction_vs_grpo"] == pytest.approx(70.0)
    assert s["dash"]["reduction_vs_grpo_spread"]["min"] == pytest.approx(50.0)
    assert s["grpo"]["total_s"] == pytest.approx(7.0) and s["dash"]["total_s"] == pytest.approx(1.5)
    assert s["dash"]["samples_per_s"] == pytest.approx((8 / 2.0 + 8 / 1.0) / 2)


def test_outputs_are_written(tmp_path):
    raw = harness.measure(("grpo", "dash"), size=TINY, seeds=(0, 1), steps=2, warmup=1, evaluate=False,
                          factory=_fake_factory({"grpo": 0.002, "dash": 0.001}), log_fn=lambda *_: None)
    report = harness.build_report(raw, device="cpu", size=TINY, seeds=(0, 1), steps=2, warmup=1, arms=("grpo", "dash"))
    paths = harness.write_outputs(report, tmp_path)
    import json

    data = json.loads(paths["json"].read_text())
    assert {"device", "device_name", "torch", "triton", "date", "config", "arms"} <= set(data)
    assert {"total_s", "phases", "samples", "reduction_vs_grpo"} <= set(data["arms"]["dash"])
    assert paths["png"].stat().st_size > 1000 and "| dash |" in paths["md"].read_text()
    assert paths["json"].name.startswith("e2e-cpu-")


def test_steps_must_exceed_warmup():
    with pytest.raises(ValueError, match="warmup"):
        harness.measure(("grpo",), size=TINY, steps=1, warmup=1)


def test_trl_arm_skips_with_a_reason_when_trl_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr(sys.modules["trl_arm"].importlib.util, "find_spec", lambda name: None)  # as if trl were absent
    monkeypatch.delenv("FASTDASH_TRL_PYTHON", raising=False)
    reason = harness.trl_skip_reason()
    assert reason and "trl is not installed" in reason and "FASTDASH_TRL_PYTHON" in reason
    monkeypatch.setenv("FASTDASH_TRL_PYTHON", str(tmp_path / "no-such-python"))
    assert "does not exist" in harness.trl_skip_reason()
    with pytest.raises(ValueError, match="does not exist"):
        sys.modules["trl_arm"].TRLArm("trl", TINY, seed=0, steps=2)
    # the report carries the reason and no TRL arm is run
    raw = harness.measure(("grpo",), size=TINY, seeds=(0,), steps=2, warmup=1, evaluate=False,
                          factory=_fake_factory({"grpo": 0.001}), log_fn=lambda *_: None)
    report = harness.build_report(raw, device="cpu", size=dict(TINY, model="tiny-arith"), seeds=(0,), steps=2,
                                  warmup=1, arms=("grpo",))
    assert "does not exist" in report["trl"]["skipped"] and set(report["arms"]) == {"grpo"}
