"""The Triton single pass (6NHV: stored fp32 logits turned into dZ): against the float64 reference
over several token chunks, in fp32 and bf16, bit-identical reruns, zero-gradient and filtered tile
skipping, and equal to the recompute design through `fused_policy_loss`."""

import pytest
import torch

from .bounds import assert_within, logprob_bounds
from .conftest import DEVICE, backends_under_test, make_packed
from .test_triton_backward import _peaked, _upstream

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(), reason="needs triton (GPU or interpreter)")


@pytest.fixture
def single(monkeypatch):
    from fastdash_kernels import triton_logprob, triton_single

    def setup(tokens_per_chunk=None, vocab=None, itemsize=4, fwd_splits=None, dx_split=None):
        if tokens_per_chunk:  # the logits + dZ buffer holds tokens_per_chunk rows: several chunks
            vpad = -(-vocab // 128) * 128
            monkeypatch.setattr(triton_single, "SCRATCH_BYTES", tokens_per_chunk * vpad * (4 + itemsize))
        monkeypatch.setattr(triton_logprob, "FWD_SPLITS", fwd_splits)
        monkeypatch.setattr(triton_single.B, "DX_SPLIT", dx_split)  # None: split over V from the SM count
        return triton_single

    return setup


def _fwd_bwd(mod, x, w, y, g, temperature, **kw):
    def grad_fn(lo, hi, lp):  # loss = sum_t g_t logp_t: its gradient is g, known per token
        return (lp * g[lo:hi]).sum(), g[lo:hi]

    return mod.logprob_fwd_bwd_single(x, w, y.long(), temperature, True, grad_fn, **kw)


@pytest.mark.parametrize("dtype,chunk,dx_split", [(torch.float32, 64, None), (torch.float32, None, None),
                                                  (torch.bfloat16, 64, None), (torch.float32, 64, 1)],
                         ids=["fp32-3chunks", "fp32-1chunk", "bf16-3chunks", "fp32-3chunks-dx-owned"])
def test_single_pass_matches_the_reference(single, dtype, chunk, dx_split):
    x, w, y, _ = make_packed([90, 61, 29], 48, 300, dtype=dtype, seed=31)  # 180 tokens, V = 300: 3 tiles
    mod = single(tokens_per_chunk=chunk, vocab=300, itemsize=dtype.itemsize, fwd_splits=2, dx_split=dx_split)
    g = _upstream(x.shape[0], 7)
    logps, ent, loss, dx, dw = _fwd_bwd(mod, x, w, y, g, 0.9)
    assert dx.dtype == dtype and dw.dtype == dtype
    lowp = dict(out_dtype=dtype, lowp_operands=True) if dtype != torch.float32 else {}
    ref, bound = logprob_bounds(x, w, y, 0.9, g, **lowp)
    for a, what in ((logps, "logps"), (ent, "entropy"), (dx, "dX"), (dw, "dW")):
        assert_within(a, ref[what], bound[what], f"{dtype} {what}")
    assert float(loss) == pytest.approx(float((ref["logps"] * g.double()).sum()), rel=1e-4, abs=1e-4)


def test_single_pass_reruns_are_bit_identical(single):
    x, w, y, _ = make_packed([100, 90], 32, 257, seed=32)
    mod = single(tokens_per_chunk=64, vocab=257)
    g = _upstream(x.shape[0], 8)
    a, b = _fwd_bwd(mod, x, w, y, g, 1.0), _fwd_bwd(mod, x, w, y, g, 1.0)
    for t, u, what in zip(a, b, ("logps", "entropy", "loss", "dX", "dW")):
        assert torch.equal(t, u), what


def test_zero_gradient_tiles_are_skipped_and_exact(single):
    x, w, y, _ = make_packed([128], 32, 300, seed=33)
    mod = single()
    g = _upstream(128, 9)
    g[:64] = 0.0  # the first token tile has no upstream gradient
    stats = {}
    _, _, _, dx, dw = _fwd_bwd(mod, x, w, y, g, 1.0, stats=stats)
    assert stats == {"tiles": 6, "skipped_tiles": 3} and not dx[:64].any()
    ref, bound = logprob_bounds(x, w, y, 1.0, g)
    assert_within(dx, ref["dX"], bound["dX"], "dX")
    assert_within(dw, ref["dW"], bound["dW"], "dW")


def test_filtering_skips_tiles_within_its_bound(single):
    tau = 2.0**-12
    x, w, y = _peaked(128, 32, 1000, 60.0, seed=34)
    mod = single()
    g = _upstream(128, 10)
    stats = {}
    _, _, _, dx, dw = _fwd_bwd(mod, x, w, y, g, 1.0, filter_eps=tau, stats=stats)
    assert stats["skipped_tiles"] >= 0.5 * stats["tiles"], stats
    ref, bound = logprob_bounds(x, w, y, 1.0, g)
    X, W = x.double(), w.double()
    p = torch.softmax(X @ W.t(), -1)
    small = (p < tau) & (torch.arange(1000, device=DEVICE)[None, :] != y[:, None])
    dropped = g.double().abs()[:, None] * p * small
    assert_within(dx, ref["dX"], bound["dX"] + dropped @ W.abs(), "filtered dX")
    assert_within(dw, ref["dW"], bound["dW"] + dropped.t() @ X.abs(), "filtered dW")


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_policy_loss_single_pass_equals_recompute(single, beta):
    """fused_policy_loss's grad-in-forward path on Triton, both designs: the same loss and gradients
    (each within fp32 rounding of the other: they differ only in how z is formed for dZ)."""
    from fastdash_kernels import fused_policy_loss

    x, w, y, cu = make_packed([40, 33, 27], 32, 260, seed=35)
    single(tokens_per_chunk=64, vocab=260)
    n = x.shape[0]
    gen = torch.Generator().manual_seed(36)
    adv = torch.randn(3, generator=gen).to(DEVICE)
    ref_lp = (-3.0 - torch.rand(n, generator=gen)).to(DEVICE)
    out = {}
    for mode in (True, False):
        xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        res = fused_policy_loss(xr, wr, y, cu, adv, token_weights=torch.full((n,), 1.0 / n, device=DEVICE),
                                ref_logps=ref_lp if beta else None, beta=beta, backend="triton", single_pass=mode)
        res.loss.backward()
        out[mode] = (res.loss.detach(), xr.grad, wr.grad)
    for a, b, what in zip(out[True], out[False], ("loss", "dX", "dW")):
        tol = 8 * torch.finfo(torch.float32).eps * float(b.abs().max()) + 1e-12
        assert torch.allclose(a, b, rtol=0, atol=tol), what
