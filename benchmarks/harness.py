"""End-to-end benchmark: GRPO vs No-GF vs DASH vs fastdash (vs TRL), interleaved, same samples.

    python benchmarks/harness.py                        # the paper-shaped CPU size (GPU size on CUDA)
    python benchmarks/harness.py --size learning        # tiny-arith: accuracy after equal samples
    python benchmarks/harness.py --size smoke           # seconds: checks the harness end to end
    pytest benchmarks/ --benchmark-only                 # paper + learning under pytest-benchmark

Arms are pure Config differences on one model, workload and seed (ARMS). For every seed the harness
prepares one list of prompt rows (workload.py) and gives each arm's Trainer its own reader over it
through the trainer's public `prompt_source`; completion lengths (`length_control_mean`) and the
synthetic reward are keyed by the same rollout and prompt, so every arm generates and scores the same
samples. Steps are interleaved across arms (A B C D, B C D A, ...), so slow phases of a shared machine
hit every arm alike; ratios are paired per seed and summarised as median [min, max] (report.py).
Nothing is downloaded: models are the shipped tiny one or random-weight `fastdash.models.PRESETS`.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # checkout + siblings

import torch  # noqa: E402

from fastdash.config import Config, load_config  # noqa: E402
from fastdash.memory import CpuMemoryProbe  # noqa: E402
from fastdash.metrics import PHASES  # noqa: E402
from report import build_report, format_table, write_outputs  # noqa: E402
from trl_arm import TRL_ARMS, TRLArm, skip_reason as trl_skip_reason  # noqa: E402  (TRL in a worker)
from workload import SYNTHETIC_REWARD, WORKLOAD_KEYS, PromptFeed, rows_for  # noqa: E402

log = logging.getLogger("fastdash.bench")
RESULTS = Path(__file__).resolve().parent / "results"

# Arm name -> Config overrides. Baseline GRPO as TRL 0.17 / the paper: one engine call per
# backprop micro-batch, padded micro-batches, full-logit loss, no filter.
ARMS: dict[str, dict] = {
    "grpo": dict(generation_batch_size="micro", packing=False, kernel="reference", gradient_filtering=False),
    "no_gf": dict(generation_batch_size="train", packing=False, kernel="reference", gradient_filtering=False),
    "dash": dict(generation_batch_size="train", packing=False, kernel="reference", gradient_filtering=True,
                 gradient_filtering_threshold=0.1),
    "fastdash": dict(generation_batch_size="train", packing=True, kernel="auto", max_tokens_per_microbatch="auto",
                     gradient_filtering=True, gradient_filtering_threshold=0.1),
}
DEFAULT_ARMS = tuple(ARMS)

# Benchmark sizes: Config overrides shared by every arm, plus the workload keys (workload.py).
# paper: DASH's batch shape scaled down (train 32 = 8 prompts x G 4, micro-batch 8: GRPO makes 4
#   engine calls per step), the real 151,936-token tied head on a 2-layer body, prompts of tens of
#   tokens, completions gamma-distributed with mean 0.3 x the 256-token cap, half the groups mixed.
# gpu: the same shape on random Qwen2.5-0.5B, lengths 1/8 of the paper's, 16 prompts x 4 per step
#   (GRPO: 8 engine calls), sized to finish in ~3 minutes on one H100 (1 seed, 1 timed step).
_PAPER = dict(workload="paper", num_generations=4, mixed_fraction=0.5, num_train_problems=64,
              num_eval_problems=8, eval_batch_size=8, learning_rate=1e-5)
SIZES: dict[str, dict] = {
    "paper": dict(_PAPER, model="random:paper-cpu", train_batch_size=32, micro_batch_size=8, num_threads=2,
                  trl_micro_batch_size=8,  # TRL materialises [B, T, 151936] logits: 8 rows is ~1.2 GB
                  max_prompt_length=128, prompt_length_mean=48, max_completion_length=256, length_control_mean=77),
    "gpu": dict(_PAPER, model="random:qwen2.5-0.5b", train_batch_size=64, micro_batch_size=8,
                max_prompt_length=256, prompt_length_mean=96, max_completion_length=256, length_control_mean=77),
    "learning": dict(workload="arith", model="tiny-arith", train_batch_size=256, micro_batch_size=8,
                     num_generations=4, num_threads=1, max_prompt_length=16, max_completion_length=8,
                     learning_rate=1e-4, num_train_problems=20_000, num_eval_problems=200, eval_batch_size=200),
    "smoke": dict(_PAPER, model="random:tiny", train_batch_size=8, micro_batch_size=4, num_threads=1,
                  max_prompt_length=16, prompt_length_mean=8, max_completion_length=12, length_control_mean=4),
}
# Seeds and steps per size (steps include 1 untimed warm-up), and the TRL arms it runs when trl imports:
# only TRL's best CPU setting (no gradient checkpointing) where time is short.
# trl_seeds: the TRL arm runs on the first n seeds only (paper: ~100 s a step on 2 cores, 11x fastdash's:
# one seed keeps the default suite near 15 minutes; its ratios are paired on the seeds it ran).
RUN_SHAPE = {"paper": dict(seeds=3, steps=2, trl=("trl_no_gc",), trl_seeds=1),
             "gpu": dict(seeds=1, steps=2, trl=()),
             "learning": dict(seeds=3, steps=8, trl=tuple(TRL_ARMS)), "smoke": dict(seeds=1, steps=2, trl=())}


def run_when_asked(request, benchmark, word: str, fn, what: str) -> dict:
    """A long benchmark kept out of the default run: fn() once under pytest-benchmark when `-k` names
    `word`, its report's summary in extra_info; otherwise a skip that says how to ask for it."""
    import pytest

    if word not in (request.config.getoption("keyword") or ""):
        pytest.skip(f"{what} runs only when asked: pytest benchmarks/{request.path.name} -k {word}")
    report = benchmark.pedantic(fn, rounds=1, iterations=1)
    benchmark.extra_info.update(report["summary"])
    return report


def default_size(device: str) -> str:
    return "gpu" if device == "gpu" else "paper"


def is_learning_task(size: dict) -> bool:
    return size.get("workload", "arith") == "arith"


def make_config(arm: str, size: dict, seed: int, **extra) -> Config:
    """The arm's Config: shared sizes + the arm's overrides + seed. 'micro'/'train' resolve to sizes."""
    over = {**{k: v for k, v in size.items() if k not in WORKLOAD_KEYS}, **ARMS[arm], **extra,
            "seed": seed, "plots": False}
    over["generation_batch_size"] = {"micro": over["micro_batch_size"], "train": over["train_batch_size"]}.get(
        over["generation_batch_size"], over["generation_batch_size"])
    if not is_learning_task(size):
        over["reward"] = SYNTHETIC_REWARD
    return load_config(None, over)


class StepMemory:
    """Peak memory of one step: absolute and above the step's start (CUDA allocator / CPU RSS)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.cpu = None if self.cuda else CpuMemoryProbe()

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            self.base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
        else:
            self.base = self.cpu.rss_bytes()
            self.cpu.reset_peak()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.peak = torch.cuda.max_memory_allocated() if self.cuda else self.cpu.peak_rss_bytes()
        self.above_start = max(0, self.peak - self.base)
        return False


class ArmRun:
    """One arm's Run + Trainer for one seed, fed by its own reader of the seed's prompt rows."""

    def __init__(self, cfg: Config, run, trainer, feed: PromptFeed, setup_s: float = 0.0, resolved=None):
        self.cfg, self.run, self.trainer, self.feed, self.setup_s = cfg, run, trainer, feed, setup_s
        self.resolved = resolved

    @classmethod
    def build(cls, cfg: Config, feed: PromptFeed) -> "ArmRun":
        from fastdash.runtime import build_run
        from fastdash.trainer import Trainer

        t0 = time.perf_counter()
        run = build_run(cfg, with_plan=cfg.packing)  # only packing consumes the memory plan
        trainer = Trainer(cfg, run, prompt_source=feed)
        return cls(cfg, run, trainer, feed, time.perf_counter() - t0, _resolved(cfg, run, trainer))

    def step(self) -> dict:
        self.feed.reset_log()
        t0 = time.perf_counter()
        with StepMemory(self.run.device) as mem:
            m = self.trainer.step()
        wall = time.perf_counter() - t0
        prompts = self.feed.reset_log()
        n = len(prompts) * self.cfg.num_generations
        return {"wall_s": wall, "phases": {p: m.get(f"time/{p}_s", 0.0) for p in PHASES},
                "samples": n, "tokens": n * m.get("completion/mean_length", 0.0),
                "reward": m.get("reward/mean"), "kept_fraction": m.get("filter/kept_fraction"),
                "engine_calls": m.get("rollout/engine_calls"), "padding_tokens": m.get("tokens/padding", 0),
                "real_tokens": m.get("tokens/real", 0), "peak_mem_bytes": mem.peak,
                "step_mem_bytes": mem.above_start, "prompts": prompts, "optimizer_step": self.run.state.step}

    def evaluate(self) -> float:
        from fastdash.evaluate import accuracy

        return accuracy(self.run, greedy=True)


def _resolved(cfg: Config, run, trainer) -> dict:
    """What the 'auto' knobs became for this arm, so the report says which features were on."""
    from fastdash_kernels import resolve_backend

    probe = torch.empty(1, device=run.device)
    return {"kernel": resolve_backend(cfg.kernel, probe), "packing": cfg.packing,
            "max_tokens_per_microbatch": trainer.budget, "gradient_filtering": cfg.gradient_filtering,
            "generation_batch_size": cfg.generation_batch_size,
            "engine_calls_per_step": cfg.preemptive_sampling.engine_calls, "engine": run.engine.name,
            "generation_concurrency": getattr(run.engine, "max_batch_size", None),
            "compute_dtype": str(run.compute_dtype)}


def measure(arms=DEFAULT_ARMS, *, size: dict, seeds=(0, 1, 2), steps: int = 2, warmup: int = 1,
            evaluate: bool | None = None, factory=None, log_fn=print, after_seed=None,
            trl_seeds: int | None = None) -> dict:
    """Run every arm for `steps` optimizer steps per seed, steps interleaved across arms (TRL's arms
    only on the first `trl_seeds` seeds when given).

    The first `warmup` steps of each arm and seed train (and count for learning) but are not
    timed. `factory(arm, cfg, feed)` builds an ArmRun-like object (tests inject fakes);
    `after_seed(raw)` runs after each seed (run_suite writes the report so far). Returns the raw records: {"steps": [...], "evals": [...], "setup": [...]}."""
    if steps <= warmup:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}: nothing would be timed")
    unknown = [a for a in arms if a not in ARMS and a not in TRL_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS) + list(TRL_ARMS)}")
    evaluate = is_learning_task(size) if evaluate is None else evaluate
    factory = factory or (lambda arm, cfg, feed: ArmRun.build(cfg, feed))
    raw = {"steps": [], "evals": [], "setup": []}
    every = arms
    for k, seed in enumerate(seeds):
        arms = tuple(a for a in every if a not in TRL_ARMS or trl_seeds is None or k < trl_seeds)
        cfgs = {a: make_config(a, size, seed, max_steps=steps) for a in arms if a in ARMS}
        rows = rows_for(size, seed, steps * size["train_batch_size"] // size["num_generations"])
        runs = {}
        for arm in arms:
            runs[arm] = (TRLArm(arm, size, seed, steps, rows=rows) if arm in TRL_ARMS
                         else factory(arm, cfgs[arm], PromptFeed(rows)))
            raw["setup"].append({"arm": arm, "seed": seed, "setup_s": runs[arm].setup_s,
                                 "resolved": getattr(runs[arm], "resolved", None)})
        if evaluate:  # every arm starts from the same weights: one "before" number per seed
            raw["evals"].append({"arm": "before", "seed": seed, "accuracy": runs[arms[0]].evaluate()})
        for i in range(steps):
            order = list(arms[i % len(arms):]) + list(arms[: i % len(arms)])  # rotate who goes first
            for arm in order:
                rec = runs[arm].step()
                raw["steps"].append({"arm": arm, "seed": seed, "step": i, "timed": i >= warmup, **rec})
                log_fn(f"seed {seed} step {i} {arm:9s} {rec['wall_s']:7.2f}s reward {rec['reward'] or 0:.3f} "
                       f"kept {rec['kept_fraction'] if rec['kept_fraction'] is not None else float('nan'):.2f}")
        if evaluate:
            for arm in arms:
                raw["evals"].append({"arm": arm, "seed": seed, "accuracy": runs[arm].evaluate()})
        for r in runs.values():
            getattr(r, "close", lambda: None)()  # TRL workers exit
        del runs
        if after_seed is not None:
            after_seed(raw)
    return raw


def trl_skip(device: str, size: dict) -> str | None:
    """Why the TRL arms are left out of this size, or None when they run."""
    if device != "cpu":
        return "TRL arm is CPU-only here (its GPU run would need vLLM or minutes of HF generate); skipped"
    return trl_skip_reason()


def run_suite(size_name: str | None = None, *, seeds=None, steps: int | None = None, warmup: int = 1,
              arms=None, out_dir: Path | None = RESULTS, size_overrides: dict | None = None) -> dict:
    device = "gpu" if torch.cuda.is_available() else "cpu"
    size_name = size_name or default_size(device)
    if size_name == "gpu" and device != "gpu":
        raise ValueError("size 'gpu' needs CUDA; on CPU use 'paper', 'learning' or 'smoke'")
    shape = RUN_SHAPE[size_name]
    seeds = tuple(range(shape["seeds"])) if seeds is None else tuple(seeds)
    steps = steps or shape["steps"]
    size = {**SIZES[size_name], **(size_overrides or {})}
    skipped = trl_skip(device, size)
    arms = tuple(arms or DEFAULT_ARMS + (shape["trl"] if skipped is None else ()))

    def report_of(raw: dict) -> dict:
        done = sorted({r["seed"] for r in raw["steps"]})
        report = build_report(raw, device=device, size_name=size_name, size=size, seeds=done, steps=steps,
                              warmup=warmup, arm_configs={a: ARMS.get(a) or TRL_ARMS[a] for a in arms},
                              learning=is_learning_task(size),
                              trl_skipped=skipped if not set(TRL_ARMS) & set(arms) else None)
        if out_dir is not None:  # rewritten after every seed: a run cut short keeps its finished seeds
            report["outputs"] = {k: str(v) for k, v in write_outputs(report, out_dir).items()}
        return report

    report = report_of(measure(arms, size=size, seeds=seeds, steps=steps, warmup=warmup, after_seed=report_of,
                               trl_seeds=shape.get("trl_seeds")))
    print("\n" + format_table(report))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default=None, help="default: gpu with CUDA, else paper")
    ap.add_argument("--seeds", type=int, default=None, help=f"default per size: {RUN_SHAPE}")
    ap.add_argument("--steps", type=int, default=None, help="optimizer steps per arm and seed, warm-up included")
    ap.add_argument("--warmup", type=int, default=1, help="leading steps per arm and seed left untimed")
    ap.add_argument("--arms", default="", help=f"default: {','.join(DEFAULT_ARMS)} (+ {','.join(TRL_ARMS)} with trl)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_suite(args.size, seeds=range(args.seeds) if args.seeds else None, steps=args.steps, warmup=args.warmup,
              arms=tuple(a for a in args.arms.split(",") if a), out_dir=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
