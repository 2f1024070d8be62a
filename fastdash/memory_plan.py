"""The scheduler's inputs and decision as data: the workload, the fixed part of memory, and the
plan (every number it measured and chose, as a table and as JSON)."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

import torch

from fastdash.memory import ActivationFit, copy_bytes, model_bytes

log = logging.getLogger("fastdash.scheduler")
GiB = 1024**3

# Optimizer state bytes per trainable parameter, fp32 whatever the compute dtype
# (AdamW: exp_avg + exp_avg_sq).
OPTIMIZER_STATE_BYTES = {"adamw": 8, "adam": 8, "sgd": 0, "sgd_momentum": 4}
ENGINES = ("hf", "vllm")


class MemoryPlanError(RuntimeError):
    """Even the smallest useful configuration does not fit in the measured memory."""


@dataclass(frozen=True)
class Workload:
    """What one training step asks of memory: sample shapes, batch sizes, and what is held."""

    max_prompt_length: int
    max_completion_length: int
    samples_per_step: int  # train_batch_size: caps the token budget, gives micro-batches per step
    samples_per_generation: int | None = None  # caps the generation concurrency (default: per step)
    beta: float = 0.0  # > 0: a reference model is held
    optimizer: str = "adamw"
    engine: str = "hf"
    vllm_sleep: bool = True  # vLLM frees its weights and KV cache during backprop
    compute_dtype: torch.dtype | None = None  # forward/backward (autocast); None: the parameters' dtype
    lora: bool = False  # LoRA: a frozen compute-dtype base, trained fp32 adapters (fastdash/lora.py)

    def __post_init__(self):
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be 'hf' or 'vllm', got {self.engine!r}")
        if self.optimizer not in OPTIMIZER_STATE_BYTES:
            raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATE_BYTES)}, got {self.optimizer!r}")

    @property
    def sample_len(self) -> int:
        """L: the worst-case sample every probe and budget is sized for."""
        return self.max_prompt_length + self.max_completion_length

    @property
    def generation_samples(self) -> int:
        return self.samples_per_generation or self.samples_per_step


def _check_pin(name: str, value, fraction: bool = False):
    """None for 'auto', else the value: a positive int, or with `fraction` a float in (0, 1]."""
    if value == "auto":
        return None
    number = isinstance(value, (int, float) if fraction else int) and not isinstance(value, bool)
    if not (number and (0 < value <= 1 if fraction else value > 0)):
        raise ValueError(f"{name} must be 'auto' or {'a float in (0, 1]' if fraction else 'a positive int'}, "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Pins:
    """The budgets a user pinned (None: 'auto', the plan chooses); kept and checked, not changed."""

    tokens: int | None = None  # max_tokens_per_microbatch
    generation: int | None = None  # generation_concurrency (vLLM: max_num_seqs)
    utilization: float | None = None  # gpu_memory_utilization (vLLM)

    @classmethod
    def check(cls, max_tokens_per_microbatch="auto", generation_concurrency="auto", gpu_memory_utilization="auto"):
        return cls(_check_pin("max_tokens_per_microbatch", max_tokens_per_microbatch),
                   _check_pin("generation_concurrency", generation_concurrency),
                   _check_pin("gpu_memory_utilization", gpu_memory_utilization, fraction=True))

    def names(self, engine: str) -> list[str]:
        gen = "max_num_seqs" if engine == "vllm" else "generation_concurrency"
        named = (("max_tokens_per_microbatch", self.tokens), (gen, self.generation),
                 ("gpu_memory_utilization", self.utilization))
        return [k for k, v in named if v is not None]


@dataclass(frozen=True)
class FixedPart:
    """Bytes resident through the whole step, whatever the batch."""

    weights: int  # the trained parameters (fp32 master weights) and buffers
    grads: int  # one per trainable parameter, in its dtype
    optimizer: int  # fp32 state
    reference: int  # reference model in the compute dtype (beta > 0)
    generation_weights: int  # the HF engine's compute-dtype copy (when it differs from the weights')
    base_params: int = 0  # the model's own parameters (LoRA adapters not counted)
    adapter_bytes: int = 0  # LoRA: the adapters' fp32 weights + grads + AdamW state (inside the totals above)

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.reference + self.generation_weights

    def describe(self) -> str:
        parts = [("weights", self.weights), ("grads", self.grads), ("optimizer", self.optimizer),
                 ("reference", self.reference), ("engine weights", self.generation_weights)]
        return " + ".join(f"{k} {v / GiB:.3f}" for k, v in parts) + f" = {self.total / GiB:.3f} GiB"


def fixed_part(model: torch.nn.Module, w: Workload) -> FixedPart:
    """weights + grads (parameter dtype) + optimizer state (fp32) + reference model (beta > 0, compute
    dtype) + the HF engine's generation copy (compute dtype, when it is not the parameters' dtype).
    vLLM's own weight copy is inside its memory share, not here."""
    weights, grads, n_trainable = model_bytes(model)
    compute = w.compute_dtype or next(model.parameters()).dtype
    optimizer = n_trainable * OPTIMIZER_STATE_BYTES[w.optimizer]
    if w.lora:  # the reference is the base with adapters off; the engine decodes on the same base and
        # holds its own adapters only when the compute dtype is not theirs (fp32)
        engine = n_trainable * _itemsize(compute) if w.engine == "hf" and compute != torch.float32 else 0
        n_base = sum(p.numel() for p in model.parameters()) - n_trainable
        return FixedPart(weights=weights, grads=grads, optimizer=optimizer, reference=0, generation_weights=engine,
                         base_params=n_base, adapter_bytes=grads + grads + optimizer)
    copy = copy_bytes(model, compute)
    separate_copy = w.engine == "hf" and compute != next(model.parameters()).dtype
    return FixedPart(weights=weights, grads=grads, optimizer=optimizer, reference=copy if w.beta > 0 else 0,
                     generation_weights=copy if separate_copy else 0,
                     base_params=sum(p.numel() for p in model.parameters()))


def _itemsize(dtype: torch.dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


@dataclass
class MemoryPlan:
    device: str
    engine: str
    master_dtype: str  # the trained parameters, grads (fp32 under mixed precision)
    compute_dtype: str  # forward / backward, reference model, KV cache, engine weights
    # measured
    total_bytes: int
    free_bytes: int
    resident_bytes: int  # already allocated and part of `fixed` (the model's weights)
    safety: float
    usable_bytes: int  # safety * (free + resident)
    # fixed part
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    reference_bytes: int
    generation_weights_bytes: int  # HF engine's compute-dtype weight copy (0 when it shares the weights)
    fixed_bytes: int
    # activations: peak(T) = base + per_token * T + per_token_sq * T^2 above the fixed part
    activation_base_bytes: float
    activation_bytes_per_token: float
    activation_bytes_per_token_sq: float
    probe_points: list[tuple[int, int]]
    # workload
    sample_len: int
    samples_per_step: int
    # backprop
    max_tokens_per_microbatch: int
    backprop_peak_bytes: int
    backprop_headroom_bytes: int
    microbatches_per_step: int  # worst case: every sample kept and of length sample_len
    # generation
    kv_bytes_per_token: int
    generation_concurrency: int  # HF: sequences per generate call; vLLM: max_num_seqs
    generation_peak_bytes: int
    generation_headroom_bytes: int
    gpu_memory_utilization: float | None = None  # vLLM only
    vllm_sleep: bool | None = None
    memory_max_tokens: int = 0  # the largest budget that fits (before the throughput limit)
    fastest_tokens: int | None = None  # where measured tokens/s peaks, when it does inside the range
    pinned: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    base_params: int = 0  # the model's own parameters (not the LoRA adapters)
    lora_adapter_bytes: int = 0  # LoRA: adapter weights + grads + AdamW (fp32), inside the fixed part

    @property
    def fixed_bytes_per_base_param(self) -> float:
        """The fixed part per model parameter: ~16-18 bytes full fine-tuning, ~2 + adapters LoRA (bf16)."""
        return self.fixed_bytes / max(self.base_params, 1)

    def predict_backprop_bytes(self, tokens: int) -> int:
        fit = ActivationFit(self.activation_base_bytes, self.activation_bytes_per_token, self.activation_bytes_per_token_sq)
        return int(self.fixed_bytes + fit(tokens))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_table(self) -> str:
        def gib(x):
            return f"{x / GiB:8.3f} GiB"

        gen_name = "max_num_seqs" if self.engine == "vllm" else "generation_concurrency"

        def mark(name):
            return " (pinned)" if name in self.pinned else ""

        rows = [
            ("device", self.device),
            ("total", gib(self.total_bytes)),
            ("free (measured)", gib(self.free_bytes)),
            ("already resident", gib(self.resident_bytes)),
            (f"usable (x{self.safety:g})", gib(self.usable_bytes)),
            ("compute dtype", self.compute_dtype),
            (f"weights ({self.master_dtype})" if not self.lora_adapter_bytes else
             f"weights (frozen {self.compute_dtype} base + fp32 adapters)", gib(self.weights_bytes)),
            (f"grads ({self.master_dtype})", gib(self.grads_bytes)),
            ("optimizer state (fp32)", gib(self.optimizer_bytes)),
            (f"reference model ({self.compute_dtype})", gib(self.reference_bytes)),
            (f"engine weights ({self.compute_dtype})",
             gib(self.generation_weights_bytes) if self.engine == "hf" else "in vLLM's share"),
            ("fixed total", gib(self.fixed_bytes)),
            ("fixed bytes / model parameter", f"{self.fixed_bytes_per_base_param:8.2f} B"),
            *([("LoRA adapters (weights+grads+AdamW)", f"{self.lora_adapter_bytes / 1024**2:8.2f} MiB")]
              if self.lora_adapter_bytes else []),
            ("activation / token", f"{self.activation_bytes_per_token / 1024:8.1f} KiB"),
            ("activation / token^2", f"{self.activation_bytes_per_token_sq:8.2f} B"),
            ("activation base", gib(self.activation_base_bytes)),
            ("probe points (T: bytes)", ", ".join(f"{t}: {b / GiB:.3f}G" for t, b in self.probe_points)),
            ("sample length (worst)", str(self.sample_len)),
            ("samples per step", str(self.samples_per_step)),
            ("max_tokens_per_microbatch" + mark("max_tokens_per_microbatch"), str(self.max_tokens_per_microbatch)),
            ("largest budget that fits", str(self.memory_max_tokens)),
            ("fastest budget (probe timing)", str(self.fastest_tokens or "-")),
            ("micro-batches / step (worst)", str(self.microbatches_per_step)),
            ("backprop peak (predicted)", gib(self.backprop_peak_bytes)),
            ("backprop headroom", gib(self.backprop_headroom_bytes)),
            ("engine", self.engine),
            ("KV cache / token", f"{self.kv_bytes_per_token / 1024:8.1f} KiB"),
            (gen_name + mark(gen_name), str(self.generation_concurrency)),
            ("generation peak (predicted)", gib(self.generation_peak_bytes)),
            ("generation headroom", gib(self.generation_headroom_bytes)),
        ]
        if self.gpu_memory_utilization is not None:
            rows.append(("gpu_memory_utilization" + mark("gpu_memory_utilization"), f"{self.gpu_memory_utilization:.2f}"))
            rows.append(("vLLM sleeps in backprop", str(self.vllm_sleep)))
        width = max(len(k) for k, _ in rows)
        lines = ["memory plan", "-" * (width + 20)] + [f"{k:<{width}}  {v}" for k, v in rows]
        lines += [f"WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)

    def log_and_save(self, run_dir: str | None = None) -> None:
        """Log the table; write `memory_plan.json` into `run_dir` when given."""
        log.info("\n%s", self.to_table())
        for w in self.warnings:
            log.warning(w)
        if run_dir is not None:
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, "memory_plan.json"), "w") as f:
                json.dump(self.to_dict(), f, indent=2)
