"""Rollout correction (fastdash/correction.py) and the kernels' pg_weights, against float64 references
written out by hand here (no call into the code under test for the expected values)."""
from __future__ import annotations

import math
import os
from dataclasses import replace

import pytest
import torch

from fastdash.algo import CLIP_LOSS_TYPES, loss_token_weights
from fastdash.correction import WeightStats, log_ratios, rollout_is_weights
from fastdash_kernels import fused_policy_loss
from fastdash_kernels.reference import logprob_reference
from tests.kernels.bounds import assert_within, policy_loss_bounds

EPS32 = torch.finfo(torch.float32).eps
LENGTHS = [5, 1, 0, 12, 30]  # ragged, one empty sequence
H, V = 16, 41


def _backends():
    out = ["torch", "reference"]
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        try:
            import triton  # noqa: F401

            out.append("triton")
        except ImportError:
            pass
    return out


def _cu(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def _logps(seed, spread, n=sum(LENGTHS), dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    train = -5 * torch.rand(n, generator=g, dtype=torch.float64)
    sampler = train + spread * torch.randn(n, generator=g, dtype=torch.float64)
    return train.to(dtype), sampler.to(dtype)


def _reference_weights(train, sampler, lengths, mode, cap, level):
    """Plain Python floats, one sequence at a time."""
    out, pos = [], 0
    for L in lengths:
        d = [float(train[pos + i]) - float(sampler[pos + i]) for i in range(L)]
        if level == "sequence" and L:
            d = [sum(d) / L] * L  # geometric mean of the token ratios
        for di in d:
            r = math.exp(di)
            out.append(min(r, cap) if mode == "tis" else (r if 1 / cap <= r <= cap else 0.0))
        pos += L
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [1.5, 2.0, 5.0])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_weights_match_the_float64_reference(mode, level, cap, dtype):
    train, sampler = _logps(3, spread=0.8, dtype=dtype)
    got = rollout_is_weights(train, sampler, _cu(LENGTHS), mode, cap, level)
    ref = _reference_weights(train, sampler, LENGTHS, mode, cap, level)
    assert got.dtype == torch.float32 and got.shape == ref.shape and not got.requires_grad
    # one fp32 rounding of the result, plus (fp32 inputs are exact in fp64) nothing else
    assert (got.double() - ref).abs().max() <= EPS32 * float(ref.abs().max())
    if level == "sequence":
        return
    if mode == "mis":  # the comparison covers both sides of the band
        assert 0 < int((ref == 0).sum()) < ref.numel()
    else:
        assert 0 < int((ref == cap).sum()) < ref.numel()


@pytest.mark.parametrize("mode", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identical_logps_give_weight_one_exactly(mode, level):
    train, _ = _logps(5, spread=0.0, dtype=torch.float32)
    w = rollout_is_weights(train, train.clone(), _cu(LENGTHS), mode, 2.0, level)
    assert torch.equal(w, torch.ones_like(w))


def test_sequence_level_masks_whole_sequences_and_uses_the_mean():
    lengths = [3, 2]
    train = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0])
    sampler = torch.tensor([-1.0, 0.5, 0.5, -0.2, -0.4])  # seq 0: mean log-ratio 0; seq 1: 0.3
    lr = log_ratios(train, sampler, _cu(lengths), "sequence")
    assert torch.allclose(lr, torch.tensor([0.0, 0.0, 0.0, 0.3, 0.3], dtype=torch.float64), atol=1e-7)
    w = rollout_is_weights(train, sampler, _cu(lengths), "mis", 1.3, "sequence")  # log 1.3 = 0.262
    assert w.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    w_tok = rollout_is_weights(train, sampler, _cu(lengths), "mis", 1.3, "token")
    assert (w_tok == 0).tolist() == [True, True, True, False, True]  # ratios e^1, e^-.5, e^-.5, e^.2, e^.4


def test_weight_stats_by_hand():
    s = WeightStats(cap=2.0)
    s.add(torch.tensor([1.0, 0.0, 2.0]))
    s.add(torch.tensor([0.5]))
    s.add(torch.tensor([]))
    m = s.metrics()
    assert m == {"rollout_is/weight_mean": 3.5 / 4, "rollout_is/weight_max": 2.0,
                 "rollout_is/masked_fraction": 0.25, "rollout_is/capped_fraction": 0.25}
    assert WeightStats(2.0).metrics() == {}


def test_bad_arguments_name_the_fix():
    t = torch.zeros(3)
    with pytest.raises(ValueError, match="rollout_is_cap must be > 1"):
        rollout_is_weights(t, t, _cu([3]), "tis", 1.0)
    with pytest.raises(ValueError, match="rollout_is_level"):
        rollout_is_weights(t, t, _cu([3]), "tis", 2.0, "seq")
    with pytest.raises(ValueError, match=r"both be \[N\]"):
        rollout_is_weights(t, torch.zeros(2), _cu([3]), "mis", 2.0)


# ------------------------------------------------------------------ the kernels' pg_weights ---------
def _batch(seed, beta):
    g = torch.Generator().manual_seed(seed)
    n = sum(LENGTHS)
    x = torch.randn(n, H, generator=g)
    w = torch.randn(V, H, generator=g) / H**0.5 * 4
    y = torch.randint(0, V, (n,), generator=g)
    adv = torch.randn(len(LENGTHS), generator=g)
    with torch.no_grad():
        cur, _ = logprob_reference(x, w, y)
    old = cur + 0.3 * torch.randn(n, generator=g)
    ref = cur + 0.2 * torch.randn(n, generator=g) if beta else None
    pgw = 2.0 * torch.rand(n, generator=g)
    pgw[::4] = 0.0  # masked tokens
    return x, w, y, _cu(LENGTHS), adv, old, ref, pgw


def _grads(backend, x, w, y, cu, adv, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fused_policy_loss(x, w, y, cu, adv, backend=backend, **kw)
    out.loss.backward()
    return out.loss.detach(), x.grad, w.grad


def _with_liger():
    try:
        import liger_kernel  # noqa: F401

        return _backends() + ["liger"]
    except ImportError:
        return _backends()


@pytest.mark.parametrize("backend", _with_liger())
@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.05])
@pytest.mark.parametrize("form", ["tensor", "function"])
def test_pg_weights_match_a_hand_written_float64_loss(backend, loss_type, beta, form):
    """loss = sum_t tw_t (pw_t * -min(r A, clip(r) A) + beta k3_t): only the PG term is weighted."""
    x, w, y, cu, adv, old, ref, pgw = _batch(11, beta)
    tw = loss_token_weights(loss_type, cu, 17.0)
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    a, pw, o = adv.double()[seg], pgw.double(), old.double()

    def loss_of_logps(lp):
        r = torch.exp(lp - o)
        pg = -torch.minimum(r * a, torch.clamp(r, 0.8, 1.28) * a)
        terms = pw * pg
        if beta:
            d = ref.double() - lp
            terms = terms + beta * (torch.exp(d) - d - 1)
        terms = terms * tw.double()
        return terms.sum(), terms

    weights = pgw if form == "tensor" else (lambda logps: pgw)
    kw = dict(token_weights=tw, old_logps=old, ref_logps=ref, beta=beta, epsilon=0.2, epsilon_high=0.28,
              pg_weights=weights)
    if backend == "liger" and beta:
        with pytest.raises(ValueError, match="use beta=0 or kernel=torch"):
            _grads(backend, x, w, y, cu, adv, **kw)
        return
    loss, dx, dw = _grads(backend, x, w, y, cu, adv, **kw)
    refs, bound = policy_loss_bounds(x, w, y, 1.0, loss_of_logps)
    assert_within(loss, refs["loss"], bound["loss"], f"{backend} {loss_type} loss")
    assert_within(dx, refs["dX"], bound["dX"], f"{backend} {loss_type} dX")
    assert_within(dw, refs["dW"], bound["dW"], f"{backend} {loss_type} dW")
    assert dx.abs().sum() > 0


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize("with_old", [False, True], ids=["K1", "Kgt1"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["eager", "recompute"])
def test_unit_weights_change_nothing_bit_for_bit(backend, loss_type, with_old, grad_in_forward):
    """Identical sampler and trainer log-probs give w = 1: loss and gradients equal those without
    weights exactly (x * 1.0 == x in IEEE arithmetic, so this is a test of the wiring)."""
    x, w, y, cu, adv, old, ref, _ = _batch(13, 0.05)
    kw = dict(token_weights=loss_token_weights(loss_type, cu, 9.0), old_logps=old if with_old else None,
              ref_logps=ref, beta=0.05, grad_in_forward=grad_in_forward)
    base = _grads(backend, x, w, y, cu, adv, **kw)
    ones = rollout_is_weights(old, old.clone(), cu, "tis", 2.0)
    for got in (_grads(backend, x, w, y, cu, adv, pg_weights=ones, **kw),
                *([_grads(backend, x, w, y, cu, adv, pg_weights=lambda lp: torch.ones_like(lp), **kw)]
                  if not grad_in_forward else [])):
        for a, b in zip(base, got):
            assert torch.equal(a, b)


def test_pg_weights_shape_is_checked():
    x, w, y, cu, adv, old, _, _ = _batch(19, 0.0)
    with pytest.raises(ValueError, match=r"pg_weights must be \[N\]"):
        fused_policy_loss(x, w, y, cu, adv, token_weights=loss_token_weights("bnpo", cu, 1.0),
                          pg_weights=torch.ones(3), backend="torch")


# ------------------------------------------------------------------ in the trainer, K = 1 ------------
# num_iterations 1 (the default on-policy step), and old_logprobs=sampler: no old-log-prob pass, the
# weights are a function of the current log-probs (the path async generation takes too).
NO_OLD_PASS = [dict(), dict(num_iterations=2, old_logprobs="sampler")]


@pytest.mark.parametrize("shape", NO_OLD_PASS, ids=["K1", "K2-old_logprobs=sampler"])
def test_correction_moves_the_update_without_an_old_logprob_pass(scripted_run, shape):
    """The K = 1 twin of test_beyond_dash's test: made-up sampler log-probs, mis masks part of the
    tokens, and the update differs from rollout_correction=none's."""
    from fastdash.trainer import Trainer
    from tests.test_beyond_dash import _make, _step_delta

    deltas, metrics = [], None
    for mode in ("none", "mis"):
        cfg, run = _make(scripted_run, rollout_correction=mode, rollout_is_cap=3.0, **shape)
        delta, metrics = _step_delta(Trainer(cfg, run), run)
        deltas.append(delta)
    assert 0 < metrics["rollout_is/masked_fraction"] < 1 and metrics["rollout_is/weight_max"] <= 3.0
    assert any(not torch.equal(deltas[0][k], deltas[1][k]) for k in deltas[0]), "the correction changed nothing"


def test_k1_mis_drops_exactly_the_mismatched_samples(scripted_run):
    """K = 1, mis: sampler log-probs equal to the trainer's current ones for even samples (w = 1 exactly)
    and 2 nats below them for odd ones (rho = e^2 > C: w = 0). The update is bit for bit that of
    rollout_correction=none with the odd samples' advantages set to 0 (their policy-gradient term gone,
    the normaliser unchanged), and the statistics count exactly the odd samples' tokens."""
    from fastdash.trainer import Trainer
    from tests.test_beyond_dash import _make, _record_current_logps, _step_delta

    table, _ = _record_current_logps(scripted_run, loss_type="grpo")
    odd = sum(len(v) for u, v in table.items() if u % 2)
    assert odd and len(table) == 16 and odd < sum(len(v) for v in table.values())
    full = [[x - 2.0 * (u % 2) for x in table[u]] for u in range(16)]
    cfg, run = _make(scripted_run, table=full, loss_type="grpo", rollout_correction="mis", rollout_is_cap=3.0)
    delta, metrics = _step_delta(Trainer(cfg, run), run)
    tokens = sum(len(v) for v in table.values())
    assert metrics["rollout_is/masked_fraction"] == odd / tokens
    assert metrics["rollout_is/weight_max"] == 1.0 and metrics["rollout_is/weight_mean"] == (tokens - odd) / tokens

    cfg, run = _make(scripted_run, loss_type="grpo")
    trainer = Trainer(cfg, run)
    trainer.rollout()
    trainer.buffer = [replace(b, kept=tuple(replace(s, advantage=0.0) if s.uid % 2 else s for s in b.kept))
                      for b in trainer.buffer]
    want, _ = _step_delta(trainer, run)
    assert max(float(v.abs().max()) for v in want.values()) > 1e-4, "the step changed nothing"
    unequal = [k for k in want if not torch.equal(want[k], delta[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
