"""kernel=cce: Cut Cross-Entropy behind fastdash's signature (CUDA only; a clear error elsewhere)."""

import pytest
import torch

from fastdash.algo import loss_token_weights
from fastdash_kernels import cce as cce_mod
from fastdash_kernels import fused_policy_loss
from fastdash_kernels.loss import per_token_policy_loss

from .bounds import assert_within, policy_loss_bounds
from .conftest import DEVICE, make_packed


def _inputs(seed=0):
    x, w, y, cu = make_packed([9, 0, 14, 5], 32, 157, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    adv = torch.randn(cu.numel() - 1, generator=g).to(DEVICE)
    old = (torch.randn(x.shape[0], generator=g) * 0.3 - 5.0).to(DEVICE)
    return x, w, y, cu, adv, old


def _check_against_float64(backend, temperature=0.7):
    x, w, y, cu, adv, old = _inputs()
    tw = loss_token_weights("grpo", cu, 11.0)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    out = fused_policy_loss(xr, wr, y, cu, adv, token_weights=tw, old_logps=old, temperature=temperature,
                            backend=backend, return_entropy=True)
    out.loss.backward()
    seg = torch.repeat_interleave(torch.arange(cu.numel() - 1, device=DEVICE), (cu[1:] - cu[:-1]).long())

    def loss_of_logps(lp):
        terms = per_token_policy_loss(lp, adv.double()[seg], old)[0] * tw.double()
        return terms.sum(), terms

    ref, bound = policy_loss_bounds(x, w, y, temperature, loss_of_logps)
    for got, what in ((out.loss, "loss"), (out.logps, "logps"), (out.entropy, "entropy"), (xr.grad, "dX"),
                      (wr.grad, "dW")):
        assert_within(got, ref[what], bound[what], f"{backend} {what}")


def test_cce_off_cuda_is_a_clear_error():
    if DEVICE == "cuda":
        pytest.skip("on CUDA the real backend runs (test_cce_matches_reference_on_cuda)")
    x, w, y, cu, adv, _ = _inputs()
    with pytest.raises((ValueError, ImportError), match="cce.*(CUDA|cut-cross-entropy)"):
        fused_policy_loss(x, w, y, cu, adv, token_weights=torch.ones(x.shape[0]), backend="cce")


def test_cce_wiring_with_the_documented_contract(monkeypatch):
    """The wrapper's own maths (temperature folded into the hidden states, logp = -CE, the policy
    loss by autograd on [N] vectors) with CCE replaced by its documented contract in float64:
    linear_cross_entropy(e, c, targets, reduction='none') = cross_entropy(e @ c.T, targets)."""
    def contract(e, c, targets, reduction, filter_eps):
        assert reduction == "none" and filter_eps is None
        z = e.double() @ c.double().t()
        return torch.nn.functional.cross_entropy(z, targets, reduction="none").to(e.dtype)

    monkeypatch.setattr(cce_mod, "_load_cce", lambda hidden: contract)
    _check_against_float64("cce")


@pytest.mark.cuda
@pytest.mark.skipif(DEVICE != "cuda", reason="cut-cross-entropy runs on CUDA only")
def test_cce_matches_reference_on_cuda():
    pytest.importorskip("cut_cross_entropy")
    _check_against_float64("cce")
