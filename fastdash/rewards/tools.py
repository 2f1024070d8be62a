"""Rewards for tool-using completions: the answer is the text after the last tool response."""
from __future__ import annotations

RESPONSE_END = "</tool_response>"


def final_answer(completion: str) -> str:
    """What the model said after its last tool turn (the whole text when it called none)."""
    tail = completion.rsplit(RESPONSE_END, 1)[-1]
    return tail.replace("<|im_start|>assistant", "").replace("<|im_end|>", "").strip()


def final_answer_reward(completion: str, answer: str, **row) -> float:
    """1.0 when the final answer is exactly `answer`, else 0.0 (a tool's output never counts)."""
    return float(final_answer(completion) == str(answer).strip())
