"""Make the shipped tool-using base model: a tiny Qwen2 SFT'd on multiplication transcripts, a few of
which call the `python` tool.

    python scripts/make_tool_model.py            # writes fastdash/assets/tiny-tools/

The task (`task=multiplication`, 3-digit by 2-digit) is one a 0.75M-parameter model cannot do in its
head, but can do with the tool: copy the operands into a call, copy the tool's output into the answer.
The SFT transcripts (`tools.tiny.sft_completion`) call the tool on a seeded `--tool-fraction` of the
problems only and answer straight away on the rest, so the model calls it about that often and RL has
something to learn (recipes/tiny-tools.yaml): that calling pays. The tool's output is in the
transcript, as the decode loop appends it, but not trained on (the model reads it, never writes it).

Deterministic (seeded, one thread). The checkpoint is chosen by validation (train-split problems,
disjoint from the held-out set by construction), decoded by the real multi-turn loop
(`rollout/tool_decode.py`) with an in-process stand-in for the sandboxed tool (same output, 100x
faster): the first evaluation where the transcripts that call the tool are right at least
`--min-call-accuracy` of the time (the model has learned to use it) and the sampled call rate is in
[`--min-call-rate`, `--max-call-rate`] (it calls the tool some of the time, as in its data) is saved.
Never retrain it inside tests; tests load the shipped one.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path

import torch

from fastdash.data.multiplication import make_problems
from fastdash.models import SHIPPED, random_model
from fastdash.rewards.tools import final_answer_reward
from fastdash.rollout.base import SamplingParams
from fastdash.rollout.decode import DecodeStats
from fastdash.rollout.tool_decode import tool_decode
from fastdash.tools import ToolSession
from fastdash.tools.python_tool import ToolFailed
from fastdash.tools.tiny import sft_completion, tool_char_tokenizer

MAX_TOKENS = 72  # the longest transcript (a call, a 5-digit output, the answer) is 62 tokens


def python(code: str) -> str:
    """Multiply two integers (an in-process stand-in for the sandboxed tool, for validation only).

    Args:
        code: Python source, here 'A*B'.
    """
    m = re.fullmatch(r"\s*(\d+)\s*\*\s*(\d+)\s*", code)
    if m is None:
        raise ToolFailed(f"stand-in tool: cannot run {code!r}")
    return f"{int(m[1]) * int(m[2])}\n"  # what `print(A*B)` prints in the sandbox


def encode_batch(tok, problems, use_tool):
    """Right-padded rows of prompt + transcript and the mask of trained tokens (the model's own turns)."""
    rows, masks = [], []
    for p, tool in zip(problems, use_tool):
        ids, mask = tok(p["prompt"], add_special_tokens=False).input_ids, []
        mask = [False] * len(ids)
        for text, trained in sft_completion(p["prompt"], p["answer"], tool):
            part = tok(text, add_special_tokens=False).input_ids
            ids, mask = ids + part, mask + [trained] * len(part)
        rows.append(ids)
        masks.append(mask)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    target = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        target[i, : len(m)] = torch.tensor(m)
    return ids, target


@torch.no_grad()
def validate(model, tok, problems, *, greedy: bool, seed: int = 0) -> dict:
    """Accuracy, call rate, and accuracy of the transcripts that call the tool, decoded with tools."""
    model.eval()
    session = ToolSession({"python": python}, max_iterations=1)
    rows = [tok(p["prompt"], add_special_tokens=False).input_ids for p in problems]
    try:
        res = tool_decode(model, rows, SamplingParams(max_tokens=MAX_TOKENS, greedy=greedy), session=session,
                          tokenizer=tok, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id, max_batch_size=None,
                          seed=seed, stats=DecodeStats())
    finally:
        session.close()
        model.train()
    texts = [tok.decode(r.ids, skip_special_tokens=True) for r in res]
    right = [final_answer_reward(t, p["answer"]) for t, p in zip(texts, problems)]
    called = [r.episode.stats.calls > 0 for r in res]
    n_called = max(1, sum(called))
    return {"accuracy": sum(right) / len(res), "call_rate": sum(called) / len(res),
            "call_accuracy": sum(a for a, c in zip(right, called) if c) / n_called}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(SHIPPED["tiny-tools"]))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--max-steps", type=int, default=3000)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--tool-fraction", type=float, default=0.2, help="SFT transcripts that call the tool")
    ap.add_argument("--min-call-accuracy", type=float, default=0.85)
    ap.add_argument("--min-call-rate", type=float, default=0.1)
    ap.add_argument("--max-call-rate", type=float, default=0.35)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # deterministic, and immune to oversubscription on a busy machine
    tok = tool_char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=args.seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train = make_problems(args.max_steps * args.batch_size, split="train", seed=args.seed + 1)
    val = make_problems(200, split="train", seed=args.seed + 2)
    rng = random.Random(f"tool-sft-{args.seed}")
    use_tool = [rng.random() < args.tool_fraction for _ in train]
    t0 = time.time()
    for step in range(args.max_steps):
        sl = slice(step * args.batch_size, (step + 1) * args.batch_size)
        ids, target = encode_batch(tok, train[sl], use_tool[sl])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[target[:, 1:]], ids[:, 1:][target[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if (step + 1) % args.eval_every:
            continue
        sampled, greedy = validate(model, tok, val, greedy=False), validate(model, tok, val, greedy=True)
        print(f"step {step + 1:5d}  loss {loss.item():.4f}  sampled {sampled}  greedy {greedy}  "
              f"{time.time() - t0:.0f}s", flush=True)
        if (sampled["call_accuracy"] >= args.min_call_accuracy
                and args.min_call_rate <= sampled["call_rate"] <= args.max_call_rate):
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(out, safe_serialization=True)
            tok.save_pretrained(out)
            for f in out.iterdir():
                f.chmod(0o644)  # a shipped asset, readable by every user
            (out / "fastdash_base.json").write_text(json.dumps(
                {"sft_steps": step + 1, "val_sampled": sampled, "val_greedy": greedy, "seed": args.seed,
                 "lr": args.lr, "batch_size": args.batch_size, "tool_fraction": args.tool_fraction,
                 "task": "multiplication", "digits": [3, 2]}, indent=2) + "\n")
            print(f"saved {out}")
            return 0
    raise SystemExit(f"no checkpoint reached call accuracy >= {args.min_call_accuracy} with a call rate in "
                     f"[{args.min_call_rate}, {args.max_call_rate}] within {args.max_steps} steps; "
                     "adjust --lr or --max-steps")


if __name__ == "__main__":
    raise SystemExit(main())
