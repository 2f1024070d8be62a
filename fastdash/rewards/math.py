"""Math rewards: answer extraction (last ``\\boxed{}``, GSM8K ``####``) and math-verify checking.

All rewards are binary (1.0 / 0.0), as in the paper. The paper's checker looks for the last
``\\boxed{}`` inside the last 4 lines of the completion and compares it with ``is_equiv`` or an
OlympiadBench judge; here the last ``\\boxed{}`` anywhere in the completion is compared with
math-verify (``parse`` + ``verify``), which accepts equivalent forms (``\\frac{1}{2}`` = 0.5 = 1/2,
``\\dfrac``, ``\\left( \\right)``, intervals, radicals, ``\\text{ cm}`` units, ``1,000``).

Timeouts: math-verify bounds parsing and comparison with ``signal.alarm``, which only works in the
main thread. Off the main thread we call it with the timeouts disabled (a pathological input can
then take long; run rewards in the main thread or in worker processes to keep the bound).
"""

from __future__ import annotations

import logging
import re
import threading

logger = logging.getLogger("fastdash")

# Seconds (integers: math-verify uses signal.alarm) for parsing one expression / one comparison.
PARSE_TIMEOUT_S = 5
VERIFY_TIMEOUT_S = 5

_BOX_CMDS = ("\\boxed", "\\fbox")
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_warned_thread = False


def _brace_content(text: str, open_idx: int) -> str | None:
    """Content of the brace group opening at text[open_idx] == '{' (nested braces), or None."""
    depth = 0
    for i in range(open_idx, len(text)):
        c = text[i]
        if c == "\\":  # skip escaped characters such as \{ and \}
            continue
        if c == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif c == "}" and text[i - 1] != "\\":
            depth -= 1
            if depth == 0:
                return text[open_idx + 1 : i]
    return None  # unbalanced: the box never closes (e.g. a truncated completion)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` or ``\\fbox{...}`` in ``text`` (nested braces handled).

    Also accepts the brace-less form ``\\boxed 5`` (one token). Returns None when there is no box
    or the last box is unbalanced.

    >>> extract_boxed(r"so \\boxed{\\frac{1}{2}} and finally \\boxed{\\{1,2\\}}")
    '\\\\{1,2\\\\}'
    """
    if not isinstance(text, str):
        return None
    start = max(text.rfind(cmd) for cmd in _BOX_CMDS)
    if start < 0:
        return None
    cmd = "\\boxed" if text.startswith("\\boxed", start) else "\\fbox"
    i = start + len(cmd)
    if text.startswith(" ", i) and not text[i:].lstrip().startswith("{"):
        m = re.match(r"\s+([^\s$]+)", text[i:])  # \boxed 5 (MATH's brace-less form)
        return m.group(1) if m else None
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    content = _brace_content(text, i)
    return content.strip() if content is not None else None


def _clean_number(s: str) -> str:
    s = s.replace(",", "").strip()
    if s.endswith("."):
        s = s[:-1]
    return s


def extract_gsm8k(text: str) -> str | None:
    """The number after the last ``####`` or, failing that, the last number in ``text``.

    Commas are stripped ('1,000' -> '1000'); a trailing full stop is dropped.
    """
    if not isinstance(text, str):
        return None
    idx = text.rfind("####")
    if idx >= 0:
        m = _NUMBER_RE.search(text[idx + 4 :].replace("$", ""))
        if m:
            return _clean_number(m.group(0))
    nums = _NUMBER_RE.findall(text)
    return _clean_number(nums[-1]) if nums else None


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _timeouts() -> tuple[int | None, int | None]:
    global _warned_thread
    if _in_main_thread():
        return PARSE_TIMEOUT_S, VERIFY_TIMEOUT_S
    if not _warned_thread:
        _warned_thread = True
        logger.warning(
            "math rewards called off the main thread: math-verify's signal-based timeouts are "
            "disabled there, so a pathological answer can take long to check"
        )
    return None, None


def verify_equal(gold: str, pred: str) -> bool:
    """math-verify equivalence of two bare LaTeX answers (each is wrapped in ``\\boxed{}``)."""
    from math_verify import parse, verify  # imported lazily: ~0.7 s (sympy)

    parse_t, verify_t = _timeouts()
    gold_p = parse("\\boxed{" + gold + "}", parsing_timeout=parse_t)
    pred_p = parse("\\boxed{" + pred + "}", parsing_timeout=parse_t)
    if not gold_p or not pred_p:
        return False
    return bool(verify(gold_p, pred_p, timeout_seconds=verify_t))


def math_reward(completion: str, answer: str, **row) -> float:
    """1.0 if the last ``\\boxed{}`` of ``completion`` is equivalent to the gold ``answer``, else 0.0.

    A completion without a box scores 0. ``answer`` is the bare gold answer (e.g. ``\\frac{1}{2}``).
    """
    pred = extract_boxed(completion)
    if not pred:
        return 0.0
    gold = str(answer).strip()
    if pred == gold:
        return 1.0
    return 1.0 if verify_equal(gold, pred) else 0.0


def gsm8k_reward(completion: str, answer: str, **row) -> float:
    """1.0 if the completion's final number equals the gold number (math-verify), else 0.0.

    The prediction is the last ``\\boxed{}`` if the completion has one (models trained on MATH box
    their answers), otherwise ``extract_gsm8k`` (after ``####``, else the last number).
    """
    pred = extract_boxed(completion)
    if pred is None:
        pred = extract_gsm8k(completion)
    if not pred:
        return 0.0
    gold = _clean_number(str(answer))
    pred = pred.replace(",", "").strip()
    if pred == gold:
        return 1.0
    return 1.0 if verify_equal(gold, pred) else 0.0


def arithmetic_reward(completion: str, answer: str, **row) -> float:
    """Exact integer match of the stripped completion (the built-in task's completion is '579')."""
    try:
        return 1.0 if int(str(completion).strip()) == int(str(answer).strip()) else 0.0
    except ValueError:
        return 0.0
