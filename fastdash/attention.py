"""Attention for packed micro-batches, picked once at run time.

Backends, best first (`select_attention_backend`):

- ``flash_attn``: flash-attn's ``flash_attn_varlen_func`` (CUDA, when the package is installed);
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (CUDA, torch >= 2.10; KV heads are
  repeated for GQA where the installed torch has no ``enable_gqa``);
- ``sdpa_varlen`` (CPU): sdpa per packed sequence, sequences of equal length batched into one call.
  Exact, and linear in the row's length: transformers' packed sdpa path below builds a [T, T] mask,
  so its cost grows with the square of the token budget and caps useful budgets at a few hundred
  tokens on CPU;
- ``sdpa``: transformers' own sdpa path (CUDA without either varlen kernel). It detects
  packing from position ids that restart at 0, but only with ``attention_mask=None`` and
  ``use_cache=False``; it then builds a block-diagonal causal mask [T, T].

The varlen backends are wired into transformers as one registered attention function,
``fastdash_varlen``: packed calls (``cu_seq_lens_q`` in the kwargs, no mask) go to the varlen kernel,
padded calls (2-D mask) to transformers' sdpa with the usual mask, so one model serves both arms.
Importing this module never needs flash-attn.

Shared prompts (`packing.collate_shared`): the forward passes ``fastdash_prefix`` and
``fastdash_varlen`` sends the row to `shared_prefix_attention` (batched sdpa on every device).
"""
from __future__ import annotations

import functools
import inspect
import logging

import torch
import torch.nn.functional as F

logger = logging.getLogger("fastdash")

VARLEN_IMPL = "fastdash_varlen"  # name registered with transformers' AttentionInterface
VARLEN_BACKENDS = ("flash_attn", "torch_varlen", "sdpa_varlen")  # served by VARLEN_IMPL
_BACKENDS: dict[str, str] = {}  # device type -> chosen backend (chosen and logged once)
_registered = False


@functools.cache
def _flash_attn_varlen_func():
    try:
        from flash_attn import flash_attn_varlen_func
    except Exception:  # ImportError, or a broken build (undefined symbols): either way, not usable
        return None
    return flash_attn_varlen_func


@functools.cache
def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except Exception:
        return None
    return varlen_attn


def select_attention_backend(device: torch.device | str) -> str:
    """'flash_attn', 'torch_varlen' or 'sdpa' for packed micro-batches on `device`; logged once."""
    dev = torch.device(device).type
    if dev not in _BACKENDS:
        backend = "sdpa_varlen" if dev == "cpu" else "sdpa"
        if dev == "cuda":
            if _flash_attn_varlen_func() is not None:
                backend = "flash_attn"
            elif _torch_varlen_attn() is not None:
                backend = "torch_varlen"
        _BACKENDS[dev] = backend
        logger.info("packed attention on %s: %s", dev, backend)
    return _BACKENDS[dev]


def _model_device(model: torch.nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def use_packed_attention(model: torch.nn.Module, backend: str | None = None) -> str:
    """Point `model` at the attention backend for its device; returns the backend's name.

    Idempotent and cheap, so `forward_hidden` calls it on every packed micro-batch. On CUDA with a
    varlen kernel the model switches to ``fastdash_varlen``; elsewhere it keeps an implementation
    that handles packed rows (sdpa, eager, flex, or ``fastdash_varlen``, whose fallback is exact on
    any device) and otherwise goes to sdpa. `backend` forces a choice (tests, benchmarks).
    """
    if backend is None:
        backend = select_attention_backend(_model_device(model))
    elif backend not in VARLEN_BACKENDS + ("sdpa",):
        raise ValueError(f"backend must be one of {VARLEN_BACKENDS + ('sdpa',)}, got {backend!r}")
    current = model.config._attn_implementation
    if backend in VARLEN_BACKENDS:
        if current != VARLEN_IMPL:
            register_varlen_attention()
            model.set_attn_implementation(VARLEN_IMPL)
    elif current not in ("sdpa", "eager", "flex_attention", VARLEN_IMPL):
        # e.g. a model loaded with flash_attention_2 where flash-attn cannot run
        model.set_attn_implementation("sdpa")
    return backend


def packed_attention_kwargs(model: torch.nn.Module, cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """Extra forward kwargs for a packed row: the sequence boundaries, for the varlen backends.

    The names are transformers' flash-attention kwargs, passed through every layer to the attention
    function. The sdpa path needs none (it reads the boundaries off the position ids).
    """
    if model.config._attn_implementation != VARLEN_IMPL:
        return {}
    cu = cu_seqlens.to(device=_model_device(model), dtype=torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": int(max_seqlen), "max_length_k": int(max_seqlen)}


def register_varlen_attention() -> None:
    """Register ``fastdash_varlen`` with transformers (attention function and its mask function)."""
    global _registered
    if _registered:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface, sdpa_mask

    def varlen_mask(*args, attention_mask=None, **kwargs):
        # packed rows carry no mask (varlen kernels take cu_seqlens); padded rows get sdpa's mask
        if attention_mask is None:
            return None
        return sdpa_mask(*args, attention_mask=attention_mask, **kwargs)

    AttentionInterface.register(VARLEN_IMPL, varlen_attention_forward)
    AttentionMaskInterface.register(VARLEN_IMPL, varlen_mask)
    if VARLEN_IMPL not in ALL_MASK_ATTENTION_FUNCTIONS:  # the mask registry's public mapping interface
        raise RuntimeError(f"transformers did not register the {VARLEN_IMPL!r} attention mask; this transformers "
                           "version's AttentionMaskInterface differs from the one fastdash was written for")
    _registered = True


def varlen_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,  # [B, Hq, T, D]
    key: torch.Tensor,  # [B, Hkv, T, D]
    value: torch.Tensor,  # [B, Hkv, T, D]
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: varlen kernel for packed rows, sdpa otherwise.

    Returns ([B, T, Hq, D], None) like transformers' other attention functions.
    """
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None or attention_mask is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if query.shape[0] != 1:
        raise ValueError(f"packed attention expects one row, got batch size {query.shape[0]}")
    max_len = int(kwargs.get("max_length_q") or int((cu[1:] - cu[:-1]).max()))
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, D]
    prefix = kwargs.get("fastdash_prefix")
    if prefix is not None:  # shared prompts: completions also attend to their group's prompt
        q, k, v = (x.to(compute_dtype(q, k, v)) for x in (q, k, v))
        return shared_prefix_attention(q, k, v, cu, prefix, scale=scaling, dropout=dropout).unsqueeze(0), None
    out = varlen_attention(q, k, v, cu, max_len, scale=scaling, dropout=dropout)
    return out.unsqueeze(0), None  # [1, T, Hq, D]


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: float | None = None, dropout: float = 0.0,
) -> torch.Tensor:
    """Causal attention within each packed sequence. q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D], in the
    compute dtype (`compute_dtype`): fp32 master weights under bf16 autocast give fp32 q/k (RoPE over
    the fp32 residual stream) and a bf16 v (a Linear), so no input's own dtype says what to run in."""
    dtype = compute_dtype(q, k, v)
    q, k, v = (x.to(dtype) for x in (q, k, v))
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    low_precision = dtype in (torch.float16, torch.bfloat16)
    if q.is_cuda and low_precision:
        flash = _flash_attn_varlen_func()
        if flash is not None:
            return flash(q, k, v, cu, cu, max_seqlen, max_seqlen, dropout_p=dropout, softmax_scale=scale, causal=True)
        varlen = _torch_varlen_attn()
        if varlen is not None and dropout == 0.0:
            return _call_torch_varlen(varlen, q, k, v, cu, max_seqlen, scale)
    # fp32 (the kernels take fp16/bf16 only), CPU, or dropout: exact, one sdpa per sequence length
    return _sdpa_by_length(q, k, v, cu, scale, dropout)


def compute_dtype(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.dtype:
    """The autocast dtype when autocast is on for q's device (the trainer's forward passes), else
    torch's promotion of the three (mixed inputs outside autocast run in the widest)."""
    dev = q.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return torch.promote_types(torch.promote_types(q.dtype, k.dtype), v.dtype)


def _call_torch_varlen(varlen, q, k, v, cu, max_seqlen, scale):
    params = inspect.signature(varlen).parameters
    kwargs = {"scale": scale}
    if "window_size" in params:  # torch >= 2.11: causal is the window (-1, 0)
        kwargs["window_size"] = (-1, 0)
    else:  # torch 2.10
        kwargs["is_causal"] = True
    if q.shape[1] != k.shape[1]:
        if "enable_gqa" in params:
            kwargs["enable_gqa"] = True
        else:  # older torch: no GQA in the kernel, repeat the KV heads
            rep = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    return varlen(q, k, v, cu, cu, max_seqlen, max_seqlen, **kwargs)


def _sdpa_by_length(q, k, v, cu, scale, dropout):
    """Causal sdpa within each sequence; sequences of one length go through one batched call, so a
    row of many short samples costs a few calls per layer, not one per sample, and no [T, T] mask."""
    gqa = q.shape[1] != k.shape[1]
    starts, lengths = cu[:-1].long(), (cu[1:] - cu[:-1]).long()
    out = q.new_empty(q.shape)
    for L in torch.unique(lengths).tolist():
        if L == 0:
            continue
        idx = (starts[lengths == L][:, None] + torch.arange(L, device=q.device)).reshape(-1)  # [n * L]
        qs, ks, vs = (x[idx].unflatten(0, (-1, L)).transpose(1, 2) for x in (q, k, v))  # [n, H, L, D]
        o = F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
        # sdpa's result in q's dtype: CUDA's autocast does not promote index_copy (CPU's does)
        out = out.index_copy(0, idx, o.transpose(1, 2).reshape(-1, *q.shape[1:]).to(out.dtype))
    return out  # [T, Hq, D]


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor,
                            prefix: torch.Tensor, scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Causal attention where segment i of the packed row (cu_seqlens) first attends to the keys of
    rows prefix[i] = (start, length), then causally to its own: a group's completions read their shared
    prompt's keys and values, gathered (so the prompt's gradient is the sum over its completions).
    Segments of one (prefix length, own length) go through one sdpa call with a bottom-right causal mask.
    q [T, Hq, D], k/v [T, Hkv, D] -> [T, Hq, D]."""
    gqa = q.shape[1] != k.shape[1]
    cu = cu_seqlens.to(q.device).long()
    starts, lengths = cu[:-1], cu[1:] - cu[:-1]
    pstart, plen = prefix[:, 0].to(q.device), prefix[:, 1].to(q.device)
    out = q.new_empty(q.shape)
    for P, L in torch.unique(torch.stack([plen, lengths], 1), dim=0).tolist():
        if L == 0:
            continue
        pick = (plen == P) & (lengths == L)
        own = starts[pick][:, None] + torch.arange(L, device=q.device)  # [n, L]
        keys = torch.cat([pstart[pick][:, None] + torch.arange(P, device=q.device), own], 1)  # [n, P + L]
        qs = q[own.reshape(-1)].unflatten(0, (-1, L)).transpose(1, 2)  # [n, H, L, D]
        ks, vs = (x[keys.reshape(-1)].unflatten(0, (-1, P + L)).transpose(1, 2) for x in (k, v))  # [n, H, P+L, D]
        # query i sees the whole prefix and its own first i + 1 tokens (P = 0: plain causal)
        mask = None if P == 0 else torch.ones(L, P + L, dtype=torch.bool, device=q.device).tril(P)
        o = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=mask, dropout_p=dropout, is_causal=P == 0,
                                           scale=scale, enable_gqa=gqa)
        idx = own.reshape(-1)
        out = out.index_copy(0, idx, o.transpose(1, 2).reshape(-1, *q.shape[1:]).to(out.dtype))
    return out  # [T, Hq, D]
