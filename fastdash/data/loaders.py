"""Load problems for a task (gsm8k, math, mbpp, plain) from local files or cached HF datasets.

A problem is a dict with at least ``prompt`` (the templated prompt text) and ``answer`` (the gold
answer the reward uses), plus the row's other columns and task extras (``tests`` for code).

For ``plain``, ``prompt`` may also be a list of chat messages (TRL's conversational format,
``[{"role": "user", "content": ...}]``); it is kept as a list and rendered with the tokenizer's
chat template when the prompt is tokenized (``fastdash.data.chat``).

Sources: a directory (a ``save_to_disk`` dataset, or data files that ``datasets.load_dataset``
can read), a ``.jsonl`` / ``.json`` / ``.parquet`` file, or a dataset name, which is only read
from the local HF cache: nothing is downloaded here.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import string
from collections import Counter
from typing import Callable

from fastdash.data.chat import check_messages, is_messages
from fastdash.rewards.math import extract_boxed

logger = logging.getLogger("fastdash")

# Default prompt templates. The paper feeds math problems raw (no chat template, no system prompt,
# no "box your answer" instruction); code prompts are '"""\n{description}\n{first test}\n"""\n'.
DEFAULT_TEMPLATES = {
    "gsm8k": "{question}",
    "math": "{problem}",
    "mbpp": '"""\n{description}\n{first_test}\n"""\n',
    "plain": "{prompt}",
}
EXPECTED_COLUMNS = {
    "gsm8k": "question, answer (gold after '#### ')",
    "math": "problem, and answer or solution (gold = last \\boxed{} of the solution)",
    "mbpp": "text or prompt or description, and test_list or test",
    "plain": "prompt, answer",
}
_NUMBER_RE = re.compile(r"^-?\d+(?:\.\d+)?(?:/\d+)?$")


class _Skip(Exception):
    """A malformed row: the message says why (it is the key the skip counts are grouped by)."""


def _text(row: dict, *columns: str) -> str:
    for c in columns:
        v = row.get(c)
        if isinstance(v, str) and v.strip():
            return v
    present = [c for c in columns if c in row]
    wrong = [f"{c} is {type(row[c]).__name__}" for c in present if row[c] is not None and not isinstance(row[c], str)]
    if wrong:
        raise _Skip(f"{', '.join(wrong)}, not text")
    if present:
        raise _Skip(f"empty {'/'.join(columns)}")
    raise _Skip(f"missing column {'/'.join(columns)}")


def _gsm8k(row: dict) -> dict:
    question = _text(row, "question")
    solution = _text(row, "answer")
    if "####" not in solution:
        raise _Skip("no '####' in answer")
    gold = solution.rsplit("####", 1)[1].strip().replace(",", "").replace("$", "").rstrip(".")
    if not _NUMBER_RE.match(gold):
        raise _Skip("gold after '####' is not a number")
    return {"question": question, "solution": solution, "answer": gold}


def _math(row: dict) -> dict:
    problem = _text(row, "problem")
    gold = row.get("answer")
    gold = gold.strip() if isinstance(gold, str) else ""
    if not gold:
        solution = _text(row, "solution")
        gold = extract_boxed(solution) or ""
        if not gold:
            raise _Skip("no \\boxed{} answer in solution")
    return {"problem": problem, "answer": gold}


def _mbpp(row: dict) -> dict:
    description = _text(row, "text", "prompt", "description")
    test_list = row.get("test_list")
    test_list = [t for t in test_list if isinstance(t, str) and t.strip()] if test_list else []
    imports = row.get("test_imports") or []
    imports = [imports] if isinstance(imports, str) else list(imports)
    plus = row.get("test")
    if isinstance(plus, str) and plus.strip():
        tests = imports + [plus]  # MBPP+: one test program with the plus inputs
        first = test_list[0] if test_list else next(
            (ln.strip() for ln in plus.splitlines() if ln.strip().startswith("assert")), None)
    elif test_list:
        tests = imports + test_list
        first = test_list[0]
    else:
        raise _Skip("missing column test_list/test")
    if not first:
        raise _Skip("no assert to show in the prompt")
    code = row.get("code")
    return {"description": description.strip(), "first_test": first.strip(), "tests": tests,
            "answer": code if isinstance(code, str) else ""}


def _plain(row: dict) -> dict:
    if is_messages(row.get("prompt")):  # TRL's conversational format: rendered later (data/chat.py)
        try:
            messages = check_messages(row["prompt"])
        except ValueError as e:
            raise _Skip(str(e).split(";")[0]) from None
        extra = {"messages": messages}
    else:
        _text(row, "prompt")
        extra = {}
    answer = row.get("answer")
    if answer is None or str(answer).strip() == "":
        raise _Skip("missing column answer")
    return {**extra, "answer": str(answer)}


TASKS: dict[str, Callable[[dict], dict]] = {"gsm8k": _gsm8k, "math": _math, "mbpp": _mbpp,
                                            "plain": _plain}


@contextlib.contextmanager
def _hub_offline():
    """Force the Hub offline for one load, so a name not in the cache fails fast (no retries).

    The HF_HUB_OFFLINE environment variable is read at import time, hence the module constants.
    """
    import datasets.config
    import huggingface_hub.constants as hub_constants

    saved = datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE
    datasets.config.HF_HUB_OFFLINE = hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        datasets.config.HF_HUB_OFFLINE, hub_constants.HF_HUB_OFFLINE = saved


def _load_dataset(source: str, split: str):
    """A ``datasets.Dataset`` for the source (see the module docstring)."""
    import datasets

    path = os.path.expanduser(source)
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(path)
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise ValueError(f"data: {source!r} has splits {sorted(ds)}, not {split!r}")
            ds = ds[split]
        return ds
    if os.path.isfile(path):
        lower = path.lower()
        if lower.endswith((".jsonl", ".json")):
            builder = "json"
        elif lower.endswith(".parquet"):
            builder = "parquet"
        else:
            raise ValueError(f"data: cannot read {source!r}: expected .jsonl, .json or .parquet")
        if os.path.getsize(path) == 0:
            raise ValueError(f"data: {source!r} is empty; it needs one row per problem")
        if lower.endswith(".jsonl"):
            _check_jsonl(path)
        # A single file is one split, whatever `split` says.
        try:
            return datasets.load_dataset(builder, data_files=path, split="train")
        except Exception as e:  # datasets wraps the parser's error in DatasetGenerationError
            cause = e.__cause__ or e
            expected = {"json": "a JSON array of row objects (or one object per line in a .jsonl file)",
                        "parquet": "a parquet table with one row per problem"}[builder]
            raise ValueError(f"data: cannot read {source!r} as {builder}: {type(cause).__name__}: "
                             f"{str(cause)[:300]}; expected {expected}") from e
    if source.startswith((".", "/", "~")) or source.lower().endswith((".jsonl", ".json", ".parquet")):
        raise ValueError(f"data: {source!r} does not exist")
    try:
        with _hub_offline():
            return datasets.load_dataset(source, split=split)
    except Exception as e:
        raise ValueError(
            f"data: cannot load dataset {source!r} (split {split!r}) from the local Hugging Face "
            f"cache ({type(e).__name__}: {str(e)[:300]}). Nothing is downloaded here: pass a local "
            "path (a directory, .jsonl, .json or .parquet file) instead."
        ) from e


def _check_jsonl(path: str) -> None:
    """Name the first broken line of a .jsonl file: datasets' own error names neither file nor line."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"data: {path}, line {lineno}: not valid JSON ({e.msg}, column {e.colno}); "
                                 f"a .jsonl file needs one JSON object per line, e.g. "
                                 f'{{"prompt": "...", "answer": "..."}}. The line starts: {line.strip()[:80]!r}'
                                 ) from None
            if not isinstance(row, dict):
                raise ValueError(f"data: {path}, line {lineno}: a JSON {type(row).__name__}, not an object; "
                                 f"a .jsonl file needs one JSON object (the row's columns) per line")


def _fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def load_problems(
    source: str,
    *,
    task: str,
    split: str = "train",
    prompt_template: str | None = None,
    limit: int | None = None,
) -> list[dict]:
    """Load ``source`` as problems of ``task`` (``gsm8k``, ``math``, ``mbpp`` or ``plain``).

    ``prompt_template`` is a ``str.format`` template over the row's columns plus the task's
    derived fields (e.g. ``{question}``, ``{problem}``, ``{description}``, ``{first_test}``).
    Malformed rows (missing or empty columns, unparseable gold) are skipped with one warning
    giving the counts and reasons; if every row is malformed, ValueError. ``limit`` keeps the
    first ``limit`` good problems, in file order.
    """
    if task not in TASKS:
        raise ValueError(f"data: unknown task {task!r}; expected one of {sorted(TASKS)}")
    if limit is not None and limit <= 0:
        raise ValueError(f"data: limit must be positive, got {limit}")
    template = DEFAULT_TEMPLATES[task] if prompt_template is None else prompt_template
    ds = _load_dataset(source, split)
    parse = TASKS[task]

    problems: list[dict] = []
    skipped: Counter = Counter()
    seen = 0
    for row in ds:
        if limit is not None and len(problems) >= limit:
            break
        seen += 1
        try:
            extra = parse(row)
            fields = {**row, **extra}
            messages = fields.pop("messages", None)
            if messages is not None and prompt_template not in (None, "{prompt}"):
                raise ValueError(f"data: {source!r} has chat-message prompts; prompt_template formats text "
                                 "prompts only: drop it (system_prompt adds a system message)")
            try:
                prompt = messages or template.format(**fields)
            except KeyError as e:
                raise _Skip(f"prompt template needs column {e.args[0]!r}") from None
            except (IndexError, ValueError) as e:
                raise ValueError(f"data: bad prompt_template {template!r}: {e}") from e
            if isinstance(prompt, str) and not prompt.strip():
                raise _Skip("empty prompt")
        except _Skip as e:
            skipped[str(e)] += 1
            continue
        problems.append({**fields, "prompt": prompt, "answer": str(extra["answer"])})

    if skipped:
        reasons = ", ".join(f"{n} {why}" for why, n in skipped.most_common())
        if not problems:
            raise ValueError(
                f"data: no usable rows in {source!r} for task {task!r} ({reasons}); expected "
                f"columns: {EXPECTED_COLUMNS[task]}; found: {sorted(ds.column_names)}"
            )
        logger.warning("data: skipped %d of %d rows of %r (task %s): %s",
                       sum(skipped.values()), seen, source, task, reasons)
    if not problems:
        raise ValueError(f"data: {source!r} has no rows")
    return problems
