"""The kernels, speed, attention, scheduler and static steps of scripts/gpu_check.py: kernel
correctness, kernel speed, packed attention, the scheduler's plan, static-shape decode.

Each step is `fn(size) -> dict` with "ok" (True / False / None = nothing to judge) and its figures;
`size` is gpu_check.sizes(dry). Tolerances are derived from magnitudes: a bf16 result
may be off by a few of its own ulps at the largest reference value, an fp32 accumulation over H
terms by ~H fp32 ulps of the largest term.
"""
from __future__ import annotations

import itertools
import math
import time

import torch
import torch.nn.functional as F

from fastdash.algo import LOSS_TYPES, loss_token_weights
from fastdash_kernels import fused_policy_loss, resolve_backend

V_QWEN = 151936


def _dev() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def ulp(x: float, dtype: torch.dtype) -> float:
    """Spacing of `dtype` at |x| (bf16: 8 significant bits, fp32: 24)."""
    bits = {torch.bfloat16: 8, torch.float16: 11, torch.float32: 24}[dtype]
    return 2.0 ** (math.floor(math.log2(max(abs(x), 1e-30))) - bits + 1)


def _max_err(a: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    """(max |a - ref|, max |ref|)."""
    return float((a.float() - ref.float()).abs().max()), float(ref.float().abs().max())


# ------------------------------------------------------------------ kernels: correctness -------
def _case(n_lengths: list[int], H: int, V: int, peaked: bool, dtype, seed: int):
    g = torch.Generator().manual_seed(seed)
    N = sum(n_lengths)
    w = torch.randn(V, H, generator=g) * H ** -0.5
    y = torch.randint(0, V, (N,), generator=g)
    x = torch.randn(N, H, generator=g)
    if peaked:  # hidden aligned with its target's row: target logit ~ 20, p(target) ~ 1
        x = 0.3 * x + 20.0 * w[y] / w[y].norm(dim=1, keepdim=True) ** 2
    cu = torch.tensor([0] + list(itertools.accumulate(n_lengths)), dtype=torch.int32)
    adv = torch.randn(len(n_lengths), generator=g)
    d = _dev()
    return (x.to(d, dtype), w.to(d, dtype), y.to(d), cu.to(d), adv.to(d))


def _run_loss(backend, x, w, y, cu, adv, old, ref, loss_type, beta, T, normaliser):
    x = x.detach().clone().requires_grad_(True)
    w = w.detach().clone().requires_grad_(True)
    out = fused_policy_loss(x, w, y, cu, adv, token_weights=loss_token_weights(loss_type, cu, normaliser),
                            old_logps=old, ref_logps=ref, beta=beta, temperature=T, backend=backend)
    out.loss.backward()
    _sync()
    return out.loss.detach(), out.logps, x.grad, w.grad


def kernel_correctness(size: dict) -> dict:
    """Every backend vs an fp32 reference at bf16 inputs; dW bit-identity over two runs."""
    dtype, V = size["dtype"], size["vocab"]
    backends = [b for b in ("triton", "torch") if b != "triton" or _dev().type == "cuda"]
    rows, ok, bitwise = [], True, {}
    for H, peaked, T in itertools.product(size["hidden"], (False, True), (1.0, 0.9)):
        x, w, y, cu, adv = _case(size["lengths"], H, V, peaked, dtype, seed=H)
        with torch.no_grad():  # old / ref log-probs near the current ones: ratios and KL stay small but nonzero
            base = torch.log_softmax((x.float() @ w.float().T) / T, -1).gather(1, y[:, None]).squeeze(1)
        g = torch.Generator(device=base.device).manual_seed(1)
        old = base + 0.1 * torch.randn(base.shape, generator=g, device=base.device)
        ref = base + 0.1 * torch.randn(base.shape, generator=g, device=base.device)
        for loss_type, beta in itertools.product(LOSS_TYPES, (0.0, 0.04)):
            norm = float(sum(size["lengths"]))
            args = (y, cu, adv, old, ref if beta else None, loss_type, beta, T, norm)
            r_loss, r_lp, r_dx, r_dw = _run_loss("reference", x.float(), w.float(), *args)
            for b in backends:
                loss, lp, dx, dw = _run_loss(b, x, w, *args)
                e_lp, m_lp = _max_err(lp, r_lp)
                e_dx, m_dx = _max_err(dx, r_dx)
                e_dw, m_dw = _max_err(dw, r_dw)
                # fp32 sums: H products per logit (|logit| <= ~25 / T here), V terms per logsumexp
                tol_lp = 4 * H * ulp(30.0, torch.float32) + 4 * V ** 0.5 * ulp(1.0, torch.float32) + 4 * ulp(m_lp, torch.float32)
                good = (e_lp <= tol_lp and e_dx <= 4 * ulp(m_dx, dtype) and e_dw <= 4 * ulp(m_dw, dtype)
                        and abs(float(loss) - float(r_loss)) <= 8 * ulp(float(r_loss), dtype) + tol_lp
                        and bool(torch.isfinite(dw).all()))
                ok &= good
                rows.append(dict(backend=b, H=H, peaked=peaked, T=T, loss_type=loss_type, beta=beta, ok=good,
                                 err_logp=e_lp, tol_logp=tol_lp, err_dx_ulps=e_dx / ulp(m_dx, dtype),
                                 err_dw_ulps=e_dw / ulp(m_dw, dtype)))
                if (b, H) not in bitwise and loss_type == "dapo":
                    bitwise[(b, H)] = bool(torch.equal(dw, _run_loss(b, x, w, *args)[3]))
    worst = max(rows, key=lambda r: r["err_dw_ulps"])
    return {"ok": ok, "cases": len(rows), "failed": [r for r in rows if not r["ok"]][:20],
            "worst_dw": worst, "dw_bit_identical_over_two_runs": {f"{b} H={h}": v for (b, h), v in bitwise.items()},
            "lengths": size["lengths"], "vocab": V, "dtype": str(dtype)}


# ------------------------------------------------------------------ speed ----------------------
def _timed(fn, reps: int) -> float:
    """Median seconds of fn() (CUDA events on GPU)."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def kernel_speed(size: dict) -> dict:
    """fwd+bwd per backend vs the 6NHV floor and vs one cuBLAS [N,H]x[H,V] matmul timed here."""
    import importlib.util

    d, dtype, V, rows = _dev(), size["dtype"], size["vocab"], []
    backends = ["triton", "triton-recompute", "torch", "liger", "cce", "reference"] if d.type == "cuda" \
        else ["torch", "reference"]
    optional = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}  # baselines, where installed
    backends = [b for b in backends if b not in optional or importlib.util.find_spec(optional[b]) is not None]
    # triton: the cost model's pick for this token-level loss (the 6NHV single pass at these shapes);
    # triton-recompute: forward + recompute (8NHV), the other design, side by side
    variant = {"triton-recompute": ("triton", {"single_pass": False})}
    for N, H in itertools.product(size["speed_n"], size["hidden_speed"]):
        x, w, y, cu, adv = _case([N // 4] * 4, H, V, False, dtype, seed=0)
        mm = _timed(lambda: x @ w.T, size["reps"])
        tw = loss_token_weights("dapo", cu, float(N))
        for b in backends:
            if b == "reference" and N * V * 4 * 3 > 0.5 * _free_bytes():
                rows.append(dict(N=N, H=H, backend=b, skipped="fp32 [N, V] logits would not fit"))
                continue
            xg, wg = x.detach().requires_grad_(True), w.detach().requires_grad_(True)

            backend, kw = variant.get(b, (b, {}))

            def step():
                xg.grad = wg.grad = None
                fused_policy_loss(xg, wg, y, cu, adv, token_weights=tw, backend=backend, **kw).loss.backward()

            try:
                if d.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated() if d.type == "cuda" else 0
                sec = _timed(step, size["reps"])
                peak = (torch.cuda.max_memory_allocated() - base) if d.type == "cuda" else None
            except Exception as e:  # a baseline that cannot run here is reported, not fatal
                rows.append(dict(N=N, H=H, backend=b, error=f"{type(e).__name__}: {str(e)[:160]}"))
                continue
            rows.append(dict(N=N, H=H, backend=b, ms=sec * 1e3, tflops_6nhv=6 * N * H * V / sec / 1e12,
                             matmul_ms=mm * 1e3, matmul_tflops=2 * N * H * V / mm / 1e12,
                             x_matmul=sec / mm, extra_peak_mib=peak / 2**20 if peak is not None else None))
    return {"ok": None, "rows": rows, "vocab": V, "dtype": str(dtype), "auto_backend": resolve_backend("auto", x)}


def _free_bytes() -> int:
    return torch.cuda.mem_get_info()[0] if torch.cuda.is_available() else 8 * 2**30


# ------------------------------------------------------------------ attention ------------------
def packed_attention(size: dict) -> dict:
    """varlen attention vs per-sequence sdpa (fwd, dq, dk, dv; GQA), then packed forward_hidden vs
    per sample on a random model, and one sample's change leaving the others bit-identical."""
    from fastdash.attention import varlen_attention

    d, dtype = _dev(), size["dtype"]
    lengths, (hq, hkv, D) = size["attn_lengths"], size["heads"]
    g = torch.Generator().manual_seed(0)
    T = sum(lengths)
    q, k, v = (torch.randn(T, h, D, generator=g).to(d, dtype) for h in (hq, hkv, hkv))
    cu = torch.tensor([0] + list(itertools.accumulate(lengths)), dtype=torch.int32, device=d)
    grad_out = torch.randn(T, hq, D, generator=g).to(d, dtype)

    def run(fn, qq, kk, vv):
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (qq, kk, vv))
        out = fn(qq, kk, vv)
        out.backward(grad_out.to(out.dtype))
        return [out.detach(), qq.grad, kk.grad, vv.grad]

    def per_seq(qq, kk, vv):
        outs = []
        for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
            o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1)[None] for t in (qq, kk, vv)),
                                               is_causal=True, enable_gqa=True)
            outs.append(o[0].transpose(0, 1))
        return torch.cat(outs)

    packed = run(lambda a, b, c: varlen_attention(a, b, c, cu, max(lengths)), q, k, v)
    ref = run(per_seq, q.float(), k.float(), v.float())
    attn = {}
    for name, a, r in zip(("out", "dq", "dk", "dv"), packed, ref):
        e, m = _max_err(a, r)
        attn[name] = {"err_ulps": e / ulp(m, dtype), "ok": e <= 8 * ulp(m, dtype) + 8 * ulp(1.0, dtype)}
    hidden = _packed_vs_per_sample(size)
    ok = all(v["ok"] for v in attn.values()) and hidden["ok"]
    return {"ok": ok, "attention": attn, "forward_hidden": hidden, "lengths": lengths, "heads": size["heads"]}


def _packed_vs_per_sample(size: dict) -> dict:
    from fastdash.batch import Sample
    from fastdash.forward import compute_autocast, forward_hidden
    from fastdash.models import random_model
    from fastdash.packing import collate_packed, collate_padded

    d, dtype = _dev(), size["dtype"]
    model = random_model(size["preset"], vocab_size=size["model_vocab"], seed=0).to(d).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    samples = [Sample(uid=i, prompt_ids=torch.randint(2, vocab, (p,), generator=g).tolist(),
                      completion_ids=torch.randint(2, vocab, (c,), generator=g).tolist(), truncated=False,
                      advantage=1.0) for i, (p, c) in enumerate(size["sample_shapes"])]

    def hidden(ss):
        with torch.no_grad(), compute_autocast(d, dtype):
            mb = collate_packed(ss).to(d)
            h = forward_hidden(model, mb).float()
        cu = mb.completion_cu_seqlens.tolist()
        return [h[cu[j] : cu[j + 1]] for j in range(len(ss))]

    packed = hidden(samples)
    errs, ok = [], True
    for s, hp in zip(samples, packed):
        with torch.no_grad(), compute_autocast(d, dtype):
            h1 = forward_hidden(model, collate_padded([s], 0).to(d)).float()
        e, m = _max_err(hp, h1)
        errs.append(e / ulp(m, dtype))
        ok &= e <= 16 * ulp(m, dtype)  # different attention kernels, same maths, 24 layers of bf16
    changed = list(samples)
    changed[1] = Sample(uid=1, prompt_ids=samples[1].prompt_ids, completion_ids=[(t + 1) % vocab or 2 for t in
                                                                                 samples[1].completion_ids],
                        truncated=False, advantage=1.0)
    again = hidden(changed)
    untouched = all(torch.equal(a, b) for j, (a, b) in enumerate(zip(packed, again)) if j != 1)
    return {"ok": bool(ok and untouched), "per_sample_err_ulps": errs, "others_bit_identical": untouched,
            "preset": size["preset"]}


# ------------------------------------------------------------------ scheduler ------------------
def scheduler_plan(size: dict) -> dict:
    """The plan for the size's workload; one real micro-batch at the planned budget (predicted vs
    measured peak); twice the budget through the OOM back-off (it must back off, not crash)."""
    from fastdash.memory import default_probe, ensure_grads, probe_forward_backward
    from fastdash.models import random_model
    from fastdash.oom import run_with_oom_backoff
    from fastdash.scheduler import plan_memory

    d, w = _dev(), size["plan"]
    model = random_model(size["preset"], vocab_size=size["model_vocab"], seed=0).to(d).train()
    budget = None
    if d.type == "cpu":
        probe = default_probe(d)
        budget = probe.rss_bytes() + w["cpu_extra_budget"]
    t0 = time.perf_counter()
    plan = plan_memory(model, max_prompt_length=w["prompt"], max_completion_length=w["completion"],
                       samples_per_step=w["samples"], compute_dtype=size["dtype"], memory_budget=budget)
    plan_s = time.perf_counter() - t0
    B, L = plan.max_tokens_per_microbatch, w["prompt"] + w["completion"]
    ensure_grads(model)
    opt_state = [torch.zeros(2 * p.numel(), device=d) for p in model.parameters()]  # AdamW's two states
    probe = default_probe(d, budget)
    step = lambda T: probe_forward_backward(model, T, L, w["completion"], compute_dtype=size["dtype"])  # noqa: E731
    if d.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step(B)
        torch.cuda.synchronize()
        measured = torch.cuda.max_memory_allocated()
    else:
        measured = probe.rss_bytes() + probe.measure(lambda: step(B))
    predicted = plan.predict_backprop_bytes(B)
    backoffs = []
    try:
        run_with_oom_backoff(step, 2 * B, min_budget=L, on_backoff=lambda old, new: backoffs.append(new), plan=plan)
        crashed = None
    except Exception as e:  # noqa: BLE001 - the check is that this does not happen
        crashed = f"{type(e).__name__}: {str(e)[:300]}"
    del opt_state
    # The hard check is the back-off; predicted vs measured is reported (CPU RSS includes the interpreter).
    return {"ok": crashed is None, "plan_seconds": plan_s,
            "max_tokens_per_microbatch": B, "generation_concurrency": plan.generation_concurrency,
            "predicted_peak_bytes": predicted, "measured_peak_bytes": int(measured),
            "measured_over_predicted": measured / predicted, "usable_bytes": plan.usable_bytes,
            "twice_budget": {"backoffs": backoffs, "crashed": crashed}, "plan": plan.to_dict(), "workload": w}


# ------------------------------------------------------------------ static decode --------------
def static_decode(size: dict) -> dict:
    """The HF engine's compacting loop vs its static-shape loop (torch.compile per bucket; on CUDA
    inductor with CUDA graphs) on one forced-length workload: tokens/s of a second call, the first
    call's seconds (compiles), graphs compiled vs buckets used. Judged: forced lengths honoured by
    both, graphs <= buckets used, no compile in the second call. Reported: the share of completions
    with the same tokens (the same uniforms, but bf16 logits of other kernels may flip a draw)."""
    import numpy as np
    from torch._dynamo.utils import counters

    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout.base import SamplingParams
    from fastdash.rollout.hf import HFEngine
    from fastdash.rollout.static_decode import bucket_for

    w, d = size["static"], _dev()
    model = random_model(w["preset"], vocab_size=size["model_vocab"], seed=0).to(d, size["dtype"])
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.config.vocab_size, size=(w["prompts"], w["prompt_len"])).tolist()
    rows = w["prompts"] * w["n"]
    forced = tuple(int(x) for x in np.clip(rng.gamma(2.0, w["mean"] / 2.0, size=rows).round(), 1, w["max_new"]))
    params = SamplingParams(max_tokens=w["max_new"], seed=0, forced_lengths=forced)
    live = [sum(m > k for m in forced) for k in range(1, max(forced))]  # one wave: rows <= max_batch_size
    used = sorted({bucket_for(n, rows) for n in live})
    res, outs = {}, {}
    for name, kw in (("compact", {}), ("static", {"compile_backend": w["backend"]})):
        engine = HFEngine(model, char_tokenizer(), decode_mode=name, **kw)
        graphs0 = counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        engine.generate(prompts, w["n"], params)  # static: compiles every bucket this workload uses
        _sync()
        first, graphs1 = time.perf_counter() - t0, counters["stats"]["unique_graphs"]
        t0 = time.perf_counter()
        outs[name] = engine.generate(prompts, w["n"], params)
        _sync()
        sec = time.perf_counter() - t0
        res[name] = {"first_call_s": first, "seconds": sec, "tokens_per_s": sum(forced) / sec,
                     "graphs_first_call": graphs1 - graphs0,
                     "graphs_second_call": counters["stats"]["unique_graphs"] - graphs1,
                     "decode_row_steps": engine.stats.decode_row_steps // 2,
                     "padded_row_steps": engine.stats.padded_row_steps // 2,
                     "lengths_honoured": [len(c.completion_ids) for c in outs[name]] == list(forced)}
    st = res["static"]
    same = sum(a.completion_ids == b.completion_ids for a, b in zip(outs["compact"], outs["static"])) / rows
    ok = (res["compact"]["lengths_honoured"] and st["lengths_honoured"] and st["graphs_first_call"] <= len(used)
          and st["graphs_second_call"] == 0)
    return {"ok": ok, "compact": res["compact"], "static": st, "buckets_used": used, "same_tokens_fraction": same,
            "static_over_compact": st["tokens_per_s"] / res["compact"]["tokens_per_s"], "tokens": sum(forced),
            "device": str(d), "dtype": str(size["dtype"]), "workload": w}
