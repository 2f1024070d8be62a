"""Experiment tracking: `report_to` trackers (TensorBoard, trackio, wandb) and the completions table.

Offline by default: TensorBoard event files under `<run>/tensorboard`, trackio's local store (its
`TRACKIO_DIR`, default `~/.cache/huggingface/trackio`), wandb in offline mode under `<run>/wandb`
unless the user configured it (WANDB_MODE or WANDB_API_KEY set). Every `logging_steps` optimizer
steps the step's metrics.jsonl row goes to each tracker unchanged, under the same names
(`reward/mean`, `time/generate_s`, ...); with `log_completions` the step's sampled completions go to
the trackers, to `<run>/completions.jsonl` and to the console (with tools, completions.jsonl rows also
carry `messages`: the transcript with its tool calls and outputs). Only rank 0 tracks.

The trackers are optional extras (`pip install 'fastdash[tensorboard]'`); a missing one is an error
at the start of the run, before the model loads. Docs: docs/tracking.md.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
from pathlib import Path

from fastdash.metrics import trim_jsonl

log = logging.getLogger("fastdash")

TRACKERS = {"tensorboard": "tensorboard", "trackio": "trackio", "wandb": "wandb"}  # name -> module it needs
COMPLETION_COLUMNS = ("step", "prompt", "completion", "reward", "advantage")


def report_to_list(value) -> list[str]:
    """HF's convention for `report_to`: none, one tracker, a list (or comma-separated), or all (the
    installed ones). ValueError naming the key otherwise."""
    names = value if isinstance(value, (list, tuple)) else str(value).split(",")
    names = [str(n).strip() for n in names if str(n).strip()]
    if names in ([], ["none"]):
        return []
    if names == ["all"]:
        return [n for n in TRACKERS if _installed(n)]
    unknown = [n for n in names if n not in TRACKERS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"config: report_to={value!r}: expected none, all, or some of {list(TRACKERS)} "
                         "(a list, or comma-separated), each once")
    return names


def _installed(name: str) -> bool:
    return importlib.util.find_spec(TRACKERS[name]) is not None


def require_trackers(value) -> None:
    """A clear error at the start of the run, naming the extra, for each tracker that is not installed."""
    missing = [n for n in report_to_list(value) if not _installed(n)]
    if missing:
        raise ValueError(f"config: report_to={value!r}: {', '.join(missing)} is not installed; "
                         f"pip install 'fastdash[{','.join(missing)}]' (or set report_to=none)")


def scalars(row: dict) -> dict:
    """The row's finite numbers but its step: what a tracker can plot."""
    return {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


# ---------------------------------------------------------------- the trackers ---------------------
class TensorBoard:
    """Event files under `<run>/tensorboard`. A resumed run purges the events past its checkpoint,
    as metrics.jsonl drops its lines past it."""

    def __init__(self, cfg, out: Path, name: str, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start_step + 1 if start_step else None)
        if not start_step:
            self.writer.add_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2, default=str) + "\n```", 0)

    def log(self, metrics: dict, step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.writer.add_text(name, markdown_table(rows), step)

    def close(self) -> None:
        self.writer.close()


class Trackio:
    """trackio's local store (remote only where the user set TRACKIO_SPACE_ID / TRACKIO_SERVER_URL);
    project TRACKIO_PROJECT or `fastdash`. A resumed run continues its trackio run of the same name."""

    def __init__(self, cfg, out: Path, name: str, start_step: int):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project=os.environ.get("TRACKIO_PROJECT", "fastdash"), name=name,
                                config=cfg.to_dict(), resume="allow" if start_step else "never")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.run.log({name: self.trackio.Table(columns=list(COMPLETION_COLUMNS), data=_cells(rows))}, step=step)

    def close(self) -> None:
        self.trackio.finish()  # the module's: also forgets the current run, so its atexit hook does not finish it again


class Wandb:
    """wandb under `<run>/wandb`, offline unless WANDB_MODE or WANDB_API_KEY says otherwise (no network
    is assumed); project WANDB_PROJECT or `fastdash`. `wandb sync <run>/wandb/offline-run-*` uploads."""

    def __init__(self, cfg, out: Path, name: str, start_step: int):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "fastdash"), name=name, dir=str(out),
                              config=cfg.to_dict(), **wandb_mode(os.environ))

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def log_table(self, name: str, rows: list[dict], step: int) -> None:
        self.run.log({name: self.wandb.Table(columns=list(COMPLETION_COLUMNS), data=_cells(rows))}, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_mode(env) -> dict:
    """Offline, unless the user configured wandb (WANDB_MODE, or an API key in the environment)."""
    return {} if "WANDB_MODE" in env or "WANDB_API_KEY" in env else {"mode": "offline"}


OPEN = {"tensorboard": TensorBoard, "trackio": Trackio, "wandb": Wandb}


# ---------------------------------------------------------------- the run's tracking ---------------
class Tracking:
    """What the training loop calls: `log_step` after each step, `log_eval` after each evaluation,
    `close` at the end (or on an error: TensorBoard buffers events for up to two minutes)."""

    def __init__(self, cfg, out: Path, start_step: int = 0, enabled: bool = True):
        self.cfg, self.trackers, self.completions = cfg, [], None
        if not enabled:  # ranks other than 0
            return
        name = cfg.run_name or out.resolve().name
        self.trackers = [OPEN[n](cfg, out, name, start_step) for n in report_to_list(cfg.report_to)]
        if cfg.log_completions:
            self.completions = out / "completions.jsonl"
            trim_jsonl(self.completions, start_step)  # a resumed run: no step twice

    def log_step(self, row: dict, samples=(), decode=None) -> None:
        """The step's row to every tracker, and its sampled completions, on logging steps."""
        step = row["step"]
        if step % self.cfg.logging_steps:
            return
        metrics = scalars(row)
        for t in self.trackers:
            t.log(metrics, step)
        if self.completions is not None and samples:
            self._log_completions(completion_rows(step, samples, decode, self.cfg.num_completions_to_print))

    def log_eval(self, row: dict) -> None:
        for t in self.trackers:
            t.log(scalars(row), row["step"])

    def _log_completions(self, rows: list[dict]) -> None:
        with self.completions.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
        for t in self.trackers:
            t.log_table("completions", rows, rows[0]["step"])
        print_completions(rows)

    def close(self) -> None:
        trackers, self.trackers = self.trackers, []  # once, even when called again on the error path
        for t in trackers:
            try:
                t.close()
            except Exception:  # noqa: BLE001 - one tracker failing to flush must not hide the others
                log.exception("closing the %s tracker failed", type(t).__name__)


# ---------------------------------------------------------------- the completions table -----------
def completion_rows(step: int, samples, decode, k: int | None) -> list[dict]:
    """k samples of the step (all when k is None), spread evenly over it so several prompts show."""
    n = len(samples)
    picked = range(n) if k is None or k >= n else sorted({i * n // k for i in range(k)})
    rows = [{"step": step, "prompt": decode(samples[i].prompt_ids), "completion": decode(samples[i].completion_ids),
             "reward": samples[i].reward, "advantage": samples[i].advantage} for i in picked]
    for r, i in zip(rows, picked):  # tools: the transcript with its calls and outputs (completions.jsonl only)
        if getattr(samples[i], "messages", None) is not None:
            r["messages"] = samples[i].messages
    return rows


def _cells(rows: list[dict]) -> list[list]:
    return [[r[c] for c in COMPLETION_COLUMNS] for r in rows]


def markdown_table(rows: list[dict]) -> str:
    """For TensorBoard's text tab: pipes escaped, newlines as <br>."""
    def cell(v):
        text = f"{v:.4g}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", "<br>")

    lines = ["| " + " | ".join(COMPLETION_COLUMNS) + " |", "|" + "---|" * len(COMPLETION_COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(cell(r[c]) for c in COMPLETION_COLUMNS) + " |" for r in rows])


def print_completions(rows: list[dict]) -> None:
    """A rich table on the console (rich comes with transformers); plain lines if it is missing."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        for r in rows:
            print(" | ".join(f"{c}={r[c]!r}" for c in COMPLETION_COLUMNS))
        return
    table = Table(title=f"completions, step {rows[0]['step']}", show_lines=True)
    for c in COMPLETION_COLUMNS[1:]:
        table.add_column(c, justify="right" if c in ("reward", "advantage") else "left")
    for r in rows:
        table.add_row(r["prompt"], r["completion"], f"{r['reward']:.3f}", f"{r['advantage']:.3f}")
    Console().print(table)
