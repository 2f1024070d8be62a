"""Pipelined generation, one step off policy (`async_generation: true`; beyond DASH).

A generation worker (its own process, its own torch threads, its own copy of the policy and an HF
engine) generates rollout n + S while the trainer trains on rollout n. S is `max_staleness`.

The schedule is fixed, never "whatever is ready", so a run is deterministic and resumable:
  before optimizer step n the trainer has submitted rollouts 0 .. n + S;
  rollout r is submitted before step max(0, r - S), with the weights of that moment: its
  policy version (the optimizer steps those weights had taken) is max(0, r - S);
  rollout r is trained at step r, so its staleness is min(r, S), never more.
With S = 0 each rollout is submitted and awaited before its own step: the synchronous trainer, with
the generation moved to another process (bit for bit the same samples when both use one thread).

Weights travel through S + 1 shared-memory slots (CPU tensors allocated once); version v is written
into slot v % (S + 1) at submit time. The worker copies a slot into its model when a request starts,
before it generates; at most S + 1 requests are unanswered and they hold versions spanning at most S,
so the slot being written is never one a pending request still needs. The worker leaves when its
parent dies (it polls), so a kill -9 of the trainer leaves no orphan generating forever.

With several (DDP) ranks each rank has a worker of its own, generating that rank's share of every
rollout (`Trainer.rank_problems`). Out of scope (refused at start, naming the key): Multi / Mini (a
rollout feeds one step here), FSDP and split placement, and vLLM in the worker. On CUDA the slots
are host memory (a copy per push; CUDA IPC would avoid it).
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import os
import queue
import time
import traceback
from collections import deque
from dataclasses import dataclass

import torch

log = logging.getLogger("fastdash")
POLL_S = 0.5  # how often a waiting side checks that the other is still alive


@dataclass
class Request:
    """One submitted rollout: what the trainer needs back to turn completions into samples."""

    index: int  # rollout number
    version: int  # optimizer steps of the weights that generate it
    problems: list  # the rollout's problems, in order
    submitted_at: float
    oom_retries: int = 0  # the worker's OOM back-offs while generating it (set by `take`)


class GenerationPipeline:
    """The trainer's side: submit rollouts ahead, take them back in order."""

    def __init__(self, cfg, model, *, compute_dtype: torch.dtype, device: torch.device, concurrency: int | None):
        self.cfg, self.staleness = cfg, cfg.max_staleness
        self.model = model
        self.names = [n for n, _ in model.named_parameters()]
        self.slots = [{n: p.detach().to("cpu", copy=True).share_memory_() for n, p in model.named_parameters()}
                      for _ in range(self.staleness + 1)]
        self.slot_version = [None] * len(self.slots)
        self.pending: deque[Request] = deque()
        ctx = mp.get_context("spawn")  # never fork a process that holds torch threads (and maybe CUDA)
        self.requests, self.results = ctx.Queue(), ctx.Queue()
        spec = dict(model=cfg.model, attn_implementation=cfg.attn_implementation, seed=cfg.seed,
                    threads=cfg.async_engine_threads, compute_dtype=compute_dtype, device=str(device),
                    concurrency=concurrency, hf_decode=cfg.hf_decode, share_prompts=cfg.share_prompts,
                    parent=os.getpid())
        self.worker = ctx.Process(target=_worker_main, args=(spec, self.slots, self.requests, self.results),
                                  name="fastdash-generation", daemon=True)
        self.worker.start()
        self.push_bytes = sum(t.numel() * t.element_size() for t in self.slots[0].values())
        log.info("async generation: worker pid %d, max_staleness %d, %d weight slots of %.1f MiB",
                 self.worker.pid, self.staleness, len(self.slots), self.push_bytes / 2**20)

    @classmethod
    def for_run(cls, cfg, run) -> "GenerationPipeline":
        """The worker for a `fastdash.runtime.Run`: its model, compute dtype, device and planned concurrency."""
        plan = run.plan
        return cls(cfg, run.model, compute_dtype=run.compute_dtype, device=run.device,
                   concurrency=plan.generation_concurrency if plan else None)

    # ------------------------------------------------------------------ trainer side -------------
    def submit(self, index: int, version: int, problems: list, calls: list) -> float:
        """Queue rollout `index` (its engine calls: (prompt_ids, n, SamplingParams)) with the current
        weights as `version`. Returns the seconds spent pushing weights (0 when the slot holds them)."""
        slot = version % len(self.slots)
        t0 = time.perf_counter()
        if self.slot_version[slot] != version:
            with torch.no_grad():
                for name, p in self.model.named_parameters():
                    self.slots[slot][name].copy_(p.detach())
            self.slot_version[slot] = version
        pushed = time.perf_counter() - t0
        self.requests.put(("generate", index, version, slot, calls))
        self.pending.append(Request(index, version, problems, time.perf_counter()))
        return pushed

    def take(self, timeout_s: float | None = None):
        """The oldest submitted rollout: (request, completions, worker seconds). Raises when the worker
        failed or died, naming the cause."""
        if not self.pending:
            raise RuntimeError("async generation: take() with no rollout submitted")
        want = self.pending.popleft()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                kind, index, payload, seconds, want.oom_retries = self.results.get(timeout=POLL_S)
                break
            except queue.Empty:
                if not self.worker.is_alive():
                    raise RuntimeError(f"async generation: the worker (pid {self.worker.pid}) died with exit "
                                       f"code {self.worker.exitcode} while generating rollout {want.index}")
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"async generation: rollout {want.index} not back after {timeout_s} s")
        if kind == "error":
            what = "could not start" if index < 0 else f"failed on rollout {index}"
            raise RuntimeError(f"async generation: the worker {what}:\n{payload}")
        if index != want.index:  # one queue, answered in order: anything else is a bug
            raise RuntimeError(f"async generation: expected rollout {want.index}, got {index}")
        return want, payload, seconds

    def close(self) -> None:
        if self.worker.is_alive():
            self.requests.put(("stop",))
            self.worker.join(timeout=10)
        if self.worker.is_alive():
            self.worker.kill()
            self.worker.join(timeout=5)


# ---------------------------------------------------------------------- worker side --------------
def _parent_alive(pid: int) -> bool:
    return os.getppid() == pid


def _worker_main(spec: dict, slots: list, requests, results) -> None:
    """Build the policy and an HF engine, then answer requests in order until told to stop."""
    try:
        engine, model = _build(spec)
    except Exception:  # noqa: BLE001 - the trainer reports it
        results.put(("error", -1, traceback.format_exc(), 0.0, 0))
        return
    loaded = None  # (slot, version) the model holds
    while True:
        try:
            msg = requests.get(timeout=POLL_S)
        except queue.Empty:
            if not _parent_alive(spec["parent"]):
                return  # the trainer is gone (killed): stop, do not generate for nobody
            continue
        if msg[0] == "stop":
            return
        _, index, version, slot, calls = msg
        t0, retries = time.perf_counter(), []
        try:
            if loaded != (slot, version):
                _load(model, slots[slot])
                engine.sync_weights(model)
                loaded = (slot, version)
            out = [c for prompts, n, params in calls for c in _generate(engine, prompts, n, params, retries)]
        except Exception:  # noqa: BLE001
            results.put(("error", index, traceback.format_exc(), 0.0, len(retries)))
            continue
        for c in out:
            c.policy_version = version
        results.put(("ok", index, out, time.perf_counter() - t0, len(retries)))


def _generate(engine, prompts, n: int, params, retries: list) -> list:
    """One engine call with the trainer's OOM back-off (`fastdash.oom`): on OOM the worker's engine
    halves its concurrency and retries the call (same seed: the same samples); later calls keep the
    smaller concurrency. Each back-off is appended to `retries`."""
    from fastdash.oom import run_with_oom_backoff

    rows = len(prompts) * n

    def call(concurrency: int):
        engine.max_batch_size = concurrency
        return engine.generate(prompts, n, params)

    return run_with_oom_backoff(call, min(engine.max_batch_size or rows, rows), what="async worker generation batch",
                                on_backoff=lambda old, new: retries.append((old, new)))


def _build(spec: dict):
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rollout.hf import HFEngine

    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])  # the rank's own (cuda:<LOCAL_RANK>): a new process starts on GPU 0
    if device.type == "cuda":
        torch.cuda.set_device(device)
    model, tok = load_model_and_tokenizer(spec["model"], dtype=torch.float32,
                                          attn_implementation=spec["attn_implementation"], seed=spec["seed"])
    model = model.to(device).eval().requires_grad_(False)
    engine = HFEngine(model, tok, max_batch_size=spec["concurrency"], dtype=spec["compute_dtype"],
                      decode_mode=spec["hf_decode"], share_prompts=spec.get("share_prompts", "auto"))
    return engine, model


@torch.no_grad()
def _load(model, slot: dict) -> None:
    params = dict(model.named_parameters())
    if params.keys() != slot.keys():
        raise ValueError(f"async generation: the worker's model does not match the trainer's "
                         f"({sorted(set(params) ^ set(slot))[:5]})")
    for name, p in params.items():
        p.copy_(slot[name])
