"""Several trainer ranks under torchrun: process group, rank helpers, gradient reduction, failures.

`torchrun --nproc_per_node=N -m fastdash.train ...` (or any launcher that sets RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT) starts N ranks; `setup` joins them in one process group (gloo for CPU
tensors, NCCL for CUDA tensors) whose collectives time out after `dist_timeout_s`.

Data parallelism keeps the maths of one process (README "Several GPUs / torchrun"):
- every optimizer step's prompts are split into contiguous shares, one per rank, so a group's G
  samples stay on one rank and the union over ranks is the one-process step;
- the step's loss normaliser is summed over ranks before the first micro-batch (`sum_floats`),
  so each rank's loss is already its share of the global loss: after the backward loop the gradients
  are summed once (`all_reduce_grads`, bucketed, fp32), which is exactly the one-process gradient.
  We reduce ourselves rather than wrap the model in `DistributedDataParallel`: ranks run different
  numbers of micro-batches (packing) or none at all (all filtered), and the fused loss reads the
  lm_head weight outside the module's forward, neither of which DDP's reducer allows;
- metrics are reduced over ranks; logging, the progress bar, evaluation, plots and the final model are
  rank 0's; checkpoints are written collectively (`fastdash.checkpoint`).

Failures: each rank writes a heartbeat to the rendezvous store every second and, when it fails with
an exception, its cause. A rank whose collective fails (a peer's connection closed, or the timeout)
looks there and names the dead rank and its cause; a watchdog ends a rank whose peer has been silent
for longer than `dist_timeout_s`, so no rank hangs.
"""
from __future__ import annotations

import logging
import os
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdash.heartbeat import HEARTBEAT_S, STALE_S, Watchdog

log = logging.getLogger("fastdash")
BUCKET_BYTES = 25 * 2**20
_watchdog: "Watchdog | None" = None
# split placement (`generation_gpus: K`): the first T = world - K ranks train, the last K only generate
# (`fastdash.rollout.split`). Every trainer collective runs on the trainers' group; None = the whole world.
_trainers = None
_generators = None  # trainer rank 0 + the generation ranks: the weight broadcast's group
_generation = 0  # how many ranks only generate


# ---------------------------------------------------------------- who am I -------------------------
def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def joined() -> bool:
    """This process is one rank of several (trainer or generation rank)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def active() -> bool:
    """More than one trainer rank: the trainer's collectives have peers."""
    return joined() and world_size() > 1


def rank() -> int:
    """The global rank; trainer ranks come first, so for them it is also the rank among trainers."""
    return dist.get_rank() if joined() else 0


def world_size() -> int:
    """The number of trainer ranks (generation ranks of split placement do not count)."""
    return dist.get_world_size(_trainers) if joined() and is_trainer() else 1


def generation_ranks() -> list[int]:
    """The ranks that only generate (split placement); [] when every rank trains."""
    if not joined():
        return []
    world = dist.get_world_size()
    return list(range(world - _generation, world))


def is_trainer() -> bool:
    return rank() not in generation_ranks()


def trainer_group():
    """The process group of the trainer ranks (None: the default group, every rank trains)."""
    return _trainers


def generator_group():
    return _generators


def is_main() -> bool:
    return rank() == 0


def share(n: int, r: int | None = None, w: int | None = None) -> tuple[int, int]:
    """Rank r's contiguous share [lo, hi) of n items (n divisible by the world size: validated)."""
    r, w = rank() if r is None else r, world_size() if w is None else w
    return n * r // w, n * (r + 1) // w


def call_prompts(ranges: list[tuple[int, int]], per_call: int) -> list[list[int]]:
    """The global prompt indices of each engine call: those of `ranges` (`step_shares`) that one
    process would generate in the same call (one call per one-process call that holds any of them)."""
    calls: dict[int, list[int]] = {}
    for lo, hi in ranges:
        for i in range(lo, hi):
            calls.setdefault(i // per_call, []).append(i)
    return list(calls.values())


def step_shares(n_prompts: int, prompts_per_step: int) -> list[tuple[int, int]]:
    """This rank's prompt index ranges of a rollout: its contiguous share of every step's prompts
    (a group stays on one rank; every step is spread over all ranks, also when a rollout feeds several)."""
    w = world_size()
    if w == 1:
        return [(0, n_prompts)]
    out = []
    for start in range(0, n_prompts, prompts_per_step):
        lo, hi = share(min(prompts_per_step, n_prompts - start))
        out.append((start + lo, start + hi))
    return out


_SEED_MOD, _SEED_MUL, _SEED_STEP = 2**63 - 1, 1_000_003, 7_919  # rollout.decode.row_seed, vllm._mix


def shifted_seed(seed: int, offset: int) -> int:
    """A call seed s' whose row j draws row j + offset's seed of a call seeded `seed`: the engines seed
    row (HF) or prompt (vLLM) i with (s * 1_000_003 + i * 7_919 + 1) mod (2^63 - 1), so
    s' = s + offset * 7_919 / 1_000_003 (mod 2^63 - 1). tests/test_distributed.py checks it against them."""
    return (seed + offset * _SEED_STEP * pow(_SEED_MUL, -1, _SEED_MOD)) % _SEED_MOD


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def local_device() -> torch.device:
    """This process's device: `cuda:<LOCAL_RANK>` (one GPU per rank, the one `setup` selects), else CPU.
    With an index, so processes this one starts (the async worker) land on it, not on GPU 0."""
    if not torch.cuda.is_available():
        return torch.device("cpu")
    r, count = local_rank(), torch.cuda.device_count()
    if r >= count:
        raise ValueError(f"LOCAL_RANK={r} but this process sees {count} CUDA device(s): every rank needs its own "
                         "GPU; lower --nproc_per_node (or let each rank see every GPU of the node)")
    return torch.device("cuda", r)


def planned_world(cfg=None) -> int:
    """The number of trainer ranks: torchrun's world size less cfg's generation ranks (also before /
    without the process group: --dry-run)."""
    if joined():
        return world_size()
    return int(os.environ.get("WORLD_SIZE", "1")) - (cfg.generation_gpus if cfg is not None else 0)


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or stopped answering; the message names it."""


class NullLog:
    """What ranks other than 0 write metrics to."""

    rows: list = []

    def write(self, row: dict) -> None:
        pass


def collective_error(e: BaseException) -> bool:
    """An error raised by a collective (peer gone, connection closed, timeout), not by our own code."""
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = f"{type(e).__name__} {e}".lower()
    return isinstance(e, (RuntimeError, OSError)) and any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe"))


# ---------------------------------------------------------------- start / stop ---------------------
def setup(cfg) -> None:
    """Join the process group torchrun described (no-op for one process); start the heartbeat. The
    world was checked before (`fastdash.layout.resolve_layout`)."""
    global _watchdog
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if world == 1 or joined():
        return
    r = int(os.environ["RANK"])
    timeout = timedelta(seconds=cfg.dist_timeout_s)
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # under torchrun the store lives in the agent; a plain launcher's rank 0 hosts it
    host = r == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"
    store = dist.TCPStore(addr, port, world, is_master=host, timeout=timeout)
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(local_rank())
    dist.init_process_group(backend, store=dist.PrefixStore("pg", store), rank=r, world_size=world, timeout=timeout)
    if cfg.generation_gpus:  # every rank creates every group, in the same order
        global _trainers, _generators, _generation
        _generation, trainers = cfg.generation_gpus, world - cfg.generation_gpus
        _trainers = dist.new_group(list(range(trainers)))
        _generators = dist.new_group([0, *range(trainers, world)])
    _watchdog = Watchdog(addr, port, r, world, cfg.dist_timeout_s, timeout)
    log.info("rank %d of %d joined (%s, collective timeout %ds)", r, world, backend, cfg.dist_timeout_s)


def teardown() -> None:
    global _watchdog, _trainers, _generators, _generation
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    _trainers, _generators, _generation = None, None, 0
    if dist.is_initialized():
        dist.destroy_process_group()


def record_failure(exc: BaseException) -> None:
    """Leave this rank's cause where the others look (best effort: the store may be gone)."""
    if _watchdog is not None:
        _watchdog.record(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")


def explain_failure(exc: BaseException) -> str | None:
    """For a failed collective: which peer is gone and why (from the store), or None when all are alive."""
    if _watchdog is None:
        return None
    return _watchdog.diagnose(wait=STALE_S + HEARTBEAT_S)


# ---------------------------------------------------------------- collectives ----------------------
def _device_for_collectives() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def sum_floats(*values: float) -> list[float]:
    """Sum each value over ranks, in one all_reduce (float64: counts stay exact)."""
    if not active():
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64)
    dist.all_reduce(t, group=_trainers)
    return t.tolist()


def all_gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's equally shaped `t` along dim 0, in rank order."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.contiguous(), group=_trainers)
    return torch.cat(parts)


def gather_objects(obj) -> list | None:
    """Every rank's obj on rank 0 (in rank order); None on the others."""
    if not active():
        return [obj]
    out = [None] * world_size() if is_main() else None
    dist.gather_object(obj, out, dst=0, group=_trainers)
    return out


def all_gather_objects(obj) -> list:
    if not active():
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj, group=_trainers)
    return out


def broadcast_object(obj, src: int = 0):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, group=_trainers)
    return box[0]


def barrier() -> None:
    if active():
        dist.barrier(group=_trainers)


def main_first(fn):
    """Run fn on rank 0 first, then on the others; rank 0's error is raised on every rank."""
    err = None
    if is_main():
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - re-raised below, on every rank
            err = e
    msg = broadcast_object(None if err is None else f"{err}")
    if err is not None:
        raise err
    if msg is not None:
        raise ValueError(msg)
    if not is_main():
        fn()


def all_reduce_grads(model: torch.nn.Module, bucket_bytes: int = BUCKET_BYTES) -> None:
    """Sum every trainable parameter's gradient over ranks (missing gradients count as zero), in
    buckets of flattened fp32 tensors: one all_reduce per bucket, as DDP's reducer would do."""
    if not active():
        return
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # a rank whose samples were all filtered still takes part
            p.grad = torch.zeros_like(p)
    bucket, size = [], 0
    for p in params:
        bucket.append(p.grad)
        size += p.grad.numel() * p.grad.element_size()
        if size >= bucket_bytes:
            _reduce_bucket(bucket)
            bucket, size = [], 0
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat, group=_trainers)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


SUMMED = ("loss", "microbatches", "tokens/loss", "tokens/padding", "tokens/real", "mismatch/tokens",
          "fsdp/padding_microbatches")


def reduce_step_stats(stats: dict) -> dict:
    """One optimizer step's backward statistics over ranks: counts and the loss (already a share of the
    global loss) summed, maxima maxed, the rest token-weighted means (clip fraction, KL, mismatch)."""
    if not active():
        return stats
    parts = all_gather_objects(stats)
    out = {}
    for key in dict.fromkeys(k for p in parts for k in p):
        values = [(p[key], p.get("tokens/loss", 0)) for p in parts if key in p and p[key] is not None]
        if not values:
            out[key] = None
        elif key in SUMMED:
            out[key] = sum(v for v, _ in values)
        elif key.endswith("_max"):
            out[key] = max(v for v, _ in values)
        else:
            weight = sum(t for _, t in values)
            out[key] = sum(v * t for v, t in values) / weight if weight else 0.0
    return out
