"""The loss family beyond the paper (docs/losses.md): GSPO's sequence ratio, cispo, sapo, delta, the
bias-corrected KL, the top-entropy and off-policy masks.

The oracle is TRL's GRPOTrainer._compute_loss as TRL documents it, rewritten here on padded [B, T]
float64 tensors with materialised logits (no fastdash code): the fused kernels and fastdash.algo's
normalisers must give its loss and gradients within error bounds derived from the magnitudes
(tests/kernels/bounds.py). Then the masks' own definitions, the config's validation, and one trainer
step per option set whose gradient must not depend on how the step is split into micro-batches.
"""
from __future__ import annotations

import hashlib
import math

import pytest
import torch

from fastdash.algo import loss_normaliser, loss_token_weights, policy_objective
from fastdash.batch import Sample
from fastdash.config import Config
from fastdash.loss_masks import (TIE_RTOL, off_policy_sequence_mask, quantile, step_entropy_threshold,
                                 top_entropy_mask)
from fastdash_kernels import fused_policy_loss
from tests.conftest import ScriptedEngine
from tests.kernels.bounds import EPS32, ULPS, assert_within, logprob_bounds
from tests.kernels.conftest import backends_under_test, make_packed
from tests.test_invariants import _assert_close, _one_step_delta

LENGTHS = [5, 9, 1, 13, 4]  # N = 32; no empty completion (TRL's rows always hold at least one token)
H, V, MAX_LEN = 16, 61, 16


# ------------------------------------------------------------------ TRL's definitions, padded ---------
def _pad(x, cu):
    """[N] -> [B, T] (zeros after each row's end) and the [B, T] mask."""
    lengths = (cu[1:] - cu[:-1]).tolist()
    out = x.new_zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.float64)
    for i, (lo, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        out[i, :n] = x[lo : lo + n]
        mask[i, :n] = 1
    return out, mask


def trl_loss(lp, old, ref, adv, cu, loss_type, *, level="token", epsilon=0.2, epsilon_high=0.28, delta=None,
             beta=0.0, bias_kl=False, tau_pos=1.0, tau_neg=1.05, keep=None):
    """TRL's loss for one micro-batch on one process, float64. lp/old/ref [N], adv [B]; keep [B, T]: the
    off-policy and entropy masks' product (None = 1). Returns (loss, [N] per-token terms summing to it)."""
    logps, mask = _pad(lp, cu)
    old_p, _ = _pad(old, cu)
    a = adv.double().unsqueeze(1)
    log_ratio = logps - old_p
    if level == "sequence":
        log_ratio = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_ratio)
    if beta:
        ref_p, _ = _pad(ref, cu)
        kl = torch.exp(ref_p - logps) - (ref_p - logps) - 1
        if bias_kl:
            kl = kl * coef_1
    if loss_type == "cispo":
        per_token = -torch.clamp(coef_1, max=epsilon_high).detach() * a * logps
    elif loss_type == "sapo":
        tau = torch.where(a > 0, tau_pos, tau_neg)
        per_token = -torch.sigmoid(tau * (coef_1 - 1)) * 4 / tau * a
    else:
        coef_2 = torch.clamp(coef_1, 1 - epsilon, 1 + epsilon_high)
        if delta is not None:
            coef_1 = torch.clamp(coef_1, max=delta)
        per_token = -torch.min(coef_1 * a, coef_2 * a)
    per_token = per_token.expand_as(mask)
    if keep is not None:
        per_token = per_token * keep
    if beta:
        per_token = per_token + beta * kl
    b = mask.shape[0]
    if loss_type in ("grpo", "sapo"):
        scale = 1.0 / (mask.sum(-1, keepdim=True).clamp(min=1.0) * b)
    elif loss_type == "dr_grpo":
        scale = torch.full_like(mask, 1.0 / (b * MAX_LEN))
    else:  # bnpo; dapo and cispo: num_items_in_batch, = the mask's sum on one process and micro-batch
        scale = torch.full_like(mask, 1.0 / mask.sum())
    terms = (per_token * mask * scale)[mask.bool()]  # [N], in packed order
    return terms.sum(), terms


def trl_entropy_mask(entropy, cu, rho):
    ent, mask = _pad(entropy, cu)
    threshold = torch.quantile(ent[mask.bool()], 1 - rho)
    return ((ent * mask >= threshold) & mask.bool()).double()


def trl_off_policy_mask(sampling, lp, adv, cu, threshold):
    s, mask = _pad(sampling, cu)
    cur, _ = _pad(lp.detach(), cu)
    avg = ((s - cur) * mask).sum(1, keepdim=True) / mask.sum(1, keepdim=True).clamp(min=1.0)
    return ((adv.double().unsqueeze(1) >= 0) | (avg <= threshold)).double().expand_as(mask)


# ------------------------------------------------------------------ data and bounds ------------------
def _batch(seed):
    """Packed hidden states, and old / ref log-probs spread so that ratios leave every clip range."""
    x, w, y, cu = make_packed(LENGTHS, H, V, dtype=torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        cur = _logps64(x, w, y)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    shift = torch.tensor([-0.45, 0.35, 0.6, -0.1, 0.25], dtype=torch.float64)  # per-sequence drift (GSPO ratios)
    old = (cur + shift[seq] + 0.5 * torch.randn(len(y), generator=g, dtype=torch.float64)).float()
    ref = (cur + 0.3 * torch.randn(len(y), generator=g, dtype=torch.float64)).float()
    adv = torch.tensor([1.0, -0.7, 0.4, -1.3, 0.9])
    return x, w, y, cu, adv, old, ref


def _logps64(x, w, y):
    z = x.double() @ w.double().t()
    return torch.log_softmax(z, -1).gather(-1, y[:, None]).squeeze(-1)


def _entropy64(x, w):
    lsm = torch.log_softmax(x.double() @ w.double().t(), -1)
    return -(lsm.exp() * lsm).sum(-1)


def _bounds(x, w, y, loss_of_logps):
    """Float64 reference loss, dX, dW and their error bounds for any L(logps) (a sequence ratio couples a
    sequence's tokens, so the upstream gradient's error uses the full |Hessian|). A detached ratio
    factor f(r) (cispo's capped weight, |df/dlogp| <= |f|) moves g by at most |g| err_lp: added too."""
    lp = _logps64(x, w, y).requires_grad_(True)
    loss, terms = loss_of_logps(lp)
    (g,) = torch.autograd.grad(loss, lp)
    hess = torch.autograd.functional.hessian(lambda t: loss_of_logps(t)[0], lp.detach(), vectorize=True)
    err_lp = logprob_bounds(x, w, y, 1.0, g)[1]["logps"]
    dg = hess.abs() @ err_lp + g.abs() * err_lp
    ref, bound = logprob_bounds(x, w, y, 1.0, g, dg=dg)
    ref["loss"] = loss.detach()
    bound["loss"] = (g.abs() * err_lp).sum() + ULPS * EPS32 * math.sqrt(len(y)) * terms.abs().sum().detach()
    return ref, bound


CASES = {  # id: (loss_type, fastdash / TRL options)
    "grpo-delta": ("grpo", dict(delta=1.5)),
    "dapo-delta-biaskl": ("dapo", dict(delta=1.5, beta=0.04, bias_kl=True)),
    "bnpo-biaskl": ("bnpo", dict(beta=0.04, bias_kl=True)),
    "cispo": ("cispo", dict(epsilon_high=1.3)),
    "cispo-seq-kl": ("cispo", dict(epsilon_high=1.3, level="sequence", beta=0.04)),
    "sapo": ("sapo", dict()),
    "sapo-seq-biaskl": ("sapo", dict(level="sequence", beta=0.04, bias_kl=True)),
    "gspo": ("grpo", dict(level="sequence")),
    "drgrpo-seq-delta": ("dr_grpo", dict(level="sequence", delta=1.5)),
}


def _fastdash_kw(loss_type, opts, cu):
    norm = loss_normaliser(loss_type, LENGTHS, LENGTHS, MAX_LEN)
    return dict(token_weights=loss_token_weights(loss_type, cu, norm), objective=policy_objective(loss_type),
                importance_sampling_level=opts.get("level", "token"), delta=opts.get("delta"),
                epsilon=0.2, epsilon_high=opts.get("epsilon_high", 0.28), beta=opts.get("beta", 0.0),
                use_bias_correction_kl=opts.get("bias_kl", False))


def _grads(backend, x, w, y, cu, adv, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fused_policy_loss(x, w, y, cu, adv, backend=backend, return_entropy=True, **kw)
    out.loss.backward()
    return out, x.grad, w.grad


# ------------------------------------------------------------------ kernels against TRL --------------
# A sequence-level ratio always forms the gradient after the forward: only token-level cases run eager.
MODES = [(c, g) for c in CASES for g in (True, False) if g is False or CASES[c][1].get("level") != "sequence"]


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("case,grad_in_forward", MODES,
                         ids=[f"{c}-{'eager' if g else 'recompute'}" for c, g in MODES])
def test_loss_and_gradients_equal_trls_definition(backend, grad_in_forward, case):
    loss_type, opts = CASES[case]
    x, w, y, cu, adv, old, ref = _batch(3)
    kw = _fastdash_kw(loss_type, opts, cu)
    out, dx, dw = _grads(backend, x, w, y, cu, adv, old_logps=old, ref_logps=ref if kw["beta"] else None,
                         grad_in_forward=grad_in_forward, **kw)
    trl_opts = {k: v for k, v in opts.items() if k != "epsilon_high"}
    refs, bound = _bounds(x, w, y, lambda lp: trl_loss(lp, old.double(), ref.double(), adv, cu, loss_type,
                                                         epsilon_high=kw["epsilon_high"], **trl_opts))
    assert_within(out.loss, refs["loss"], bound["loss"], f"{case} loss")
    assert_within(dx, refs["dX"], bound["dX"], f"{case} dX")
    assert_within(dw, refs["dW"], bound["dW"], f"{case} dW")
    assert dx.abs().sum() > 0
    assert_within(out.entropy, _entropy64(x, w), logprob_bounds(x, w, y, 1.0, torch.zeros(len(y)))[1]["entropy"],
                  f"{case} entropy")


def test_the_cases_reach_every_branch():
    """Not vacuous: the batch puts ratios past every bound the cases use, on both advantage signs."""
    x, w, y, cu, adv, old, _ = _batch(3)
    lp = _logps64(x, w, y)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    r, a = torch.exp(lp - old.double()), adv.double()[seq]
    assert ((r > 1.5) & (a < 0)).any() and ((r < 0.8) & (a < 0)).any() and ((r > 1.28) & (a > 0)).any()
    assert ((r > 1.3) & (a > 0)).any() and (r < 1.3).any()  # cispo: capped and not
    r_seq = torch.exp(torch.stack([(lp - old.double())[seq == i].mean() for i in range(len(LENGTHS))]))
    assert (r_seq > 1.28).any() and (r_seq < 0.8).any()


def test_clip_fractions_per_side_are_trls():
    x, w, y, cu, adv, old, _ = _batch(3)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    a = adv.double()[seq]
    for loss_type, opts in (("dapo", dict(delta=1.5)), ("cispo", dict(epsilon_high=1.3)), ("sapo", {}),
                            ("grpo", dict(level="sequence"))):
        kw = _fastdash_kw(loss_type, opts, cu)
        out = fused_policy_loss(x, w, y, cu, adv, old_logps=old, backend="torch", **kw)
        lr = _logps64(x, w, y) - old.double()
        if opts.get("level") == "sequence":
            lr = torch.stack([lr[seq == i].mean() for i in range(len(LENGTHS))])[seq]
        r = torch.exp(lr)
        if loss_type == "cispo":  # TRL's cispo_clip_ratio
            low, high = torch.zeros_like(r, dtype=torch.bool), (r > 1.3) & (a > 0)
        elif loss_type == "sapo":  # no hard clip
            low = high = torch.zeros_like(r, dtype=torch.bool)
        else:  # TRL's clip_ratio/low_mean and /high_mean
            low, high = (r < 0.8) & (a < 0), (r > 1.28) & (a > 0)
        n = len(y)
        assert float(out.metrics["clip_low_fraction"]) * n == pytest.approx(float(low.sum()), abs=0.5), loss_type
        assert float(out.metrics["clip_high_fraction"]) * n == pytest.approx(float(high.sum()), abs=0.5), loss_type
        if "delta" in opts:
            want = float(((r > 1.5) & (a < 0)).sum())
            assert want > 0 and float(out.metrics["clip_delta_fraction"]) * n == pytest.approx(want, abs=0.5)
        assert (low | high).any() or loss_type == "sapo"


# ------------------------------------------------------------------ the masks -------------------------
@pytest.mark.parametrize("backend", backends_under_test())
def test_masks_multiply_only_the_policy_term_like_trl(backend):
    """pg_weights = off-policy mask (a function of the current log-probs) x top-entropy mask: TRL's
    per_token_loss * off_policy_mask * entropy_mask + beta * kl, with both masks from TRL's formulas."""
    x, w, y, cu, adv, old, ref = _batch(5)
    seq = torch.repeat_interleave(torch.arange(len(LENGTHS)), torch.tensor(LENGTHS))
    sampling = old  # the sampler's log-probs: here the old policy's
    ent = _entropy64(x, w)
    thr = quantile(ent, 1 - 0.4)
    ent_mask = top_entropy_mask(ent, thr)
    kw = _fastdash_kw("dapo", dict(beta=0.04), cu)

    def pg_weights(logps):
        return off_policy_sequence_mask(logps, sampling, adv[seq], cu, 0.05) * ent_mask

    out, dx, dw = _grads(backend, x, w, y, cu, adv, old_logps=old, ref_logps=ref, pg_weights=pg_weights, **kw)
    cur = _logps64(x, w, y)
    keep = trl_off_policy_mask(sampling.double(), cur, adv, cu, 0.05) * trl_entropy_mask(ent, cu, 0.4)
    opm = trl_off_policy_mask(sampling.double(), cur, adv, cu, 0.05)
    assert 0 < opm[:, 0].mean() < 1, "the off-policy mask must drop some sequences and keep others"
    refs, bound = _bounds(x, w, y, lambda lp: trl_loss(lp, old.double(), ref.double(), adv, cu, "dapo", beta=0.04,
                                                         keep=keep))
    assert_within(out.loss, refs["loss"], bound["loss"], "loss")
    assert_within(dx, refs["dX"], bound["dX"], "dX")
    assert_within(dw, refs["dW"], bound["dW"], "dW")


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.5, 0.999, 1.0])
def test_top_entropy_mask_is_trls_quantile_rule(rho):
    ent = torch.rand(97, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 5
    assert quantile(ent, 1 - rho) == pytest.approx(float(torch.quantile(ent, 1 - rho)), rel=1e-15, abs=0)
    cu = torch.tensor([0, 40, 97])
    want = trl_entropy_mask(ent, cu, rho)[torch.tensor([[1] * 40 + [0] * 17, [1] * 57]).bool()]
    got = top_entropy_mask(ent, quantile(ent, 1 - rho))
    assert torch.equal(got.bool(), want.bool())
    if rho == 0.0:
        assert int(got.sum()) == 1  # TRL: only the highest-entropy token


def test_equal_entropies_are_kept_or_dropped_together():
    """Tokens sharing a context have equal entropies in exact arithmetic; fp32 rounding (which depends on
    the packing) moving one of them an ulp below the threshold must not split them."""
    e = 2.5
    ent = torch.tensor([1.0, e, e * (1 - 4 * EPS32), 3.0, 4.0], dtype=torch.float64)
    thr = quantile(torch.tensor([1.0, e, e, 3.0, 4.0], dtype=torch.float64), 0.25)  # = e: the tie is at it
    assert thr == e and top_entropy_mask(ent, thr).tolist() == [0, 1, 1, 1, 1]
    assert top_entropy_mask(torch.tensor([e * (1 - 10 * TIE_RTOL)], dtype=torch.float64), thr).tolist() == [0]


def test_step_threshold_pools_every_kept_token_of_the_step():
    g = torch.Generator().manual_seed(2)
    kept = [Sample(uid=i, prompt_ids=[1], completion_ids=[5] * n, truncated=False, entropy=torch.rand(n, generator=g))
            for i, n in enumerate([3, 0, 7, 2])]
    kept[1] = Sample(uid=1, prompt_ids=[1], completion_ids=[], truncated=False, entropy=torch.zeros(0))
    pooled = torch.cat([s.entropy for s in kept]).double()
    assert step_entropy_threshold(kept, 0.3) == pytest.approx(float(torch.quantile(pooled, 0.7)), rel=1e-12)
    assert step_entropy_threshold([], 0.3) is None


def test_off_policy_mask_is_deepseeks_rule():
    lp = torch.tensor([-1.0, -2.0, -1.0, -1.0, -3.0, -0.5], dtype=torch.float64)
    sampling = torch.tensor([-0.5, -1.0, -1.0, -1.1, -1.0, -0.5], dtype=torch.float64)
    cu = torch.tensor([0, 2, 4, 6])
    # mean KL(sampler || current) per sequence: 0.75, -0.05, 1.0; advantages -1, -1, +1
    adv = torch.tensor([-1.0, -1.0, -1.0, -1.0, 1.0, 1.0])
    assert off_policy_sequence_mask(lp, sampling, adv, cu, 0.5).tolist() == [0, 0, 1, 1, 1, 1]
    assert off_policy_sequence_mask(lp, sampling, adv, cu, 0.75).tolist() == [1, 1, 1, 1, 1, 1]  # <= keeps


# ------------------------------------------------------------------ config ---------------------------
@pytest.mark.parametrize("overrides,key", [
    (dict(importance_sampling_level="seq"), "importance_sampling_level"),
    (dict(loss_type="cispo"), "epsilon_high"),
    (dict(delta=1.1), "delta"),
    (dict(loss_type="sapo", delta=4.0), "delta"),
    (dict(sapo_temperature_neg=0.0), "sapo_temperature_neg"),
    (dict(top_entropy_quantile=1.5), "top_entropy_quantile"),
    (dict(off_policy_mask_threshold=-0.1), "off_policy_mask_threshold"),
    (dict(use_bias_correction_kl=True), "use_bias_correction_kl"),
    (dict(kernel="liger", loss_type="sapo"), "kernel"),
])
def test_bad_values_name_the_key(overrides, key):
    with pytest.raises(ValueError, match=f"config: {key}="):
        Config(**overrides)


def test_defaults_are_trls_but_the_kl_is_the_papers():
    c = Config(loss_type="cispo", epsilon_high=5.0, delta=None)
    assert (c.importance_sampling_level, c.sapo_temperature_pos, c.sapo_temperature_neg) == ("token", 1.0, 1.05)
    assert c.top_entropy_quantile == 1.0 and c.off_policy_mask_threshold is None and not c.use_bias_correction_kl


# ------------------------------------------------------------------ one trainer step -----------------
class SamplerLogpEngine(ScriptedEngine):
    """ScriptedEngine's samples with the engine's own log-probs, away from the trainer's (~ -3; with
    old_logprobs=sampler they are the ratio's denominator): ratios ~ e^+-1 leave every clip range, and half
    the sequences are off-policy (mean KL(sampler || current) ~ +1 > 0.5) while the rest are not (~ -1.4)."""

    def generate(self, prompts, n, params):
        out = super().generate(prompts, n, params)
        for i, c in enumerate(out):
            h = hashlib.sha256(f"{c.prompt_ids}-{i % n}".encode()).digest()
            base = -1.8 if h[0] % 2 else -4.2  # the tiny model's log-probs are ~ -3 (20 tokens)
            c.sampler_logps = [base - (h[1 + k] % 4) * 0.15 for k in range(len(c.completion_ids))]
        return out


def _sampler_run(make):
    def run(**overrides):
        cfg, run_ = make(**overrides)
        run_.engine = SamplerLogpEngine(max_len=cfg.max_completion_length)
        return cfg, run_
    return run


STEP_CASES = {
    "sapo-gspo-entropy-biaskl": dict(loss_type="sapo", importance_sampling_level="sequence", top_entropy_quantile=0.5,
                                     beta=0.04, use_bias_correction_kl=True),
    "cispo-offpolicy-entropy": dict(loss_type="cispo", epsilon_high=1.5, off_policy_mask_threshold=0.5,
                                    top_entropy_quantile=0.3),
    "dapo-delta": dict(loss_type="dapo", delta=1.5, epsilon_high=0.28),
    "gspo-delta-offpolicy": dict(loss_type="grpo", importance_sampling_level="sequence", delta=1.5,
                                 off_policy_mask_threshold=0.5),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_gradient_independent_of_microbatch_split(scripted_run, case):
    """Multi (K = 2) with the sampler's log-probs as the old policy: one step packed at several budgets
    and padded equals the float64 step; the masks and bounds it uses are on and active."""
    make = _sampler_run(scripted_run)
    common = dict(max_grad_norm=0.0, num_iterations=2, old_logprobs="sampler", **STEP_CASES[case])
    ref64, m64, run = _one_step_delta(make, float64=True, packing=True, max_tokens_per_microbatch=10_000, **common)
    for kw in (dict(packing=True, max_tokens_per_microbatch=22), dict(packing=False, micro_batch_size=3)):
        delta, metrics, _ = _one_step_delta(make, **common, **kw)
        assert metrics["microbatches"] > 1
        _assert_close(delta, ref64, run.cfg)
        assert metrics["entropy/mean"] == pytest.approx(m64["entropy/mean"], rel=1e-5)
    if "top_entropy_quantile" in common:
        assert 0 < metrics["mask/entropy_masked_fraction"] < 1
    if "off_policy_mask_threshold" in common:
        assert 0 < metrics["mask/off_policy_masked_fraction"] < 1
    if common["loss_type"] != "sapo":
        assert metrics["clip/low_fraction"] + metrics["clip/high_fraction"] > 0
    if "delta" in common:
        assert metrics["clip/delta_fraction"] > 0


def test_entropy_threshold_comes_from_the_policy_before_the_step(scripted_run):
    """At num_iterations = 1 no old pass runs: the entropies come from a no-grad pass of the weights being
    trained, so they equal the training pass's (its entropy/mean), and the threshold is fixed per step."""
    cfg, run = scripted_run(top_entropy_quantile=0.25, max_grad_norm=0.0)
    from fastdash.trainer import Trainer

    trainer = Trainer(cfg, run)
    trainer.rollout()
    batch = trainer.buffer[0]
    pooled = torch.cat([s.entropy for s in batch.kept])
    assert batch.entropy_threshold == pytest.approx(float(torch.quantile(pooled.double(), 0.75)), rel=1e-12)
    metrics = trainer.step()
    assert metrics["entropy/mean"] == pytest.approx(float(pooled.double().mean()), rel=1e-5)
    kept = float((pooled.double() >= batch.entropy_threshold * (1 - TIE_RTOL)).double().mean())
    assert metrics["mask/entropy_masked_fraction"] == pytest.approx(1 - kept, abs=1e-12)
