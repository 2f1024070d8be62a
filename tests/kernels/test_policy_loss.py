"""fused_policy_loss: every loss type (through fastdash.algo's token weights), beta 0 / > 0, K = 1
and K > 1, both gradient modes, against the float64 loop-over-sequences reference within bounds
derived from the magnitudes (bounds.py); plus hand-computed checks of the per-token maths."""

import math

import pytest
import torch

from fastdash.algo import CLIP_LOSS_TYPES, loss_token_weights
from fastdash_kernels import fused_policy_loss, per_token_policy_loss
from fastdash_kernels.reference import logprob_reference, policy_loss_reference

from .bounds import assert_within, logprob_bounds, policy_loss_bounds
from .conftest import DEVICE, backends_under_test, make_packed

LENGTHS = [7, 0, 19, 1, 33]  # ragged, one empty sequence, N = 60
H, V = 32, 157


def _batch(seed, with_old, beta, lengths=LENGTHS, dtype=torch.float32):
    x, w, y, cu = make_packed(lengths, H, V, dtype=dtype, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    n = x.shape[0]
    adv = torch.randn(len(lengths), generator=g).to(DEVICE)
    adv[0] = 0.0  # a zero-advantage sequence (its tiles are skipped in the Triton backward)
    with torch.no_grad():
        cur, _ = logprob_reference(x, w, y)
    # old/ref near the current log-probs, spread enough that some ratios leave [1 - eps, 1 + eps_high]
    old = (cur + 0.3 * torch.randn(n, generator=g).to(DEVICE)) if with_old else None
    ref = (cur + 0.2 * torch.randn(n, generator=g).to(DEVICE)) if beta else None
    return x, w, y, cu, adv, old, ref


def _run(backend, x, w, y, cu, adv, **kw):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    if backend == "reference_loop":
        loss, logps, ent, _ = policy_loss_reference(x, w, y, cu, adv, **kw)
        ent = ent.detach()
    else:
        out = fused_policy_loss(x, w, y, cu, adv, return_entropy=True, backend=backend, **kw)
        loss, logps, ent = out.loss, out.logps, out.entropy
        assert not logps.requires_grad and not ent.requires_grad
    loss.backward()
    return loss.detach(), logps.detach(), ent, x.grad, w.grad


def _check(got, x, w, y, cu, adv, tag, out_dtype=torch.float32, **kw):
    """got vs the float64 loop reference, within bounds derived from the magnitudes: the loss is
    rebuilt from float64 log-probs so the bound follows the gradient's own error (policy_loss_bounds)."""
    kw = dict(kw)
    temperature = kw.pop("temperature", 1.0)
    X, W = x.detach().double(), w.detach().double()
    loop = _run("reference_loop", X, W, y, cu, adv, temperature=temperature, **kw)
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=cu.device), (cu[1:] - cu[:-1]).long())
    tw = kw.pop("token_weights").double()

    def loss_of_logps(lp):
        terms = per_token_policy_loss(lp, adv.double()[seg], kw.get("old_logps"), kw.get("ref_logps"),
                                      **{k: v for k, v in kw.items() if k not in ("old_logps", "ref_logps")})[0] * tw
        return terms.sum(), terms

    _, bound = policy_loss_bounds(x, w, y, temperature, loss_of_logps, out_dtype=out_dtype,
                                  lowp_operands=out_dtype != torch.float32 and DEVICE == "cuda")
    for a, b, what in zip(got, loop, ("loss", "logps", "entropy", "dX", "dW")):
        assert_within(a, b, bound[what], f"{tag} {what}")


def _weights(loss_type, cu, normaliser):
    return loss_token_weights(loss_type, cu, normaliser)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True], ids=["K1", "Kgt1"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["eager", "recompute"])
def test_policy_loss_matches_reference(backend, loss_type, beta, with_old, grad_in_forward, small_chunks):
    x, w, y, cu, adv, old, ref = _batch(7, with_old, beta)
    kw = dict(old_logps=old, ref_logps=ref, token_weights=_weights(loss_type, cu, 37.0), epsilon=0.2,
              epsilon_high=0.28, beta=beta, temperature=0.8)
    got = _run(backend, x, w, y, cu, adv, grad_in_forward=grad_in_forward, **kw)
    _check(got, x, w, y, cu, adv, f"{backend} {loss_type}", **kw)
    assert got[3].abs().sum() > 0  # the comparison is not between two zero gradients


@pytest.mark.parametrize("loss_type", CLIP_LOSS_TYPES)
def test_loss_types_mean_what_they_say(loss_type):
    """algo's weights: 'grpo' = mean of each sequence's token mean x B / normaliser, the rest a token
    sum / normaliser, written out per sequence here (no weights, no segment helpers), in float64."""
    x, w, y, cu, adv, old, _ = _batch(13, True, 0.0)
    out = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=_weights(loss_type, cu, 9.0),
                            backend="torch")
    lp, _ = logprob_reference(x.double(), w.double(), y)
    bounds, total = cu.tolist(), 0.0
    for i in range(len(bounds) - 1):
        lo, hi = bounds[i], bounds[i + 1]
        if hi > lo:
            per_tok, _ = per_token_policy_loss(lp[lo:hi], adv[i].double().expand(hi - lo), old[lo:hi])
            total += float(per_tok.mean() if loss_type == "grpo" else per_tok.sum()) / 9.0
    kw = dict(old_logps=old, token_weights=_weights(loss_type, cu, 9.0))
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE), torch.tensor(LENGTHS, device=DEVICE))
    terms = lambda lp: per_token_policy_loss(lp, adv.double()[seg], old)[0] * kw["token_weights"].double()  # noqa
    tol = float(policy_loss_bounds(x, w, y, 1.0, lambda lp: (terms(lp).sum(), terms(lp)))[1]["loss"])
    assert abs(float(out.loss) - total) <= tol, (float(out.loss), total, tol)


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimators_and_metrics(kl_estimator):
    x, w, y, cu, adv, old, ref = _batch(11, True, 0.1)
    kw = dict(old_logps=old, ref_logps=ref, token_weights=_weights("bnpo", cu, 60.0), beta=0.1,
              kl_estimator=kl_estimator)
    out = fused_policy_loss(x, w, y, cu, adv, backend="torch", **kw)
    _check((out.loss,), x, w, y, cu, adv, f"torch {kl_estimator}", **kw)
    logps, _ = logprob_reference(x.double(), w.double(), y)
    # Metrics recomputed here from the definitions, not through per_token_policy_loss.
    d = logps - ref.double()
    kl = {"k1": d, "k2": 0.5 * d**2, "k3": torch.exp(-d) + d - 1}[kl_estimator]
    ratio = torch.exp(logps - old.double())
    a = adv[torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE), torch.tensor(LENGTHS, device=DEVICE))]
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    assert 0 < clipped.double().mean() < 1
    # kl_mean: mean over N tokens of a term whose logp-sensitivity is |dKL/dlogp| (<= |1 - e^-d| + |d|)
    err_lp = 4 * torch.finfo(torch.float32).eps * (logps.abs().max() * 2 * math.sqrt(H) + math.sqrt(V))
    tol = float(err_lp * ((1 - torch.exp(-d)).abs() + d.abs() + 1).max() + 4 * torch.finfo(torch.float32).eps
                * kl.abs().max() * math.sqrt(len(y)))
    assert abs(float(out.metrics["kl_mean"]) - float(kl.mean())) <= tol
    assert float(out.metrics["clip_fraction"]) == pytest.approx(float(clipped.double().mean()), abs=0.5 / len(y))


def test_per_token_loss_by_hand():
    logps = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    old = torch.tensor([-0.5, 0.5, -0.5, 0.5, -1.0])  # ratios e^0.5, e^-0.5, e^0.5, e^-0.5, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.5])
    loss, m = per_token_policy_loss(logps.double(), adv, old, ref, epsilon=0.2, epsilon_high=0.3, beta=0.5)
    r = math.exp(0.5)
    k3_last = math.exp(-0.5) + 0.5 - 1
    want = [-1.3, -math.exp(-0.5), r, 0.8, -2.0 + 0.5 * k3_last]  # clip at 1.3 (A>0), at 0.8 (A<0)
    # inputs are exact in fp32 and the maths is float64: a few float64 ulps of values <= 2
    torch.testing.assert_close(loss, torch.tensor(want, dtype=torch.float64), atol=8 * 2.2e-16 * 2, rtol=0)
    assert m["clipped"].tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("backend", backends_under_test())
def test_k1_gradient_is_vanilla_policy_gradient(backend):
    """old_logps=None, beta=0: dL/dlogp_t = -A_t w_t, so dX matches that of -(A w logp).sum()."""
    x, w, y, cu, adv, _, _ = _batch(3, False, 0.0)
    tw = _weights("grpo", cu, 4.0)
    out = _run(backend, x, w, y, cu, adv, token_weights=tw)
    lens = torch.tensor(LENGTHS, device=DEVICE)
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE), lens)
    g = -(adv[seg] / lens[seg] / 4.0)
    ref, bound = logprob_bounds(x, w, y, 1.0, g)
    assert_within(out[3], ref["dX"], bound["dX"], f"{backend} dX")
    assert_within(out[4], ref["dW"], bound["dW"], f"{backend} dW")


def test_bf16_policy_loss_torch_backend(small_chunks):
    x, w, y, cu, adv, old, ref = _batch(5, True, 0.04, dtype=torch.bfloat16)
    kw = dict(old_logps=old, ref_logps=ref, token_weights=_weights("dapo", cu, 50.0), beta=0.04)
    got = _run("torch", x, w, y, cu, adv, **kw)
    _check(got, x, w, y, cu, adv, "bf16", out_dtype=torch.bfloat16, **kw)


def test_empty_batch_and_weight_scaling():
    x, w, y, cu, adv, _, _ = _batch(1, False, 0.0, lengths=[0, 0])
    out = fused_policy_loss(x.requires_grad_(True), w, y, cu, adv, token_weights=x.new_zeros(0), backend="torch")
    assert out.loss.item() == 0.0 and out.logps.shape == (0,)
    out.loss.backward()
    x, w, y, cu, adv, old, _ = _batch(2, True, 0.0)
    tw = _weights("dapo", cu, 1.0)
    a = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=tw, backend="torch").loss
    b = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=tw / 8, backend="torch").loss
    assert float(a / 8) == pytest.approx(float(b), rel=4 * torch.finfo(torch.float32).eps)  # dividing by 8 is exact


def test_liger_backend_matches_reference():
    pytest.importorskip("liger_kernel")
    for loss_type, beta in (("grpo", 0.04), ("dr_grpo", 0.0)):
        x, w, y, cu, adv, old, ref = _batch(9, True, beta)
        kw = dict(old_logps=old, ref_logps=ref, token_weights=_weights(loss_type, cu, 21.0), beta=beta,
                  temperature=0.9, epsilon=0.2, epsilon_high=0.28)
        got = _run("liger", x, w, y, cu, adv, **kw)
        _check(got, x, w, y, cu, adv, f"liger {loss_type}", **kw)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(), "token_weights"),
        (dict(token_weights=torch.ones(3)), "token_weights"),
        (dict(token_weights=torch.ones(60, dtype=torch.long)), "token_weights"),
        (dict(token_weights=torch.ones(60), beta=0.1), "ref_logps"),
        (dict(token_weights=torch.ones(60), kl_estimator="k4"), "kl_estimator"),
        (dict(token_weights=torch.ones(60), backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kw, match):
    x, w, y, cu, adv, _, _ = _batch(0, False, 0.0)
    kw = {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
    with pytest.raises((ValueError, TypeError), match=match):
        fused_policy_loss(x, w, y, cu, adv, **kw)
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(x, w, y, cu, adv[:-1], token_weights=torch.ones(60, device=DEVICE))


def test_loss_token_weights_bad_loss_type():
    with pytest.raises(ValueError, match="loss_type"):
        loss_token_weights("ppo", torch.tensor([0, 3]), 1.0)
