"""Make the shipped base model: a tiny Qwen2 SFT'd on n-digit addition until it is half-learned.

    python scripts/make_base_model.py            # writes fastdash/assets/tiny-arith/

Deterministic (seeded, single thread count). SFT has a sharp phase transition, so instead of a
fixed step count we checkpoint by accuracy: the first evaluation whose greedy accuracy on a
validation set (train-split problems, disjoint from the held-out eval set by construction) falls in
[--min-acc, --max-acc] is saved. RL then has something to learn: the default
`python -m fastdash.train` run improves it. Never retrain it inside tests; tests load the shipped one.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fastdash.data.arithmetic import make_problems
from fastdash.models import SHIPPED, char_tokenizer, random_model


def encode_batch(tok, problems, device="cpu"):
    """Right-padded prompt+answer+EOS rows and a mask selecting the answer tokens as targets."""
    rows, masks = [], []
    for p in problems:
        prompt = tok(p["prompt"]).input_ids
        answer = tok(p["answer"]).input_ids + [tok.eos_token_id]
        rows.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, m) in enumerate(zip(rows, masks)):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.bool)
    return ids.to(device), mask.to(device)


@torch.no_grad()
def greedy_accuracy(model, tok, problems, batch_size=250) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(problems), batch_size):
        chunk = problems[i : i + batch_size]
        enc = tok([p["prompt"] for p in chunk], return_tensors="pt", padding=True)
        out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
        correct += sum(t.strip() == p["answer"] for t, p in zip(texts, chunk))
    model.train()
    return correct / len(problems)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(SHIPPED["tiny-arith"]))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--max-steps", type=int, default=4000)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--fine-eval-every", type=int, default=5)
    ap.add_argument("--min-acc", type=float, default=0.30)
    ap.add_argument("--max-acc", type=float, default=0.42)
    args = ap.parse_args(argv)

    torch.set_num_threads(1)  # deterministic, and immune to oversubscription on a busy machine
    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=args.seed)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    train = make_problems(args.max_steps * args.batch_size, split="train", seed=args.seed + 1)
    val = make_problems(400, split="train", seed=args.seed + 2)
    t0, every = time.time(), args.eval_every
    for step in range(args.max_steps):
        ids, mask = encode_batch(tok, train[step * args.batch_size : (step + 1) * args.batch_size])
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
        loss = torch.nn.functional.cross_entropy(logits[mask[:, 1:]], ids[:, 1:][mask[:, 1:]])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % every == 0:
            acc = greedy_accuracy(model, tok, val)
            if acc >= 0.05:  # inside the phase transition: look closely or we jump past the window
                every = args.fine_eval_every
            print(f"step {step + 1:5d}  loss {loss.item():.4f}  val greedy acc {acc:.3f}  {time.time() - t0:.0f}s")
            if args.min_acc <= acc <= args.max_acc:
                out = Path(args.out)
                out.mkdir(parents=True, exist_ok=True)
                model.save_pretrained(out, safe_serialization=True)
                tok.save_pretrained(out)
                (out / "fastdash_base.json").write_text(json.dumps(
                    {"sft_steps": step + 1, "val_greedy_accuracy": acc, "seed": args.seed, "lr": args.lr,
                     "batch_size": args.batch_size, "task": "arithmetic", "digits": 3}, indent=2) + "\n")
                print(f"saved {out} (val greedy accuracy {acc:.3f})")
                return 0
    raise SystemExit(f"no checkpoint reached accuracy in [{args.min_acc}, {args.max_acc}] "
                     f"within {args.max_steps} steps; adjust --lr or --eval-every")


if __name__ == "__main__":
    raise SystemExit(main())
