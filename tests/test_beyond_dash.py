"""Beyond DASH in the trainer: rollout correction wired for every loss type, old_logprobs=sampler
(no old-log-prob forward, the sampler's log-probs as the PPO denominator), clear errors."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import fastdash.trainer as trainer_mod
from fastdash.algo import CLIP_LOSS_TYPES
from fastdash.trainer import Trainer
from tests.conftest import ScriptedEngine, sgd


class LogpEngine(ScriptedEngine):
    """The scripted samples, with per-token sampler log-probs: `table[uid]` when given (uid = index
    in the rollout), else a deterministic made-up value per token."""

    name = "scripted+logps"

    def __init__(self, table=None, **kw):
        super().__init__(**kw)
        self.table, self.count = table, 0

    def generate(self, prompts, n, params):
        out = super().generate(prompts, n, params)
        for c in out:
            c.sampler_logps = (list(self.table[self.count]) if self.table is not None
                               else [-1.0 - 0.05 * (t % 7) for t in c.completion_ids])
            self.count += 1
        return out


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _make(scripted_run, table=None, **overrides):
    cfg, run = scripted_run(max_grad_norm=0.0, gradient_filtering=False, **overrides)
    run.engine = LogpEngine(table, max_len=cfg.max_completion_length)
    sgd(run, lr=1.0)
    return cfg, run


def _step_delta(trainer, run):
    before = _weights(run.model)
    metrics = trainer.step()
    return {k: v - before[k] for k, v in _weights(run.model).items()}, metrics


def _assert_equal(a, b):
    assert max(float(v.abs().max()) for v in a.values()) > 1e-4, "the step changed nothing"
    assert all(torch.equal(a[k], b[k]) for k in a), "updates differ"


@pytest.mark.parametrize("loss_type,correction,level",
                         [(t, "tis", "token") for t in CLIP_LOSS_TYPES]
                         + [("grpo", "mis", "token"), ("dapo", "mis", "sequence")])
def test_identical_logps_leave_the_update_unchanged_bit_for_bit(scripted_run, loss_type, correction, level):
    """Multi (K = 2, old pass on): sampler log-probs set to the trainer's old log-probs give weights of
    exactly 1 and the very update of rollout_correction=none, for every loss type."""
    deltas = []
    for mode in ("none", correction):
        cfg, run = _make(scripted_run, num_iterations=2, loss_type=loss_type, beta=0.04,
                         rollout_correction=mode, rollout_is_level=level)
        trainer = Trainer(cfg, run)
        trainer.rollout()
        trainer.buffer = [replace(b, kept=tuple(replace(s, sampler_logps=s.old_logps.tolist()) for s in b.kept))
                          for b in trainer.buffer]
        delta, metrics = _step_delta(trainer, run)
        deltas.append(delta)
        if mode != "none":
            assert metrics["rollout_is/weight_mean"] == metrics["rollout_is/weight_max"] == 1.0
            assert metrics["rollout_is/masked_fraction"] == 0.0
        else:
            assert not any(k.startswith("rollout_is/") for k in metrics)
    _assert_equal(*deltas)


def _record_current_logps(scripted_run, **overrides):
    """uid -> the trainer's own log-probs of the first step (run with correction off)."""
    cfg, run = _make(scripted_run, **overrides)
    trainer = Trainer(cfg, run)
    seen, real_mbs, real_loss = [], trainer._microbatches, trainer_mod.fused_policy_loss

    def microbatches(samples, budget=None, **kw):
        for mb, members in real_mbs(samples, budget, **kw):
            seen.append(members)
            yield mb, members

    table = {}

    def loss(*a, **k):
        out = real_loss(*a, **k)
        cu = a[3].tolist()
        for j, s in enumerate(seen[-1]):
            table[s.uid] = out.logps[cu[j] : cu[j + 1]].tolist()
        return out

    trainer._microbatches = microbatches
    trainer_mod.fused_policy_loss, saved = loss, trainer_mod.fused_policy_loss
    try:
        delta, _ = _step_delta(trainer, run)
    finally:
        trainer_mod.fused_policy_loss = saved
    return table, delta


def test_on_policy_correction_weighs_against_the_current_logps(scripted_run):
    """K = 1, no old pass: pi_train is the current log-probs. Sampler log-probs equal to them give
    weights of exactly 1 and the update of rollout_correction=none bit for bit (the gradient is then
    formed after the forward instead of in it; the torch backend runs the same chunk operations)."""
    table, base = _record_current_logps(scripted_run, loss_type="grpo")
    assert len(table) == 16
    full = [table.get(i, [0.0]) for i in range(16)]  # filtered samples never reach the loss
    cfg, run = _make(scripted_run, table=full, loss_type="grpo", rollout_correction="tis")
    delta, metrics = _step_delta(Trainer(cfg, run), run)
    assert metrics["rollout_is/weight_mean"] == metrics["rollout_is/weight_max"] == 1.0
    assert metrics["rollout_is/masked_fraction"] == 0.0
    _assert_equal(delta, base)


def test_correction_moves_the_update_when_the_sampler_differs(scripted_run):
    """A real mismatch (made-up sampler log-probs): weights leave 1 and the update changes."""
    deltas, metrics = [], None
    for mode in ("none", "mis"):
        cfg, run = _make(scripted_run, num_iterations=2, rollout_correction=mode, rollout_is_cap=3.0)
        delta, metrics = _step_delta(Trainer(cfg, run), run)
        deltas.append(delta)
    assert 0 < metrics["rollout_is/masked_fraction"] < 1 and metrics["rollout_is/weight_max"] <= 3.0
    assert any(not torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0])


# ------------------------------------------------------------------ old_logprobs: sampler ----------
def _count_logprob_passes(monkeypatch):
    calls, denominators = [], []
    real_lp, real_loss = trainer_mod.fused_linear_logprob, trainer_mod.fused_policy_loss
    monkeypatch.setattr(trainer_mod, "fused_linear_logprob", lambda *a, **k: calls.append(1) or real_lp(*a, **k))
    monkeypatch.setattr(trainer_mod, "fused_policy_loss",
                        lambda *a, **k: denominators.append(k["old_logps"]) or real_loss(*a, **k))
    return calls, denominators


@pytest.mark.parametrize("shape", [dict(num_iterations=2), dict(generation_batch_size=16, train_batch_size=8)],
                         ids=["multi", "mini"])
def test_sampler_old_logprobs_skip_the_forward_and_are_the_denominator(scripted_run, monkeypatch, shape):
    calls, denominators = _count_logprob_passes(monkeypatch)
    cfg, run = _make(scripted_run, old_logprobs="sampler", **shape)
    trainer = Trainer(cfg, run)
    trainer.rollout()
    kept = [s for b in trainer.buffer for s in b.kept]
    assert kept and all(torch.equal(s.old_logps, torch.tensor(s.sampler_logps, dtype=torch.float32)) for s in kept)
    trainer.step()
    trainer.step()
    assert calls == [], "old_logprobs=sampler must not run the old-log-prob forward"
    assert len(denominators) >= 2 and all(d is not None for d in denominators)
    # every denominator the loss saw is the sampler's log-probs of its tokens
    made_up = {round(-1.0 - 0.05 * k, 6) for k in range(7)}
    assert all({round(x, 6) for x in d.tolist()} <= made_up for d in denominators)
    cfg, run = _make(scripted_run, old_logprobs="trainer", **shape)
    Trainer(cfg, run).step()
    assert calls, "old_logprobs=trainer runs the old-log-prob pass"


def test_engines_without_logps_give_a_clear_error(scripted_run):
    for overrides in (dict(old_logprobs="sampler", num_iterations=2), dict(rollout_correction="tis")):
        cfg, run = scripted_run(**overrides)  # ScriptedEngine returns no sampler log-probs
        with pytest.raises(ValueError, match="returned none; use engine=vllm"):
            Trainer(cfg, run).step()
    cfg, run = scripted_run(old_logprobs="sampler", num_iterations=1)  # on-policy: nothing to replace
    assert Trainer(cfg, run).step()["skipped"] == 0


def test_config_keys_are_validated():
    from fastdash.config import load_config

    for bad, match in ((["rollout_correction=is"], "rollout_correction"), (["rollout_is_cap=0.5"], "> 1"),
                       (["rollout_is_level=seq"], "rollout_is_level"), (["old_logprobs=engine"], "old_logprobs"),
                       (["speculative={num_speculative_tokens: 3}"], "method"),
                       (["speculative={method: ngram, num_speculative_tokens: 0}"], "positive integer"),
                       (["engine=hf", "speculative={method: ngram}"], "vLLM option"),
                       (["kernel=liger", "beta=0.1", "rollout_correction=tis"], "liger")):
        with pytest.raises(ValueError, match=match):
            load_config(None, bad)
    cfg = load_config(None, ["speculative={method: ngram, num_speculative_tokens: 3}", "rollout_correction=mis"])
    assert cfg.speculative == {"method": "ngram", "num_speculative_tokens": 3} and cfg.rollout_is_cap == 2.0
