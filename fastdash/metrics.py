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
        if path.exists():  # a resumed run: drop lines past the checkpoint so no step appears twice
            kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= start_step]
            path.write_text("".join(ln + "\n" for ln in kept))
        self.rows: list[dict] = [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def write(self, row: dict) -> None:
        row = {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
        self.rows.append(row)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")


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
        for key, style in (("eval/accuracy_greedy", "o-"), ("eval/accuracy_sampled", "s--")):
            pts = [(e["step"], e[key]) for e in evals if key in e]
            if pts:
                ax.plot(*zip(*pts), style, label=key.split("/")[1].replace("_", " "))
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
