"""The end-to-end benchmark's summary, targets, tables, plot and files (harness.py measures)."""
from __future__ import annotations

import json
import platform
import statistics
from datetime import datetime, timezone
from pathlib import Path

import torch

from devices import device_name
from fastdash.metrics import PHASES

# The goals (reported, never asserted): name -> (numerator arm, denominator arm, what, goal).
# Each is a time ratio paired per seed: numerator time / denominator time, higher = denominator faster.
TARGETS = {
    "backprop_vs_grpo": ("grpo", "fastdash", "backward", 2.0),
    "generation_grpo_over_one_call": ("grpo", "no_gf", "generate", 1.0),
    "fastdash_vs_dash": ("dash", "fastdash", "total", 1.5),
    "fastdash_vs_trl": ("trl_no_gc", "fastdash", "total", 2.0),
}


def _spread(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _mean_std(xs: list) -> dict:
    xs = [x for x in xs if x is not None]
    if not xs:
        return {}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0,
            "min": min(xs), "max": max(xs), "per_seed": xs}


def _per_seed(raw: dict, arm: str, seed: int) -> dict:
    rows = [r for r in raw["steps"] if r["arm"] == arm and r["seed"] == seed and r["timed"]]
    allrows = [r for r in raw["steps"] if r["arm"] == arm and r["seed"] == seed]
    pad, real = sum(r.get("padding_tokens") or 0 for r in rows), sum(r.get("real_tokens") or 0 for r in rows)
    kept = [r["kept_fraction"] for r in allrows if r.get("kept_fraction") is not None]
    return {"total_s": sum(r["wall_s"] for r in rows),
            "phases": {p: sum(r["phases"].get(p, 0.0) for r in rows) for p in PHASES},
            "samples": sum(r["samples"] for r in rows), "tokens": sum(r["tokens"] for r in rows),
            "samples_all": sum(r["samples"] for r in allrows), "steps_all": len(allrows), "steps_timed": len(rows),
            "padding_fraction": pad / (pad + real) if real else None,
            "kept_fraction": statistics.fmean(kept) if kept else None,
            "peak_mem_bytes": max((r.get("peak_mem_bytes") or 0 for r in allrows), default=0),
            "step_mem_bytes": max((r.get("step_mem_bytes") or 0 for r in allrows), default=0),
            "engine_calls": statistics.fmean(r.get("engine_calls") or 0 for r in allrows) if allrows else None,
            "reward_last": allrows[-1]["reward"] if allrows else None,
            "reward_mean": statistics.fmean(r["reward"] for r in allrows if r["reward"] is not None)
            if any(r["reward"] is not None for r in allrows) else None}


def _seeds_of(raw: dict, arm: str) -> list:
    return sorted({r["seed"] for r in raw["steps"] if r["arm"] == arm})


def _time(t: dict, what: str) -> float:
    return t["total_s"] if what == "total" else t["phases"][what]


def summarise(raw: dict, arms=None) -> dict:
    """Per arm: per-seed totals over timed steps -> median [min, max]; ratios paired per seed."""
    arms = arms or list(dict.fromkeys(r["arm"] for r in raw["steps"]))
    per = {a: {s: _per_seed(raw, a, s) for s in _seeds_of(raw, a)} for a in arms}  # an arm may skip seeds (TRL)
    out = {}
    for a in arms:
        t = per[a]
        med = lambda key: statistics.median(v[key] for v in t.values())  # noqa: E731
        opt = lambda key: statistics.median(xs) if (xs := [v[key] for v in t.values() if v[key] is not None]) else None  # noqa: E731
        arm = {"total_s": med("total_s"), "total_s_spread": _spread([v["total_s"] for v in t.values()]),
               "phases": {p: statistics.median(v["phases"][p] for v in t.values()) for p in PHASES},
               "samples": med("samples"),
               "samples_per_s": statistics.median(v["samples"] / v["total_s"] for v in t.values()),
               "tokens_per_s": statistics.median(v["tokens"] / v["total_s"] for v in t.values()),
               "padding_fraction": opt("padding_fraction"), "kept_fraction": opt("kept_fraction"),
               "peak_mem_bytes": max(v["peak_mem_bytes"] for v in t.values()),
               "step_mem_bytes": max(v["step_mem_bytes"] for v in t.values()),
               "engine_calls_per_step": opt("engine_calls"),
               "optimizer_steps_per_seed": [v["steps_all"] for v in t.values()],
               "timed_steps_per_seed": [v["steps_timed"] for v in t.values()],
               "samples_trained_on_per_seed": [v["samples_all"] for v in t.values()],
               "setup_s_per_seed": [r["setup_s"] for r in raw.get("setup", []) if r["arm"] == a],
               "resolved": next((r.get("resolved") for r in raw.get("setup", []) if r["arm"] == a), None)}
        arm["phases"]["other"] = max(0.0, arm["total_s"] - sum(arm["phases"].values()))
        if "grpo" in per:  # paired: each seed's arm vs the GRPO run interleaved with it
            red = [100.0 * (1.0 - t[s]["total_s"] / per["grpo"][s]["total_s"]) for s in t if s in per["grpo"]]
            arm["reduction_vs_grpo"], arm["reduction_vs_grpo_spread"] = statistics.median(red), _spread(red)
        if "fastdash" in per:  # paired too: how many times fastdash's time this arm takes
            arm["x_fastdash_time"] = _spread([t[s]["total_s"] / per["fastdash"][s]["total_s"]
                                              for s in t if s in per["fastdash"]])
        learn = {"train_reward_mean": _mean_std([v["reward_mean"] for v in t.values()]),
                 "train_reward_last": _mean_std([v["reward_last"] for v in t.values()])}
        accs = [e["accuracy"] for e in raw.get("evals", []) if e["arm"] == a]
        if accs:
            learn["heldout_accuracy"] = _mean_std(accs)
        arm["learning"] = learn
        out[a] = arm
    return out


def targets(raw: dict) -> dict:
    """Each goal's paired per-seed ratio (median [min, max]) where both arms ran, else why not."""
    arms = {r["arm"] for r in raw["steps"]}
    out = {}
    for name, (num, den, what, goal) in TARGETS.items():
        if not {num, den} <= arms:
            out[name] = {"goal": goal, "measured": None, "note": f"needs arms {num} and {den}"}
            continue
        ratios = []
        for s in sorted(set(_seeds_of(raw, num)) & set(_seeds_of(raw, den))):  # seeds where both ran
            a, b = _time(_per_seed(raw, num, s), what), _time(_per_seed(raw, den, s), what)
            if b > 0:
                ratios.append(a / b)
        sp = _spread(ratios) if ratios else None
        out[name] = {"goal": goal, "measured": sp, "met": bool(sp and sp["median"] >= goal),
                     "what": f"{num} {what} time / {den} {what} time"}
    return out


def environment(device: str) -> dict:
    try:
        import triton

        triton_v = triton.__version__
    except ImportError:
        triton_v = None
    import transformers

    return {"device": device, "device_name": device_name(device), "torch": torch.__version__, "triton": triton_v,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu_count": __import__("os").cpu_count(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def build_report(raw: dict, *, device: str, size_name: str, size: dict, seeds, steps: int, warmup: int,
                 arm_configs: dict, learning: bool, trl_skipped: str | None = None) -> dict:
    """`arm_configs`: arm -> its overrides (recorded as is); `learning`: the arithmetic task (accuracy)."""
    summary = summarise(raw, list(arm_configs))
    before = [e["accuracy"] for e in raw.get("evals", []) if e["arm"] == "before"]
    cfg = {"size_name": size_name, "sizes": size, "arms": arm_configs,
           "seeds": list(seeds), "steps_per_seed": steps, "warmup_steps": warmup, "learning_task": learning,
           "reward": None if learning else f"fastdash.rewards.synthetic (mixed-group fraction {size.get('mixed_fraction')})"}
    steps_out = [{k: v for k, v in r.items() if k != "prompts"} for r in raw["steps"]]  # prompts: big, equal
    return {**environment(device), "config": cfg, "heldout_accuracy_before": _mean_std(before), "arms": summary,
            "targets": targets(raw), "trl": {"skipped": trl_skipped}, "raw_steps": steps_out}


def _fmt_opt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(report: dict) -> str:
    arms = report["arms"]
    cols = ["arm", "total_s [min,max]", *PHASES, "other", "samples/s", "tokens/s", "kept", "padding",
            "step peak MiB", "vs GRPO % [min,max]", "x fastdash time"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for name, a in arms.items():
        sp = a["total_s_spread"]
        red = (f"{a['reduction_vs_grpo']:.1f} [{a['reduction_vs_grpo_spread']['min']:.1f}, "
               f"{a['reduction_vs_grpo_spread']['max']:.1f}]") if "reduction_vs_grpo" in a else "-"
        x = a.get("x_fastdash_time")
        lines.append("| " + " | ".join([name, f"{a['total_s']:.2f} [{sp['min']:.2f}, {sp['max']:.2f}]",
                                        *(f"{a['phases'][p]:.2f}" for p in (*PHASES, "other")),
                                        f"{a['samples_per_s']:.2f}", f"{a['tokens_per_s']:.0f}",
                                        _fmt_opt(a["kept_fraction"], ".2f"), _fmt_opt(a["padding_fraction"], ".1%"),
                                        f"{a['step_mem_bytes'] / 2**20:.0f}", red,
                                        f"{x['median']:.2f} [{x['min']:.2f}, {x['max']:.2f}]" if x else "-"]) + " |")
    tgt = ["", "| target | goal | measured (median [min, max] over seeds) | met |", "|---|---|---|---|"]
    for name, t in report.get("targets", {}).items():
        m = t["measured"]
        got = f"{m['median']:.2f}x [{m['min']:.2f}, {m['max']:.2f}] ({t['what']})" if m else t.get("note", "-")
        tgt.append(f"| {name} | >= {t['goal']}x | {got} | {'yes' if t.get('met') else 'no' if m else '-'} |")
    learn = ["", "| arm | train reward (mean over steps) | held-out greedy accuracy |", "|---|---|---|"]
    for name, a in arms.items():
        r, acc = a["learning"].get("train_reward_mean", {}), a["learning"].get("heldout_accuracy")
        fmt = lambda d: f"{d['mean']:.3f} +- {d['std']:.3f} [{d['min']:.3f}, {d['max']:.3f}]" if d else "-"  # noqa: E731
        learn.append(f"| {name} | {fmt(r)} | {fmt(acc) if acc else 'not measured (synthetic reward)'} |")
    return "\n".join(lines + tgt + learn)


def plot(arms: dict, path: Path, title: str) -> Path:
    """Stacked bars of the median time per phase per arm (the paper's Figure 2 analogue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4))
    names, bottom = list(arms), [0.0] * len(arms)
    for phase in (*PHASES, "other"):
        vals = [arms[n]["phases"][phase] for n in names]
        ax.bar(names, vals, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, vals)]
    for i, n in enumerate(names):
        if "reduction_vs_grpo" in arms[n] and n != "grpo":
            ax.text(i, bottom[i], f"{-arms[n]['reduction_vs_grpo']:+.0f}%", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("seconds (median over seeds, timed steps)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(report: dict, out_dir: Path) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = report["config"]
    stem = f"e2e-{cfg['size_name']}-{report['device']}-{report['date'][:10]}"
    paths = {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png", "md": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    trl = report["trl"]["skipped"]
    fewer = {a: len(v["timed_steps_per_seed"]) for a, v in report["arms"].items()
             if len(v["timed_steps_per_seed"]) < len(cfg["seeds"])}
    trl = trl or TRL_NOTE + "".join(f" {a} ran on the first {n} seed(s) only (its ratios are paired on those)."
                                    for a, n in fewer.items())
    paths["md"].write_text(
        f"# End-to-end benchmark '{cfg['size_name']}', {report['device']} ({report['device_name']}), "
        f"{report['date']}\n\n"
        f"torch {report['torch']}, transformers {report['transformers']}, triton {report['triton']}, "
        f"{report['threads']} threads on {report['cpu_count']} cores, model {cfg['sizes']['model']}, "
        f"seeds {cfg['seeds']}, {cfg['steps_per_seed']} steps per seed ({cfg['warmup_steps']} untimed). "
        f"Times in seconds summed over timed steps, median [min, max] over seeds; ratios paired per seed. "
        f"Reward: {cfg['reward'] or 'arithmetic (learning task)'}. Held-out greedy accuracy before training: "
        f"{json.dumps(report.get('heldout_accuracy_before'))}\n\n"
        f"Sizes: `{json.dumps(cfg['sizes'])}`\n\n{format_table(report)}\n\n"
        f"Resolved per arm: `{json.dumps({a: v.get('resolved') for a, v in report['arms'].items()})}`\n\n"
        f"TRL: {trl}\n")
    plot(report["arms"], paths["png"], f"{cfg['size_name']}: {cfg['sizes']['model']} on {report['device']}, "
                                       "time per arm by phase")
    return paths


TRL_NOTE = ("GRPOTrainer in a worker process (benchmarks/trl_arm.py), fed the same prompt rows, forced "
            "lengths and reward, stepped in the same rotation as the other arms; phases timed by wrapping its "
            "methods. 'x fastdash time' = arm time / fastdash time, paired per seed.")
