"""DESIGN.md section 3: the invariants of a DASH step, each against an independent reference."""
from __future__ import annotations

import pytest
import torch

import fastdash.fsdp as fsdp_mod
import fastdash.trainer as trainer_mod
from fastdash.trainer import Trainer
from tests.conftest import sgd
from tests.numerics import fp32_tolerance


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _one_step_delta(make, float64=False, **overrides):
    cfg, run = make(**overrides)
    if float64:  # the reference: the same step computed in float64
        for model in (run.model, run.ref_model):
            if model is not None:
                model.double()
    sgd(run, lr=1.0)
    before = _weights(run.model)
    trainer = Trainer(cfg, run)
    metrics = trainer.step()
    after = _weights(run.model)
    return {k: after[k] - before[k] for k in before}, metrics, run


def _assert_close(delta, ref64, cfg):
    """A float32 step's weight delta (SGD, lr 1: the gradient) against the float64 one, within float32
    rounding of gradient sums over every token of the step (sqrt(n) ulps of the largest delta)."""
    worst = max((delta[k].double() - ref64[k]).abs().max().item() for k in delta)
    scale = max(v.abs().max().item() for v in ref64.values())
    assert scale > 1e-4, "the step changed nothing: the comparison would be vacuous"
    tol = fp32_tolerance(torch.tensor(scale), cfg.train_batch_size * (cfg.max_prompt_length + cfg.max_completion_length))
    assert worst <= tol, f"max weight-delta difference {worst:.3g} > {tol:.3g} (largest delta {scale:.3g})"


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_preemptive_equals_per_microbatch_generation(scripted_run, loss_type):
    """Same samples, one big engine call vs one call per micro-batch: same update."""
    common = dict(loss_type=loss_type, max_grad_norm=0.0, gradient_filtering=False)
    dash, m1, run1 = _one_step_delta(scripted_run, generation_batch_size=16, **common)
    grpo, m2, run2 = _one_step_delta(scripted_run, generation_batch_size=4, **common)
    ref64, _, _ = _one_step_delta(scripted_run, float64=True, generation_batch_size=16, **common)
    assert run1.engine.calls == [16] and run2.engine.calls == [4, 4, 4, 4]
    assert m1["reward/mean"] == m2["reward/mean"]
    _assert_close(dash, ref64, run1.cfg)
    _assert_close(grpo, ref64, run1.cfg)


@pytest.mark.parametrize("loss_type", ["grpo", "dr_grpo", "bnpo"])
def test_gradient_independent_of_microbatch_split(scripted_run, loss_type):
    """Packed at several budgets and padded at several sizes all give one big batch's update."""
    common = dict(loss_type=loss_type, max_grad_norm=0.0, beta=0.04)
    ref64, _, run = _one_step_delta(scripted_run, float64=True, packing=True, max_tokens_per_microbatch=10_000,
                                    **common)
    for kw in (dict(packing=True, max_tokens_per_microbatch=10_000), dict(packing=True, max_tokens_per_microbatch=22),
               dict(packing=True, max_tokens_per_microbatch=40), dict(packing=False, micro_batch_size=1),
               dict(packing=False, micro_batch_size=3)):
        delta, metrics, _ = _one_step_delta(scripted_run, **common, **kw)
        assert metrics["microbatches"] > 1 or kw["max_tokens_per_microbatch"] == 10_000
        _assert_close(delta, ref64, run.cfg)


def test_filter_keeps_exactly_abs_advantage_above_tau(scripted_run):
    cfg, run = scripted_run(gradient_filtering_threshold=0.6)
    trainer = Trainer(cfg, run)
    trainer.rollout()
    batch = trainer.buffer[0]
    kept = {s.uid for s in batch.kept}
    expected = {s.uid for s in batch.samples if abs(s.advantage) > 0.6}
    assert kept == expected and 0 < len(kept) < len(batch.samples)


def test_all_filtered_step_skips_forward_and_optimizer(scripted_run, monkeypatch):
    cfg, run = scripted_run()
    run.reward_fn = lambda completion, answer, **_: 1.0  # every group has zero variance: all |A| = 0
    calls = []
    monkeypatch.setattr(fsdp_mod, "forward_hidden", lambda *a, **k: calls.append(1))  # every model call's body
    before = _weights(run.model)
    metrics = Trainer(cfg, run).step()
    assert calls == [] and metrics["skipped"] == 1 and metrics["filter/kept_fraction"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in run.model.state_dict().items())
    assert run.state.counters["skipped_empty_steps"] == 1


def test_no_reference_model_at_beta_zero_and_no_old_pass_at_k1(scripted_run, monkeypatch):
    logprob_calls = []
    real = trainer_mod.fused_linear_logprob
    monkeypatch.setattr(trainer_mod, "fused_linear_logprob", lambda *a, **k: logprob_calls.append(1) or real(*a, **k))
    cfg, run = scripted_run(beta=0.0, num_iterations=1)
    assert run.ref_model is None
    Trainer(cfg, run).step()
    assert logprob_calls == []  # on-policy K = 1: the ratio is 1, no old-log-prob pass
    cfg, run = scripted_run(beta=0.04)
    assert run.ref_model is not None
    Trainer(cfg, run).step()
    assert logprob_calls, "beta > 0 must run the reference pass"


@pytest.mark.parametrize("overrides", [dict(num_iterations=2), dict(generation_batch_size=16, train_batch_size=8)])
def test_multi_and_mini_use_old_logps_of_the_sampling_policy(scripted_run, overrides):
    """Multi (K > 1) and Mini (several steps per generation) train against the sampler's log-probs."""
    cfg, run = scripted_run(max_grad_norm=0.0, **overrides)
    trainer = Trainer(cfg, run)
    trainer.step()
    assert len(trainer.buffer) == 1
    second = trainer.buffer[0]
    kept = second.kept
    assert kept and all(s.old_logps is not None and s.old_logps.numel() == len(s.completion_ids) for s in kept)
    metrics = trainer.step()  # the policy moved: ratios differ from 1 and are measured against old_logps
    assert metrics["skipped"] == 0 and trainer.state.step == 2


def test_generation_oom_halves_the_batch_and_keeps_the_samples(scripted_run):
    """An OOM in generation halves the engine's concurrency and retries the same call."""
    cfg, run = scripted_run()
    from fastdash.rollout.hf import HFEngine

    engine = HFEngine(run.model, run.tokenizer, max_batch_size=None)
    seen = []
    real = engine._decode

    def flaky(rows, params, seed):
        seen.append(min(engine.max_batch_size or len(rows), len(rows)))  # rows decoded at once
        if seen[-1] > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows, params, seed)

    engine._decode = flaky
    run.engine = engine
    trainer = Trainer(cfg, run)
    trainer.rollout()
    assert seen[:3] == [16, 8, 4] and engine.max_batch_size == 4
    assert run.state.counters["oom_retries"] == 2 and len(trainer.buffer[0].samples) == 16
