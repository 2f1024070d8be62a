"""The Triton backend as `api.py` calls it: `logprob` (triton_logprob.py) and `logprob_fwd_bwd`, which
picks one of two designs by the cost model (COST_MODEL.md): the single pass (triton_single.py) or the
recompute pass (triton_logprob.py forward + triton_backward.py). Kept apart so neither design imports
the other or the cost model (which reads both designs' launch sizes).

Imported only when the Triton backend is used.
"""
from __future__ import annotations

from .cost_model import single_pass_pays
from .triton_backward import logprob_backward
from .triton_logprob import logprob, logprob_forward  # noqa: F401 - `logprob` is part of this backend's API
from .triton_single import logprob_fwd_bwd_single


def logprob_fwd_bwd(hidden, weight, targets, temperature, return_entropy, grad_fn, single_pass=None, need_dw=True,
                    **opts):
    """Same contract as torch_backend.logprob_fwd_bwd. single_pass (None: the cost model's pick,
    `cost_model.single_pass_pays`): the forward stores each token chunk's logits and turns them into
    dZ (6NHV, triton_single.py); else dZ is recomputed from the saved lse (8NHV, no logits buffer)."""
    if single_pass is None:
        single_pass = single_pass_pays(hidden.shape[0], hidden.shape[1], weight.shape[0], weight.element_size())
    if single_pass:
        return logprob_fwd_bwd_single(hidden, weight, targets, temperature, return_entropy, grad_fn,
                                      filter_eps=opts.get("filter_eps"), need_dw=need_dw)
    targets = targets.long().contiguous()
    filt = opts.get("filter_eps") is not None
    logps, lse, ent, tmax = logprob_forward(hidden, weight, targets, temperature, return_entropy, filt)
    loss, g = grad_fn(0, hidden.shape[0], logps)
    dx, dw = logprob_backward(hidden, weight, targets, lse, g, temperature, tile_max=tmax, need_dw=need_dw, **opts)
    return logps, ent, loss, dx, dw
