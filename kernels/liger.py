"""liger-kernel's LigerFusedLinearGRPOLoss behind fastdash's signature, for comparison only.

Liger wants padded [B, T] inputs, so this wrapper pads (the one place a padded tensor appears) and
reads the lengths on the host. Its loss is rescaled to fastdash's normaliser:
'grpo' -> liger 'grpo' (mean over sequences of the sequence means) * B / normaliser; the others ->
liger 'dapo' with num_items_in_batch=1 (a plain token sum) / normaliser.
"""

from __future__ import annotations

import torch

from .segment import segment_ids


def _pad(x, seg, pos, n_seq, t_max, fill=0):
    out = x.new_full((n_seq, t_max) + tuple(x.shape[1:]), fill)
    return out.index_put((seg, pos), x)


def liger_policy_loss(hidden, weight, targets, cu_seqlens, advantages, *, old_logps, ref_logps, loss_type,
                      epsilon, epsilon_high, beta, kl_estimator, temperature, normaliser, return_entropy):
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    except ImportError as e:
        raise ImportError("backend='liger' needs liger-kernel: pip install 'liger-kernel>=0.6' (or fastdash[bench])") from e
    if beta != 0.0 and kl_estimator != "k3":
        raise ValueError(f"backend='liger' only has the k3 KL estimator, got kl_estimator={kl_estimator!r}")
    from .api import PolicyLossOutput
    from .torch_backend import logprob

    n = hidden.shape[0]
    n_seq = cu_seqlens.numel() - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    t_max = max(int(lengths.max()) if n_seq else 0, 1)  # host sync: fine for a comparison backend
    seg = segment_ids(cu_seqlens, n)
    pos = torch.arange(n, device=hidden.device) - cu_seqlens.long()[seg]
    mask = _pad(torch.ones(n, device=hidden.device, dtype=torch.long), seg, pos, n_seq, t_max)
    pad = lambda t: None if t is None else _pad(t.float(), seg, pos, n_seq, t_max)  # noqa: E731
    lig_type = "grpo" if loss_type == "grpo" else "dapo"
    loss_fn = LigerFusedLinearGRPOLoss(
        beta=beta, compiled=hidden.is_cuda, use_ref_model=beta != 0.0, epsilon_low=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, loss_type=lig_type, temperature=temperature,
    )
    loss, metrics = loss_fn(
        _pad(hidden, seg, pos, n_seq, t_max), weight, _pad(targets.long(), seg, pos, n_seq, t_max), mask,
        advantages.float(), ref_per_token_logps=pad(ref_logps), old_per_token_logps=pad(old_logps),
        num_items_in_batch=1.0 if lig_type == "dapo" else None,
    )
    loss = loss * n_seq / normaliser if lig_type == "grpo" else loss / normaliser
    with torch.no_grad():  # liger does not hand back log-probs; one extra forward, comparison only
        logps, ent = logprob(hidden.detach(), weight.detach(), targets, temperature, return_entropy)
    out = {"clip_fraction": metrics[-1]}
    if beta != 0.0:
        out["kl_mean"] = metrics[0]
    return PolicyLossOutput(loss, logps, ent, out)
