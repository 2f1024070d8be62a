"""load_problems: file formats, task parsing (gsm8k / math / mbpp), templates, malformed rows."""

import json
import logging

import pytest

from fastdash.data.loaders import load_problems

GSM8K_ROWS = [
    {"question": "Natalia sold 48 clips in April and half as many in May. How many in total?",
     "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\n#### 72"},
    {"question": "A house costs 1,000 dollars more than 2,500. Price?",
     "answer": "1,000 + 2,500 = 3,500\n#### 3,500"},
    {"question": "Temperature drops 5 below zero. Value?", "answer": "#### -5"},
]
MATH_ROWS = [
    {"problem": "What is $1/2$ as a fraction?", "level": "Level 1", "type": "Algebra",
     "solution": "Clearly it is $\\boxed{\\frac{1}{2}}$."},
    {"problem": "Find the set.", "level": "Level 2", "type": "Algebra",
     "solution": "First \\boxed{1}, then the set is $\\boxed{\\{x : x^{2} > 1\\}}$."},
    {"problem": "Convert to polar.", "solution": "So $\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}$",
     "level": "Level 3", "type": "Precalculus"},
]


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


def test_gsm8k_jsonl(tmp_path):
    probs = load_problems(write_jsonl(tmp_path / "g.jsonl", GSM8K_ROWS), task="gsm8k")
    assert [p["answer"] for p in probs] == ["72", "3500", "-5"]
    assert probs[0]["prompt"] == GSM8K_ROWS[0]["question"]  # raw question, no template
    assert probs[0]["solution"].endswith("#### 72")


def test_math_parquet_nested_boxes(tmp_path):
    import pandas as pd

    path = tmp_path / "m.parquet"
    pd.DataFrame(MATH_ROWS).to_parquet(path)
    probs = load_problems(str(path), task="math")
    assert [p["answer"] for p in probs] == [
        "\\frac{1}{2}", "\\{x : x^{2} > 1\\}", "\\left( 3, \\frac{\\pi}{2} \\right)"]
    assert probs[0]["prompt"] == MATH_ROWS[0]["problem"]  # paper: raw problem text
    assert probs[0]["level"] == "Level 1"  # extra columns kept


def test_math500_answer_column_preferred(tmp_path):
    rows = [{"problem": "p", "solution": "... \\boxed{2}", "answer": "\\frac{4}{2}",
             "unique_id": "test/algebra/1.json"}]
    probs = load_problems(write_jsonl(tmp_path / "test.jsonl", rows), task="math")
    assert probs[0]["answer"] == "\\frac{4}{2}"


def test_malformed_rows_skipped_with_counted_warning(tmp_path, caplog):
    rows = GSM8K_ROWS + [
        {"question": "no gold marker", "answer": "it is 5"},
        {"question": "", "answer": "#### 1"},
        {"answer": "#### 1"},
        {"question": "words", "answer": "#### five"},
    ]
    with caplog.at_level(logging.WARNING, logger="fastdash"):
        probs = load_problems(write_jsonl(tmp_path / "g.jsonl", rows), task="gsm8k")
    assert len(probs) == 3
    msgs = [r.getMessage() for r in caplog.records]
    assert len(msgs) == 1
    assert "skipped 4 of 7" in msgs[0] and "no '####'" in msgs[0] and "not a number" in msgs[0]


def test_all_rows_bad_raises(tmp_path):
    path = write_jsonl(tmp_path / "wrong.jsonl", [{"q": "x", "a": "y"}] * 3)
    with pytest.raises(ValueError, match=r"wrong\.jsonl.*gsm8k.*question"):
        load_problems(path, task="gsm8k")
    with pytest.raises(ValueError, match="problem"):
        load_problems(path, task="math")


def test_prompt_template_and_limit(tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", MATH_ROWS)
    probs = load_problems(path, task="math", limit=2,
                          prompt_template="[{type}] {problem}\nPut the answer in \\boxed{{}}.")
    assert len(probs) == 2
    assert probs[0]["prompt"] == "[Algebra] What is $1/2$ as a fraction?\nPut the answer in \\boxed{}."
    with pytest.raises(ValueError, match="no_such_col"):
        load_problems(path, task="math", prompt_template="{no_such_col}")


def test_mbpp_prompt_like_paper(tmp_path):
    rows = [{"task_id": 2, "text": "Write a function to find the shared elements.",
             "code": "def similar_elements(a, b):\n    return tuple(set(a) & set(b))",
             "test_list": ["assert set(similar_elements((3, 4), (4, 5))) == {4}",
                           "assert similar_elements((1,), (2,)) == ()"],
             "test_imports": []}]
    probs = load_problems(write_jsonl(tmp_path / "mbpp.jsonl", rows), task="mbpp")
    p = probs[0]
    assert p["prompt"] == ('"""\nWrite a function to find the shared elements.\n'
                           'assert set(similar_elements((3, 4), (4, 5))) == {4}\n"""\n')
    assert p["tests"] == rows[0]["test_list"]
    assert p["answer"] == rows[0]["code"]


def test_mbppplus_uses_plus_test_program(tmp_path):
    plus = "def check(f):\n    assert f(1) == 2\ncheck(inc)\n"
    rows = [{"task_id": 1, "prompt": "Increment a number.", "code": "def inc(x): return x + 1",
             "test_list": ["assert inc(1) == 2"], "test_imports": ["import math"], "test": plus}]
    p = load_problems(write_jsonl(tmp_path / "plus.jsonl", rows), task="mbpp")[0]
    assert p["tests"] == ["import math", plus]
    assert "assert inc(1) == 2" in p["prompt"]
    from fastdash.rewards.code import run_code_tests
    assert run_code_tests(p["answer"], p["tests"]) == 1.0


def test_saved_dataset_dir_and_splits(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(GSM8K_ROWS),
                               "test": datasets.Dataset.from_list(GSM8K_ROWS[:1])})
    dd.save_to_disk(str(tmp_path / "saved"))
    assert len(load_problems(str(tmp_path / "saved"), task="gsm8k")) == 3
    assert len(load_problems(str(tmp_path / "saved"), task="gsm8k", split="test")) == 1
    with pytest.raises(ValueError, match="splits"):
        load_problems(str(tmp_path / "saved"), task="gsm8k", split="validation")


def test_data_files_dir(tmp_path):
    d = tmp_path / "MATH-500"
    d.mkdir()
    write_jsonl(d / "train.jsonl", MATH_ROWS)
    write_jsonl(d / "test.jsonl", MATH_ROWS[:1])
    assert len(load_problems(str(d), task="math")) == 3
    assert len(load_problems(str(d), task="math", split="test")) == 1


def test_missing_sources_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_problems(str(tmp_path / "nope.jsonl"), task="gsm8k")
    with pytest.raises(ValueError, match="Nothing is downloaded"):
        load_problems("fastdash-test/definitely-not-cached", task="gsm8k")
    with pytest.raises(ValueError, match="unknown task"):
        load_problems(str(tmp_path), task="chess")
