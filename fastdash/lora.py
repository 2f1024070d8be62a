"""LoRA RL with `peft`: adapters trained on a frozen base, the base also serving as the reference.

Memory (what `memory_plan.fixed_part` counts): the base is held once, in the compute dtype, with no
gradient and no optimizer state (2 bytes a parameter in bf16, against 16 + 2 for full fine-tuning's
fp32 master, grad, AdamW and engine copy); only the adapters keep fp32 masters, grads and AdamW state.

The policy is a `peft.PeftModel`, so the names a peft user knows work on it: `disable_adapter()`
gives the reference policy (beta > 0) from the same tensors, `save_pretrained` writes an adapter
directory that `PeftModel.from_pretrained` loads. The HF engine generates with the adapters applied at
run time (docs/lora.md has the measurement that picked it over merging), so a weight sync moves only
adapter tensors: none when the engine shares the policy (fp32 compute), the adapters cast to the
compute dtype otherwise (bf16: the engine's adapters are its own, its base is the trainer's).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys

import torch

log = logging.getLogger("fastdash")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("lora_r > 0 needs peft: pip install 'fastdash[peft]' (or pip install peft)") from e
    return peft


def is_lora(model) -> bool:
    """The policy is a peft model (lora_r > 0)."""
    peft = sys.modules.get("peft")  # never imported: no peft model exists (and full runs skip its import)
    return peft is not None and isinstance(model, peft.PeftModel)


def apply_lora(model: torch.nn.Module, cfg, compute_dtype: torch.dtype) -> torch.nn.Module:
    """Freeze `model`, cast its parameters to the compute dtype (in place: no transient second copy;
    buffers such as RoPE's inv_freq stay as they are), and wrap it with LoRA adapters in fp32."""
    peft = _peft()
    model.requires_grad_(False)
    for p in model.parameters():  # a tied embedding / head is one Parameter: cast once
        p.data = p.data.to(compute_dtype)
    config = peft.LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                             target_modules=cfg.lora_modules, bias="none", task_type="CAUSAL_LM")
    try:
        # autocast_adapter_dtype: adapters in fp32 whatever the base dtype (fp32 masters for AdamW)
        wrapped = peft.get_peft_model(model, config, autocast_adapter_dtype=True)
    except ValueError as e:  # peft: "Target modules {...} not found in the base model"
        raise ValueError(f"config: lora_target_modules={cfg.lora_target_modules!r}: {e}") from None
    for p in adapter_parameters(wrapped).values():
        p.data = p.data.float()  # peft casts bf16/fp16 adapters up; fp32 whatever the base was
    n_base = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    log.info("LoRA r=%d alpha=%g on %s: %d adapter parameters (fp32) on a frozen %s base of %d",
             cfg.lora_r, cfg.lora_alpha, cfg.lora_target_modules, sum(p.numel() for p in
                                                                       adapter_parameters(wrapped).values()),
             str(compute_dtype).removeprefix("torch."), n_base)
    return wrapped


def adapter_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trained tensors (the adapters), by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def adapter_bytes(model: torch.nn.Module, dtype: torch.dtype | None = None) -> int:
    """Bytes of the adapters, in their own dtype or cast to `dtype`."""
    size = None if dtype is None else torch.tensor([], dtype=dtype).element_size()
    return sum(p.numel() * (size or p.element_size()) for p in adapter_parameters(model).values())


def reference_pass(model):
    """Inside: `model` computes the reference policy (beta > 0): a LoRA policy with its adapters
    disabled, i.e. the frozen base itself (no second copy). Any other model is left as it is."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


# ---------------------------------------------------------------------- the HF engine's copy ------
def engine_model(model: torch.nn.Module, dtype: torch.dtype | None) -> tuple[torch.nn.Module, bool]:
    """(the transformers model the HF engine decodes with, shared?). Shared (the adapters are already
    in `dtype`): the policy's own injected model. Else a copy that shares every frozen base tensor with
    the policy and holds its adapters in `dtype` (no second base)."""
    inner = model.get_base_model()  # the transformers model with the LoRA layers injected
    adapters = adapter_parameters(inner)
    if dtype is None or all(p.dtype == dtype for p in adapters.values()):
        return inner, True
    memo = {id(p): p for p in inner.parameters() if not p.requires_grad}  # deepcopy keeps these as they are
    memo.update({id(p): torch.nn.Parameter(p.detach().to(dtype), requires_grad=False) for p in adapters.values()})
    memo.update({id(b): b for b in inner.buffers()})
    return copy.deepcopy(inner, memo).eval(), False


@torch.no_grad()
def sync_adapters(engine_model: torch.nn.Module, model: torch.nn.Module) -> int:
    """Copy the policy's adapters into the engine's (in place, casting); returns the bytes written."""
    ours = dict(engine_model.named_parameters())
    moved = 0
    for name, p in adapter_parameters(model.get_base_model()).items():
        dst = ours[name]
        dst.copy_(p)
        moved += dst.numel() * dst.element_size()
    return moved


# ---------------------------------------------------------------------- checkpoints ----------------
def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapters as peft saves them (adapter_model.safetensors' names)."""
    return _peft().get_peft_model_state_dict(model)


def load_adapter_state(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> None:
    result = _peft().set_peft_model_state_dict(model, weights)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"adapter weights do not fit the model: unexpected {unexpected[:5]}")


def save_adapters(model: torch.nn.Module, d, dtype: torch.dtype | None = None) -> None:
    """A peft adapter directory (adapter_config.json + adapter_model.safetensors), adapters in `dtype`
    (None: as trained, fp32: exact resume)."""
    state = adapter_state(model)
    if dtype is not None:
        state = {k: v.to(dtype) for k, v in state.items()}
    model.save_pretrained(d, state_dict=state, safe_serialization=True)


def save_merged(model: torch.nn.Module, d, dtype: torch.dtype) -> None:
    """A plain transformers model with the adapters folded in, in `dtype`. Merges a copy (one more
    base in memory, at the end of the run only): the policy's own base stays untouched."""
    merged = copy.deepcopy(model).merge_and_unload()
    merged.to(dtype).save_pretrained(d, safe_serialization=True)
