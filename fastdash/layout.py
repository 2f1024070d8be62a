"""Where and how a run runs, resolved once at start: the `Layout`.

From the config, the world (torchrun's WORLD_SIZE / RANK, the CUDA devices) and vLLM's availability:
the device, the compute dtype, the engine that generates, the parallelism, which ranks train and
which only generate, async generation on or off. Each `auto` is resolved by one function here
(`resolve_dtype`, `rollout.resolve_engine`, `resolve_parallelism`), and every refusal of a
combination that depends on the world, the device or the memory plan lives in `check_layout`, once,
with its reason (refusals among the config's own keys stay in `config.validate`). Everything after
start (runtime.build_run, the memory plan, the engines, split placement's generation ranks, the async
worker, `--dry-run`) reads the Layout instead of deciding again; each run writes it to `layout.json`.
docs/architecture.md says where this module sits among the others.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from fastdash.distributed import BUCKET_BYTES, local_device
from fastdash.rollout import resolve_engine

log = logging.getLogger("fastdash")


@dataclass(frozen=True)
class Layout:
    device: str  # this rank's device: "cpu" or "cuda:<LOCAL_RANK>"
    dtype: str  # the compute dtype (forward, backward, the engine); weights and AdamW stay fp32
    engine: str  # the engine that generates: hf | vllm (after auto and its fallbacks)
    engine_reason: str  # why that engine, in words
    parallelism: str  # ddp (a full replica per trainer rank) | fsdp (FSDP2 shards); one trainer: ddp
    placement: str  # colocated (every trainer rank generates) | split (generation_gpus ranks only generate)
    world_size: int  # every rank of the launch
    rank: int
    trainer_ranks: tuple[int, ...]
    generation_ranks: tuple[int, ...]
    async_generation: bool
    cuda_devices: int  # CUDA devices this process sees

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def compute_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def trainers(self) -> int:
        return len(self.trainer_ranks)

    @property
    def planned_engine(self) -> str:
        """The engine on a trainer rank's device, which its memory plan counts. Split placement puts none
        there; the plan keeps the HF row (no vLLM share of the GPU), the smaller."""
        return "hf" if self.placement == "split" else self.engine

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, out: Path) -> None:
        (Path(out) / "layout.json").write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    def describe(self, cfg, n_params: int | None = None) -> str:
        """--dry-run: what each rank does and where the engines live (n_params: for FSDP's share)."""
        T, G, shape = self.trainers, cfg.num_generations, cfg.preemptive_sampling
        per_step, per_rollout = cfg.train_batch_size // T, shape.samples // T
        held = (f"fp32 weights, gradients and AdamW state sharded 1/{T} per rank (FSDP2); every micro-batch "
                "all-gathers each layer" if self.parallelism == "fsdp" else
                "one fp32 replica each; gradients summed once per step")
        lines = [f"layout: device {self.device}, compute dtype {self.dtype}, engine {self.engine} "
                 f"({self.engine_reason}), async_generation {str(self.async_generation).lower()}",
                 f"ranks: {T} ({self.parallelism}: {held})",
                 f"per rank: {per_step} samples ({per_step // G} prompts x G={G}) of each step, {per_rollout} of "
                 f"each rollout; engine calls of <= {rank_call_samples(cfg, T)} samples; the memory plan below is "
                 "a rank's"]
        if self.parallelism == "fsdp" and n_params:
            lines.append(f"fsdp per rank: {16 * n_params / T / 2**30:.3f} GiB of fp32 weights, gradients and AdamW "
                         f"state (1/{T} of {16 * n_params / 2**30:.3f} GiB; the plan's fixed part below is a full "
                         "replica's) + one layer gathered at a time + the engine's full copy")
        where = "its own GPU (LOCAL_RANK)" if self.cuda_devices else "CPU"
        if self.placement == "split":
            K, wire = len(self.generation_ranks), "NCCL" if self.cuda_devices else "gloo"
            lines.append(f"placement: split; trainer ranks 0..{T - 1}, generation ranks {T}..{T + K - 1} (each an "
                         f"engine={self.engine} engine on {where}); trainer rank r is served by generation rank "
                         f"{T} + r % {K}; after every optimizer step rank 0 broadcasts the weights to the generation "
                         f"ranks over {wire} in {BUCKET_BYTES // 2**20} MiB buckets (timeout "
                         f"dist_timeout_s={cfg.dist_timeout_s})")
        else:
            lines.append(f"placement: colocated; every rank generates its share with its own engine on {where}")
        return "\n".join(lines)


# ---------------------------------------------------------------- one function per auto -----------
def resolve_dtype(cfg, device: torch.device) -> str:
    """dtype=auto: bfloat16 on CUDA, float32 on CPU."""
    if cfg.dtype != "auto":
        return cfg.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def resolve_parallelism(cfg, trainers: int, replica_fits: bool = True) -> str:
    """ddp or fsdp. One trainer rank has nothing to shard (fsdp runs unsharded there: a sharded checkpoint
    resumes on one rank); auto is ddp unless the memory plan finds no room for a full replica per rank."""
    if trainers <= 1:
        return "ddp"
    if cfg.parallelism == "auto":
        return "ddp" if replica_fits else "fsdp"
    return cfg.parallelism


def rank_call_samples(cfg, trainers: int) -> int:
    """The most samples one engine call of a rank holds (its share of the one-process call)."""
    gen, train = cfg.generation_batch_size, cfg.train_batch_size
    return gen // trainers if gen >= train else min(gen, train // trainers)


# ---------------------------------------------------------------- the layout -----------------------
def resolve_layout(cfg, *, world: int | None = None, rank: int | None = None, cuda_devices: int | None = None,
                   device: torch.device | None = None, replica_fits: bool = True) -> Layout:
    """The run's Layout (world, rank, CUDA devices and device default to this process's); refuses, naming
    the keys, combinations that cannot run here (`check_layout`)."""
    world = int(os.environ.get("WORLD_SIZE", "1")) if world is None else world
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    if cuda_devices is None:
        cuda_devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
    check_world(cfg, world, cuda_devices)
    device = local_device() if device is None else device
    trainers = world - cfg.generation_gpus
    engine, why = resolve_engine(cfg)
    layout = Layout(device=str(device), dtype=resolve_dtype(cfg, device), engine=engine, engine_reason=why,
                    parallelism=resolve_parallelism(cfg, trainers, replica_fits),
                    placement="split" if cfg.generation_gpus else "colocated", world_size=world, rank=rank,
                    trainer_ranks=tuple(range(trainers)), generation_ranks=tuple(range(trainers, world)),
                    async_generation=bool(cfg.async_generation), cuda_devices=cuda_devices)
    check_layout(cfg, layout)
    log.info("layout: %s, %s, engine %s (%s), %s over %d trainer rank(s)%s", layout.device, layout.dtype,
             layout.engine, why, layout.parallelism, trainers,
             f" + {world - trainers} generation rank(s)" if layout.placement == "split" else "")
    return layout


def without_replica(cfg, layout: Layout, why: str) -> Layout | None:
    """The memory plan found no room for a full replica per rank: the layout that shards (FSDP2) where
    parallelism=auto allows it, else None (the plan's error stands)."""
    mode = resolve_parallelism(cfg, layout.trainers, replica_fits=False)
    if mode == layout.parallelism:
        return None
    log.warning("parallelism=auto: a full replica per rank does not fit (%s); sharding with FSDP2", why)
    out = dataclasses.replace(layout, parallelism=mode)
    check_layout(cfg, out)
    return out


def engine_failed(layout: Layout, why: str) -> Layout:
    """engine=auto chose vLLM, which imports but failed to start: the HF engine, said once."""
    log.info("rollout engine: hf (vLLM failed to start: %s)", why)
    return dataclasses.replace(layout, engine="hf", engine_reason=f"auto: vLLM failed to start ({why})")


# ---------------------------------------------------------------- refusals -------------------------
def check_world(cfg, world: int, cuda_devices: int) -> None:
    """Bad combinations of the config and the world fail at start, naming the key and the fix."""
    G, shape = cfg.num_generations, cfg.preemptive_sampling
    if cfg.generation_gpus:
        _check_split(cfg, world, cuda_devices)
    trainers = world - cfg.generation_gpus
    if cfg.train_batch_size % (trainers * G):
        raise ValueError(f"config: train_batch_size={cfg.train_batch_size}: must be a multiple of trainer ranks x "
                         f"num_generations = {trainers} x {G} (a group's samples stay on one rank); set it to "
                         f"{max(1, cfg.train_batch_size // (trainers * G)) * trainers * G} or change --nproc_per_node")
    if cfg.async_generation and cfg.generation_gpus:  # (with FSDP: check_layout)
        raise ValueError("config: async_generation=true with generation_gpus: each trainer rank's worker holds a "
                         "full copy of the policy and generates itself; set async_generation=false")
    if shape.samples_per_call % G:
        raise ValueError(f"config: generation_batch_size={cfg.generation_batch_size}: must be a multiple of "
                         f"num_generations={G}")


def _check_split(cfg, world: int, cuda_devices: int) -> None:
    K, trainers = cfg.generation_gpus, world - cfg.generation_gpus
    if trainers < 1:
        raise ValueError(f"config: generation_gpus={K}: the world has {world} rank(s) and at least one must "
                         f"train; launch torchrun with --nproc_per_node = trainer ranks + {K}")
    if K > trainers:
        raise ValueError(f"config: generation_gpus={K} is more than the {trainers} trainer rank(s): each trainer "
                         "rank is served by one generation rank, so the rest would idle; lower generation_gpus")
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda_devices and local > cuda_devices:
        raise ValueError(f"config: generation_gpus={K}: split placement puts every rank on its own GPU, but "
                         f"{local} ranks share this node's {cuda_devices} GPU(s); lower --nproc_per_node")


def check_layout(cfg, layout: Layout) -> None:
    """Combinations the resolved parallelism refuses (parallelism=auto may choose FSDP after planning):
    LoRA and async generation need a full replica per rank."""
    if layout.parallelism != "fsdp":
        return
    why = f"parallelism={cfg.parallelism} resolved to fsdp (FSDP2 shards over {layout.trainers} ranks)"
    if cfg.lora_r:
        raise ValueError(f"config: lora_r > 0 with {why}: the frozen base is not sharded (FSDP); use fewer ranks "
                         "or a smaller model")
    if cfg.async_generation:
        raise ValueError(f"config: async_generation=true with {why}: each rank's generation worker holds a full "
                         "copy of the policy; set async_generation=false")
