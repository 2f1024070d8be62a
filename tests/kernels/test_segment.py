"""Per-sequence reductions over packed segments: Triton kernel and torch reference vs a Python loop."""

import pytest
import torch

from fastdash_kernels import segment_mean, segment_sum

from .conftest import DEVICE, backends_under_test


def _loop_sums(x, lengths):
    out, start = [], 0
    for n in lengths:
        out.append(x[start : start + n].double().sum().item())
        start += n
    return torch.tensor(out, dtype=torch.float32, device=x.device)


@pytest.mark.parametrize("backend", backends_under_test())
@pytest.mark.parametrize("lengths", [[3, 0, 1500, 1, 77], [1], [0, 0]])
def test_segment_sum(backend, lengths):
    x = torch.randn(sum(lengths), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(segment_sum(x, cu, backend), _loop_sums(x, lengths), atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("backend", backends_under_test())
def test_segment_mean_grad(backend):
    x = torch.randn(13, device=DEVICE, requires_grad=True)
    cu = torch.tensor([0, 4, 4, 13], device=DEVICE)
    out = segment_mean(x, cu, backend)
    torch.testing.assert_close(out, torch.stack([x[:4].mean(), x.new_zeros(()), x[4:].mean()]).detach())
    (out * torch.tensor([1.0, 5.0, 2.0], device=DEVICE)).sum().backward()
    want = torch.cat([torch.full((4,), 0.25), torch.full((9,), 2 / 9)]).to(DEVICE)
    torch.testing.assert_close(x.grad, want)
