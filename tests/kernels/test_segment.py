"""Per-sequence reductions over packed segments: Triton kernel and torch reference vs a Python loop."""

import pytest
import torch

from fastdash_kernels import segment_mean, segment_sum

from .conftest import DEVICE, backends_under_test


EPS32 = torch.finfo(torch.float32).eps


def _loop_sums(x, lengths):
    """float64 sums per segment and their fp32 error bounds: 4 ulps of sum |x| times sqrt(len)."""
    out, bound, start = [], [], 0
    for n in lengths:
        seg = x[start : start + n].double()
        out.append(seg.sum().item())
        bound.append(4 * EPS32 * n**0.5 * seg.abs().sum().item())
        start += n
    return torch.tensor(out, dtype=torch.float64), torch.tensor(bound, dtype=torch.float64)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("lengths", [[3, 0, 1500, 1, 77], [1], [0, 0]])
def test_segment_sum(backend, lengths):
    x = torch.randn(sum(lengths), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    want, bound = _loop_sums(x, lengths)
    err = (segment_sum(x, cu, backend).double().cpu() - want).abs()
    assert (err <= bound).all(), (err, bound)


@pytest.mark.parametrize("backend", backends_under_test())
def test_segment_mean_grad(backend):
    x = torch.randn(13, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 13], device=DEVICE)
    out = segment_mean(x, cu, backend)
    xd = x.detach().double()
    want = torch.stack([xd[:4].mean(), xd.new_zeros(()), xd[4:].mean()])
    bound = 4 * EPS32 * torch.stack([xd[:4].abs().mean() * 2, xd.new_zeros(()), xd[4:].abs().mean() * 3])  # sqrt(len)
    assert ((out.detach().double() - want).abs() <= bound).all()
    (out * torch.tensor([1.0, 5.0, 2.0], device=DEVICE)).sum().backward()
    want = torch.cat([torch.full((4,), 0.25), torch.full((9,), 2 / 9)]).double().to(DEVICE)
    assert ((x.grad.double() - want).abs() <= 2 * EPS32 * want).all()  # one rounding of 1/len and one product
