"""Apple's Cut Cross-Entropy (`cut-cross-entropy` on PyPI) as a log-prob backend: `kernel=cce`.

CCE computes per-token cross-entropy from hidden states and the classifier without the [N, V]
logits. With the temperature folded into the hidden states (z = (x / T) W^T) its
`linear_cross_entropy(..., reduction="none")` is -logp_t; fastdash's policy loss is then built on
the [N] vector by autograd, so CCE's backward does the lm_head work. It is both the baseline the
Triton kernel is measured against and a fast fallback.

CCE's kernels are CUDA-only (under TRITON_INTERPRET they fail inside the kernel), so on CPU this
backend raises a clear error instead of running something else under its name.
"""

from __future__ import annotations

import torch


def _load_cce(hidden):
    """CCE's linear_cross_entropy, or a clear error (not installed, or not on CUDA)."""
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise ImportError("backend='cce' needs cut-cross-entropy: pip install cut-cross-entropy "
                          "(or fastdash[bench])") from e
    if not hidden.is_cuda:
        raise ValueError("backend='cce' needs CUDA tensors: cut-cross-entropy's Triton kernels do not run on "
                         "CPU (use kernel=torch or kernel=triton there)")
    return linear_cross_entropy


def logprob(hidden, weight, targets, temperature=1.0, return_entropy=False, filter_eps=None, **_ignored):
    """([N] fp32 logps with grad through hidden and weight via CCE's backward, [N] entropy or None).

    filter_eps: CCE's gradient filter (None = exact, or a float / 'auto' / 'high' as CCE takes it).
    The entropy, when asked for, comes from one extra no-grad pass of the chunked torch backend."""
    lce = _load_cce(hidden)
    if hidden.dtype != weight.dtype:
        raise ValueError(f"backend='cce': hidden and weight dtypes must match, got {hidden.dtype} and {weight.dtype}")
    e = hidden / temperature if temperature != 1.0 else hidden
    logps = -lce(e, weight, targets.long(), reduction="none", filter_eps=filter_eps).float()
    ent = None
    if return_entropy:
        from .torch_backend import logprob as torch_logprob

        with torch.no_grad():
            _, ent = torch_logprob(hidden.detach(), weight.detach(), targets, temperature, True)
    return logps, ent
