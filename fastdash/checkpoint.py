"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoint-<step>/` holding the model (safetensors, loadable with
`from_pretrained`), the tokenizer, and `trainer_state.pt`: optimizer and LR-scheduler state, the
`TrainState` (step, data position, counters), RNG states and any rollout samples not yet trained on
(Mini / Multi reuse a rollout across steps). It is written under a temporary name and renamed into
place only once complete (with a `COMPLETE` marker inside), so a kill during a save never leaves a
half checkpoint that looks whole.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fastdash.config import save_config

log = logging.getLogger("fastdash")
MARKER = "COMPLETE"
# Changing any of these between a checkpoint and its resume would change what the run computes.
MUST_MATCH = ("model", "task", "dataset", "num_generations", "generation_batch_size", "train_batch_size",
              "num_iterations", "loss_type", "seed", "shuffle", "num_train_problems", "max_completion_length")


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomically(final: Path, write) -> Path:
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write(tmp)
    for f in tmp.iterdir():  # data on disk before the rename makes it visible
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    (tmp / MARKER).write_text("ok\n")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def save_checkpoint(cfg, run, trainer, out: Path) -> Path:
    step = run.state.step

    def write(d: Path):
        run.model.save_pretrained(d, safe_serialization=True)
        run.tokenizer.save_pretrained(d)
        save_config(cfg, d / "config.yaml")
        torch.save({"optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_scheduler.state_dict(),
                    "state": dataclasses.asdict(run.state), "rng": _rng_state(), "buffer": trainer.buffer,
                    "budget": trainer.budget, "config": cfg.to_dict()}, d / "trainer_state.pt")

    path = _write_atomically(out / f"checkpoint-{step}", write)
    log.info("saved checkpoint %s", path)
    _prune(out, cfg.save_total_limit)
    return path


def save_final(cfg, run, trainer, out: Path) -> Path:
    """The final model (loadable with from_pretrained) plus a full checkpoint of the last step."""
    save_checkpoint(cfg, run, trainer, out)

    def write(d: Path):
        run.model.save_pretrained(d, safe_serialization=True)
        run.tokenizer.save_pretrained(d)

    return _write_atomically(out / "final", write)


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (no marker) are ignored."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / MARKER).exists()
             and p.name.split("-", 1)[1].isdigit()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _prune(out: Path, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    for old in list_checkpoints(out)[:-limit]:
        shutil.rmtree(old, ignore_errors=True)


def resume_if_asked(cfg, run, trainer, out: Path) -> Path | None:
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        found = list_checkpoints(out)
        if not found:
            log.info("resume=auto: no complete checkpoint in %s; starting from scratch", out)
            return None
        path = found[-1]
    else:
        path = Path(cfg.resume)
        if not (path / MARKER).exists():
            raise ValueError(f"resume={cfg.resume!r} is not a complete fastdash checkpoint "
                             f"(no {MARKER} marker; it may be half-written); pass another or resume=auto")
    load_checkpoint(cfg, run, trainer, path)
    return path


def load_checkpoint(cfg, run, trainer, path: Path) -> None:
    try:
        blob = torch.load(path / "trainer_state.pt", weights_only=False)
        weights = load_file(path / "model.safetensors")
    except Exception as e:  # noqa: BLE001 - any unreadable file means an unusable checkpoint
        raise ValueError(f"checkpoint {path} cannot be read ({type(e).__name__}: {e}); delete it or pass "
                         "another resume=PATH") from e
    saved = blob["config"]
    diff = {k: (saved.get(k), getattr(cfg, k)) for k in MUST_MATCH if saved.get(k) != getattr(cfg, k)}
    if diff:
        raise ValueError(f"checkpoint {path} was made with a different config: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                         + "; resume with the checkpoint's values or start a new output_dir")
    missing, unexpected = run.model.load_state_dict(weights, strict=False)
    real_missing = [k for k in missing if not (k == "lm_head.weight" and run.model.config.tie_word_embeddings)]
    if real_missing or unexpected:
        raise ValueError(f"checkpoint {path} does not fit the model: missing {real_missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    run.optimizer.load_state_dict(blob["optimizer"])
    run.lr_scheduler.load_state_dict(blob["lr_scheduler"])
    for k, v in blob["state"].items():
        setattr(run.state, k, v)
    trainer.buffer = blob["buffer"]
    trainer.budget = blob["budget"]
    _set_rng_state(blob["rng"])
    log.info("resumed from %s at step %d", path, run.state.step)
