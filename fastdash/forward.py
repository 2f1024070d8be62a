"""The model call of the training step: the base model's hidden states for a micro-batch, in the
compute dtype.

`forward_hidden` runs the transformer body (no lm_head) and returns only the N hidden states that
predict the micro-batch's targets, so the fused loss kernel never sees a padded `[B, T, V]` tensor.
`compute_autocast` is the one mixed-precision context the trainer, the memory probes and the tests
share: weights stay fp32 (master copy), matmuls run in the compute dtype.
"""
from __future__ import annotations

import contextlib

import torch

from fastdash.attention import packed_attention_kwargs, use_packed_attention
from fastdash.batch import MicroBatch

__all__ = ["compute_autocast", "forward_hidden"]


def compute_autocast(device: torch.device | str, dtype: torch.dtype | None):
    """`torch.autocast(device type, dtype)` when the compute dtype is not fp32; a no-op for fp32
    (or None), so fp32 runs are bit-identical to running without it."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    """The transformer body without the lm_head (Qwen2ForCausalLM -> .model)."""
    if hasattr(model, "get_decoder"):
        try:
            return model.get_decoder()
        except (AttributeError, NotImplementedError, ValueError):
            pass
    return getattr(model, "model", None) or model.base_model


def forward_hidden(model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
    """Run the base model on a micro-batch; return the hidden states that predict its targets: [N, H].

    Packed micro-batches go through the varlen attention backend that `fastdash.attention` picks
    (chosen and logged once per process); padded ones through the model's masked attention.
    """
    decoder = _decoder(model)
    if mb.cu_seqlens is not None:
        if mb.input_ids.shape[0] != 1:
            raise ValueError(f"a packed micro-batch has one row, got input_ids of shape {tuple(mb.input_ids.shape)}")
        # shared prompts need fastdash's attention function (it reads the prefix layout) on any device
        use_packed_attention(model, "sdpa_varlen" if mb.prefix is not None else None)
        extra = {} if mb.prefix is None else {"fastdash_prefix": mb.prefix}
        # attention_mask=None AND use_cache=False: only then does transformers keep samples apart
        # (with a cache or a 2-D mask it silently attends across the packed samples)
        out = decoder(
            input_ids=mb.input_ids,
            position_ids=mb.position_ids,
            attention_mask=None,
            use_cache=False,
            **packed_attention_kwargs(model, mb.cu_seqlens, mb.max_seqlen),
            **extra,
        )
    else:
        out = decoder(
            input_ids=mb.input_ids,
            position_ids=mb.position_ids,
            attention_mask=mb.attention_mask,
            use_cache=False,
        )
    hidden = out.last_hidden_state  # [B, T, H]
    return hidden.reshape(-1, hidden.shape[-1]).index_select(0, mb.logit_index.to(hidden.device))  # [N, H]
