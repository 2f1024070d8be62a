"""Resume restores the global RNGs (python `random`, numpy, torch): nothing shipped reads them between
reseeds, but a user's reward (or dropout) does, and must draw after a resume what it would have drawn
without the interruption. End to end: tests/test_resume.py's kill / resume runs score with
`resume_rewards.noisy_digit_parity`."""
from __future__ import annotations

import random

import numpy as np
import torch

from fastdash.checkpoint import load_checkpoint, save_checkpoint
from fastdash.runtime import build_run
from fastdash.trainer import Trainer
from tests.conftest import tiny_config


def _draws() -> dict:
    return {"python": [random.random() for _ in range(3)], "numpy": np.random.rand(3).tolist(),
            "torch": torch.rand(3, dtype=torch.float64).tolist()}


def test_load_checkpoint_gives_back_the_draws_after_the_save(tmp_path):
    cfg = tiny_config(output_dir=str(tmp_path))
    run = build_run(cfg, with_plan=False)
    trainer = Trainer(cfg, run)
    _draws()  # away from the seeds build_run set
    path = save_checkpoint(cfg, run, trainer, tmp_path)
    want = _draws()
    random.seed(12345)  # scramble them
    np.random.seed(12345)
    torch.manual_seed(12345)
    scrambled = _draws()
    assert all(scrambled[k] != want[k] for k in want)
    load_checkpoint(cfg, run, trainer, path)
    got = _draws()
    assert [k for k in want if got[k] != want[k]] == [], "RNG states not restored on resume"
