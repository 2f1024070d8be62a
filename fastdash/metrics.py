"""Phase timers, the metrics.jsonl log, the summary and the run's plots."""
from __future__ import annotations

import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch

PHASES = ("generate", "reward", "logprob", "backward", "optimizer", "sync")


class PhaseTimer:
    """Wall-clock seconds per phase. On CUDA the device is synchronised before each clock read,
    otherwise asynchronous kernels would be billed to whichever phase syncs next."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.step = defaultdict(float)
        self.total = defaultdict(float)

    @contextmanager
    def __call__(self, phase: str):
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            self.step[phase] += dt
            self.total[phase] += dt

    def pop_step(self) -> dict:
        out = {f"time/{p}_s": self.step.get(p, 0.0) for p in PHASES}
        self.step = defaultdict(float)
        return out


class MetricsLog:
    """One JSON object per optimizer step in `metrics.jsonl`; appends, so a resume continues it."""

    def __init__(self, path: Path, start_step: int = 0):
        self.path = path
        trim_jsonl(path, start_step)
        self.rows: list[dict] = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def write(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


def trim_jsonl(path: Path, start_step: int) -> None:
    """A resumed run: drop the lines past the checkpoint's step, so no step appears twice."""
    if path.exists():
        kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
        path.write_text("".join(ln + "\n" for ln in kept))


def _eval_curves(evals: list[dict]) -> list[tuple[str, str, str]]:
    """(key, line style, label) of the held-out curves: greedy accuracy, then pass@1 and pass@k, or the
    sampled accuracy of an evals.jsonl written before pass@k existed."""
    ks = sorted({int(key.split("@")[1]) for e in evals for key in e if key.startswith("eval/pass@")})
    curves = [("eval/accuracy_greedy", "o-", "held-out greedy accuracy")]
    curves += [(f"eval/pass@{k}", "s--" if k == 1 else "^:", f"held-out pass@{k}") for k in ks]
    if not ks:
        curves.append(("eval/accuracy_sampled", "s--", "held-out sampled accuracy"))
    return curves


def plot_run(rows: list[dict], evals: list[dict], out_dir: Path) -> list[Path]:
    """reward.png (reward and held-out accuracy over steps) and time.png (time split by phase)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if rows:
        fig, ax = plt.subplots(figsize=(7, 4))
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r.get("reward/mean") for r in rows], label="train reward (mean)")
        for key, style, label in _eval_curves(evals):
            pts = [(e["step"], e[key]) for e in evals if e.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts), style, label=label)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("reward / accuracy")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out_dir / "reward.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "reward.png")

        fig, ax = plt.subplots(figsize=(7, 4))
        bottom = [0.0] * len(rows)
        for phase in PHASES:
            vals = [r.get(f"time/{phase}_s", 0.0) for r in rows]
            ax.bar(steps, vals, bottom=bottom, label=phase)
            bottom = [b + v for b, v in zip(bottom, vals)]
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("seconds")
        ax.set_title("time per step, by phase")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / "time.png", dpi=110)
        plt.close(fig)
        written.append(out_dir / "time.png")
    return written


def inference_mismatch(trainer_logps: list[torch.Tensor], sampler_logps: list[list[float]]) -> dict:
    """Train/inference mismatch on the step's tokens: |logp_trainer - logp_sampler| mean and max, and
    the k3 estimate of KL(sampler || trainer) = E[exp(d) - 1 - d], d = logp_trainer - logp_sampler.

    One entry per sample, same token count on both sides; samples whose sampler log-probs are None
    (an engine that gives none) are skipped. A sync that silently failed shows up as a jump here.
    """
    if len(trainer_logps) != len(sampler_logps):
        raise ValueError(f"inference_mismatch: {len(trainer_logps)} trainer samples vs "
                         f"{len(sampler_logps)} sampler samples")
    diffs = []
    for i, (t, s) in enumerate(zip(trainer_logps, sampler_logps)):
        if s is None:
            continue
        t = torch.as_tensor(t, dtype=torch.float64).detach().cpu().reshape(-1)
        if t.numel() != len(s):
            raise ValueError(f"inference_mismatch: sample {i} has {t.numel()} trainer log-probs and "
                             f"{len(s)} sampler log-probs")
        diffs.append(t - torch.tensor(s, dtype=torch.float64))
    d = torch.cat(diffs) if diffs else torch.zeros(0, dtype=torch.float64)
    if d.numel() == 0:
        return {"mismatch/tokens": 0}
    return {"mismatch/logp_abs_mean": float(d.abs().mean()), "mismatch/logp_abs_max": float(d.abs().max()),
            "mismatch/k3_kl": float((torch.expm1(d) - d).mean()), "mismatch/tokens": int(d.numel())}


def global_batch_stats(samples: tuple) -> dict:
    """Reward and length statistics of the samples one optimizer step covers, on every rank."""
    from fastdash import distributed

    rows = [(s.reward, len(s.completion_ids), s.truncated) for s in samples]
    if distributed.world_size() > 1:
        rows = [r for part in distributed.all_gather_objects(rows) for r in part]
    return batch_stats(rows)


def batch_stats(rows: list[tuple[float, int, bool]]) -> dict:
    """Mean / std reward, mean length and truncated fraction of (reward, completion length, truncated) rows."""
    rewards = torch.tensor([r for r, _, _ in rows])
    lengths = [n for _, n, _ in rows]
    truncated = [t for _, _, t in rows]
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()) if len(rows) > 1 else 0.0,
            "completion/mean_length": sum(lengths) / len(rows),
            "completion/truncated_fraction": sum(truncated) / len(rows)}
