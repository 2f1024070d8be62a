"""Packed vs padded micro-batches: padding fraction and backprop tokens/s.

    python benchmarks/bench_packing.py                  # prints a table; --json PATH to save it
    pytest benchmarks/bench_packing.py --benchmark-only # the same runs under pytest-benchmark

Two length distributions: `paper` (completions gamma-distributed with mean ~600 and clipped at 2048
tokens, prompts 32..256, like the paper's Figure 6b) and `uniform` (completions 1..2048). Each step's
samples are backpropagated twice: packed (`plan_microbatches` into a token budget, one varlen row
per micro-batch) and padded (TRL-style consecutive micro-batches of B samples, right-padded). Both
arms run the same loss (plain lm_head + log_softmax on the completion positions only), so the
difference is the layout. Throughput counts real tokens (prompt + completion) only.

On CUDA: a Qwen2.5-0.5B-shaped random model in bf16, the full lengths, 256 samples.
On CPU: a tiny Qwen2 (hidden 256, 2 layers), lengths scaled down 16x, 64 samples, one thread;
the whole run takes ~10-20 s. Tiny models are overhead-bound, so the CPU gain is below the ideal.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastdash.attention import select_attention_backend, use_packed_attention  # noqa: E402
from fastdash.batch import Sample  # noqa: E402
from fastdash.models import PRESETS, QWEN_VOCAB  # noqa: E402
from fastdash.forward import forward_hidden  # noqa: E402
from fastdash.packing import (  # noqa: E402
    collate_packed,
    collate_padded,
    plan_microbatches,
    plan_padded_microbatches,
)

MAX_COMPLETION, MAX_PROMPT, MIN_PROMPT, MEAN_COMPLETION = 2048, 256, 32, 600


def qwen_shape(preset: str) -> dict:
    """A Qwen2.5 preset's body shape and the real vocabulary (build_model ties the head itself)."""
    return {**{k: v for k, v in PRESETS[preset].items() if k != "tie_word_embeddings"}, "vocab_size": QWEN_VOCAB}


def settings(device: torch.device) -> dict:
    if device.type == "cuda":
        return dict(scale=1, samples=256, micro_batch_size=4, max_tokens=8192, dtype=torch.bfloat16,
                    model=qwen_shape("qwen2.5-0.5b"))
    return dict(scale=16, samples=64, micro_batch_size=4, max_tokens=576, dtype=torch.float32,
                model=dict(hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, vocab_size=512))


def sample_lengths(kind: str, n: int, scale: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, completion) lengths, divided by `scale` (>= 1 token each)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        p = rng.randint(MIN_PROMPT, MAX_PROMPT)
        if kind == "paper":  # gamma(2, 300): mean 600, long tail, ~1% clipped at the max
            c = min(MAX_COMPLETION, max(1, int(rng.gammavariate(2.0, MEAN_COMPLETION / 2.0))))
        elif kind == "uniform":
            c = rng.randint(1, MAX_COMPLETION)
        else:
            raise ValueError(f"kind must be 'paper' or 'uniform', got {kind!r}")
        out.append((max(1, p // scale), max(1, c // scale)))
    return out


def make_samples(shapes, vocab: int, seed: int = 0) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    return [
        Sample(uid=i, prompt_ids=torch.randint(1, vocab, (p,), generator=g).tolist(),
               completion_ids=torch.randint(1, vocab, (c,), generator=g).tolist(), truncated=False,
               advantage=float(torch.randn((), generator=g)))
        for i, (p, c) in enumerate(shapes)
    ]


def build_model(device: torch.device, cfg: dict):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(**cfg["model"], max_position_embeddings=4096, tie_word_embeddings=True,
                         attn_implementation="sdpa")
    model = Qwen2ForCausalLM(config).to(device=device, dtype=cfg["dtype"]).train()
    use_packed_attention(model)
    return model


def microbatches(samples, arm: str, cfg: dict):
    if arm == "packed":
        plan = plan_microbatches([s.length for s in samples], cfg["max_tokens"])
        return [collate_packed([samples[i] for i in b]) for b in plan]
    plan = plan_padded_microbatches(len(samples), cfg["micro_batch_size"])
    return [collate_padded([samples[i] for i in b], pad_token_id=0) for b in plan]


def backprop(model, mbs, total_completion_tokens: int) -> None:
    """One step's forward + backward over all micro-batches (gradients accumulate)."""
    for mb in mbs:
        hidden = forward_hidden(model, mb)  # [N, H]
        logp = torch.log_softmax((hidden @ model.lm_head.weight.T).float(), -1)  # [N, V]
        logp = logp.gather(1, mb.targets[:, None]).squeeze(1)
        (-(mb.advantages[mb.token_sample] * logp).sum() / total_completion_tokens).backward()


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_arm(model, samples, arm: str, cfg: dict, repeats: int = 2) -> dict:
    device = next(model.parameters()).device
    mbs = [mb.to(device) for mb in microbatches(samples, arm, cfg)]
    total = sum(len(s.completion_ids) for s in samples)
    real = sum(mb.meta["real_tokens"] for mb in mbs)
    pad = sum(mb.meta["padding_tokens"] for mb in mbs)
    backprop(model, mbs, total)  # warm-up (allocator, kernels)
    model.zero_grad(set_to_none=True)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        backprop(model, mbs, total)
        _sync(device)
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    seconds = min(times)
    out = dict(arm=arm, microbatches=len(mbs), real_tokens=real, padding_tokens=pad,
               padding_fraction=pad / (real + pad), seconds=seconds, tokens_per_s=real / seconds)
    if arm == "packed":
        out["budget_fill"] = real / (len(mbs) * cfg["max_tokens"])
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        torch.cuda.reset_peak_memory_stats()
    return out


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads; 1 by default because oversubscribed shared CPUs make timings swing 5x")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = settings(device)
    if args.samples:
        cfg["samples"] = args.samples
    model = build_model(device, cfg)
    rows = []
    for kind in ("paper", "uniform"):
        samples = make_samples(sample_lengths(kind, cfg["samples"], cfg["scale"]), cfg["model"]["vocab_size"])
        res = {arm: run_arm(model, samples, arm, cfg) for arm in ("padded", "packed")}
        speedup = res["packed"]["tokens_per_s"] / res["padded"]["tokens_per_s"]
        ideal = 1.0 / (1.0 - res["padded"]["padding_fraction"])  # if compute were linear in tokens
        for arm in ("padded", "packed"):
            rows.append(dict(distribution=kind, device=str(device), backend=select_attention_backend(device),
                             **res[arm], speedup=speedup if arm == "packed" else 1.0,
                             ideal_speedup=ideal))
    print(f"{'dist':8} {'arm':7} {'mbs':>4} {'real tok':>9} {'pad %':>6} {'tok/s':>10} {'speedup':>8} {'ideal':>6}")
    for r in rows:
        print(f"{r['distribution']:8} {r['arm']:7} {r['microbatches']:4d} {r['real_tokens']:9d} "
              f"{100 * r['padding_fraction']:6.1f} {r['tokens_per_s']:10.0f} {r['speedup']:8.2f} {r['ideal_speedup']:6.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(settings={k: str(v) for k, v in cfg.items()}, rows=rows), indent=2))
    return rows


# pytest-benchmark entry points (not in the default test run: testpaths is tests/)
try:
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("arm", ["padded", "packed"])
    @pytest.mark.parametrize("kind", ["paper", "uniform"])
    def test_backprop_throughput(benchmark, kind, arm):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        cfg = settings(device)
        if device.type == "cpu":
            torch.set_num_threads(1)  # see --threads in main()
        model = build_model(device, cfg)
        samples = make_samples(sample_lengths(kind, cfg["samples"], cfg["scale"]), cfg["model"]["vocab_size"])
        mbs = [mb.to(device) for mb in microbatches(samples, arm, cfg)]
        total = sum(len(s.completion_ids) for s in samples)

        def step():
            backprop(model, mbs, total)
            _sync(device)
            model.zero_grad(set_to_none=True)

        benchmark.group = f"packing-{kind}"
        benchmark.pedantic(step, rounds=3, warmup_rounds=1)
        real = sum(mb.meta["real_tokens"] for mb in mbs)
        pad = sum(mb.meta["padding_tokens"] for mb in mbs)
        benchmark.extra_info.update(real_tokens=real, padding_fraction=pad / (real + pad),
                                    tokens_per_s=real / benchmark.stats.stats.min, microbatches=len(mbs))


if __name__ == "__main__":
    main()
