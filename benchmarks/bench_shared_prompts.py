"""Shared prompts, on vs off (docs/shared-prompts.md): HF-engine generation and packed backprop.

    python benchmarks/bench_shared_prompts.py            # the long-prompt case; --smoke: lengths / 8
    pytest benchmarks/bench_shared_prompts.py --benchmark-only

The long-prompt case of issue 30: P distinct prompts of 512 tokens, G = 8 completions each, every
completion forced to 128 tokens (forced lengths: both arms decode the same number of steps). Reported
per arm: prompt tokens prefilled, decode row-steps, tokens computed (their sum) and wall time.
Same seeds in both arms; the samples are the same (tests/test_shared_prompts.py).
Backprop: the same shapes as kept samples (forward + backward of sum(log p), packed under a budget of
BUDGET tokens), per arm: micro-batches, tokens computed, wall time.

On CUDA: a Qwen2.5-0.5B-shaped random model in bf16. On CPU: the tiny preset (hidden 128, 3 layers)
over the character tokenizer, one thread.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from fastdash.batch import Sample  # noqa: E402
from fastdash.forward import forward_hidden  # noqa: E402
from fastdash.models import char_tokenizer, random_model  # noqa: E402
from fastdash.packing import microbatches  # noqa: E402
from fastdash.rollout.base import SamplingParams  # noqa: E402
from fastdash.rollout.hf import HFEngine  # noqa: E402

PROMPT, COMPLETION, G, PROMPTS = 512, 128, 8, 2
BUDGET = 4096  # backprop tokens per micro-batch


def setup(device: torch.device, scale: int = 1):
    """(model, tokenizer, prompts, params) of the long-prompt case, lengths divided by `scale`."""
    tok = char_tokenizer()
    if device.type == "cuda":
        model = random_model("qwen2.5-0.5b", vocab_size=len(tok), dtype=torch.bfloat16).to(device)
    else:
        model = random_model("tiny", vocab_size=len(tok))
    model.eval()
    rng = random.Random(0)
    ids = [i for i in range(len(tok)) if i not in (tok.eos_token_id, tok.pad_token_id)]
    prompts = [[rng.choice(ids) for _ in range(PROMPT // scale)] for _ in range(PROMPTS)]
    n = COMPLETION // scale
    params = SamplingParams(max_tokens=n, temperature=1.0, seed=0, forced_lengths=[n] * (PROMPTS * G))
    return model, tok, prompts, params


def run_arm(model, tok, prompts, params, share: bool) -> dict:
    engine = HFEngine(model, tok, share_prompts=share)
    t0 = time.perf_counter()
    out = engine.generate(prompts, G, params)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    s = engine.stats
    return dict(share_prompts=share, seconds=round(time.perf_counter() - t0, 3), prefill_tokens=s.prefill_tokens,
                decode_row_steps=s.decode_row_steps, tokens_computed=s.prefill_tokens + s.decode_row_steps,
                completion_tokens=sum(len(c.completion_ids) for c in out))


def backprop_samples(prompts, scale: int = 1, seed: int = 0) -> list[Sample]:
    """G kept completions of COMPLETION tokens per prompt (random tokens: the cost is the shapes)."""
    g = torch.Generator().manual_seed(seed)
    n = COMPLETION // scale
    return [Sample(uid=i * G + j, prompt_ids=p, completion_ids=torch.randint(2, 20, (n,), generator=g).tolist(),
                   truncated=False, advantage=1.0) for i, p in enumerate(prompts) for j in range(G)]


def run_backprop(model, samples, share: bool, budget: int) -> dict:
    device = next(model.parameters()).device
    mbs = microbatches(samples, budget=budget, micro_batch_size=1, pad_id=0, device=device, share_prompts=share)
    model.train()
    t0 = time.perf_counter()
    for mb, _ in mbs:
        hidden = forward_hidden(model, mb)
        logits = model.get_output_embeddings()(hidden).float()
        torch.log_softmax(logits, -1).gather(1, mb.targets[:, None]).sum().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    return dict(share_prompts=share, seconds=round(time.perf_counter() - t0, 3), microbatches=len(mbs),
                tokens_computed=sum(mb.meta["real_tokens"] for mb, _ in mbs))


def main(argv=None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="lengths / 8 (a loaded machine, a quick check)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="runs per arm; the fastest is reported")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    scale = 8 if args.smoke else 1
    model, tok, prompts, params = setup(device, scale)
    samples = backprop_samples(prompts, scale)
    arms = {"generation": lambda share: run_arm(model, tok, prompts, params, share),
            "backprop": lambda share: run_backprop(model, samples, share, BUDGET // scale)}
    rows = []
    for phase, arm in arms.items():
        for share in (False, True):
            runs = [arm(share) for _ in range(args.repeats)]  # the fastest: the first pays warm-up
            rows.append(dict(phase=phase, **min(runs, key=lambda r: r["seconds"])))
    for r in rows:
        print(r)
    return rows


try:  # pytest-benchmark entry points (not in the default test run: testpaths is tests/)
    import pytest
except ImportError:  # pragma: no cover
    pytest = None

if pytest is not None:

    @pytest.mark.parametrize("share", [False, True])
    def test_long_prompt_generation(benchmark, share):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        model, tok, prompts, params = setup(device)
        benchmark.group = "shared-prompts-generation"
        row = benchmark.pedantic(run_arm, args=(model, tok, prompts, params, share), rounds=2, warmup_rounds=0)
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "seconds"})

    @pytest.mark.parametrize("share", [False, True])
    def test_long_prompt_backprop(benchmark, share):
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        model, _, prompts, _ = setup(device)
        samples = backprop_samples(prompts)
        benchmark.group = "shared-prompts-backprop"
        row = benchmark.pedantic(run_backprop, args=(model, samples, share, BUDGET), rounds=2, warmup_rounds=0)
        benchmark.extra_info.update({k: v for k, v in row.items() if k != "seconds"})


if __name__ == "__main__":
    main()
