"""Triton backward paths: token chunks, the 2-D forward grid, dW split-K (deterministic partials and
atomics), bf16 tiles, bit-identical reruns, and gradient filtering on peaked logits with its bound."""

import pytest
import torch

from .bounds import assert_within, logprob_bounds
from .conftest import DEVICE, backends_under_test, make_packed

pytestmark = pytest.mark.skipif("triton" not in backends_under_test(), reason="needs triton (GPU or interpreter)")


@pytest.fixture
def tri(monkeypatch):
    from fastdash_kernels import triton_backward, triton_logprob

    def setup(chunk_vocab=None, tokens=None, fwd_splits=None, dw_split=None, itemsize=4, dx_split=None):
        if chunk_vocab:  # the dZ scratch holds tokens x chunk_vocab entries: several vocabulary chunks
            monkeypatch.setattr(triton_backward, "SCRATCH_BYTES", tokens * chunk_vocab * itemsize)
        monkeypatch.setattr(triton_logprob, "FWD_SPLITS", fwd_splits)
        monkeypatch.setattr(triton_backward, "DW_SPLIT", dw_split)
        monkeypatch.setattr(triton_backward, "DX_SPLIT", dx_split)  # None: from the (interpreter's 8) SMs
        return triton_logprob, triton_backward

    return setup


def _run(mod, x, w, y, g, temperature=1.0, **opts):
    xr, wr = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
    lp, ent = mod.logprob(xr, wr, y, temperature, True, **opts)
    (lp * g).sum().backward()
    return lp.detach(), ent, xr.grad, wr.grad


def _upstream(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(DEVICE)


@pytest.mark.parametrize("fwd_splits,dw_split,deterministic", [(3, None, True), (1, 3, True), (2, 3, False)],
                         ids=["fwd-split3", "dw-split3-partials", "dw-split3-atomics"])
def test_chunks_and_splits_match_reference(tri, fwd_splits, dw_split, deterministic):
    x, w, y, _ = make_packed([150, 97, 53], 48, 300, seed=21)  # V = 300: chunks of 128, 128 and 44
    mod, _ = tri(chunk_vocab=128, tokens=300, fwd_splits=fwd_splits, dw_split=dw_split)
    g = _upstream(x.shape[0], 1)
    got = _run(mod, x, w, y, g, 0.9, deterministic=deterministic)
    ref, bound = logprob_bounds(x, w, y, 0.9, g)
    for a, what in zip(got, ("logps", "entropy", "dX", "dW")):
        assert_within(a, ref[what], bound[what], what)


def test_bf16_tiles_match_reference(tri):
    x, w, y, _ = make_packed([70, 61], 64, 389, dtype=torch.bfloat16, seed=22)
    mod, _ = tri(chunk_vocab=256, tokens=131, fwd_splits=2, itemsize=2)
    g = _upstream(x.shape[0], 2)
    got = _run(mod, x, w, y, g, 0.8)
    assert got[2].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    ref, bound = logprob_bounds(x, w, y, 0.8, g, out_dtype=torch.bfloat16, lowp_operands=True)
    for a, what in zip(got, ("logps", "entropy", "dX", "dW")):
        assert_within(a, ref[what], bound[what], f"bf16 {what}")


@pytest.mark.parametrize("dw_split", [None, 3])
def test_deterministic_reruns_are_bit_identical(tri, dw_split):
    x, w, y, _ = make_packed([100, 90], 32, 257, seed=23)
    mod, _ = tri(chunk_vocab=128, tokens=190, fwd_splits=2, dw_split=dw_split)
    g = _upstream(x.shape[0], 3)
    a, b = _run(mod, x, w, y, g), _run(mod, x, w, y, g)
    for t, u, what in zip(a, b, ("logps", "entropy", "dX", "dW")):
        assert torch.equal(t, u), what


def test_zero_gradient_tiles_are_skipped_and_exact(tri):
    x, w, y, _ = make_packed([128], 32, 300, seed=24)
    mod, bwd = tri()
    g = _upstream(128, 4)
    g[:64] = 0.0  # the first token tile has no upstream gradient (zero advantage, beta = 0)
    _, lse, _, _ = mod.logprob_forward(x, w, y.long(), 1.0, False)
    stats = {}
    dx, dw = bwd.logprob_backward(x, w, y.long(), lse, g, 1.0, stats=stats)
    assert stats["skipped_tiles"] == 3 and stats["tiles"] == 6
    assert not dx[:64].any()
    ref, bound = logprob_bounds(x, w, y, 1.0, g)
    assert_within(dx, ref["dX"], bound["dX"], "dX")
    assert_within(dw, ref["dW"], bound["dW"], "dW")


def _peaked(n, h, v, margin, seed):
    """Hidden states aimed at their target's weight row: logit margin ~ `margin` over a random head,
    and targets drawn from the first 100 tokens (frequent tokens), as a trained model's are."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(v, h, generator=g) / h**0.5
    y = torch.randint(0, 100, (n,), generator=g)
    wy = w[y]
    x = margin * wy / (wy * wy).sum(-1, keepdim=True) + 0.05 * torch.randn(n, h, generator=g)
    return x.to(DEVICE), w.to(DEVICE), y.to(DEVICE)


@pytest.mark.parametrize("dx_split", [1, None], ids=["dx-owned", "dx-split-over-vocab"])
def test_filtering_skips_tiles_within_its_bound(tri, dx_split):
    """Skipped entries have p < tau, so the dropped gradient is at most |g_t| / T * p_tj on each
    (t, j) with p_tj < tau (j != y_t); dX and dW errors are bounded by that mass times |W|, |X|.
    The kept tiles reach dX / dW as index lists, with dX whole or split over the vocabulary."""
    tau, temperature = 2.0**-12, 1.0
    x, w, y = _peaked(128, 32, 1000, 60.0, seed=25)
    mod, bwd = tri(dx_split=dx_split)
    if dx_split is None:
        assert bwd.dx_split(2, 8, 32, 8) > 1  # 2 token blocks of 64 on the interpreter's 8 "SMs"
    g = _upstream(128, 5)
    _, lse, _, tmax = mod.logprob_forward(x, w, y, temperature, False, save_tile_max=True)
    stats = {}
    dx, dw = bwd.logprob_backward(x, w, y, lse, g, temperature, tile_max=tmax, filter_eps=tau, stats=stats)
    assert stats["skipped_tiles"] >= 0.5 * stats["tiles"], stats  # peaked: most tiles go
    ref, bound = logprob_bounds(x, w, y, temperature, g)
    X, W = x.double(), w.double()
    p = torch.softmax(X @ W.t() / temperature, -1)
    assert p[torch.arange(128), y].median() > 0.999  # the data are peaked, as a trained head's are
    small = (p < tau) & (torch.arange(1000, device=DEVICE)[None, :] != y[:, None])
    dropped = g.double().abs()[:, None] / temperature * p * small  # |dZ| of every droppable entry
    assert_within(dx, ref["dX"], bound["dX"] + dropped @ W.abs(), "filtered dX")
    assert_within(dw, ref["dW"], bound["dW"] + dropped.t() @ X.abs(), "filtered dW")


def test_filtering_never_fires_on_a_flat_softmax(tri):
    x, w, y, _ = make_packed([128], 32, 500, seed=26)  # random head: p ~ 1/V everywhere
    mod, bwd = tri()
    _, lse, _, tmax = mod.logprob_forward(x, w, y.long(), 1.0, False, save_tile_max=True)
    stats = {}
    bwd.logprob_backward(x, w, y.long(), lse, _upstream(128, 6), 1.0, tile_max=tmax, filter_eps=2.0**-12,
                         stats=stats)
    assert stats["skipped_tiles"] == 0


def test_filtering_through_the_public_api(tri):
    from fastdash_kernels import fused_linear_logprob

    x, w, y = _peaked(64, 32, 600, 60.0, seed=27)
    tri()
    xr = x.clone().requires_grad_(True)
    lp = fused_linear_logprob(xr, w, y, backend="triton", filter_eps=2.0**-12)
    lp.sum().backward()
    assert torch.isfinite(xr.grad).all()
    with pytest.raises(ValueError, match="filter_eps"):
        fused_linear_logprob(x, w, y, backend="torch", filter_eps=2.0**-12)
