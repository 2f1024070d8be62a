"""The scheduler's decision as data: every number it measured and chose, as a table and as JSON."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field

from fastdash.memory import ActivationFit

log = logging.getLogger("fastdash.scheduler")
GiB = 1024**3


class MemoryPlanError(RuntimeError):
    """Even the smallest useful configuration does not fit in the measured memory."""


@dataclass
class MemoryPlan:
    device: str
    engine: str
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
            ("weights", gib(self.weights_bytes)),
            ("grads", gib(self.grads_bytes)),
            ("optimizer state", gib(self.optimizer_bytes)),
            ("reference model", gib(self.reference_bytes)),
            ("fixed total", gib(self.fixed_bytes)),
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
