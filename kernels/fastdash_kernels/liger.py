"""liger-kernel's LigerFusedLinearGRPOLoss behind fastdash's signature, for comparison only.

Liger wants padded [B, T] inputs, so this wrapper pads (the one place a padded tensor appears) and
reads the lengths on the host. fastdash's per-token weights ride in liger's attention mask: its
'dapo' loss with num_items_in_batch=1 is sum_t mask_t l_t, which is fastdash's sum_t w_t l_t when
the mask holds w_t (0 on padding). Liger's own metrics would then be weighted, so the caller
recomputes them from the log-probs. Rollout-correction weights (pg_weights) ride there too, which
is exact only without the KL term (liger cannot weight its PG term apart from its KL term).
"""

from __future__ import annotations

import torch

from .segment import segment_ids


def _pad(x, seg, pos, n_seq, t_max, fill=0):
    out = x.new_full((n_seq, t_max) + tuple(x.shape[1:]), fill)
    return out.index_put((seg, pos), x)


def liger_policy_loss(hidden, weight, targets, cu_seqlens, advantages, token_weights, *, old_logps, ref_logps,
                      epsilon, epsilon_high, beta, kl_estimator, temperature, return_entropy, pg_weights=None):
    """-> (loss with grad, logps [N] detached, entropy [N] or None)."""
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise ImportError("backend='liger' needs liger-kernel: pip install 'liger-kernel>=0.6' (or fastdash[bench])") from e
    if beta != 0.0 and kl_estimator != "k3":
        raise ValueError(f"backend='liger' only has the k3 KL estimator, got kl_estimator={kl_estimator!r}")
    from .torch_backend import logprob

    if pg_weights is not None:
        if beta != 0.0:
            raise ValueError("backend='liger' cannot weight the policy-gradient term apart from the KL term: "
                             "with rollout correction (pg_weights) use beta=0 or kernel=torch / triton")
        if callable(pg_weights):
            with torch.no_grad():
                pg_weights = pg_weights(logprob(hidden.detach(), weight.detach(), targets, temperature, False)[0])
        token_weights = token_weights * pg_weights.detach().float()
    n = hidden.shape[0]
    n_seq = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    t_max = max(int(lengths.max()) if n_seq else 0, 1)  # host sync: fine for a comparison backend
    seg = segment_ids(cu_seqlens, n)
    pos = torch.arange(n, device=hidden.device) - cu_seqlens.long()[seg]
    pad = lambda t: None if t is None else _pad(t.float(), seg, pos, n_seq, t_max)  # noqa: E731
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=hidden.is_cuda, use_ref_model=beta != 0.0, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, loss_type="dapo", temperature=temperature,
    )
    loss, _ = loss_fn(
        _pad(hidden, seg, pos, n_seq, t_max), weight, _pad(targets.long(), seg, pos, n_seq, t_max),
        pad(token_weights), advantages.float(), ref_per_token_logps=pad(ref_logps),
        old_per_token_logps=pad(old_logps), num_items_in_batch=1.0,
    )
    with torch.no_grad():  # liger does not hand back log-probs; one extra forward, comparison only
        logps, ent = logprob(hidden.detach(), weight.detach(), targets, temperature, return_entropy)
    return loss, logps, ent
