"""Beyond DASH on CPU: pipelined generation against synchronous fastdash, and the old-log-prob pass
that `old_logprobs: sampler` removes from Multi / Mini.

    python benchmarks/bench_beyond.py [--steps 4] [--seeds 1] [--curve-steps 60]
    pytest benchmarks/bench_beyond.py -k beyond     # not part of the default benchmark run (~15 min)

Three measurements, arms run one after the other (never interleaved: the async arm's worker keeps
generating between its steps, so another arm timed meanwhile would share its cores):
  paper  the paper-shaped workload of harness.py (random Qwen2, 151,936 vocab, long-tailed forced
         lengths, synthetic reward): per-step wall time, samples/s, generate / backward split.
         sync:  fastdash, one process, num_threads=2 (both cores for generation and for backprop)
         async: fastdash + async_generation, max_staleness 1, tis; trainer 1 thread, worker 1 thread
  curve  the tiny task (`python -m fastdash.train`'s default model and task, shorter): held-out greedy
         accuracy against steps and against training seconds, sync (2 threads) vs async (1 + 1).
  oldlogp  the paper-shaped workload as Multi (K = 2) and Mini (64 generated, 32 per step), each with
         old_logprobs trainer (a no-grad forward over the kept samples) and sampler (the HF engine's
         own log-probs): the `logprob` phase is the step time saved, set against backward.
Results: benchmarks/results/beyond-<device>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

RESULTS = Path(__file__).resolve().parent / "results"
ASYNC = dict(async_generation=True, max_staleness=1, rollout_correction="tis", num_threads=1, async_engine_threads=1)
PAPER_ARMS = {"sync": dict(num_threads=2), "async": ASYNC}
OLDLOGP_ARMS = {f"{shape}-{src}": dict(extra, old_logprobs=src) for shape, extra in
                (("multi", dict(num_iterations=2)), ("mini", dict(generation_batch_size=64)))
                for src in ("trainer", "sampler")}
CURVE_ARMS = {"sync": ["num_threads=2"], "async": [f"{k}={str(v).lower()}" for k, v in ASYNC.items()]}


def paper_arm(arm: str, seed: int, steps: int, warmup: int = 1) -> dict:
    """`steps` optimizer steps of one arm on the paper-shaped workload; the first `warmup` untimed
    (the async worker's start-up and its first, unoverlapped rollout fall there)."""
    return _paper_steps(arm, PAPER_ARMS[arm], seed, steps, warmup)


def oldlogp_arm(arm: str, seed: int) -> dict:
    """One rollout's steps (2: K = 2, or 64 samples over 2 steps) of a Multi / Mini arm, all timed."""
    return _paper_steps(arm, OLDLOGP_ARMS[arm], seed, 2, 0)


def _paper_steps(arm: str, overrides: dict, seed: int, steps: int, warmup: int) -> dict:
    import harness
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer
    from workload import PromptFeed, rows_for

    size = harness.SIZES["paper"]
    cfg = harness.make_config("fastdash", size, seed, max_steps=steps, **overrides)
    rows = rows_for(size, seed, cfg.rollout_size * -(-steps // cfg.steps_per_generation) // size["num_generations"])
    run = build_run(cfg, with_plan=True)
    trainer = Trainer(cfg, run, prompt_source=PromptFeed(rows))
    timed = []
    try:
        for i in range(steps):
            t0 = time.perf_counter()
            m = trainer.step()
            if i >= warmup:
                timed.append({"wall_s": time.perf_counter() - t0, "samples": cfg.train_batch_size,
                              "generate_s": m.get("time/generate_s", 0.0), "backward_s": m.get("time/backward_s", 0.0),
                              "logprob_s": m.get("time/logprob_s", 0.0),
                              "worker_generate_s": m.get("async/worker_generate_s"),
                              "staleness": m["policy/staleness"], "reward": m["reward/mean"]})
    finally:
        trainer.close()
    wall = sum(r["wall_s"] for r in timed)
    return {"arm": arm, "seed": seed, "steps": timed, "wall_s": wall,
            "samples_per_s": sum(r["samples"] for r in timed) / wall}


def curve_arm(arm: str, seed: int, steps: int, eval_every: int, problems: int) -> dict:
    """A `python -m fastdash.train` run of the tiny task; its evals and timings."""
    with tempfile.TemporaryDirectory() as d:
        args = [sys.executable, "-m", "fastdash.train", f"output_dir={d}", f"max_steps={steps}", f"seed={seed}",
                f"eval_steps={eval_every}", f"num_eval_problems={problems}", "eval_sampled=false", "plots=false",
                *CURVE_ARMS[arm]]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"{arm} run failed:\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}")
        summary = json.loads((Path(d) / "summary.json").read_text())
        evals = [json.loads(x) for x in (Path(d) / "evals.jsonl").read_text().splitlines()]
        rows = [json.loads(x) for x in (Path(d) / "metrics.jsonl").read_text().splitlines()]
    train_at = [0.0]
    for r in rows:
        train_at.append(train_at[-1] + r["time/step_s"])
    return {"arm": arm, "seed": seed, "train_s": summary["time/train_s"], "samples": summary["samples"],
            "samples_per_s": summary["samples"] / summary["time/train_s"],
            "curve": [{"step": e["step"], "train_s": train_at[e["step"]], "accuracy": e["eval/accuracy_greedy"]}
                      for e in evals],
            "phases": {k[5:-2]: v for k, v in summary.items() if k.startswith("time/") and k.endswith("_s")}}


def run(steps: int = 4, seeds: int = 1, curve_steps: int = 60, eval_every: int = 20, problems: int = 200,
        out_dir: Path | None = RESULTS, log=print) -> dict:
    import torch

    device = "gpu" if torch.cuda.is_available() else "cpu"
    report = {"device": device, "date": date.today().isoformat(), "cpu_count": os.cpu_count(),
              "paper": [], "curve": [], "oldlogp": []}
    for seed in range(seeds):
        order = ("sync", "async") if seed % 2 == 0 else ("async", "sync")
        for arm in order:
            report["paper"].append(paper_arm(arm, seed, steps))
            log(f"paper seed {seed} {arm}: {report['paper'][-1]['wall_s']:.1f} s, "
                f"{report['paper'][-1]['samples_per_s']:.2f} samples/s")
        for arm in order:
            report["curve"].append(curve_arm(arm, seed, curve_steps, eval_every, problems))
            c = report["curve"][-1]
            log(f"curve seed {seed} {arm}: {c['train_s']:.1f} s, accuracy {[p['accuracy'] for p in c['curve']]}")
    for arm in OLDLOGP_ARMS:
        report["oldlogp"].append(oldlogp_arm(arm, 0))
        r = report["oldlogp"][-1]
        log(f"oldlogp {arm}: logprob {sum(x['logprob_s'] for x in r['steps']):.2f} s, "
            f"backward {sum(x['backward_s'] for x in r['steps']):.2f} s")
    report["summary"] = summarise(report)
    if out_dir is not None:
        write(report, out_dir)
    return report


def summarise(report: dict) -> dict:
    def med(rows, key):
        return statistics.median(r[key] for r in rows) if rows else None

    out = {}
    for part in ("paper", "curve"):
        for arm in ("sync", "async"):
            rows = [r for r in report[part] if r["arm"] == arm]
            out[f"{part}/{arm}/samples_per_s"] = med(rows, "samples_per_s")
        s, a = out[f"{part}/sync/samples_per_s"], out[f"{part}/async/samples_per_s"]
        out[f"{part}/async_speedup"] = a / s if s and a else None
    for arm in ("sync", "async"):
        finals = [r["curve"][-1]["accuracy"] for r in report["curve"] if r["arm"] == arm]
        out[f"curve/{arm}/final_accuracy"] = statistics.fmean(finals) if finals else None
    for r in report["oldlogp"]:
        for key in ("logprob_s", "backward_s", "wall_s"):
            out[f"oldlogp/{r['arm']}/{key}"] = sum(x[key] for x in r["steps"])
    return out


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"beyond-{report['device']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    s = report["summary"]
    lines = [f"# Async generation vs synchronous fastdash, {report['device']}, {report['date']}", "",
             f"{report['cpu_count']} CPU cores. sync: one process, 2 torch threads. async: async_generation, "
             "max_staleness 1, rollout_correction tis; trainer 1 thread + generation worker 1 thread.", "",
             "| measurement | sync samples/s | async samples/s | async / sync |", "|---|---|---|---|"]
    for part in ("paper", "curve"):
        fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
        lines.append(f"| {part} | {fmt(s[f'{part}/sync/samples_per_s'])} | {fmt(s[f'{part}/async/samples_per_s'])} "
                     f"| {fmt(s[f'{part}/async_speedup'])} |")
    lines += ["", "Paper-shaped steps (timed, after 1 warm-up step):", "",
              "| arm | seed | wall s | generate (wait) s | backward s | worker generate s | staleness |",
              "|---|---|---|---|---|---|---|"]
    for r in report["paper"]:
        for st in r["steps"]:
            w = st["worker_generate_s"]
            lines.append(f"| {r['arm']} | {r['seed']} | {st['wall_s']:.1f} | {st['generate_s']:.1f} | "
                         f"{st['backward_s']:.1f} | {'-' if w is None else f'{w:.1f}'} | {st['staleness']} |")
    lines += ["", "Multi (K = 2) / Mini (64 generated, 32 per step), one rollout = 2 steps, old_logprobs trainer vs "
              "sampler (paper-shaped workload, 2 threads):", "",
              "| arm | logprob s | backward s | wall s (2 steps) |", "|---|---|---|---|"]
    for r in report["oldlogp"]:
        cells = [f"{s['oldlogp/' + r['arm'] + '/' + k]:.2f}" for k in ("logprob_s", "backward_s", "wall_s")]
        lines.append(f"| {r['arm']} | " + " | ".join(cells) + " |")
    lines += ["", "Tiny task, held-out greedy accuracy (step: accuracy @ training seconds):", ""]
    for r in report["curve"]:
        pts = ", ".join(f"{p['step']}: {p['accuracy']:.3f} @ {p['train_s']:.0f} s" for p in r["curve"])
        lines.append(f"- {r['arm']} seed {r['seed']} ({r['samples_per_s']:.1f} samples/s): {pts}")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def test_beyond_dash(request, benchmark):
    """Selected only with `-k beyond` (about 15 minutes on 2 cores)."""
    import harness

    harness.run_when_asked(request, benchmark, "beyond", run, "the beyond-DASH benchmark")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--curve-steps", type=int, default=60)
    ap.add_argument("--eval-every", type=int, default=20)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--out", type=Path, default=RESULTS)
    a = ap.parse_args()
    print(json.dumps(run(a.steps, a.seeds, a.curve_steps, a.eval_every, a.problems, a.out)["summary"], indent=2))
