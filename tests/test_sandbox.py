"""The code sandbox: correct code passes, wrong code fails, escapes are contained and score 0.

Cheats against the reward itself (early exits, forged verdicts, eq-anything values) are in
test_code_reward_gaming.py.

Each escape test checks the effect did not happen (no file, no connection) and that the run ended
quickly, not only the score. Timeouts are short so the file runs in well under 30 s.
"""

import json
import os
import socket
import sys
import time
import uuid

import pytest

from fastdash.rewards import get_reward_fn, score_completions
from fastdash.rewards.code import (code_reward_batch, extract_code, run_code_tests, run_sandboxed,
                                   sandbox_capabilities)

GOOD = "def add(a, b):\n    return a + b\n"
TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"]
CAPS = sandbox_capabilities()
needs_root = pytest.mark.skipif(not CAPS.get("uid"), reason="needs root (unprivileged sandbox uid)")


def test_correct_code_passes():
    assert run_code_tests(GOOD, TESTS) == 1.0


def test_wrong_code_fails():
    assert run_code_tests("def add(a, b):\n    return a - b\n", TESTS) == 0.0
    assert run_code_tests("def add(a, b) return", TESTS) == 0.0  # syntax error
    assert run_code_tests(GOOD, TESTS + ["assert add(2, 2) == 5"]) == 0.0  # pass/fail, not 2/3


HONEST = """
import collections, math
from math import isclose
from operator import add as plus
class Pair:
    def __init__(self, a, b):
        self.a, self.b = a, b
def chain(ps, n):
    return sum(p.b - p.a for p in ps[:n])
def squares(n):
    return (i * i for i in range(n))
def count(s):
    return collections.Counter(s)
def big(n):
    return 2 ** n
def half(x):
    return x / 2
def sort_in_place(a):
    a.sort()
def root(x):
    if x < 0:
        raise ValueError(x)
    return math.sqrt(x)
Point = collections.namedtuple("Point", "x y")
def point():
    return Point(1, 2)
def nan():
    return float("nan")
def similar_elements(a, b):
    return tuple(sorted(set(a) & set(b)))
"""
HONEST_TESTS = [
    "assert chain([Pair(1, 5), Pair(2, 4)], 2) == 6",  # the code's objects go back to the code
    "assert list(squares(4)) == [0, 1, 4, 9]", "assert count('aab') == {'a': 2, 'b': 1}",
    "assert big(200) == 1 << 200", "assert math.isclose(half(1), 0.5)", "assert isclose(half(3), 1.5)",
    "assert plus(2, 3) == 5", "a = [3, 1, 2]\nsort_in_place(a)\nassert a == [1, 2, 3]",
    "try:\n    root(-1)\nexcept ValueError:\n    pass\nelse:\n    raise AssertionError",
    "assert point() == (1, 2)", "assert math.isnan(nan())", "assert root(4) == 2.0",
    # an MBPP+-style test program: its own helper and input/result tables
    "def assertion(out, exp, atol):\n    assert out == exp or math.isclose(out, exp, abs_tol=atol)\n"
    "inputs = [[(3, 4, 5, 6), (5, 7, 4, 10)], [(1, 2), (3,)]]\nresults = [(4, 5), ()]\n"
    "for inp, exp in zip(inputs, results):\n    assertion(similar_elements(*inp), exp, 0)\n",
]


def test_honest_values_pass_the_judge():
    res = run_sandboxed(HONEST, tests=HONEST_TESTS)
    assert res.passed, res.output
    assert res.verdict["ran"] == res.verdict["passed"] == len(HONEST_TESTS)
    # in-place mutation is mirrored back to the judge, so a wrong one is seen
    assert run_code_tests(HONEST.replace("a.sort()", "a.reverse()"), HONEST_TESTS) == 0.0


def test_codec_round_trip_is_exact():
    from fastdash.rewards.sandbox_codec import decode, encode

    def no(x, d):
        raise TypeError(type(x))

    values = [None, True, 0, -1, 2 ** 100, -(2 ** 70), 0.1, -0.0, float("inf"), "é\ud800", b"\x00",
              bytearray(b"ab"), 1 + 2j, (1, [2, {3: (4,)}]), {1, 2}, frozenset({"a"}), range(1, 9, 2),
              Ellipsis, {"k": [1.5, None]}, [True, 1, 1.0, "1", None], [1, 2 ** 70, "a"], (0.5, -0.0),
              {1, 2.5, "x"}, list(range(1000))]
    for v in values:
        j = encode(v, no)
        back = decode(json.loads(json.dumps(j)), no)
        assert type(back) is type(v) and repr(back) == repr(v), v
        if isinstance(v, list):  # element types too (True is not 1)
            assert list(map(type, back)) == list(map(type, v))
    nan = decode(encode(float("nan"), no), no)
    assert nan != nan
    for bad in (["zz", 1], ["f", "1e999x"], ["i", 12], ["c", "a", 1.0], {"x": 1}, ["r", 1, 2, "3"]):
        with pytest.raises((ValueError, TypeError, KeyError)):
            decode(bad, no)


def test_extract_code():
    assert extract_code("Here:\n```python\nx = 1\n```\nbye") == "x = 1\n"
    assert extract_code("```\ny = 2\n```") == "y = 2\n"
    assert extract_code("def f(): pass") == "def f(): pass"
    fenced = "Sure!\n```python\n" + GOOD + "```\nThat adds."
    assert run_code_tests(extract_code(fenced), TESTS) == 1.0


def test_infinite_loop_times_out():
    t0 = time.monotonic()
    res = run_sandboxed("while True:\n    pass\n", timeout_s=1.0)
    assert res.reason == "timeout" and not res.passed
    assert time.monotonic() - t0 < 3.0


def test_os_system_blocked(tmp_path):
    marker = tmp_path / "ran"
    res = run_sandboxed(f"import os\nos.system('touch {marker}')\n", timeout_s=3.0)
    assert not res.passed and "os.system" in res.output
    assert not marker.exists()
    res = run_sandboxed("import subprocess\nsubprocess.run(['true'])\n", timeout_s=3.0)
    assert not res.passed


def test_network_blocked():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        prog = f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
        res = run_sandboxed(prog, timeout_s=3.0)
        assert not res.passed and "Error" in res.output
        srv.settimeout(0.2)
        with pytest.raises(socket.timeout):
            srv.accept()  # nothing connected to the host's loopback
    finally:
        srv.close()
    assert CAPS.get("net") or CAPS == {}, CAPS


@pytest.mark.parametrize("where", ["/tmp", "/var/tmp", "/dev/shm", "HERE"])
def test_write_outside_scratch_contained(where):
    name = f"fastdash-escape-{uuid.uuid4().hex}"
    target = os.path.join(os.getcwd() if where == "HERE" else where, name)
    res = run_sandboxed(f"open({target!r}, 'w').write('x')\nprint('wrote')\n", timeout_s=3.0)
    try:
        assert not os.path.exists(target), f"sandbox wrote {target}"
    finally:
        if os.path.exists(target):
            os.remove(target)
    if where == "HERE" and CAPS.get("uid"):
        assert not res.passed  # a root-owned directory is read-only for the sandbox uid


@pytest.mark.skipif(not CAPS.get("fs"), reason="no minimal root (pivot_root) here")
def test_world_readable_user_files_are_hidden():
    # e.g. a dataset file holding the expected answers, next to the project
    path = os.path.join(os.getcwd(), f"fastdash-answers-{uuid.uuid4().hex}.jsonl")
    with open(path, "w") as f:
        f.write("42\n")
    os.chmod(path, 0o644)
    try:
        res = run_sandboxed(f"print(open({path!r}).read())\n", timeout_s=3.0)
        assert not res.passed and "No such file" in res.output, res.output
    finally:
        os.remove(path)
    res = run_sandboxed("import os\nprint(sorted(os.listdir('/')))\n")
    assert res.passed and set(eval(res.output)) <= {
        "usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32", "etc", "dev", "proc", "tmp", "var",
        *(p.split("/")[1] for p in (sys.prefix, sys.base_prefix, sys.executable))}, res.output


def test_scratch_dir_is_writable_and_removed():
    res = run_sandboxed("import os\nopen('f.txt', 'w').write('x')\nprint(os.getcwd())\n")
    assert res.passed, res.output
    assert not os.path.exists(res.output.strip())


def _sandbox_processes():
    out = []
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                if os.stat(f"/proc/{p}").st_uid >= 1_000_000:
                    out.append(p)
            except FileNotFoundError:
                pass
    return out


def _wait_no_sandbox_processes(limit_s=5.0):
    t0 = time.monotonic()
    while _sandbox_processes() and time.monotonic() - t0 < limit_s:
        time.sleep(0.05)
    return _sandbox_processes()


def test_fork_bomb_blocked_by_default():
    res = run_sandboxed("import os\nwhile True:\n    os.fork()\n", timeout_s=2.0)
    assert not res.passed and "os.fork" in res.output


@needs_root
def test_fork_bomb_contained_by_nproc():
    # With the audit hook off, RLIMIT_NPROC (per-run uid) and the pid namespace must hold it.
    bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    t0 = time.monotonic()
    res = run_sandboxed(bomb, timeout_s=1.5, allow_subprocess=True, max_procs=8)
    assert not res.passed and res.reason == "timeout"
    assert time.monotonic() - t0 < 4.0
    assert _wait_no_sandbox_processes() == []


@needs_root
def test_detached_children_are_killed():
    prog = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n"
    res = run_sandboxed(prog, timeout_s=3.0, allow_subprocess=True)
    assert res.passed
    assert _wait_no_sandbox_processes() == []


def test_memory_limit():
    t0 = time.monotonic()
    res = run_sandboxed("x = bytearray(1024 ** 3)\nprint(len(x))\n", memory_mb=512, timeout_s=5.0)
    assert not res.passed and "MemoryError" in res.output
    assert time.monotonic() - t0 < 4.0


def test_huge_output_capped():
    t0 = time.monotonic()
    res = run_sandboxed("import sys\nfor _ in range(100):\n    sys.stdout.write('a' * 1_000_000)\n",
                        timeout_s=10.0, max_output_bytes=1_000_000)
    assert res.reason == "output_limit" and not res.passed
    assert len(res.output) <= 1_000_000
    assert time.monotonic() - t0 < 5.0
    assert run_code_tests("print('a' * 100_000_000)", [], timeout_s=10.0) == 0.0


@needs_root
def test_home_exposes_only_the_interpreter(tmp_path):
    """From inside, the home directory holds nothing but the interpreter's own tree (pyenv, a venv under
    ~/.cache, ...): a file of the user's beside it is not readable, wherever Python lives."""
    home = os.path.realpath(os.path.expanduser("~"))
    canary = os.path.join(home, f".fastdash-canary-{uuid.uuid4().hex}")
    with open(canary, "w") as f:
        f.write("secret")
    try:
        interp = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix,
                                                        os.path.dirname(sys.executable))})
        code = (
            "import os, sys\n"
            f"home, interp = {home!r}, {interp!r}\n"
            "seen = []\n"
            "for d, dirs, files in os.walk(home):\n"
            "    dirs[:] = [x for x in dirs if not any(os.path.join(d, x).startswith(p) for p in interp)]\n"
            "    seen += [os.path.join(d, f) for f in files if not any(os.path.join(d, f).startswith(p) for p in interp)]\n"
            f"print(repr((seen, os.path.exists({canary!r}))))\n"
        )
        res = run_sandboxed(code)
        assert res.passed, res.output
        outside_interpreter, canary_visible = eval(res.output.strip())
        assert not canary_visible
        assert outside_interpreter == []  # nothing of the user's, only the interpreter's tree
    finally:
        os.remove(canary)


def test_batch_in_parallel():
    n = 16
    comps = ["```python\n" + GOOD + "```"] * n
    tests = [TESTS] * (n // 2) + [["assert add(1, 1) == 3"]] * (n // 2)
    assert code_reward_batch(comps, tests, max_workers=8) == [1.0] * (n // 2) + [0.0] * (n // 2)


def test_code_reward_via_registry():
    rows = [{"answer": "", "tests": TESTS}, {"answer": "", "tests": TESTS}, {"answer": ""}]
    rewards, n_failed = score_completions(get_reward_fn("code"), [GOOD, "def add(a, b): return 0", GOOD], rows)
    assert rewards == [1.0, 0.0, 0.0] and n_failed == 1  # the row without tests is a failure
