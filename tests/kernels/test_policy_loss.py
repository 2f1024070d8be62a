"""fused_policy_loss: every loss type, beta 0 / > 0, K = 1 and K > 1, both gradient modes, against
the loop-over-sequences reference; plus hand-computed checks of the per-token maths."""

import math

import pytest
import torch

from fastdash_kernels import LOSS_TYPES, fused_policy_loss, per_token_policy_loss
from fastdash_kernels.reference import logprob_reference, policy_loss_reference

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


def _assert_all_close(got, ref, atol=2e-5, rtol=1e-4, tag=""):
    for a, b, what in zip(got, ref, ("loss", "logps", "entropy", "dX", "dW")):
        torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{tag} {what}: {m}")


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("with_old", [False, True], ids=["K1", "Kgt1"])
@pytest.mark.parametrize("grad_in_forward", [True, False], ids=["eager", "recompute"])
def test_policy_loss_matches_reference(backend, loss_type, beta, with_old, grad_in_forward, small_chunks):
    x, w, y, cu, adv, old, ref = _batch(7, with_old, beta)
    kw = dict(old_logps=old, ref_logps=ref, loss_type=loss_type, epsilon=0.2, epsilon_high=0.28, beta=beta,
              temperature=0.8, normaliser=37.0)
    got = _run(backend, x, w, y, cu, adv, grad_in_forward=grad_in_forward, **kw)
    want = _run("reference_loop", x, w, y, cu, adv, **kw)
    _assert_all_close(got, want, tag=f"{backend} {loss_type}")
    assert want[3].abs().sum() > 0  # the comparison is not between two zero gradients


@pytest.mark.parametrize("kl_estimator", ["k1", "k2", "k3"])
def test_kl_estimators_and_metrics(kl_estimator):
    x, w, y, cu, adv, old, ref = _batch(11, True, 0.1)
    kw = dict(old_logps=old, ref_logps=ref, loss_type="bnpo", beta=0.1, kl_estimator=kl_estimator, normaliser=60.0)
    out = fused_policy_loss(x, w, y, cu, adv, backend="torch", **kw)
    loss, logps, _, _ = policy_loss_reference(x, w, y, cu, adv, **kw)
    torch.testing.assert_close(out.loss, loss.detach(), atol=2e-5, rtol=1e-4)
    # Metrics recomputed here from the definitions, not through per_token_policy_loss.
    d = logps.detach() - ref
    kl = {"k1": d, "k2": 0.5 * d**2, "k3": torch.exp(-d) + d - 1}[kl_estimator]
    ratio = torch.exp(logps.detach() - old)
    a = adv[torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE), torch.tensor(LENGTHS, device=DEVICE))]
    clipped = ((ratio > 1.2) & (a > 0)) | ((ratio < 0.8) & (a < 0))
    assert 0 < clipped.float().mean() < 1
    torch.testing.assert_close(out.metrics["kl_mean"], kl.mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.metrics["clip_fraction"], clipped.float().mean())


def test_per_token_loss_by_hand():
    logps = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.0])
    old = torch.tensor([-0.5, 0.5, -0.5, 0.5, -1.0])  # ratios e^0.5, e^-0.5, e^0.5, e^-0.5, 1
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0, 2.0])
    ref = torch.tensor([0.0, 0.0, 0.0, 0.0, -1.5])
    loss, m = per_token_policy_loss(logps, adv, old, ref, epsilon=0.2, epsilon_high=0.3, beta=0.5)
    r = math.exp(0.5)
    k3_last = math.exp(-0.5) + 0.5 - 1
    want = [-1.3, -math.exp(-0.5), r, 0.8, -2.0 + 0.5 * k3_last]  # clip at 1.3 (A>0), at 0.8 (A<0)
    torch.testing.assert_close(loss, torch.tensor(want))
    assert m["clipped"].tolist() == [True, False, False, True, False]


@pytest.mark.parametrize("backend", backends_under_test())
def test_k1_gradient_is_vanilla_policy_gradient(backend):
    """old_logps=None, beta=0: dL/dlogp_t = -A_t w_t / normaliser, so dX matches -(A w logp).sum()."""
    x, w, y, cu, adv, _, _ = _batch(3, False, 0.0)
    out = _run(backend, x, w, y, cu, adv, loss_type="grpo", normaliser=4.0)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    logps, _ = logprob_reference(xr, wr, y)
    lens = torch.tensor(LENGTHS, device=DEVICE)
    seg = torch.repeat_interleave(torch.arange(len(LENGTHS), device=DEVICE), lens)
    (-(adv[seg] / lens[seg] * logps).sum() / 4.0).backward()
    torch.testing.assert_close(out[3], xr.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(out[4], wr.grad, atol=2e-5, rtol=1e-4)


def test_bf16_policy_loss_torch_backend(small_chunks):
    x, w, y, cu, adv, old, ref = _batch(5, True, 0.04, dtype=torch.bfloat16)
    kw = dict(old_logps=old, ref_logps=ref, loss_type="dapo", beta=0.04, normaliser=50.0)
    got = _run("torch", x, w, y, cu, adv, **kw)
    want = _run("reference_loop", x.float(), w.float(), y, cu, adv, **kw)
    _assert_all_close(got, want, atol=2e-2, rtol=2e-2, tag="bf16")


def test_empty_batch_and_normaliser_scaling():
    x, w, y, cu, adv, _, _ = _batch(1, False, 0.0, lengths=[0, 0])
    out = fused_policy_loss(x.requires_grad_(True), w, y, cu, adv, normaliser=1.0, backend="torch")
    assert out.loss.item() == 0.0 and out.logps.shape == (0,)
    out.loss.backward()
    x, w, y, cu, adv, old, _ = _batch(2, True, 0.0)
    a = fused_policy_loss(x, w, y, cu, adv, old_logps=old, normaliser=1.0, backend="torch").loss
    b = fused_policy_loss(x, w, y, cu, adv, old_logps=old, normaliser=8.0, backend="torch").loss
    torch.testing.assert_close(a / 8, b)


def test_liger_backend_matches_reference():
    pytest.importorskip("liger_kernel")
    for loss_type, beta in (("grpo", 0.04), ("dr_grpo", 0.0)):
        x, w, y, cu, adv, old, ref = _batch(9, True, beta)
        kw = dict(old_logps=old, ref_logps=ref, loss_type=loss_type, beta=beta, normaliser=21.0, temperature=0.9,
                  epsilon=0.2, epsilon_high=0.28)
        got = _run("liger", x, w, y, cu, adv, **kw)
        want = _run("reference_loop", x, w, y, cu, adv, **kw)
        _assert_all_close(got, want, tag=f"liger {loss_type}")


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(normaliser=0.0), "normaliser"),
        (dict(normaliser=-1.0), "normaliser"),
        (dict(normaliser=None), "normaliser"),
        (dict(normaliser=1.0, beta=0.1), "ref_logps"),
        (dict(normaliser=1.0, loss_type="ppo"), "loss_type"),
        (dict(normaliser=1.0, kl_estimator="k4"), "kl_estimator"),
        (dict(normaliser=1.0, backend="cuda"), "backend"),
    ],
)
def test_bad_arguments(kw, match):
    x, w, y, cu, adv, _, _ = _batch(0, False, 0.0)
    with pytest.raises(ValueError, match=match):
        fused_policy_loss(x, w, y, cu, adv, **kw)
    with pytest.raises(ValueError, match="advantages"):
        fused_policy_loss(x, w, y, cu, adv[:-1], normaliser=1.0)
