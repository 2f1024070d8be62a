"""Kernel tests run the Triton kernels under the interpreter when there is no GPU.

TRITON_INTERPRET must be set before the kernels are decorated by triton.jit, i.e. before
fastdash_kernels.triton_logprob / triton_segment are imported (fastdash_kernels itself never
imports triton), so it is set here at conftest import time.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:
    HAS_TRITON = False


def backends_under_test():
    """torch always; triton when importable (on CPU only via the interpreter)."""
    out = ["torch"]
    if HAS_TRITON and (DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"):
        out.append("triton")
    return out


def make_packed(lengths, hidden, vocab, *, dtype=torch.float32, seed=0, scale=1.0):
    """Random packed batch: hidden [N, H], weight [V, H], targets [N], cu_seqlens [B + 1]."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    x = (torch.randn(n, hidden, generator=g) * scale).to(DEVICE, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5 * 4).to(DEVICE, dtype)
    y = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0).tolist()), dtype=torch.int32, device=DEVICE)
    return x, w, y, cu


@pytest.fixture
def small_chunks(monkeypatch):
    """Force the torch backend to use several token chunks even on tiny inputs."""
    from fastdash_kernels import torch_backend

    monkeypatch.setattr(torch_backend, "CHUNK_ELEMENTS", 2000)
