"""The loss family on the tiny task (docs/losses.md): does each option still learn?

    python benchmarks/bench_losses.py [--steps 40] [--arms cispo,sapo]
    pytest benchmarks/bench_losses.py -k losses     # not part of the default benchmark run (~10 min, 2 cores)

Each arm is `python -m fastdash.train`'s default run (shipped tiny-arith model, built-in addition task),
shortened to `--steps` steps of 128 samples, with one option of docs/losses.md switched on; the options
that only act off-policy (delta, the off-policy mask, the bias-corrected KL) run as Multi (K = 2) so that
the ratio moves away from 1. Reported: held-out greedy accuracy before / after on 300 problems, and the
step metrics that show the option acting (clip and mask fractions, entropy).
Results: benchmarks/results/losses-<device>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
RESULTS = Path(__file__).resolve().parent / "results"

MULTI = dict(num_iterations=2)
ARMS = {
    "dr_grpo (default)": {},
    "cispo": dict(loss_type="cispo", epsilon_high=5.0),
    "sapo": dict(loss_type="sapo"),
    "gspo": dict(loss_type="grpo", importance_sampling_level="sequence"),
    "top_entropy 0.2": dict(top_entropy_quantile=0.2),
    "delta 1.5, K=2": dict(delta=1.5, **MULTI),
    "off_policy_mask 1e-3, K=2": dict(off_policy_mask_threshold=1e-3, **MULTI),
    "bias-corrected KL, K=2": dict(beta=0.04, use_bias_correction_kl=True, **MULTI),
}
SHOWN = ("clip/low_fraction", "clip/high_fraction", "clip/delta_fraction", "mask/entropy_masked_fraction",
         "mask/off_policy_masked_fraction", "entropy/mean")


def run_arm(name: str, steps: int, seed: int = 42) -> dict:
    import torch

    from fastdash.config import Config
    from fastdash.train import run_training

    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as d:
        cfg = Config(output_dir=d, max_steps=steps, train_batch_size=128, generation_batch_size=128,
                     num_eval_problems=300, eval_steps=0, eval_sampled=False, plots=False, seed=seed, **ARMS[name])
        t0 = time.perf_counter()
        summary = run_training(cfg, Path(d))
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    means = {k: statistics.fmean(r[k] for r in rows if r.get(k) is not None)
             for k in SHOWN if any(r.get(k) is not None for r in rows)}
    return {"arm": name, "overrides": ARMS[name], "steps": steps, "wall_s": time.perf_counter() - t0,
            "before": summary["eval/accuracy_before"], "after": summary["eval/accuracy_after"], "step_means": means}


def run(steps: int = 40, arms: list[str] | None = None) -> dict:
    results = [run_arm(a, steps) for a in (arms or list(ARMS))]
    report = {"device": "cpu", "date": date.today().isoformat(), "cpu": platform.processor() or platform.machine(),
              "results": results,
              "summary": {f"{r['arm']}/gain": r["after"] - r["before"] for r in results}}
    write(report, RESULTS)
    return report


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"losses-{report['device']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    lines = [f"# The loss family on the tiny task, {report['device']} ({report['cpu']}), {report['date']}", "",
             "Held-out greedy accuracy (300 problems) before / after; step means of the option's metrics.", "",
             "| arm | steps | before | after | gain | metrics (step means) | wall s |", "|---|---|---|---|---|---|---|"]
    for r in report["results"]:
        shown = ", ".join(f"{k} {v:.3g}" for k, v in r["step_means"].items())
        lines.append(f"| {r['arm']} | {r['steps']} | {r['before']:.3f} | {r['after']:.3f} | "
                     f"{r['after'] - r['before']:+.3f} | {shown} | {r['wall_s']:.0f} |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def test_losses(request, benchmark):
    """Selected only with `-k losses` (about 10 minutes on 2 cores)."""
    import harness

    harness.run_when_asked(request, benchmark, "losses", run, "the loss-family learning check")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--arms", default=None, help="comma-separated arm names (default: all)")
    args = ap.parse_args()
    rep = run(args.steps, args.arms.split(",") if args.arms else None)
    print((RESULTS / f"losses-{rep['device']}-{rep['date']}.md").read_text())
