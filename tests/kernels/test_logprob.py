"""fused_linear_logprob: every backend against float64 references (the materialised logits and
torch.nn.functional.linear_cross_entropy), values and both gradients, within error bounds derived
from the magnitudes involved (see bounds.py)."""

import pytest
import torch
import torch.nn.functional as F

from fastdash_kernels import fused_linear_logprob
from fastdash_kernels.reference import logprob_reference

from .bounds import assert_within, logprob_bounds
from .conftest import DEVICE, backends_under_test, make_packed

SHAPES = [  # (token lengths, H, V): ragged, N and V not multiples of any block, V not a power of two
    ([1], 32, 100),
    ([5, 0, 15, 17], 32, 157),
    ([40, 23, 67], 64, 500),
]


def _grads(backend, x, w, y, temperature, g):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    if backend == "reference":
        logps, ent = logprob_reference(x, w, y, temperature)
    else:
        logps, ent = fused_linear_logprob(x, w, y, temperature=temperature, return_entropy=True, backend=backend)
    (logps * g).sum().backward()
    return logps.detach(), ent.detach(), x.grad, w.grad


def _check(got, x, w, y, temperature, g, tag, **kw):
    ref, bound = logprob_bounds(x, w, y, temperature, g, **kw)
    for a, what in zip(got, ("logps", "entropy", "dX", "dW")):
        assert_within(a, ref[what], bound[what], f"{tag} {what}")


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("lengths,hidden,vocab", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_matches_reference(backend, lengths, hidden, vocab, temperature, small_chunks):
    x, w, y, _ = make_packed(lengths, hidden, vocab, seed=len(lengths) + vocab)
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)  # random upstream grad
    got = _grads(backend, x, w, y, temperature, g)
    _check(got, x, w, y, temperature, g, backend)
    assert (got[0] <= 0).all()


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy")
@pytest.mark.parametrize("backend", backends_under_test())
def test_logprob_matches_torch_linear_cross_entropy(backend):
    x, w, y, _ = make_packed([30, 11], 48, 301, seed=3)
    temperature = 0.6
    g = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = _grads(backend, x, w, y, temperature, g)
    xr, wr = x.double().requires_grad_(True), w.double().requires_grad_(True)
    # z = W x / T  ==  (W / T) x, so -CE of the scaled weight is the log-prob (float64: an oracle).
    logps = -F.linear_cross_entropy(xr, wr / temperature, y, reduction="none")
    (logps * g.double()).sum().backward()
    _, bound = logprob_bounds(x, w, y, temperature, g)
    assert_within(got[0], logps.detach(), bound["logps"], "logps")
    assert_within(got[2], xr.grad, bound["dX"], "dX")
    assert_within(got[3], wr.grad, bound["dW"], "dW")


@pytest.mark.parametrize("backend", backends_under_test())
def test_very_negative_logits(backend):
    """Every logit near -5e4: an online max that starts at 0 instead of -inf would give nan/-inf.

    One fp32 ulp at 5e4 is ~4e-3, so the bound (a few ulps of max |z|) is what fp32 can promise."""
    x, w, y, _ = make_packed([20], 32, 157, seed=4)
    x[:, 0], w[:, 0] = 1000.0, -50.0
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got = _grads(backend, x, w, y, 1.0, g)
    assert all(torch.isfinite(t).all() for t in got)
    _check(got, x, w, y, 1.0, g, backend)


@pytest.mark.parametrize("backend", backends_under_test() + ["reference"])
def test_empty_batch(backend):
    x, w, y, _ = make_packed([0], 32, 100)
    x.requires_grad_(True)
    w.requires_grad_(True)
    logps = fused_linear_logprob(x, w, y, backend=backend)
    assert logps.shape == (0,)
    logps.sum().backward()
    assert w.grad is not None and not w.grad.any()


def test_bf16_torch_backend(small_chunks):
    """bf16 inputs: fp32 maths inside; grads come back in bf16 (one bf16 rounding in the bound; on
    CUDA dZ is also rounded to bf16 before the gradient GEMMs)."""
    x, w, y, _ = make_packed([33, 64, 9], 64, 389, dtype=torch.bfloat16, seed=5)
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = _grads("torch", x, w, y, 0.9, g)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    _check(got, x, w, y, 0.9, g, "bf16", out_dtype=torch.bfloat16, lowp_operands=DEVICE == "cuda")


def test_bad_inputs():
    x, w, y, _ = make_packed([4], 32, 100)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(x, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprob(x, w, y[:-1])
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprob(x, w, y, backend="cuda")
