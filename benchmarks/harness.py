"""End-to-end benchmark: DASH vs baseline GRPO, interleaved, phases and learning side by side.

    python benchmarks/harness.py                 # CPU sizes (GPU sizes when CUDA is present)
    python benchmarks/harness.py --device gpu --steps 3 --seeds 1
    pytest benchmarks/ --benchmark-only          # the same measurement under pytest-benchmark

Arms are pure Config differences on one model, task, reward and seed (see ARMS). Every seed builds
one Run per arm from that seed; then steps are interleaved across arms (A B C D, B C D A, ...), so
slow phases of a shared, noisy machine hit every arm alike. Each arm's reduction against GRPO is
computed per seed from steps measured in this process, then summarised as median [min, max].
Nothing is downloaded: models are the shipped tiny one or random-weight presets.
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]  # checkout + trl_arm

import torch  # noqa: E402

from fastdash.config import Config, load_config  # noqa: E402
from fastdash.metrics import PHASES  # noqa: E402
from fastdash.models import SHIPPED  # noqa: E402
from trl_arm import TRL_ARMS, TRLArm, skip_reason as trl_skip_reason  # noqa: E402  (arm 5, TRL in a worker)

log = logging.getLogger("fastdash.bench")
RESULTS = Path(__file__).resolve().parent / "results"

# Arm name -> Config overrides. Baseline GRPO as TRL 0.17 / the paper: one engine call per
# backprop micro-batch of 8, padded micro-batches, full-logit loss, no filter.
ARMS: dict[str, dict] = {
    "grpo": dict(generation_batch_size="micro", packing=False, kernel="reference", gradient_filtering=False),
    "no_gf": dict(generation_batch_size="train", packing=False, kernel="reference", gradient_filtering=False),
    "dash": dict(generation_batch_size="train", packing=False, kernel="reference", gradient_filtering=True,
                 gradient_filtering_threshold=0.1),
    "fastdash": dict(generation_batch_size="train", packing=True, kernel="auto", max_tokens_per_microbatch="auto",
                     gradient_filtering=True, gradient_filtering_threshold=0.1),
}
DEFAULT_ARMS = tuple(ARMS)


def sizes(device: str) -> dict:
    """Shared Config overrides for the device's benchmark size (every arm gets exactly these)."""
    if device == "gpu":
        return dict(model="random:qwen2.5-0.5b", length_control_mean=600, max_completion_length=2048,
                    max_prompt_length=256, train_batch_size=256, micro_batch_size=8, num_generations=4,
                    num_eval_problems=100)
    common = dict(train_batch_size=256, micro_batch_size=8, num_generations=4, num_threads=1,
                  max_prompt_length=16, num_train_problems=20_000, num_eval_problems=200, eval_batch_size=200)
    if SHIPPED["tiny-arith"].is_dir():  # the learning task: natural lengths (4 digits + EOS)
        return dict(common, model="tiny-arith", max_completion_length=8, learning_rate=1e-4)
    # Until the shipped model exists: random weights, EOS forced at ~realistic scaled-down lengths.
    return dict(common, model="random:tiny", length_control_mean=16, max_completion_length=64)


def is_learning_task(size: dict) -> bool:
    return not str(size["model"]).startswith("random:")


def parity_reward(completion: str, answer: str, **row) -> float:
    """Random-weight models never solve the task, so every reward would be 0, every advantage 0 and
    gradient filtering would drop whole steps. This deterministic stand-in (parity of a hash of
    the text) gives realistic 0/1 variance within groups, so the filter keeps a realistic share."""
    return float(sum(map(ord, completion + answer)) % 2)


def make_config(arm: str, size: dict, seed: int, **extra) -> Config:
    """The arm's Config: shared sizes + the arm's overrides + seed. 'micro'/'train' resolve to sizes."""
    over = {**size, **{k: v for k, v in ARMS[arm].items()}, **extra, "seed": seed, "plots": False}
    gbs = over.pop("generation_batch_size")
    gbs = {"micro": over["micro_batch_size"], "train": over["train_batch_size"]}.get(gbs, gbs)
    cfg = load_config(None, {**over, "generation_batch_size": over["train_batch_size"]})
    # Work-around: Config.validate (config.py:139) unpacks `big, small = sorted(...)` the wrong way
    # round and rejects generation_batch_size < train_batch_size; check the real rule, then set it.
    if gbs % cfg.num_generations or cfg.train_batch_size % gbs:
        raise ValueError(f"arm {arm}: generation_batch_size={gbs} must be a multiple of num_generations "
                         f"and divide train_batch_size={cfg.train_batch_size}")
    cfg.generation_batch_size = gbs
    return cfg


_PLANS: dict = {}  # memory plans by the config fields plan_memory reads
_PLAN_KEYS = ("model", "dtype", "max_prompt_length", "max_completion_length", "train_batch_size",
              "generation_batch_size", "beta", "engine", "memory_budget", "max_tokens_per_microbatch",
              "attn_implementation", "num_threads")


def _resolved(cfg: Config, run) -> dict:
    """What the 'auto' knobs became for this arm, so the report says which features were on."""
    from fastdash_kernels.api import resolve_backend

    hidden = torch.empty(1, run.model.config.hidden_size, device=run.device, dtype=next(run.model.parameters()).dtype)
    return {"kernel": resolve_backend(cfg.kernel, hidden), "packing": cfg.packing,
            "max_tokens_per_microbatch": run.plan.max_tokens_per_microbatch if cfg.packing else None,
            "gradient_filtering": cfg.gradient_filtering, "generation_batch_size": cfg.generation_batch_size,
            "engine": getattr(run.engine, "name", "?")}


class ArmRun:
    """One arm's Run + Trainer for one seed, logging which prompts each step drew."""

    def __init__(self, cfg: Config, run, trainer, setup_s: float = 0.0):
        self.cfg, self.run, self.trainer, self.setup_s = cfg, run, trainer, setup_s
        self.prompts: list[int] = []  # prompt indices drawn during the current step
        take = self.trainer.sampler.take

        def logged_take(k):
            idx = take(k)
            self.prompts += idx
            return idx

        self.trainer.sampler.take = logged_take

    @classmethod
    def build(cls, cfg: Config, reward_fn=None) -> "ArmRun":
        from fastdash.rollout import make_engine
        from fastdash.runtime import build_run
        from fastdash.trainer import Trainer

        t0 = time.perf_counter()
        # Only packing consumes the memory plan. Its probes take minutes on a busy CPU and do not
        # depend on the seed, so later seeds reuse the first one's plan (same shapes, same budget).
        key = tuple(sorted((k, str(v)) for k, v in cfg.to_dict().items() if k in _PLAN_KEYS))
        cached = _PLANS.get(key) if cfg.packing else None
        run = build_run(cfg, with_plan=cfg.packing and cached is None)
        if cfg.packing:
            if cached is not None:
                run.plan = cached
                run.engine = make_engine(cfg, run.model, run.tokenizer, cached)  # as build_run would
            _PLANS[key] = run.plan
        if reward_fn is not None:
            run.reward_fn = reward_fn
        trainer = Trainer(cfg, run)
        arm = cls(cfg, run, trainer, time.perf_counter() - t0)
        arm.resolved = _resolved(cfg, run)
        return arm

    def step(self) -> dict:
        self.prompts = []
        t0 = time.perf_counter()
        m = self.trainer.step()
        wall = time.perf_counter() - t0
        n = len(self.prompts) * self.cfg.num_generations
        return {"wall_s": wall, "phases": {p: m.get(f"time/{p}_s", 0.0) for p in PHASES},
                "samples": n, "tokens": n * m.get("completion/mean_length", 0.0),
                "reward": m.get("reward/mean"), "kept_fraction": m.get("filter/kept_fraction"),
                "prompts": list(self.prompts), "optimizer_step": self.run.state.step}

    def evaluate(self) -> float:
        from fastdash.evaluate import accuracy

        return accuracy(self.run, greedy=True)


def measure(arms=DEFAULT_ARMS, *, size: dict, seeds=(0, 1, 2), steps: int = 3, warmup: int = 1,
            evaluate: bool | None = None, factory=None, log_fn=print) -> dict:
    """Run every arm for `steps` optimizer steps per seed, steps interleaved across arms.

    The first `warmup` steps of each arm and seed train (and count for learning) but are not
    timed. `factory(arm, cfg)` builds an ArmRun-like object (tests inject fakes).
    Returns the raw records: {"steps": [...], "evals": [...], "setup": [...]}."""
    if steps <= warmup:
        raise ValueError(f"steps={steps} must exceed warmup={warmup}: nothing would be timed")
    unknown = [a for a in arms if a not in ARMS and a not in TRL_ARMS]
    if unknown:
        raise ValueError(f"unknown arms {unknown}; choose from {list(ARMS) + list(TRL_ARMS)}")
    evaluate = is_learning_task(size) if evaluate is None else evaluate
    reward = None if is_learning_task(size) else parity_reward
    factory = factory or (lambda arm, cfg: ArmRun.build(cfg, reward))
    raw = {"steps": [], "evals": [], "setup": []}
    for seed in seeds:
        runs = {}
        for arm in arms:
            runs[arm] = TRLArm(arm, size, seed, steps) if arm in TRL_ARMS else factory(arm, make_config(arm, size, seed))
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
                       f"kept {rec['kept_fraction'] or 0:.2f}")
        if evaluate:
            for arm in arms:
                raw["evals"].append({"arm": arm, "seed": seed, "accuracy": runs[arm].evaluate()})
        for r in runs.values():
            getattr(r, "close", lambda: None)()  # TRL workers exit
        del runs
    return raw


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def summarise(raw: dict, arms=None) -> dict:
    """Per arm: per-seed totals over timed steps -> median [min, max]; reduction vs GRPO per seed."""
    arms = arms or list(dict.fromkeys(r["arm"] for r in raw["steps"]))
    seeds = sorted({r["seed"] for r in raw["steps"]})
    per = {a: {} for a in arms}  # arm -> seed -> totals
    for a in arms:
        for s in seeds:
            rows = [r for r in raw["steps"] if r["arm"] == a and r["seed"] == s and r["timed"]]
            allrows = [r for r in raw["steps"] if r["arm"] == a and r["seed"] == s]
            per[a][s] = {"total_s": sum(r["wall_s"] for r in rows),
                         "phases": {p: sum(r["phases"][p] for r in rows) for p in PHASES},
                         "samples": sum(r["samples"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
                         "samples_all": sum(r["samples"] for r in allrows),
                         "steps_all": len(allrows), "steps_timed": len(rows),
                         "reward_last": allrows[-1]["reward"] if allrows else None,
                         "reward_mean": statistics.fmean(r["reward"] for r in allrows) if allrows else None}
    out = {}
    for a in arms:
        t = per[a]
        arm = {"total_s": statistics.median(v["total_s"] for v in t.values()),
               "total_s_spread": _spread([v["total_s"] for v in t.values()]),
               "phases": {p: statistics.median(v["phases"][p] for v in t.values()) for p in PHASES},
               "samples": statistics.median(v["samples"] for v in t.values()),
               "samples_per_s": statistics.median(v["samples"] / v["total_s"] for v in t.values()),
               "tokens_per_s": statistics.median(v["tokens"] / v["total_s"] for v in t.values()),
               "optimizer_steps_per_seed": [v["steps_all"] for v in t.values()],
               "timed_steps_per_seed": [v["steps_timed"] for v in t.values()],
               "samples_trained_on_per_seed": [v["samples_all"] for v in t.values()],
               "setup_s_per_seed": [r["setup_s"] for r in raw.get("setup", []) if r["arm"] == a],
               "resolved": next((r.get("resolved") for r in raw.get("setup", []) if r["arm"] == a), None)}
        arm["phases"]["other"] = max(0.0, arm["total_s"] - sum(arm["phases"].values()))
        if "grpo" in per:  # paired: each seed's arm vs the GRPO run interleaved with it
            red = [100.0 * (1.0 - t[s]["total_s"] / per["grpo"][s]["total_s"]) for s in seeds]
            arm["reduction_vs_grpo"] = statistics.median(red)
            arm["reduction_vs_grpo_spread"] = _spread(red)
        if "fastdash" in per:  # paired too: how many times fastdash's time this arm takes (TRL goal >= 1.5)
            arm["x_fastdash_time"] = _spread([t[s]["total_s"] / per["fastdash"][s]["total_s"] for s in seeds])
        learn = {"train_reward_mean": _mean_std([v["reward_mean"] for v in t.values()]),
                 "train_reward_last": _mean_std([v["reward_last"] for v in t.values()])}
        accs = [e["accuracy"] for e in raw.get("evals", []) if e["arm"] == a]
        if accs:
            learn["heldout_accuracy"] = _mean_std(accs)
        arm["learning"] = learn
        out[a] = arm
    return out


def _mean_std(xs: list[float]) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "per_seed": xs}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: str) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    name = torch.cuda.get_device_name(0) if device == "gpu" else _cpu_name()
    return {"device": device, "device_name": name, "torch": torch.__version__, "triton": triton_v,
            "python": platform.python_version(), "threads": torch.get_num_threads(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def format_table(arms: dict) -> str:
    cols = ["arm", "total_s [min,max]", *PHASES, "other", "samples/s", "tokens/s", "vs GRPO % [min,max]",
            "x fastdash time [min,max]"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, a in arms.items():
        sp = a["total_s_spread"]
        red = (f"{a['reduction_vs_grpo']:.1f} [{a['reduction_vs_grpo_spread']['min']:.1f}, "
               f"{a['reduction_vs_grpo_spread']['max']:.1f}]") if "reduction_vs_grpo" in a else "-"
        x = a.get("x_fastdash_time")
        lines.append("| " + " | ".join([name, f"{a['total_s']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}]",
                                        *(f"{a['phases'][p]:.2f}" for p in (*PHASES, "other")),
                                        f"{a['samples_per_s']:.1f}", f"{a['tokens_per_s']:.0f}", red,
                                        f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]" if x else "-"]) + " |")
    learn = ["", "| arm | train reward (mean over steps) | held-out greedy accuracy |", "|---|---|---|"]
    for name, a in arms.items():
        r, acc = a["learning"].get("train_reward_mean", {}), a["learning"].get("heldout_accuracy")
        fmt = lambda d: f"{d['mean']:.3f} +- {d['std']:.3f} [{d['min']:.3f}, {d['max']:.3f}]" if d else "-"  # noqa: E731
        learn.append(f"| {name} | {fmt(r)} | {fmt(acc) if acc else 'not measured (no learning task)'} |")
    return "\n".join(lines + learn)


def plot(arms: dict, path: Path, title: str) -> Path:
    """Stacked bars of the median time per phase per arm (the paper's Figure 2 analogue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    names, bottom = list(arms), [0.0] * len(arms)
    for phase in (*PHASES, "other"):
        vals = [arms[n]["phases"][phase] for n in names]
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        if "reduction_vs_grpo" in arms[n] and n != "grpo":
            ax.text(i, bottom[i], f"-{arms[n]['reduction_vs_grpo']:.0f}%", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds (median over seeds, timed steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_report(raw: dict, *, device: str, size: dict, seeds, steps: int, warmup: int, arms) -> dict:
    summary = summarise(raw, list(arms))
    before = [e["accuracy"] for e in raw.get("evals", []) if e["arm"] == "before"]
    report = {**environment(device), "config": {"sizes": size, "arms": {a: ARMS.get(a) or TRL_ARMS[a] for a in arms},
                                                 "seeds": list(seeds), "steps_per_seed": steps, "warmup_steps": warmup,
                                                 "learning_task": is_learning_task(size),
                                                 "reward": None if is_learning_task(size) else "parity_reward (stand-in)"},
              "heldout_accuracy_before": _mean_std(before), "arms": summary, "trl": {"skipped": _trl_skip(device, size) if set(TRL_ARMS) - set(arms) else None}, "raw_steps": raw["steps"]}
    for rec in report["raw_steps"]:
        rec.pop("prompts", None)  # big and identical across arms; the harness tests check them
    return report


def write_outputs(report: dict, out_dir: Path = RESULTS) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"e2e-{report['device']}-{report['date'][:10]}"
    paths = {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    table = format_table(report["arms"])
    cfg = report["config"]
    paths["md"].write_text(f"# End-to-end benchmark, {report['device']} ({report['device_name']}), {report['date']}\n\n"
                           f"torch {report['torch']}, triton {report['triton']}, model {cfg['sizes']['model']}, "
                           f"seeds {cfg['seeds']}, {cfg['steps_per_seed']} steps per seed "
                           f"({cfg['warmup_steps']} untimed), times in seconds summed over timed steps, "
                           f"median [min, max] over seeds. Held-out greedy accuracy before training: "
                           f"{json.dumps(report.get('heldout_accuracy_before'))}\n\n{table}\n\n"
                           f"Resolved per arm: {json.dumps({a: v.get('resolved') for a, v in report['arms'].items()})}\n\n"
                           f"TRL: {report['trl']['skipped'] or TRL_NOTE}\n")
    plot(report["arms"], paths["png"], f"{cfg['sizes']['model']} on {report['device']}: time per arm by phase")
    return paths


TRL_NOTE = ("arms trl (gradient checkpointing on, TRL's default) and trl_no_gc: GRPOTrainer in a worker process "
            "(benchmarks/trl_arm.py), stepped in the same rotation as the other arms; phases timed by wrapping its "
            "methods. 'x fastdash time' = arm time / fastdash time, paired per seed.")
DEFAULT_STEPS = {"cpu": 8, "gpu": 3}


def _trl_skip(device: str, size: dict) -> str | None:
    if device != "cpu" or not is_learning_task(size):  # trl_arm builds the CPU learning task only
        return "TRL arm is wired for the CPU shipped-model task only; skipped"
    return trl_skip_reason()  # CPU: enough steps for the learning comparison; GPU: minutes


def run_suite(device: str | None = None, seeds=(0, 1, 2), steps: int | None = None, warmup: int = 1,
              arms=None, out_dir: Path | None = RESULTS, size_overrides: dict | None = None) -> dict:
    device = device or ("gpu" if torch.cuda.is_available() else "cpu")
    steps = steps or DEFAULT_STEPS[device]
    if device == "gpu" and not torch.cuda.is_available():
        raise ValueError("device=gpu but CUDA is not available")
    size = {**sizes(device), **(size_overrides or {})}
    arms = arms or DEFAULT_ARMS + (tuple(TRL_ARMS) if _trl_skip(device, size) is None else ())
    raw = measure(arms, size=size, seeds=seeds, steps=steps, warmup=warmup)
    report = build_report(raw, device=device, size=size, seeds=seeds, steps=steps, warmup=warmup, arms=arms)
    if out_dir is not None:
        report["outputs"] = {k: str(v) for k, v in write_outputs(report, out_dir).items()}
    print("\n" + format_table(report["arms"]))
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "gpu"], default=None, help="default: gpu when CUDA is present")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=None, help=f"optimizer steps per arm and seed {DEFAULT_STEPS}")
    ap.add_argument("--warmup", type=int, default=1, help="leading steps per arm and seed left untimed")
    ap.add_argument("--arms", default="", help=f"default: {','.join(DEFAULT_ARMS)} (+ {','.join(TRL_ARMS)} with trl)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    run_suite(args.device, seeds=tuple(range(args.seeds)), steps=args.steps, warmup=args.warmup,
              arms=tuple(a for a in args.arms.split(",") if a), out_dir=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
