"""One optimizer step per case, on however many ranks launched this script (RANK / WORLD_SIZE set as
torchrun sets them); tests/test_distributed.py compares the ranks' results with one process's.

    python tests/dist_worker.py OUT_DIR            # writes OUT_DIR/case<i>-rank<r>.pt
    python tests/dist_worker.py OUT_DIR broadcast  # the split-placement weight broadcast
    python tests/dist_worker.py OUT_DIR stream     # FSDP weights streamed one unit at a time
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ScriptedEngine, digit_sum_reward, sgd, tiny_config  # noqa: E402

from fastdash import distributed, fsdp  # noqa: E402
from fastdash.rollout.split import broadcast_weights  # noqa: E402

# every loss type, filter on, beta 0 and > 0; then Multi (old log-probs), batch-std advantages, padding
CASES = [dict(loss_type=lt, beta=beta) for lt in ("grpo", "bnpo", "dr_grpo", "dapo") for beta in (0.0, 0.04)]
CASES += [dict(loss_type="dapo", num_iterations=2, scale_rewards="batch", packing=False)]
# the same with FSDP2 (parallelism=fsdp; one process runs it unsharded)
CASES += [dict(parallelism="fsdp", loss_type="grpo", beta=0.04), dict(parallelism="fsdp", loss_type="dr_grpo", max_tokens_per_microbatch=22),
          dict(parallelism="fsdp", loss_type="dapo", num_iterations=2, scale_rewards="batch", packing=False),
          # the second half of the step filtered: rank 1 keeps nothing and runs rank 0's count of dummies
          dict(parallelism="fsdp", loss_type="bnpo", beta=0.04, max_tokens_per_microbatch=22, drop_second_half=True)]
# FSDP runs with share_prompts off (not supported there): the one-process reference must run the same computation
CASES = [{**c, "share_prompts": False} if c.get("parallelism") == "fsdp" else c for c in CASES]
# LoRA under DDP: the adapters' gradients all-reduced, the frozen base untouched (the reference: adapters off)
CASES += [dict(lora_r=4, loss_type="dr_grpo", beta=0.04)]


def config(**case):
    return tiny_config(model="tiny-arith", num_threads=1, dist_timeout_s=60, **case)


def one_step(case: dict) -> dict:
    """A run on the scripted engine, one step with SGD(lr=1): gradients before it, weights after."""
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer

    case = dict(case)
    drop = case.pop("drop_second_half", False)
    cfg = config(**case)
    run = build_run(cfg, with_plan=False)
    run.engine = ScriptedEngine(max_len=cfg.max_completion_length)
    run.reward_fn = digit_sum_reward
    sgd(run, lr=1.0)
    trainer = Trainer(cfg, run)
    if drop:  # zero advantage (the filter drops it) for every sample in the step's second half
        half, offset = cfg.train_batch_size // 2, distributed.rank() * cfg.train_batch_size // distributed.world_size()
        step_batch = trainer.step_batch
        trainer.step_batch = lambda samples: step_batch(
            [s if offset + s.uid < half else dataclasses.replace(s, advantage=0.0) for s in samples])
    grads = {}
    step = trainer._optimizer_step

    def capture():  # full_tensor: FSDP's gradients and weights are shards (DTensors)
        grads.update({n: fsdp.local(p.grad).detach().clone() for n, p in run.model.named_parameters()
                      if p.grad is not None})
        return step()

    trainer._optimizer_step = capture
    metrics = trainer.step()
    weights = {n: fsdp.local(p).detach().clone() for n, p in run.model.named_parameters()}
    return {"grads": grads, "weights": weights, "metrics": metrics, "world": distributed.world_size(),
            "engine_rows": sum(run.engine.calls), "sharded": fsdp.is_sharded(run.model)}


def broadcast(out: Path) -> None:
    """Rank 0's tensors (two dtypes, more than one bucket) overwrite rank 1's in place."""
    r = distributed.rank()
    named = [(f"w{i}", torch.full((1000 + i,), float(r * 10 + i))) for i in range(5)]
    named += [("b", torch.arange(7, dtype=torch.bfloat16) + r)]
    stats = broadcast_weights(named, src=0, bucket_bytes=6000, timeout_s=30)
    torch.save({"named": dict(named), "stats": stats}, out / f"broadcast-rank{r}.pt")


def stream(out: Path) -> None:
    """fsdp.full_parameters over a sharded model: each parameter's full value, with at most one FSDP
    unit gathered whenever it yields (a unit's parameters are DTensors while it is sharded)."""
    from torch.distributed.tensor import DTensor

    from fastdash.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("tiny-arith", dtype=torch.float32, seed=0)
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    fsdp.shard(model, torch.float32)
    gathered_at_yield, values = [], {}
    for name, t in fsdp.full_parameters(model):
        gathered_at_yield.append((name, [n for n, p in model.named_parameters() if not isinstance(p, DTensor)]))
        values[name] = t.detach().clone()
    torch.save({"full": full, "values": values, "gathered": gathered_at_yield,
                "sharded_after": all(isinstance(p, DTensor) for p in model.parameters())},
               out / f"stream-rank{distributed.rank()}.pt")


def main(out: Path, what: str) -> None:
    distributed.setup(config(**CASES[0]))
    try:
        if what == "broadcast":
            return broadcast(out)
        if what == "stream":
            return stream(out)
        for i, case in enumerate(CASES):
            torch.save(one_step(case), out / f"case{i}-rank{distributed.rank()}.pt")
    finally:
        distributed.teardown()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "steps")
