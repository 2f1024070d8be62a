"""Data-parallel vLLM generation: H engines (the paper's H inference servers) behind one
`RoundRobinEngine`, each engine core in its own process, pinned to its own GPUs or CPU cores."""
from __future__ import annotations

import math
import os

import torch

from fastdash.rollout.vllm import VLLMEngine, _WeightExporter


def make_vllm_engines(cfg, model, tokenizer, plan=None, devices: str | None = None, compute_dtype=None):
    """One `VLLMEngine`, or for vllm_data_parallel_size = H > 1 a `RoundRobinEngine` over H engines,
    each with its core in its own process: vLLM's forward context is a module global, so in-process
    engines in parallel threads fail ("Forward context is not set", measured). Engine h gets GPUs
    [h*tp, (h+1)*tp) (engine 0 shares GPU 0 with the trainer), on CPU the h-th share of the cores.
    The plan's concurrency (max_num_seqs, KV budget) is split evenly among the engines.
    `devices` pins a single engine's core process (split placement: the generation rank's one GPU);
    `compute_dtype`: the Layout's (None: the model's)."""
    dp = cfg.vllm_data_parallel_size
    if devices is not None and dp * cfg.vllm_tensor_parallel_size > 1:
        raise ValueError(f"config: vllm_data_parallel_size={dp}, vllm_tensor_parallel_size="
                         f"{cfg.vllm_tensor_parallel_size} with generation_gpus: each generation rank has one GPU; "
                         "set both to 1 and raise generation_gpus instead")
    if dp == 1:
        return VLLMEngine(cfg, model, tokenizer, plan, devices=devices, compute_dtype=compute_dtype)
    from fastdash.rollout.multi import RoundRobinEngine

    tp = cfg.vllm_tensor_parallel_size
    if next(model.parameters()).device.type == "cuda":
        device_sets = _cuda_device_sets(dp, tp, torch.cuda.device_count(), os.environ.get("CUDA_VISIBLE_DEVICES"))
    elif "VLLM_CPU_OMP_THREADS_BIND" in os.environ:  # the user's binding wins
        device_sets = [None] * dp
    else:
        device_sets = _cpu_core_sets(dp, tp, sorted(os.sched_getaffinity(0)))
    total = int((plan.generation_concurrency if plan is not None else 0) or cfg.generation_batch_size)
    per_engine = max(1, math.ceil(total / dp))
    engines, exporter = [], _WeightExporter()
    try:
        for h in range(dp):
            engines.append(VLLMEngine(cfg, model, tokenizer, plan, devices=device_sets[h], own_process=True,
                                      max_num_seqs=per_engine, rank=h, exporter=exporter,
                                      compute_dtype=compute_dtype))
    except BaseException:
        for e in engines:  # no orphaned engine-core processes
            e.shutdown()
        raise
    return RoundRobinEngine(engines)


def _cuda_device_sets(dp: int, tp: int, count: int, visible: str | None) -> list[str]:
    """CUDA_VISIBLE_DEVICES per engine: engine h gets the visible GPUs [h*tp, (h+1)*tp)."""
    if count < dp * tp:
        raise ValueError(f"vllm_data_parallel_size={dp} x vllm_tensor_parallel_size={tp} needs {dp * tp} GPUs, "
                         f"but {count} are visible; lower one of them")
    ids = [s.strip() for s in visible.split(",")] if visible else [str(i) for i in range(count)]
    return [",".join(ids[h * tp : (h + 1) * tp]) for h in range(dp)]


def _cpu_core_sets(dp: int, tp: int, cores: list[int]) -> list[str | None]:
    """VLLM_CPU_OMP_THREADS_BIND per engine: contiguous equal shares of `cores`, one per TP worker,
    "|" between the workers of one engine (vLLM's per-rank syntax). Fewer cores than workers: None,
    vLLM's own binding (the engines then share cores)."""
    workers = dp * tp
    if len(cores) < workers:
        return [None] * dp
    per = len(cores) // workers
    shares = [",".join(map(str, cores[w * per : (w + 1) * per])) for w in range(workers)]
    return ["|".join(shares[h * tp : (h + 1) * tp]) for h in range(dp)]
