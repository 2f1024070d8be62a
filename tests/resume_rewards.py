"""Reward functions for the subprocess runs of tests/test_resume.py (imported by dotted path).

A random-weight model never solves the task, so the task reward is always 0 and nothing would
train; the parity of the completion's digit sum varies across samples, so every step moves weights.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def digit_parity(completion: str, answer: str, **_) -> float:
    return float(sum(int(c) for c in completion if c.isdigit()) % 2)


def noisy_digit_parity(completion: str, answer: str, **_) -> float:
    """digit_parity plus noise from the global RNGs (python, numpy, torch), as a user's reward may draw:
    a resumed run that did not restore them would score, and so train, differently."""
    noise = random.random() + float(np.random.rand()) + float(torch.rand(()))
    return digit_parity(completion, answer) + 0.1 * noise
