"""The memory scheduler: planning arithmetic against a fake probe, the real CPU probe against
RSS, and the OOM back-off keeping a step's gradient exact."""
import copy
import json
import math

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from fastdash.memory import CpuMemoryProbe, ensure_grads, fit_activation, kv_bytes_per_token, probe_forward_backward
from fastdash.forward import compute_autocast
from fastdash.memory_plan import MemoryPlanError
from fastdash.oom import is_oom_error, run_with_oom_backoff
from fastdash.scheduler import plan_memory
from tests.numerics import assert_fp32_close

MiB = 1024**2


def tiny_config(layers=2, hidden=64, heads=4, kv_heads=2, vocab=512):
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                       max_position_embeddings=2048, tie_word_embeddings=False)


def tiny_model(**kw):
    torch.manual_seed(0)
    return Qwen2ForCausalLM(tiny_config(**kw))


def param_count(cfg):
    """Qwen2 parameters from the config alone (an independent count, not model.parameters())."""
    H, I, V, hd = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_key_value_heads * hd
    attn = H * H + H + 2 * (H * kv + kv) + H * H  # q (bias), k, v (bias), o (no bias)
    layer = attn + 3 * H * I + 2 * H  # gate, up, down; two RMSNorms
    return V * H + cfg.num_hidden_layers * layer + H + V * H  # embed, layers, final norm, lm_head


class FakeProbe:
    device = torch.device("cpu")

    def __init__(self, free, total=None):
        self.free, self.total = free, total or 2 * free

    def total_bytes(self):
        return self.total

    def free_bytes(self):
        return self.free

    def measure(self, fn):
        raise AssertionError("tests pass activation_fn; the fake probe does not measure")

    def empty_cache(self):
        pass


class FakeActivations:
    """peak(T) = c + a*T + b*T*L (+ q*T^2), recording the token counts it was asked for."""

    def __init__(self, a, c, L, b=0.0, q=0.0):
        self.a, self.c, self.b, self.q, self.L, self.calls = a, c, b, q, L, []

    def __call__(self, T):
        self.calls.append(T)
        return int(self.c + self.a * T + self.b * T * self.L + self.q * T * T)


BASE = dict(max_prompt_length=32, max_completion_length=96, samples_per_step=32)
L = 128


def fake_plan(model, free=64 * MiB, act=None, **kw):
    act = act or FakeActivations(a=20_000, c=MiB, L=L)
    args = {**BASE, **kw}
    return plan_memory(model, probe=FakeProbe(free), activation_fn=act, **args), act


def room(model, free, safety=0.9, beta=0.0, grads_resident=False):
    """Bytes left for activations, by hand: fp32 weights + grads + AdamW (2 fp32 states).
    The free measurement excludes the weights, and the grads when the real probe path allocated them."""
    n, w = param_count(model.config), weight_bytes(model)
    usable = int(safety * (free + w + (4 * n if grads_resident else 0)))
    return usable - w - 12 * n - (w if beta > 0 else 0)


def weight_bytes(model):
    """fp32 parameters plus the (tiny) rotary buffers."""
    return 4 * param_count(model.config) + sum(b.numel() * b.element_size() for b in model.buffers())


def test_plan_fills_the_budget_exactly():
    model = tiny_model()
    plan, act = fake_plan(model, free=64 * MiB)
    n = param_count(model.config)
    assert plan.weights_bytes == weight_bytes(model) and plan.grads_bytes == 4 * n and plan.optimizer_bytes == 8 * n
    r = room(model, 64 * MiB)
    T = plan.max_tokens_per_microbatch
    assert T == (r - MiB) // 20_000 // L * L  # whole worst-case samples
    assert act(T) <= r < act(T + L)  # the largest budget that fits, and it does fit
    assert 0 <= plan.backprop_headroom_bytes < 20_000 * L
    assert plan.microbatches_per_step == math.ceil(32 / (T // L))
    assert min(act.calls) == L  # probes start at one worst-case sample


def test_plan_scales_with_model_size_and_reference_model():
    small, big = tiny_model(layers=2), tiny_model(layers=6)
    p_small, _ = fake_plan(small)
    p_big, _ = fake_plan(big)
    extra = param_count(big.config) - param_count(small.config)
    assert p_big.fixed_bytes - p_small.fixed_bytes == 16 * extra
    assert p_big.max_tokens_per_microbatch == (room(big, 64 * MiB) - MiB) // 20_000 // L * L
    assert p_big.max_tokens_per_microbatch < p_small.max_tokens_per_microbatch
    p_ref, _ = fake_plan(small, beta=0.04)
    assert p_ref.reference_bytes == weight_bytes(small)
    assert p_ref.max_tokens_per_microbatch == (room(small, 64 * MiB, beta=0.04) - MiB) // 20_000 // L * L


@pytest.mark.parametrize("completion", [96, 224, 480])
def test_plan_scales_with_sequence_length(completion):
    model = tiny_model()
    Ls = 32 + completion
    act = FakeActivations(a=8_000, c=MiB, L=Ls, b=40.0)  # attention term grows with sample length
    plan, _ = fake_plan(model, act=act, max_completion_length=completion)
    r = room(model, 64 * MiB)
    assert plan.sample_len == Ls
    assert plan.max_tokens_per_microbatch == min(int((r - MiB) // (8_000 + 40.0 * Ls)), 32 * Ls) // Ls * Ls
    kv = 2 * 2 * 2 * 16 * 4  # K,V x layers x kv_heads x head_dim x fp32
    assert plan.kv_bytes_per_token == kv == kv_bytes_per_token(model.config, 4)
    assert plan.generation_concurrency == min(32, r // (kv * Ls + 4 * 4 * 512))


def test_generation_batch_limited_by_memory_and_capped_by_step():
    model = tiny_model()
    plan, _ = fake_plan(model, free=64 * MiB)
    assert plan.generation_concurrency == 32  # plenty of room: all prompts x G at once
    r = room(model, 12 * MiB)
    per_seq = 512 * 128 + 16 * 512
    plan, _ = fake_plan(model, free=12 * MiB, act=FakeActivations(a=1000, c=0, L=L), samples_per_step=4 * 4096)
    assert plan.generation_concurrency == r // per_seq < 4096 * 4
    small_rollout, _ = fake_plan(model, samples_per_generation=8)
    assert small_rollout.generation_concurrency == 8 and small_rollout.samples_per_step == 32
    pinned, _ = fake_plan(model, free=12 * MiB, act=FakeActivations(a=1000, c=0, L=L), generation_concurrency=500)
    assert pinned.generation_concurrency == 500 and any("generation_concurrency=500" in w for w in pinned.warnings)


def test_mixed_precision_fixed_part():
    """fp32 master weights, bf16 compute: weights 4 + grads 4 + AdamW 8 bytes per parameter, plus a
    bf16 reference model (beta > 0) and the HF engine's bf16 generation copy, 2 bytes each; the KV
    cache is bf16. vLLM keeps its bf16 copy inside its own share instead. All counted by hand."""
    model = tiny_model()
    n, w = param_count(model.config), weight_bytes(model)
    bf16_copy = 2 * n + 2 * sum(b.numel() for b in model.buffers())  # rotary buffers are cast too
    plan, _ = fake_plan(model, beta=0.04, compute_dtype=torch.bfloat16)
    assert (plan.master_dtype, plan.compute_dtype) == ("float32", "bfloat16")
    assert (plan.weights_bytes, plan.grads_bytes, plan.optimizer_bytes) == (w, 4 * n, 8 * n)
    assert plan.reference_bytes == plan.generation_weights_bytes == bf16_copy
    assert plan.fixed_bytes == w + 12 * n + 2 * bf16_copy
    assert plan.kv_bytes_per_token == kv_bytes_per_token(model.config, 2)
    usable = int(0.9 * (64 * MiB + w))
    assert plan.max_tokens_per_microbatch == (usable - plan.fixed_bytes - MiB) // 20_000 // L * L
    table = plan.to_table()
    assert "compute dtype" in table and "engine weights (bfloat16)" in table and "reference model (bfloat16)" in table
    fp32, _ = fake_plan(model, beta=0.04, compute_dtype=torch.float32)  # no separate engine copy
    assert fp32.generation_weights_bytes == 0 and fp32.reference_bytes == w and fp32.fixed_bytes == 2 * w + 12 * n
    free, total, overhead = 64 * MiB, 128 * MiB, 4 * MiB
    vllm = plan_memory(model, probe=FakeProbe(free, total), activation_fn=FakeActivations(20_000, MiB, L),
                       engine="vllm", vllm_overhead_bytes=overhead, compute_dtype=torch.bfloat16,
                       **{**BASE, "samples_per_step": 4 * 4096})
    assert vllm.generation_weights_bytes == 0 and vllm.fixed_bytes == w + 12 * n
    r = int(0.9 * (free + w)) - vllm.fixed_bytes
    assert vllm.generation_concurrency == (r - bf16_copy - overhead) // (kv_bytes_per_token(model.config, 2) * L)


def test_probe_runs_under_the_trainers_autocast():
    """The plan's default probe step runs the body under `compute_autocast` (bf16 matmuls over fp32
    weights), as the trainer's forward does; fp32 runs without autocast."""
    model = tiny_model()
    seen = []
    hook = model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda mod, args, out: seen.append((torch.is_autocast_enabled("cpu"), out.dtype, args[0].shape[1])))

    class RunningProbe(FakeProbe):
        def measure(self, fn):
            fn()
            return MiB + 20_000 * seen[-1][2]  # the fake peak of the size just run

    for dtype, autocast in ((torch.bfloat16, True), (torch.float32, False)):
        seen.clear()
        plan = plan_memory(model, probe=RunningProbe(64 * MiB), compute_dtype=dtype, probe_samples=(1, 2),
                           probe_repeats=1, verify_rounds=0, throughput_aware=False,
                           max_prompt_length=8, max_completion_length=24, samples_per_step=4)
        assert seen and all(s[:2] == (autocast, dtype) for s in seen)
        assert plan.compute_dtype == str(dtype).removeprefix("torch.")
        assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights untouched
    hook.remove()
    with compute_autocast("cpu", torch.float32):
        assert not torch.is_autocast_enabled("cpu")
    with compute_autocast(torch.device("cpu"), torch.bfloat16):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def test_curved_activations_are_caught_by_the_verification_probe():
    model = tiny_model()
    # Linear over the probed 1..4 samples, then steeper: what the small probes cannot see.
    def act(T):
        return int(MiB + 20_000 * T + (60_000 * (T - 4 * L) if T > 4 * L else 0))

    plan, _ = fake_plan(model, act=act)
    r = room(model, 64 * MiB)
    best = (r - MiB + 60_000 * 4 * L) // 80_000 // L * L  # the true largest fitting budget
    assert plan.max_tokens_per_microbatch == best
    assert len(plan.probe_points) >= 4  # it measured at the chosen budget


class TimedFakeProbe(FakeProbe):
    """Runs the probe step; its clock advances by a + g * T^2 seconds per step of T tokens."""

    def __init__(self, free, act, a, g):
        super().__init__(free)
        self.act, self.a, self.g, self.now, self.last = act, a, g, 0.0, None

    def clock(self):
        return self.now

    def step(self, T):
        self.last, self.now = T, self.now + self.a + self.g * T * T

    def measure(self, fn):
        fn()
        return self.act(self.last)


@pytest.mark.parametrize("a, g, expected", [(1.0, 0.0, None), (1.0, 1e-6, 8 * L), (1.0, 1e-5, 4 * L)])
def test_budget_stops_where_tokens_per_second_peaks(a, g, expected):
    """tokens/s = T / (a + g T^2) peaks at sqrt(a / g): 1000 and 316 tokens; the plan takes the
    largest probed size within 15% of the best probed rate (probes at 1, 2, 4, 8 samples of L = 128,
    and at the memory limit of 22 samples): g = 1e-6 -> 1024 (512 and 2048 are > 15% slower),
    g = 1e-5 -> 512 (141 vs the best 155 tokens/unit at 256). With g = 0 memory is the only limit."""
    model = tiny_model()
    act = FakeActivations(a=20_000, c=MiB, L=L)
    probe = TimedFakeProbe(64 * MiB, act, a, g)
    plan = plan_memory(model, probe=probe, probe_step=probe.step, **BASE)
    memory_max = (room(model, 64 * MiB, grads_resident=True) - MiB) // 20_000 // L * L
    assert plan.memory_max_tokens == memory_max
    assert plan.fastest_tokens == expected
    assert plan.max_tokens_per_microbatch == min(memory_max, expected or memory_max)
    assert all(p.grad is None for p in model.parameters())


def test_quadratic_fit_is_exact():
    fit = fit_activation([(t, 1000 + 30 * t + 0.5 * t * t) for t in (128, 256, 512)])
    assert fit.c == pytest.approx(1000, rel=1e-6) and fit.s == pytest.approx(30) and fit.q == pytest.approx(0.5)
    # a room half a token from either boundary: rounding in the fit's coefficients (LAPACK, per CPU)
    # cannot move it across, as it could int(699.9999...) for a room of exactly fit(700)
    assert fit.max_tokens((fit(700) + fit(701)) / 2) == 700
    lin = fit_activation([(t, 1000 + 30 * t) for t in (128, 256, 512)])
    assert lin.q == 0 and lin.s == pytest.approx(30)


def test_pinned_values_are_kept_and_checked():
    model = tiny_model()
    auto, _ = fake_plan(model)
    small, _ = fake_plan(model, max_tokens_per_microbatch=256, generation_concurrency=3)
    assert small.max_tokens_per_microbatch == 256 and small.generation_concurrency == 3
    assert small.warnings == [] and set(small.pinned) == {"max_tokens_per_microbatch", "generation_concurrency"}
    big, _ = fake_plan(model, max_tokens_per_microbatch=10 * auto.max_tokens_per_microbatch)
    assert big.max_tokens_per_microbatch == 10 * auto.max_tokens_per_microbatch
    assert any("max_tokens_per_microbatch" in w and "OOM" in w for w in big.warnings)
    assert big.backprop_headroom_bytes < 0
    short, _ = fake_plan(model, max_tokens_per_microbatch=100)
    assert any("below the longest sample" in w for w in short.warnings)
    with pytest.raises(ValueError, match="max_tokens_per_microbatch"):
        fake_plan(model, max_tokens_per_microbatch=0)
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        fake_plan(model, engine="vllm", gpu_memory_utilization=1.5)


def test_a_pinned_budget_skips_the_sweep_and_the_verification():
    model = tiny_model()
    auto, act_auto = fake_plan(model)
    pinned, act = fake_plan(model, max_tokens_per_microbatch=4 * auto.max_tokens_per_microbatch)
    assert max(act.calls) <= 2 * L < max(act_auto.calls)  # only the 1- and 2-sample probes ran
    assert pinned.max_tokens_per_microbatch == 4 * auto.max_tokens_per_microbatch
    assert any("OOM" in w for w in pinned.warnings)  # still checked, against the small probes' fit


def test_too_little_memory_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(MemoryPlanError, match="one worst-case sample of 128 tokens"):
        fake_plan(model, free=4 * MiB, act=FakeActivations(a=50_000, c=0, L=L))
    with pytest.raises(MemoryPlanError, match="fixed part alone"):
        fake_plan(model, free=MiB)


def test_vllm_colocated_plan():
    model = tiny_model()
    free, total, overhead = 64 * MiB, 128 * MiB, 4 * MiB
    args = dict(engine="vllm", vllm_overhead_bytes=overhead, samples_per_step=4 * 4096)
    plan = plan_memory(model, probe=FakeProbe(free, total), activation_fn=FakeActivations(20_000, MiB, L),
                       **{**BASE, **args})
    r, w = room(model, free), weight_bytes(model)
    kv_seq = 512 * L
    assert plan.generation_concurrency == (r - w - overhead) // kv_seq
    assert plan.gpu_memory_utilization == math.floor(100 * (w + overhead + plan.generation_concurrency * kv_seq)
                                                     / total) / 100
    # Sleeping vLLM frees everything for backprop; an awake one keeps its share.
    assert plan.max_tokens_per_microbatch == (r - MiB) // 20_000 // L * L
    awake = plan_memory(model, probe=FakeProbe(free, total), activation_fn=FakeActivations(20_000, MiB, L),
                        vllm_sleep=False, **{**BASE, **args})
    assert awake.max_tokens_per_microbatch == (r - int(awake.gpu_memory_utilization * total) - MiB) // 20_000 // L * L


def test_table_and_json(tmp_path):
    plan, _ = fake_plan(tiny_model())
    table = plan.to_table()
    for key in ("free (measured)", "fixed total", "activation / token", "max_tokens_per_microbatch",
                "micro-batches / step", "headroom", str(plan.max_tokens_per_microbatch)):
        assert key in table
    plan.log_and_save(str(tmp_path))
    saved = json.loads((tmp_path / "memory_plan.json").read_text())
    assert saved["max_tokens_per_microbatch"] == plan.max_tokens_per_microbatch
    assert saved["fixed_bytes"] == plan.fixed_bytes


# ---- the real CPU probe


def test_cpu_probe_measures_a_known_allocation():
    probe = CpuMemoryProbe()
    size = 64 * MiB
    measured = probe.measure(lambda: torch.ones(size // 4, dtype=torch.float32).sum())
    assert abs(measured - size) < 0.1 * size
    assert probe.measure(lambda: None) < 4 * MiB


def test_real_probe_predicts_rss_of_an_unprobed_size():
    """Plan with the real probe, then measure the peak RSS of a step at a size it did not probe:
    prediction within 25% + 8 MiB (page-level RSS, glibc arenas, the T^2 packed-mask term)."""
    model = tiny_model(layers=2, hidden=128, vocab=1024)
    args = dict(max_prompt_length=16, max_completion_length=48, samples_per_step=32)
    probe = CpuMemoryProbe()
    plan = plan_memory(model, probe=probe, probe_samples=(1, 2, 4), verify_rounds=0, **args)
    assert all(p.grad is None for p in model.parameters())  # grads allocated for the probe are dropped
    T = 3 * 64  # between the probes
    ensure_grads(model)
    measured = probe.measure(lambda: probe_forward_backward(model, T, 64, 48))
    predicted = plan.predict_backprop_bytes(T) - plan.fixed_bytes
    assert abs(measured - predicted) <= 0.25 * measured + 8 * MiB, (measured, predicted, plan.probe_points)


def test_real_plan_step_stays_within_memory_budget():
    model = tiny_model(layers=2, hidden=128, vocab=1024)
    probe = CpuMemoryProbe()
    budget = probe.rss_bytes() + 64 * MiB
    args = dict(max_prompt_length=16, max_completion_length=112, samples_per_step=256)
    plan = plan_memory(model, memory_budget=budget, throughput_aware=False, **args)
    assert 128 <= plan.max_tokens_per_microbatch < 64 * 4 * 128  # memory, not the step, is the limit
    ensure_grads(model)
    opt_state = [torch.zeros(2 * p.numel()) for p in model.parameters()]  # AdamW state, as planned
    probe.empty_cache()
    base = probe.rss_bytes()
    probe.reset_peak()
    probe_forward_backward(model, plan.max_tokens_per_microbatch, 128, 112)
    peak = probe.peak_rss_bytes()
    assert peak <= budget, (peak / MiB, budget / MiB, plan.to_table())
    # and the plan is not wasteful: the step uses most of what the budget left for it
    assert peak - base >= 0.5 * (plan.backprop_peak_bytes - plan.fixed_bytes), plan.to_table()
    del opt_state


# ---- OOM back-off


def _linear_step(model, xs, ys, budget, fail_once):
    """Zero grads, run chunks of `budget` rows with a sum loss over a fixed normaliser."""
    model.zero_grad(set_to_none=True)
    norm = float(len(xs))
    for i, start in enumerate(range(0, len(xs), budget)):
        loss = ((model(xs[start:start + budget]) - ys[start:start + budget]) ** 2).sum() / norm
        loss.backward()
        if fail_once and i == 1:  # partial gradients are in .grad when the OOM hits
            fail_once.pop()
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (fake)")
    return [p.grad.clone() for p in model.parameters()]


def test_oom_backoff_reruns_with_the_same_gradient():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    xs, ys = torch.randn(40, 8), torch.randn(40, 1)
    reference = _linear_step(copy.deepcopy(model).double(), xs.double(), ys.double(), 40, [])  # float64
    budgets, backoffs, fail = [], [], [True]

    def run(budget):
        budgets.append(budget)
        return _linear_step(model, xs, ys, budget, fail)

    grads = run_with_oom_backoff(run, 16, on_backoff=lambda old, new: backoffs.append((old, new)))
    assert budgets == [16, 8] and backoffs == [(16, 8)]
    for g, r in zip(grads, reference):  # float32 sums over 40 rows: sqrt(40) ulps of the largest entry
        assert_fp32_close(g, r, n_terms=40, what="gradient after the OOM retry")


def test_oom_backoff_stops_with_the_plan():
    plan, _ = fake_plan(tiny_model())
    budgets = []

    def always_oom(budget):
        budgets.append(budget)
        raise RuntimeError("CUDA error: out of memory")

    with pytest.raises(RuntimeError, match=r"after trying \[64, 32, 16, 8\]") as e:
        run_with_oom_backoff(always_oom, 64, max_retries=3, plan=plan)
    assert budgets == [64, 32, 16, 8] and "memory plan" in str(e.value)
    with pytest.raises(RuntimeError, match=r"trying \[4, 2\]"):
        run_with_oom_backoff(always_oom, 4, max_retries=5, min_budget=2)


def test_non_oom_errors_are_not_retried():
    calls = []

    def broken(budget):
        calls.append(budget)
        raise ValueError("shape mismatch")

    with pytest.raises(ValueError, match="shape mismatch"):
        run_with_oom_backoff(broken, 8)
    assert calls == [8]
    assert is_oom_error(torch.OutOfMemoryError("x"))
    assert is_oom_error(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes"))
    assert not is_oom_error(RuntimeError("expected scalar type Float"))
