"""Split placement (`generation_gpus: K`): the last K ranks of the torchrun world only generate.

    torchrun --nproc_per_node=4 -m fastdash.train generation_gpus=2 engine=vllm ...   # the paper's 2 + 2

Ranks 0..T-1 (T = world - K) train among themselves (DDP or FSDP2 on their own process group,
`distributed.trainer_group`); ranks T..T+K-1 each build an engine (`engine`: vLLM or HF) on their own
device and answer engine calls. Trainer rank r is served by generation rank T + r % K, so every
trainer keeps the engine calls (and seeds) of colocated placement: the samples are the same.

- Requests and completions travel through the rendezvous store (`Channel`), not a collective: any
  trainer reaches its server whatever the others do (rank 0 evaluates alone), and a wait never runs
  into a collective timeout while a long generation runs. A dead peer is found by its failure record
  or by the heartbeat watchdog (`fastdash.heartbeat`), which ends a rank whose peer went silent.
- Weights travel as tensors: after every optimizer step (and once at start) trainer rank 0
  broadcasts the compute-dtype weights to the generation ranks over their own group (NCCL on GPUs,
  gloo on CPU) in buckets, each bounded by `dist_timeout_s`; bytes and seconds are logged.
- On-policy by construction: a request carries the policy version (weight syncs so far) it was made
  under; a server answers it only once its own weights have that version (a request that arrives
  before the sync it needs waits in the server's queue), and refuses one made under older weights.
"""
from __future__ import annotations

import logging
import os
import pickle
import time
import traceback
from collections import deque
from datetime import timedelta

import torch
import torch.distributed as dist

from fastdash import distributed
from fastdash.distributed import BUCKET_BYTES, PeerFailure
from fastdash.heartbeat import HEARTBEAT_S, STALE_S
from fastdash.rollout.base import stop_engine

log = logging.getLogger("fastdash")
PREFIX = "fastdash/split"
CHUNK = 4 * 2**20  # the TCPStore refuses values over 8 MiB: larger messages go in chunks
DEDICATED_GPU_SHARE = 0.9  # vLLM's share of a GPU it has to itself (gpu_memory_utilization=auto)
_clients: list["SplitEngine"] = []  # this trainer rank's engine, told to stop when the run ends


# ---------------------------------------------------------------- placement -----------------------
def engine_devices(device: torch.device) -> str | None:
    """CUDA_VISIBLE_DEVICES for a generation rank's vLLM engine core (a process of its own, which
    would otherwise start on GPU 0, beside trainer rank 0): the rank's GPU, named as this process's
    visible list names it. None on CPU."""
    if device.type != "cuda":
        return None
    visible = [s.strip() for s in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if s.strip()]
    return visible[device.index] if visible else str(device.index)


def _server_of(r: int) -> int:
    gens = distributed.generation_ranks()
    return gens[r % len(gens)]


def _signature(model) -> list[tuple[str, tuple[int, ...]]]:
    return [(n, tuple(p.shape)) for n, p in model.named_parameters()]


# ---------------------------------------------------------------- messages through the store ------
class Channel:
    """Pickled messages through the rendezvous store: `put` / `take` by key, `enqueue` / the server's
    `take` of its queue in arrival order. Waits poll, checking that the peers they wait on are alive."""

    def __init__(self, timeout_s: float):
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        self.store = dist.TCPStore(addr, port, is_master=False, timeout=timedelta(seconds=timeout_s))

    def put(self, key: str, obj) -> None:
        data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
        n = max(1, -(-len(data) // CHUNK))
        for i in range(n):
            self.store.set(f"{key}/{i}", data[i * CHUNK : (i + 1) * CHUNK])
        self.store.set(key, str(n))  # last: its presence means every chunk is there

    def take(self, key: str, peers: list[int]):
        wait, checked = 0.0005, time.monotonic()
        while not self.store.check([key]):
            time.sleep(wait)
            wait = min(2 * wait, 0.05)  # fast answers stay fast; idle waits cost little CPU
            if time.monotonic() - checked > HEARTBEAT_S:
                self._alive(peers)
                checked = time.monotonic()
        n = int(self.store.get(key))
        data = b"".join(self.store.get(f"{key}/{i}") for i in range(n))
        for k in (key, *(f"{key}/{i}" for i in range(n))):
            self.store.delete_key(k)
        return pickle.loads(data)

    def enqueue(self, server: int, obj) -> None:
        seq = self.store.add(f"{PREFIX}/q{server}/n", 1)
        self.put(f"{PREFIX}/q{server}/{seq}", obj)

    def _alive(self, peers: list[int]) -> None:
        """The failure record a rank leaves on its way out (train.run_training), or a stale heartbeat."""
        for p in peers:
            if self.store.check([f"fastdash/failed/{p}"]):
                raise PeerFailure(f"rank {p} failed with {self.store.get(f'fastdash/failed/{p}').decode()}")
            age = time.time() - float(self.store.get(f"fastdash/alive/{p}").decode())
            if age > STALE_S:
                raise PeerFailure(f"rank {p} is gone (no heartbeat for {age:.0f} s)")


# ---------------------------------------------------------------- the trainer's side ---------------
class SplitEngine:
    """The `Engine` of a trainer rank: its calls run on its generation rank."""

    def __init__(self, cfg, model, compute_dtype: torch.dtype):
        self.cfg, self.dtype, self.rank = cfg, compute_dtype, distributed.rank()
        self.server, self.channel = _server_of(self.rank), Channel(cfg.dist_timeout_s)
        self.calls, self.version = 0, 0
        self.name, self.max_batch_size, signature = self.channel.take(f"{PREFIX}/ready/{self.server}/{self.rank}",
                                                                      [self.server])
        if signature != _signature(model):
            raise ValueError(f"split placement: generation rank {self.server}'s model does not match the trainer's "
                             f"({cfg.model}: parameters differ); every rank must load the same model")
        log.info("split placement: rank %d's engine calls run on generation rank %d (engine=%s)",
                 self.rank, self.server, self.name)
        _clients.append(self)
        self.sync_weights(model)  # the generation ranks start from the trainer's weights

    def generate(self, prompts: list[list[int]], n: int, params) -> list:
        self.calls += 1
        self.channel.enqueue(self.server, ("generate", self.rank, self.calls, self.version, prompts, n, params,
                                           self.max_batch_size))
        status, payload = self.channel.take(f"{PREFIX}/res/{self.rank}/{self.calls}", [self.server])
        if status == "oom":  # the trainer's OOM back-off halves max_batch_size and retries
            raise torch.OutOfMemoryError(f"generation rank {self.server}: {payload}")
        if status != "ok":
            raise RuntimeError(f"generation rank {self.server} failed the engine call:\n{payload}")
        return payload

    def sync_weights(self, model: torch.nn.Module) -> None:
        """Every trainer rank calls it (FSDP: all gather); rank 0 sends. The others' next requests
        carry the new version, so their servers hold them until this sync has arrived."""
        from fastdash.fsdp import gathered

        self.version += 1
        with gathered(model):
            if self.rank != 0:
                return
            for g in distributed.generation_ranks():
                self.channel.enqueue(g, ("sync", self.version))
            named = [(n, p.detach().to(self.dtype)) for n, p in model.named_parameters()]
            broadcast_weights(named, src=0, group=distributed.generator_group(), timeout_s=self.cfg.dist_timeout_s)

    def sleep(self) -> None:  # the engines have devices of their own
        pass

    def wake(self) -> None:
        pass

    def close(self) -> None:
        self.channel.enqueue(self.server, ("stop", self.rank))


def finish() -> None:
    """A trainer rank's run is done: its server may stop; then every rank meets (`serve` ends the same way)."""
    close_clients()
    dist.barrier()


def close_clients() -> None:
    """The run ends (or failed): tell this rank's server to stop waiting for it (best effort)."""
    while _clients:
        try:
            _clients.pop().close()
        except Exception:  # noqa: BLE001 - the server or the store may be gone already
            pass


# ---------------------------------------------------------------- the generation rank's side -------
def serve(cfg, model, engine) -> dict:
    """A generation rank (its model and engine: `runtime.build_server`): answer its trainers until every
    one has stopped."""
    me, trainers = distributed.rank(), distributed.generation_ranks()[0]
    channel, clients = Channel(cfg.dist_timeout_s), [r for r in range(trainers) if _server_of(r) == me]
    for r in clients:
        channel.put(f"{PREFIX}/ready/{me}/{r}", (engine.name, engine.max_batch_size, _signature(model)))
    log.info("generation rank %d: engine=%s on %s serves trainer rank(s) %s", me, engine.name,
             next(model.parameters()).device, clients)
    try:
        Server(cfg, model, engine, channel, clients, trainers).run()
    finally:
        stop_engine(engine)  # vLLM's engine core is a process of its own here
    dist.barrier()  # as the trainers' `finish`
    return {}


class Server:
    def __init__(self, cfg, model, engine, channel: Channel, clients: list[int], trainers: int):
        self.cfg, self.model, self.engine, self.channel = cfg, model, engine, channel
        self.clients, self.trainers, self.me = set(clients), list(range(trainers)), distributed.rank()
        self.version, self.held = 0, deque()  # requests made under weights not yet received

    def run(self) -> None:
        seq = 0
        while self.clients:
            seq += 1
            msg = self.channel.take(f"{PREFIX}/q{self.me}/{seq}", self.trainers)
            if msg[0] == "stop":
                self.clients.discard(msg[1])
            elif msg[0] == "sync":
                self._receive_weights(msg[1])
                while self.held and self.held[0][3] <= self.version:
                    self._answer(self.held.popleft())
            elif msg[3] > self.version:
                self.held.append(msg)
            else:
                self._answer(msg)

    @torch.no_grad()
    def _receive_weights(self, version: int) -> None:
        named = list(self.model.named_parameters())  # written in place: their version counters move (vLLM's
        # exporter rewrites its file only when they did; `.data` would hide the write)
        broadcast_weights(named, src=0, group=distributed.generator_group(), timeout_s=self.cfg.dist_timeout_s)
        self.engine.sync_weights(self.model)
        self.version = version

    def _answer(self, msg) -> None:
        _, r, call, version, prompts, n, params, max_batch_size = msg
        key = f"{PREFIX}/res/{r}/{call}"
        if version < self.version:  # cannot happen while every trainer syncs after every step
            self.channel.put(key, ("error", f"request made under weights v{version}, engine holds v{self.version}"))
            return
        if max_batch_size is not None:
            self.engine.max_batch_size = max_batch_size
        try:
            reply = ("ok", self.engine.generate(prompts, n, params))
        except torch.OutOfMemoryError as e:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            reply = ("oom", str(e).splitlines()[0] if str(e) else "out of memory")
        except Exception:  # noqa: BLE001 - the trainer that asked raises it; the others go on
            reply = ("error", traceback.format_exc()[-4000:])
        self.channel.put(key, reply)


# ---------------------------------------------------------------- the weight broadcast -------------
def broadcast_weights(named: list[tuple[str, torch.Tensor]], src: int = 0, group=None,
                      bucket_bytes: int = BUCKET_BYTES, timeout_s: float | None = None) -> dict:
    """Trainer -> engines weight sync: broadcast `named` tensors from `src` in buckets of flattened
    same-dtype tensors, each bucket's wait bounded by `timeout_s`. Every member of `group` passes the
    same names, shapes and dtypes (receivers: their own tensors, overwritten in place). Over NCCL on
    GPUs; gloo carries the same protocol on CPU. Logs and returns bytes and seconds."""
    t0, sent, buckets = time.perf_counter(), 0, 0
    timeout = timedelta(seconds=timeout_s) if timeout_s else None
    receiver = dist.get_rank() != src
    pending: list[torch.Tensor] = []

    def flush():
        nonlocal sent, buckets
        flat = torch.cat([t.reshape(-1) for t in pending])
        work = dist.broadcast(flat, src=src, group=group, async_op=True)
        if not work.wait(timeout) if timeout else not work.wait():
            raise PeerFailure(f"weight broadcast bucket {buckets} did not finish within {timeout_s} s")
        offset = 0
        for t in pending if receiver else ():
            t.copy_(flat[offset : offset + t.numel()].view_as(t))
            offset += t.numel()
        sent, buckets = sent + flat.numel() * flat.element_size(), buckets + 1
        pending.clear()

    size = 0
    for _, t in named:
        if pending and (t.dtype != pending[0].dtype or t.device != pending[0].device or size >= bucket_bytes):
            flush()
            size = 0
        pending.append(t.detach())
        size += t.numel() * t.element_size()
    if pending:
        flush()
    seconds = time.perf_counter() - t0
    log.info("weight sync: %d tensors, %.1f MiB in %d bucket(s), %.3f s", len(named), sent / 2**20, buckets, seconds)
    return {"sync/bytes": sent, "sync/seconds": seconds, "sync/buckets": buckets}
