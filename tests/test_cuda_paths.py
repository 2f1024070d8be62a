"""What the first CUDA run would meet, checked on CPU with the dtypes, devices and processes CUDA gives
(issue 25): packed attention with fp32 q/k and a bf16 v, the --dry-run plan, each rank's device for
its generation worker and engine, the static decode's buffers across steps, the async worker's OOM
back-off."""
from __future__ import annotations

import math

import pytest
import torch

from fastdash import attention
from fastdash.attention import use_packed_attention, varlen_attention
from fastdash.forward import compute_autocast, forward_hidden
from fastdash.packing import collate_packed
from tests.numerics import EPS32
from tests.test_packing import SHAPES, make_samples, tiny_qwen2

EPS_BF16 = torch.finfo(torch.bfloat16).eps  # 2^-7: one bf16 ulp at 1


# ---------------------------------------------------------------- 1. packed attention, mixed dtypes --
def _qkv(lengths, hq=4, hkv=2, d=8, seed=0):
    """fp32 q / k (RoPE over the fp32 residual stream), bf16 v (a Linear under autocast), packed."""
    g = torch.Generator().manual_seed(seed)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, d, generator=g) for h in (hq, hkv, hkv))
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return q, k, v.bfloat16(), cu


def _reference(q, k, v, cu, scale):
    """Causal attention per sequence in float64 (GQA: KV heads repeated)."""
    q, k, v = (x.double() for x in (q, k, v))
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = torch.empty_like(q)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        s = s.masked_fill(torch.ones(b - a, b - a, dtype=torch.bool).triu(1), -math.inf)
        out[a:b] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[a:b])
    return out


def test_packed_attention_with_fp32_qk_and_bf16_v():
    """Outside autocast the mixed inputs run in torch's promotion (fp32); under bf16 autocast in bf16,
    and the result is bf16 (CUDA's autocast does not promote index_copy, so an fp32 buffer fails
    there; CPU's does, hence the dtype asserts). Each against float64 attention of the same inputs:
    fp32 within 4 x L fp32 ulps of max |v| (the output is a convex combination of v's rows, its sums
    have L terms); bf16 against the float64 attention of the bf16-rounded inputs, within 4 bf16 ulps
    of max |v| (the probabilities and the output rounded to bf16, half an ulp each, and slack)."""
    lengths = [5, 1, 9, 5, 3]
    q, k, v, cu = _qkv(lengths)
    scale = q.shape[-1] ** -0.5
    vmax = float(v.abs().max())
    out = varlen_attention(q, k, v, cu, max(lengths), scale=scale)
    assert out.dtype == torch.float32 and out.shape == q.shape
    err = float((out.double() - _reference(q, k, v, cu, scale)).abs().max())
    assert err <= 4 * max(lengths) * EPS32 * vmax, err

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert attention.compute_dtype(q, k, v) == torch.bfloat16
        out = varlen_attention(q, k, v, cu, max(lengths), scale=scale)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    err = float((out.double() - _reference(q.bfloat16(), k.bfloat16(), v, cu, scale)).abs().max())
    assert err <= 4 * EPS_BF16 * vmax, err


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device"))])
def test_packed_model_forward_under_bf16_autocast(monkeypatch, device):
    """fp32 master weights under bf16 autocast, through the model: every layer's attention gets fp32
    q / k and a bf16 v, and returns its result in bf16 (the compute dtype). On CUDA (GPU check) this
    reaches the varlen kernel, where the old fp32 buffer's index_copy raised."""
    model = tiny_qwen2().to(device)
    use_packed_attention(model, backend="sdpa_varlen")
    seen = []
    real = attention.varlen_attention

    def spy(q, k, v, cu, max_seqlen, **kw):
        out = real(q, k, v, cu, max_seqlen, **kw)
        seen.append((q.dtype, k.dtype, v.dtype, out.dtype))
        return out

    monkeypatch.setattr(attention, "varlen_attention", spy)
    mb = collate_packed(make_samples(SHAPES)).to(device)
    with compute_autocast(device, torch.bfloat16):
        hidden = forward_hidden(model, mb)
    layers = model.config.num_hidden_layers
    assert seen == [(torch.float32, torch.float32, torch.bfloat16, torch.bfloat16)] * layers
    assert torch.isfinite(hidden).all()


# ---------------------------------------------------------------- 2. --dry-run plans a real run ------
def test_dry_run_plan_is_the_real_runs_plan(monkeypatch):
    """With the device / dtype choice CUDA makes (auto -> bf16), --dry-run's fixed part is the real
    run's: fp32 master weights and grads, fp32 AdamW state, the HF engine's bf16 copy."""
    from fastdash import runtime, scheduler
    from fastdash.train import dry_run_plan
    from tests.conftest import tiny_config

    # activations: a linear stand-in for the probes (seconds of bf16 on CPU), the fixed part is measured
    monkeypatch.setattr(scheduler, "measure_activations", lambda *a: lambda tokens: 10_000 * tokens)
    cfg = tiny_config(engine="hf", memory_budget=2_000_000_000, dtype="bfloat16")  # CUDA's auto, on CPU
    model, dry, _ = dry_run_plan(cfg)
    real = runtime.build_run(cfg).plan
    n = sum(p.numel() for p in model.parameters())
    assert (dry.master_dtype, dry.compute_dtype) == (real.master_dtype, real.compute_dtype) == ("float32", "bfloat16")
    for key in ("weights_bytes", "grads_bytes", "optimizer_bytes", "reference_bytes", "generation_weights_bytes",
                "fixed_bytes"):
        assert getattr(dry, key) == getattr(real, key), key
    assert dry.grads_bytes == 4 * n and 2 * n <= dry.generation_weights_bytes < 3 * n  # bf16 copy (+ fp32 buffers)


# ---------------------------------------------------------------- 4. each rank's device -------------
@pytest.fixture
def four_gpus(monkeypatch):
    """A CUDA machine with 4 GPUs as torch reports it (nothing here touches a real device)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


class _FakeSpawn:
    """multiprocessing's spawn context, recording the worker it would start."""

    def __init__(self):
        import queue

        self.Queue, self.started = queue.Queue, []

    def Process(self, target, args, name, daemon):
        ctx = self

        class P:
            pid, exitcode = 12345, None

            def start(self):
                ctx.started.append(args[0])  # the worker's spec

            def is_alive(self):
                return False

        return P()


def test_async_worker_gets_its_ranks_gpu(four_gpus):
    """Rank 2 of a node: the run's device is cuda:2, and so is its generation worker's (a spawned
    process that would start on GPU 0 given plain "cuda")."""
    from types import SimpleNamespace

    from fastdash.rollout import pipeline
    from fastdash.layout import resolve_layout
    from tests.conftest import tiny_config

    four_gpus.setenv("LOCAL_RANK", "2")
    cfg = tiny_config(engine="hf")
    layout = resolve_layout(cfg)
    device, dtype = layout.torch_device, layout.compute_dtype
    assert (device, dtype) == (torch.device("cuda", 2), torch.bfloat16)
    spawn = _FakeSpawn()
    four_gpus.setattr(pipeline.mp, "get_context", lambda method: spawn)
    run = SimpleNamespace(model=tiny_qwen2(), compute_dtype=dtype, device=device, plan=None)
    pipeline.GenerationPipeline.for_run(cfg, run)
    assert [spec["device"] for spec in spawn.started] == ["cuda:2"]
    four_gpus.setenv("LOCAL_RANK", "4")
    with pytest.raises(ValueError, match="LOCAL_RANK=4 but this process sees 4 CUDA device"):
        resolve_layout(cfg)


def test_split_vllm_engine_core_gets_its_ranks_gpu(four_gpus):
    """Split placement: generation rank 3's vLLM engine core (a process of its own) is pinned to GPU 3,
    as the node's CUDA_VISIBLE_DEVICES names it; the engine receives that pin."""
    from fastdash.rollout import make_engine, vllm, vllm_dp
    from fastdash.rollout.split import engine_devices
    from fastdash.distributed import local_device
    from tests.conftest import tiny_config

    four_gpus.setenv("LOCAL_RANK", "3")
    cfg = tiny_config(engine="vllm")
    device = local_device()
    assert engine_devices(device) == "3"
    four_gpus.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")
    assert engine_devices(device) == "7"
    assert engine_devices(torch.device("cpu")) is None

    made = []

    class Recorder:
        def __init__(self, cfg, model, tokenizer, plan=None, **kwargs):
            made.append(kwargs)

    four_gpus.setattr(vllm, "vllm_available", lambda: None)
    four_gpus.setattr(vllm_dp, "VLLMEngine", Recorder)
    make_engine(cfg, tiny_qwen2(), None, devices=engine_devices(device), compute_dtype=torch.bfloat16)
    assert made == [{"devices": "7", "compute_dtype": torch.bfloat16}]  # the Layout's dtype, not re-resolved
    with pytest.raises(ValueError, match="vllm_tensor_parallel_size=2 with generation_gpus"):
        make_engine(tiny_config(engine="vllm", vllm_tensor_parallel_size=2), tiny_qwen2(), None, devices="7")


# ---------------------------------------------------------------- 5. static decode across steps -----
def _ptrs(ws) -> list[int]:
    return [t.data_ptr() for t in (*ws.keys, *ws.values, *ws.lengths, ws.mask, ws.ids, ws.pos)]


def test_static_decode_buffers_and_graphs_survive_a_training_step(tok, rand_model):
    """What a training step does to the engine (wake, generate, sleep, backprop, sync, wake, generate)
    keeps the KV buffers at their addresses (a CUDA graph replays only at the addresses it recorded),
    the per-bucket caches and the compiled graphs; with no plan (nothing limits them) and with a plan
    that leaves backprop room for them. A plan without that room, or an OOM back-off, frees them."""
    from types import SimpleNamespace

    from fastdash.config import Config
    from fastdash.oom import run_with_oom_backoff
    from fastdash.rollout import make_engine
    from fastdash.rollout.base import SamplingParams

    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    prompts = [tok.encode(t) for t in ("1+1=", "22+2=")]  # rows of one length: one bucket, one compile
    params = SamplingParams(max_tokens=3, temperature=1.0, seed=5, forced_lengths=(3, 3, 3, 3))
    cfg = Config(engine="hf", hf_decode="static")

    def step(engine):
        engine.wake()
        out = engine.generate(prompts, 2, params)
        engine.sleep()
        engine.sync_weights(rand_model)
        return out

    for plan in (None, SimpleNamespace(generation_concurrency=None, backprop_headroom_bytes=2**30)):
        engine = make_engine(cfg, rand_model, tok, plan)
        engine.compile_backend = counting_backend
        first = step(engine)
        ws = engine.workspace
        ptrs, caches, compiled = _ptrs(ws), dict(ws._caches), len(graphs)
        assert ws.rows and ws.nbytes > 0 and compiled > 0
        assert step(engine) == first
        assert ws.rows and _ptrs(ws) == ptrs
        assert ws._caches.keys() == caches.keys() and all(ws._caches[b] is c for b, c in caches.items())
        assert len(graphs) == compiled  # nothing recompiled

    tight = make_engine(cfg, rand_model, tok, SimpleNamespace(generation_concurrency=None, backprop_headroom_bytes=16))
    tight.compile_backend = counting_backend
    step(tight)
    assert tight.workspace.rows == 0 and tight.workspace.nbytes == 0  # backprop needs the room
    engine.generate(prompts, 2, params)
    assert engine.workspace.rows

    def oom_once(budget):
        if budget == 8:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return engine.workspace.rows

    assert run_with_oom_backoff(oom_once, 8) == 0  # the retry ran with the buffers freed


# ---------------------------------------------------------------- 6. the async worker's OOM back-off --
def test_async_worker_backs_off_on_oom_and_keeps_the_samples(monkeypatch, tok, rand_model):
    """The worker's engine runs out of memory at more than 2 rows: it halves its concurrency (8, 4, 2)
    and retries the call, with the samples of an engine that never ran out; the trainer's request
    carries the 2 back-offs, and the worker keeps 2 for later calls. (The worker's loop runs in this
    process on the queues a spawned worker would read.)"""
    from fastdash.config import Config
    from fastdash.rollout import pipeline
    from fastdash.rollout.base import SamplingParams
    from fastdash.rollout.hf import HFEngine

    engine = HFEngine(rand_model, tok, max_batch_size=None)
    seen, real = [], engine._decode

    def flaky(rows, params, seed):
        seen.append(min(engine.max_batch_size or len(rows), len(rows)))
        if seen[-1] > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(rows, params, seed)

    engine._decode = flaky
    spawn = _FakeSpawn()
    monkeypatch.setattr(pipeline.mp, "get_context", lambda method: spawn)
    monkeypatch.setattr(pipeline, "_build", lambda spec: (engine, rand_model))
    pipe = pipeline.GenerationPipeline(Config(max_staleness=0), rand_model, compute_dtype=torch.float32,
                                       device=torch.device("cpu"), concurrency=None)
    prompts = [tok.encode(t) for t in ("1+1=", "24*3=")]
    params = SamplingParams(max_tokens=4, temperature=1.0, seed=11)
    pipe.submit(0, 0, ["p"] * 2, [(prompts, 4, params)])
    pipe.requests.put(("stop",))
    pipeline._worker_main(spawn.started[0], pipe.slots, pipe.requests, pipe.results)
    request, out, _ = pipe.take()
    ref = HFEngine(rand_model, tok, max_batch_size=None).generate(prompts, 4, params)
    assert seen[:3] == [8, 4, 2] and engine.max_batch_size == 2 and request.oom_retries == 2
    assert [c.completion_ids for c in out] == [c.completion_ids for c in ref] and len(out) == 8
