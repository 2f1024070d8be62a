"""The end-to-end benchmark harness itself (benchmarks/harness.py), at tiny sizes.

Checks that arms are fair (same prompts, samples per step, optimizer steps and seed; configs differ
only in the arm's own knobs), that the synthetic reward gives the configured share of mixed groups
to every arm alike, and that reductions come from measured times, paired per seed.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_harness", ROOT / "benchmarks" / "harness.py")
harness = importlib.util.module_from_spec(_spec)
sys.modules["bench_harness"] = harness
_spec.loader.exec_module(harness)
report = sys.modules["report"]
workload = sys.modules["workload"]

from fastdash.rewards.synthetic import beta_for_mixed_fraction, success_probabilities, synthetic_reward  # noqa: E402

TINY = dict(harness.SIZES["smoke"], max_completion_length=6, length_control_mean=3, num_train_problems=64)


def test_arms_differ_only_in_their_own_knobs():
    cfgs = {a: harness.make_config(a, TINY, seed=3) for a in harness.ARMS}
    allowed = {"generation_batch_size", "packing", "kernel", "max_tokens_per_microbatch",
               "gradient_filtering", "gradient_filtering_threshold"}
    base = cfgs["grpo"].to_dict()
    for arm, cfg in cfgs.items():
        diff = {k for k, v in cfg.to_dict().items() if base[k] != v}
        assert diff <= allowed, (arm, diff)
        assert cfg.seed == 3 and cfg.train_batch_size == 8 and cfg.model == "random:tiny"
        assert cfg.reward == workload.SYNTHETIC_REWARD  # a random model: the synthetic reward
    assert cfgs["grpo"].generation_batch_size == cfgs["grpo"].micro_batch_size == 4  # a call per micro-batch
    assert cfgs["grpo"].preemptive_sampling.engine_calls == 2
    assert all(cfgs[a].preemptive_sampling.engine_calls == 1 for a in ("no_gf", "dash", "fastdash"))
    assert not cfgs["no_gf"].gradient_filtering and cfgs["dash"].gradient_filtering
    assert cfgs["fastdash"].packing and not cfgs["dash"].packing and cfgs["grpo"].kernel == "reference"


def test_make_config_rejects_bad_generation_batch():
    with pytest.raises(ValueError, match="generation_batch_size"):
        harness.make_config("grpo", dict(TINY, micro_batch_size=6), seed=0)  # 6 is no multiple of G=4


def test_sizes_use_presets_and_fit_their_limits():
    from fastdash.models import PRESETS, QWEN_VOCAB, preset_config

    paper = harness.SIZES["paper"]
    assert paper["model"] == "random:paper-cpu" and preset_config("paper-cpu").vocab_size == QWEN_VOCAB
    assert PRESETS["paper-cpu"]["tie_word_embeddings"] and PRESETS["paper-cpu"]["num_hidden_layers"] <= 4
    assert paper["length_control_mean"] == pytest.approx(0.3 * paper["max_completion_length"], rel=0.01)
    for name, size in harness.SIZES.items():
        harness.make_config("grpo", size, seed=0)  # every size validates


def test_synthetic_reward_hits_the_mixed_fraction_and_ignores_text():
    G = 4
    for target in (0.25, 0.5, 0.75):
        p = success_probabilities(4000, target, G, seed=1)
        rows = [{"uid": i, "p_success": p[i]} for i in range(4000) for _ in range(G)]
        r = np.array(synthetic_reward.batch(["x"] * len(rows), rows)).reshape(-1, G).sum(1)
        mixed = float(((r > 0) & (r < G)).mean())
        assert abs(mixed - target) < 4 * (target * (1 - target) / 4000) ** 0.5, (target, mixed)
    rows = [{"uid": i, "p_success": 0.5} for i in range(8) for _ in range(G)]
    assert synthetic_reward.batch(["a"] * 32, rows) == synthetic_reward.batch([str(i) for i in range(32)], rows)
    with pytest.raises(ValueError, match="mixed_fraction"):
        beta_for_mixed_fraction(0.9, G)  # above 1 - 2/2^G


def test_feed_logs_and_refuses_to_run_dry():
    feed = workload.PromptFeed([{"uid": i} for i in range(5)])
    assert [r["uid"] for r in feed(3)] == [0, 1, 2] and feed.reset_log() == [0, 1, 2]
    with pytest.raises(ValueError, match="prepared 5 prompts"):
        feed(3)


def test_paper_rows_are_seeded_and_in_range():
    size = harness.SIZES["paper"]
    a, b = workload.rows_for(size, 0, 64), workload.rows_for(size, 0, 64)
    assert a == b and a != workload.rows_for(size, 1, 64)
    lengths = [len(r["prompt"]) for r in a]
    assert max(lengths) <= size["max_prompt_length"] and min(lengths) >= 8 and 20 < np.mean(lengths) < 90


@pytest.mark.slow
def test_real_arms_see_identical_samples_and_steps():
    raw = harness.measure(("grpo", "dash", "fastdash"), size=TINY, seeds=(0, 1), steps=2, warmup=1,
                          evaluate=False, log_fn=lambda *_: None)
    for seed in (0, 1):
        rows = {a: [r for r in raw["steps"] if r["arm"] == a and r["seed"] == seed] for a in ("grpo", "dash", "fastdash")}
        ref = rows["grpo"]
        assert [r["optimizer_step"] for r in ref] == [1, 2]
        assert all(len(r["prompts"]) == 2 and r["samples"] == 8 and r["engine_calls"] == 2 for r in ref)
        for arm, rs in rows.items():
            assert [r["prompts"] for r in rs] == [r["prompts"] for r in ref], arm
            assert [r["samples"] for r in rs] == [r["samples"] for r in ref], arm
            assert [r["reward"] for r in rs] == [r["reward"] for r in ref], arm  # same synthetic rewards
            assert [r["tokens"] for r in rs] == [r["tokens"] for r in ref], arm  # same forced lengths
            assert [r["optimizer_step"] for r in rs] == [1, 2], arm
            assert all(r["wall_s"] > 0 for r in rs)
        assert [r["kept_fraction"] for r in rows["dash"]] == [r["kept_fraction"] for r in rows["fastdash"]]
        assert all(r["padding_tokens"] == 0 for r in rows["fastdash"] if r["real_tokens"])  # packed
    summary = report.summarise(raw)
    assert summary["grpo"]["reduction_vs_grpo"] == 0.0 and summary["grpo"]["kept_fraction"] == 1.0
    assert summary["dash"]["samples"] == summary["grpo"]["samples"] == 8


def _fake_factory(sleep_s: dict):
    """ArmRuns around fake trainers that really sleep: the harness must time them itself."""
    def factory(arm, cfg, feed):
        state = SimpleNamespace(step=0)

        def step():
            feed(cfg.prompts_per_step)
            time.sleep(sleep_s[arm])
            state.step += 1
            return {"time/generate_s": sleep_s[arm] / 2, "completion/mean_length": 3.0, "reward/mean": 0.5,
                    "filter/kept_fraction": 1.0, "tokens/padding": 2, "tokens/real": 6}

        return harness.ArmRun(cfg, SimpleNamespace(state=state, device=harness.torch.device("cpu")),
                              SimpleNamespace(step=step), feed)
    return factory


def test_reduction_comes_from_measured_times():
    def reduction(sleeps):
        raw = harness.measure(("grpo", "dash"), size=TINY, seeds=(0,), steps=3, warmup=1, evaluate=False,
                              factory=_fake_factory(sleeps), log_fn=lambda *_: None)
        return report.summarise(raw)["dash"]["reduction_vs_grpo"]

    fast = reduction({"grpo": 0.06, "dash": 0.015})  # ideal 75 %
    slow = reduction({"grpo": 0.015, "dash": 0.06})  # ideal -300 %
    assert 50 < fast < 80, fast
    assert slow < -150, slow


def _rec(arm, seed, step, wall, timed=True, backward=0.0):
    return {"arm": arm, "seed": seed, "step": step, "timed": timed, "wall_s": wall,
            "phases": {p: (backward if p == "backward" else 0.0) for p in harness.PHASES}, "samples": 8,
            "tokens": 24.0, "reward": 0.0, "kept_fraction": 1.0, "optimizer_step": step + 1,
            "padding_tokens": 1, "real_tokens": 3}


def test_summary_pairs_ratios_per_seed_and_sums_timed_steps_only():
    steps = [_rec("grpo", 0, 0, 100.0, timed=False), _rec("dash", 0, 0, 100.0, timed=False),  # warmup: ignored
             _rec("grpo", 0, 1, 4.0, backward=2.0), _rec("dash", 0, 1, 2.0, backward=1.0),
             _rec("grpo", 1, 1, 10.0, backward=6.0), _rec("dash", 1, 1, 1.0, backward=1.0)]
    raw = {"steps": steps, "evals": [], "setup": []}
    s = report.summarise(raw)
    # per seed: 50 % and 90 % -> median 70 %; an unpaired ratio of medians would give 78.6 %
    assert s["dash"]["reduction_vs_grpo"] == pytest.approx(70.0)
    assert s["dash"]["reduction_vs_grpo_spread"]["min"] == pytest.approx(50.0)
    assert s["grpo"]["total_s"] == pytest.approx(7.0) and s["dash"]["total_s"] == pytest.approx(1.5)
    assert s["dash"]["samples_per_s"] == pytest.approx((8 / 2.0 + 8 / 1.0) / 2)
    assert s["dash"]["padding_fraction"] == pytest.approx(0.25)
    steps = [dict(r, arm={"dash": "fastdash"}.get(r["arm"], r["arm"])) for r in steps]
    t = report.targets({"steps": steps})["backprop_vs_grpo"]
    assert t["measured"]["median"] == pytest.approx(4.0) and t["met"]  # (2/1 + 6/1) / 2, paired
    assert report.targets({"steps": steps})["fastdash_vs_trl"]["measured"] is None


def test_an_arm_on_fewer_seeds_is_summarised_and_paired_on_its_own():
    """The TRL arm runs on the first seed only (RUN_SHAPE trl_seeds): its medians and its ratios to
    fastdash come from that seed, never from zero-time seeds it did not run."""
    steps = [_rec("fastdash", 0, 1, 2.0), _rec("trl_no_gc", 0, 1, 20.0), _rec("fastdash", 1, 1, 3.0)]
    s = report.summarise({"steps": steps, "evals": [], "setup": []})
    assert s["trl_no_gc"]["total_s"] == pytest.approx(20.0) and s["fastdash"]["total_s"] == pytest.approx(2.5)
    x = s["trl_no_gc"]["x_fastdash_time"]
    assert x["median"] == pytest.approx(10.0) and x["n"] == 1
    t = report.targets({"steps": steps})["fastdash_vs_trl"]["measured"]
    assert t["median"] == pytest.approx(10.0) and t["n"] == 1


def test_trl_arm_runs_on_the_first_trl_seeds_only(monkeypatch):
    built = []

    def fake_trl(arm, size, seed, steps, rows):
        built.append(seed)
        return _fake_factory({arm: 0.001})(arm, harness.make_config("grpo", size, seed, max_steps=steps),
                                           workload.PromptFeed(rows))

    monkeypatch.setattr(harness, "TRLArm", fake_trl)
    raw = harness.measure(("grpo", "trl_no_gc"), size=TINY, seeds=(0, 1, 2), steps=2, warmup=1, evaluate=False,
                          factory=_fake_factory({"grpo": 0.001}), log_fn=lambda *_: None, trl_seeds=1)
    assert built == [0]
    assert {r["seed"] for r in raw["steps"] if r["arm"] == "grpo"} == {0, 1, 2}
    assert {r["seed"] for r in raw["steps"] if r["arm"] == "trl_no_gc"} == {0}
    assert harness.RUN_SHAPE["paper"]["trl_seeds"] == 1  # the default suite's TRL arm: one seed


def test_outputs_are_written(tmp_path):
    raw = harness.measure(("grpo", "dash"), size=TINY, seeds=(0, 1), steps=2, warmup=1, evaluate=False,
                          factory=_fake_factory({"grpo": 0.002, "dash": 0.001}), log_fn=lambda *_: None)
    rep = report.build_report(raw, device="cpu", size_name="smoke", size=TINY, seeds=(0, 1), steps=2, warmup=1,
                              arm_configs={a: harness.ARMS[a] for a in ("grpo", "dash")}, learning=False)
    paths = report.write_outputs(rep, tmp_path)
    data = json.loads(paths["json"].read_text())
    assert {"device", "device_name", "torch", "triton", "date", "config", "arms", "targets"} <= set(data)
    assert {"total_s", "phases", "samples", "reduction_vs_grpo", "kept_fraction", "padding_fraction",
            "step_mem_bytes"} <= set(data["arms"]["dash"])
    assert paths["png"].stat().st_size > 1000 and "| dash |" in paths["md"].read_text()
    assert paths["json"].name.startswith("e2e-smoke-cpu-")


def test_steps_must_exceed_warmup():
    with pytest.raises(ValueError, match="warmup"):
        harness.measure(("grpo",), size=TINY, steps=1, warmup=1)


def test_trl_arm_skips_with_a_reason_when_trl_is_missing(monkeypatch, tmp_path):
    trl_arm = sys.modules["trl_arm"]
    monkeypatch.setattr(trl_arm.importlib.util, "find_spec", lambda name: None)  # as if trl were absent
    monkeypatch.delenv("FASTDASH_TRL_PYTHON", raising=False)
    reason = harness.trl_skip("cpu", TINY)
    assert reason and "trl is not installed" in reason and "FASTDASH_TRL_PYTHON" in reason
    monkeypatch.setenv("FASTDASH_TRL_PYTHON", str(tmp_path / "no-such-python"))
    assert "does not exist" in harness.trl_skip("cpu", TINY)
    with pytest.raises(ValueError, match="does not exist"):
        trl_arm.TRLArm("trl", TINY, seed=0, steps=2, rows=[])
