"""fused_linear_logprob: every backend against the materialised-logits reference and
torch.nn.functional.linear_cross_entropy, values and both gradients."""

import pytest
import torch
import torch.nn.functional as F

from fastdash_kernels import fused_linear_logprob
from fastdash_kernels.reference import logprob_reference

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


def _close(a, b, atol, rtol, what):
    torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("lengths,hidden,vocab", SHAPES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprob_matches_reference(backend, lengths, hidden, vocab, temperature, small_chunks):
    x, w, y, _ = make_packed(lengths, hidden, vocab, seed=len(lengths) + vocab)
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(1)).to(DEVICE)  # random upstream grad
    got = _grads(backend, x, w, y, temperature, g)
    ref = _grads("reference", x, w, y, temperature, g)
    for a, b, what in zip(got, ref, ("logps", "entropy", "dX", "dW")):
        _close(a, b, 2e-5, 1e-4, f"{backend} {what}")
    assert (got[0] <= 0).all()


@pytest.mark.skipif(not hasattr(F, "linear_cross_entropy"), reason="torch without F.linear_cross_entropy")
@pytest.mark.parametrize("backend", backends_under_test())
def test_logprob_matches_torch_linear_cross_entropy(backend):
    x, w, y, _ = make_packed([30, 11], 48, 301, seed=3)
    temperature = 0.6
    g = torch.rand(x.shape[0], generator=torch.Generator().manual_seed(2)).to(DEVICE)
    got = _grads(backend, x, w, y, temperature, g)
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    # z = W x / T  ==  (W / T) x, so -CE of the scaled weight is the log-prob.
    logps = -F.linear_cross_entropy(xr, wr / temperature, y, reduction="none")
    (logps * g).sum().backward()
    _close(got[0], logps.detach(), 2e-5, 1e-4, "logps")
    _close(got[2], xr.grad, 2e-5, 1e-4, "dX")
    _close(got[3], wr.grad, 2e-5, 1e-4, "dW")


@pytest.mark.parametrize("backend", backends_under_test())
def test_very_negative_logits(backend):
    """Every logit near -5e4: an online max that starts at 0 instead of -inf would give nan/-inf."""
    x, w, y, _ = make_packed([20], 32, 157, seed=4)
    x[:, 0], w[:, 0] = 1000.0, -50.0
    logps, ent = fused_linear_logprob(x, w, y, return_entropy=True, backend=backend)
    ref, ref_ent = logprob_reference(x, w, y)
    assert torch.isfinite(logps).all() and torch.isfinite(ent).all()
    _close(logps, ref, 1e-3, 1e-4, "logps")
    _close(ent, ref_ent, 1e-3, 1e-4, "entropy")


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
    """bf16 inputs: fp32 maths inside; grads come back in bf16 (bf16 tolerances)."""
    x, w, y, _ = make_packed([33, 64, 9], 64, 389, dtype=torch.bfloat16, seed=5)
    g = torch.randn(x.shape[0], generator=torch.Generator().manual_seed(3)).to(DEVICE)
    got = _grads("torch", x, w, y, 0.9, g)
    ref = _grads("reference", x.float(), w.float(), y, 0.9, g)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    _close(got[0], ref[0], 1e-3, 1e-3, "logps")
    _close(got[1], ref[1], 1e-3, 1e-3, "entropy")
    _close(got[2], ref[2], 2e-2, 2e-2, "dX")
    _close(got[3], ref[3], 2e-2, 2e-2, "dW")


def test_bad_inputs():
    x, w, y, _ = make_packed([4], 32, 100)
    with pytest.raises(ValueError, match="temperature"):
        fused_linear_logprob(x, w, y, temperature=0.0)
    with pytest.raises(ValueError, match="targets"):
        fused_linear_logprob(x, w, y[:-1])
    with pytest.raises(ValueError, match="backend"):
        fused_linear_logprob(x, w, y, backend="cuda")
