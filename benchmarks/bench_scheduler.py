"""The scheduler's token budget vs a hand-picked sweep: backprop tokens/s and peak memory.

    python benchmarks/bench_scheduler.py                   # table; --json PATH to save it
    pytest benchmarks/bench_scheduler.py --benchmark-only  # the same, asserting the criteria

The planner (`plan_memory`, real probe) picks `max_tokens_per_microbatch` for a memory budget;
then one step of worst-case samples (all of the maximum length, all kept) is backpropagated at
the planned budget and at each sweep point, packed whole samples per micro-batch as the packer
would. A point "OOMs" when its peak memory passes the budget (on CPU the budget is enforced by
measurement, not by the allocator). Criteria (issue 7): the plan does not OOM, and its tokens/s
is within 10% of the best sweep point that does not.

CPU: a tiny Qwen2 (hidden 128, 2 layers), samples of 16 + 112 tokens, 32 per step, budget = the
resting RSS + 160 MiB, one thread, timed in process CPU time (best of 3; the box is shared). CUDA: a Qwen2.5-0.5B-shaped random model in bf16, 1024 + 1024 tokens,
64 per step, the free memory as measured.
"""
from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastdash.memory import CpuMemoryProbe, default_probe, ensure_grads, probe_forward_backward  # noqa: E402
from fastdash.models import PRESETS, QWEN_VOCAB  # noqa: E402
from fastdash.scheduler import plan_memory  # noqa: E402

MiB = 1024**2


def settings(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(prompt=1024, completion=1024, samples=64, dtype=torch.bfloat16, extra_budget=None, repeats=2,
                    model={**{k: v for k, v in PRESETS["qwen2.5-0.5b"].items() if k != "tie_word_embeddings"},
                           "vocab_size": QWEN_VOCAB})
    return dict(prompt=16, completion=112, samples=32, dtype=torch.float32, extra_budget=160 * MiB, repeats=3,
                model=dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=1024))


def build_model(device, s):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(**s["model"], max_position_embeddings=4096, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).to(device=device, dtype=s["dtype"])


def run_step(model, probe, budget: int, L: int, completion: int, samples: int) -> dict:
    """Backprop one step of `samples` worst-case samples at token budget `budget`; best of repeats
    is taken by the caller. Returns seconds and peak memory (bytes, absolute for CPU RSS)."""
    per_mb = max(1, budget // L)
    sizes = [min(per_mb, samples - i) * L for i in range(0, samples, per_mb)]
    model.zero_grad(set_to_none=False)
    probe.empty_cache()
    if probe.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    else:
        probe.reset_peak()
    t0 = probe.clock()
    for T in sizes:
        probe_forward_backward(model, T, L, completion)
    if probe.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = probe.peak_rss_bytes()
    return dict(seconds=probe.clock() - t0, peak_bytes=int(peak), microbatches=len(sizes))


def run(device: torch.device | None = None) -> dict:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    s = settings(device)
    model = build_model(device, s)
    L, M = s["prompt"] + s["completion"], s["samples"]
    probe = default_probe(device)
    budget = None
    if s["extra_budget"] is not None:
        # A shared CPU makes wall time swing 10x between runs: time the work instead (process CPU
        # time, one thread), for the planner's probes and for the sweep alike.
        torch.set_num_threads(1)
        probe.empty_cache()
        budget = probe.rss_bytes() + s["extra_budget"]
        probe = CpuMemoryProbe(budget, clock=time.process_time)
    t0 = time.perf_counter()
    plan = plan_memory(model, max_prompt_length=s["prompt"], max_completion_length=s["completion"],
                       samples_per_step=M, probe=probe)
    plan_seconds = time.perf_counter() - t0
    limit = budget if budget is not None else plan.total_bytes  # what an OOM means here
    # The fixed part the plan counted, made real: grads and AdamW's two fp32 states.
    ensure_grads(model)
    opt_state = [torch.zeros(2 * p.numel(), device=device) for p in model.parameters()]
    sweep = sorted({L * n for n in (1, 2, 4, 8, 16, 32) if n <= M} | {plan.max_tokens_per_microbatch})
    rows = []
    for b in sweep:
        runs = [run_step(model, probe, b, L, s["completion"], M) for _ in range(s["repeats"])]
        best = min(runs, key=lambda r: r["seconds"])
        peak = max(r["peak_bytes"] for r in runs)
        rows.append(dict(budget=b, planned=b == plan.max_tokens_per_microbatch, microbatches=best["microbatches"],
                         seconds=best["seconds"], tokens_per_s=M * L / best["seconds"], peak_bytes=peak,
                         oom=peak > limit))
    del opt_state
    return dict(device=str(device), device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                date=datetime.date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
                sample_len=L, samples_per_step=M, memory_limit_bytes=int(limit), plan_seconds=plan_seconds,
                plan=plan.to_dict(), rows=rows)


GOAL = 0.9  # the plan's tokens/s against the best fitting budget of the sweep: a goal, reported


def check(result: dict) -> tuple[bool, float, str]:
    """(the plan fits the memory limit, its tokens/s over the best fitting point's, a summary line)."""
    planned = next(r for r in result["rows"] if r["planned"])
    fitting = [r for r in result["rows"] if not r["oom"]]
    best = max(fitting, key=lambda r: r["tokens_per_s"])
    ratio = planned["tokens_per_s"] / best["tokens_per_s"]
    met = "met" if ratio >= GOAL else "not met"
    return not planned["oom"], ratio, (f"plan {planned['budget']} tokens: {ratio:.1%} of the best fitting point "
                                       f"({best['budget']}; goal >= {GOAL:.0%}: {met}), oom={planned['oom']}")


def table(result: dict) -> str:
    lines = [f"{'budget':>8} {'mbs':>4} {'tokens/s':>10} {'peak MiB':>9} {'limit MiB':>9}  note"]
    for r in result["rows"]:
        note = ("PLAN " if r["planned"] else "") + ("OOM" if r["oom"] else "")
        lines.append(f"{r['budget']:>8} {r['microbatches']:>4} {r['tokens_per_s']:>10.0f} "
                     f"{r['peak_bytes'] / MiB:>9.1f} {result['memory_limit_bytes'] / MiB:>9.1f}  {note}")
    return "\n".join(lines)


def test_plan_vs_sweep(benchmark):
    result = benchmark.pedantic(run, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    fits, ratio, msg = check(result)
    benchmark.extra_info.update(plan_vs_best=ratio, goal=GOAL, goal_met=ratio >= GOAL)
    print("\n" + table(result) + "\n" + msg)
    # timings are reported, not asserted (the scheduler itself accepts up to 15% slower to fill memory);
    # the plan exceeding the measured memory limit is a bug
    assert fits, msg + "\n" + table(result)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args()
    res = run()
    fits, _, msg = check(res)
    print(table(res))
    print(msg, "fits" if fits else "FAILED: over the memory limit")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
