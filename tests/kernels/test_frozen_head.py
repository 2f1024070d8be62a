"""A frozen lm_head (LoRA: weight.requires_grad False): every backend returns the same dX and makes no
dW, i.e. never makes a new tensor of the head's [V, H] shape (the gradient buffer and its GEMM)."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdash_kernels import fused_linear_logprob, fused_policy_loss

from .conftest import backends_under_test, make_packed

LENGTHS = [5, 0, 12, 3]
H, V = 24, 131  # [V, H] matches no other tensor of the computation


class Shapes(TorchDispatchMode):
    """Records the shape of every tensor an op returns, but views of `weight`'s own memory (the Triton
    interpreter's host views of its arguments)."""

    def __init__(self, weight):
        super().__init__()
        self.seen, self.weight_ptr = set(), weight.untyped_storage().data_ptr()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() != self.weight_ptr:
                self.seen.add(tuple(t.shape))
        return out


def _grads(backend, op, frozen):
    x, w, y, cu = make_packed(LENGTHS, H, V, seed=3)
    x = x.clone().requires_grad_(True)
    w = w.clone().requires_grad_(not frozen)
    adv = torch.tensor([1.0, 0.5, -0.7, 0.2], device=x.device)
    with Shapes(w) as shapes:
        if op == "logprob":
            fused_linear_logprob(x, w, y, backend=backend).sum().backward()
        else:
            single = {"single_pass": op == "loss_single"} if backend == "triton" else {}  # both triton paths
            fused_policy_loss(x, w, y, cu, adv, token_weights=torch.full_like(y, 0.05, dtype=torch.float32),
                              backend=backend, grad_in_forward=op != "loss_autograd", **single).loss.backward()
    return x.grad, w.grad, (V, H) in shapes.seen


@pytest.mark.parametrize("op", ["logprob", "loss_eager", "loss_single", "loss_autograd"])
@pytest.mark.parametrize("backend", backends_under_test())
def test_frozen_head_skips_dw_and_keeps_dx(backend, op):
    if op == "loss_single" and backend != "triton":
        pytest.skip("the single pass is a Triton path")
    dx, dw, made_vh = _grads(backend, op, frozen=False)
    assert dw is not None and made_vh  # the detector sees the dW buffer when there is one
    dx_frozen, dw_frozen, made_vh_frozen = _grads(backend, op, frozen=True)
    assert dw_frozen is None and not made_vh_frozen
    assert torch.equal(dx_frozen, dx)  # the same dX, bit for bit: only the dW work was dropped
