"""Reward functions for the subprocess runs of tests/test_resume.py (imported by dotted path).

A random-weight model never solves the task, so the task reward is always 0 and nothing would
train; the parity of the completion's digit sum varies across samples, so every step moves weights.
"""
from __future__ import annotations


def digit_parity(completion: str, answer: str, **_) -> float:
    return float(sum(int(c) for c in completion if c.isdigit()) % 2)
