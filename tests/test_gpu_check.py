"""scripts/gpu_check.py's CPU dry mode: every step's Python entry at tiny sizes, so CI exercises
the code a GPU run will execute (the GPU sizes differ only in numbers)."""
from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


# train, kernels and scheduler take 10-60 s each on an idle 2-core machine (three training steps of the
# recipe's config, every kernel case, the planner's probes): marked slow, they still run in CI.
@pytest.mark.parametrize("step", [pytest.param("train", marks=pytest.mark.slow),
                                  pytest.param("kernels", marks=pytest.mark.slow), "speed", "engine", "static",
                                  "attention", pytest.param("scheduler", marks=pytest.mark.slow)])
def test_dry_step_runs_and_passes(step, tmp_path):
    res = gpu_check.run_step(step, True, tmp_path)
    json.dumps(res, default=str)  # what the child writes
    assert res["ok"] is not False, {k: v for k, v in res.items() if k != "plan"}
    if step == "train":
        assert res["recipe"] == "dash-qwen2.5-0.5b.yaml" and res["dtype"] == "bfloat16"
    if step == "kernels":
        from fastdash.algo import LOSS_TYPES

        assert res["cases"] == 2 * 2 * len(LOSS_TYPES) * 2 and not res["failed"]  # peaked x T x loss x beta, torch
    if step == "speed":
        assert all("ms" in r for r in res["rows"]), res["rows"]
    if step == "engine":
        assert res["forced_lengths_honoured"]
    if step == "static":
        assert res["static"]["lengths_honoured"] and 0 < res["static"]["graphs_first_call"] <= len(res["buckets_used"])


def test_engine_step_generates_with_the_bf16_copy_training_uses(tmp_path):
    """Issue 25, item 3: training keeps fp32 master weights and generates with the engine's own bf16
    copy (runtime.build_run -> make_engine(compute_dtype=bf16)); the engine step must time that, not
    generation with the fp32 master model."""
    res = gpu_check.run_step("engine", True, tmp_path)
    assert res["ok"], res
    assert (res["engine_dtype"], res["master_dtype"], res["engine_has_own_copy"]) == \
        ("torch.bfloat16", "torch.float32", True)


def test_ulp_matches_the_dtypes():
    import torch

    for dtype in (torch.bfloat16, torch.float32):
        for x in (1.0, 3.0, 1e-3, 1000.0):
            t = torch.tensor(x, dtype=dtype)
            up = torch.nextafter(t, torch.tensor(float("inf"), dtype=dtype))
            assert gpu_check_steps().ulp(x, dtype) == float(up.float() - t.float()), (x, dtype)


def gpu_check_steps():
    return sys.modules["gpu_check_steps"] if "gpu_check_steps" in sys.modules else __import__("gpu_check_steps")


@pytest.mark.slow
def test_cli_dry_run_writes_at_most_8_flat_files(tmp_path):
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu-dry", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=ROOT, timeout=1500,
                       env={**os.environ, "PYTHON": sys.executable})  # this interpreter, wherever it lives
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files), files
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert checks["finished"] and [s["step"] for s in checks["steps"]] == [s.name for s in gpu_check.STEPS]
    assert all(s["ok"] is not False for s in checks["steps"])
    assert "| environment |" in (tmp_path / "summary.md").read_text()


def test_fastdash_trains_a_random_preset_without_datasets_or_math_verify():
    """The GPU image has neither: importing fastdash and training must not need them."""
    p = subprocess.run([sys.executable, "-c", gpu_check._NO_DATASETS], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0 and "trained one step" in p.stdout, p.stderr[-3000:]


def _step_processes(marker: str) -> list[int]:
    """pids of gpu_check step processes whose command line names `marker` (the run's --out)."""
    pids = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--run-step" in cmd and marker.encode() in cmd:
            pids.append(int(d.name))
    return pids


@pytest.mark.slow  # ~8 s idle (one step's process: torch + fastdash imports), ~20 s on a loaded 2-core machine
def test_a_dry_run_killed_partway_leaves_every_finished_step(tmp_path):
    """SIGKILL the orchestrator at a seeded random moment after its first step finished: checks.json
    is valid JSON holding every step it had reported finished, and the running step's process group
    goes down with it (its watchdog), so nothing is left holding the GPU."""
    delay = random.Random(25).uniform(0.0, 2.0)
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--cpu-dry", "--steps",
                          "speed,engine,static", "--out", str(out)], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    finished = []
    try:
        for line in p.stdout:
            if line.startswith("step "):
                finished.append(line.split()[1])
                break
        assert finished, "no step finished"
        time.sleep(delay)
        p.kill()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    checks = json.loads((out / "checks.json").read_text())
    done = {s["step"]: s for s in checks["steps"] if s["status"] != "running"}
    assert set(finished) <= set(done), checks
    assert all(done[n]["status"] == "ran" and done[n]["ok"] is not False for n in finished), checks
    assert json.loads((out / "checks.json").read_text()) and (out / "summary.md").read_text().count("| speed |")
    deadline = time.time() + 10
    while _step_processes(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert not _step_processes(str(out)), "a step's process outlived the killed orchestrator"


def test_steps_started_on_a_gpu_always_fit_the_budget(tmp_path, monkeypatch):
    """Simulated GPU runs (seeded random step durations up to each timeout, every step running to its
    timeout, a slow wheel install before): a step starts only if it ends by the budget even at its
    timeout, so the timeouts of the steps started never sum past the budget in the worst case, and the
    whole command ends inside TOTAL_LIMIT_S. The most valuable step (training) always starts."""
    clock = {"now": 1000.0}
    fake_time = type("T", (), {"perf_counter": staticmethod(lambda: clock["now"]),
                               "time": staticmethod(lambda: clock["now"])})
    monkeypatch.setattr(gpu_check, "time", fake_time)
    files = {}  # the reports, written in memory
    monkeypatch.setattr(gpu_check, "_write_atomic", lambda path, text: files.__setitem__(path.name, text))
    rng = random.Random(25)
    for trial in range(90):
        worst = trial % 3 == 0  # every step runs to its timeout
        started = []

        def run_one(step, dry, out, log, env):
            started.append((clock["now"] - report.t0, step.timeout_s))
            clock["now"] += step.timeout_s if worst else rng.uniform(0, step.timeout_s)
            return {"step": step.name, "what": step.what, "status": "ran", "ok": True, "seconds": 0.0}

        monkeypatch.setattr(gpu_check, "run_one", run_one)
        shell_start = clock["now"] - rng.uniform(0, 50)  # gpu_check.sh's wheel install, python's start
        report = gpu_check.Report(tmp_path, False, gpu_check.BUDGET_S, {})
        gpu_check.run_steps(gpu_check.STEPS, dry=False, budget=gpu_check.BUDGET_S, report=report, start=shell_start,
                            log=None, env={})
        assert started and started[0][1] == gpu_check.BY_NAME["train"].timeout_s
        assert all(at + timeout <= gpu_check.BUDGET_S for at, timeout in started), started
        assert report.t0 - shell_start + max(at + t for at, t in started) <= gpu_check.TOTAL_LIMIT_S
        assert [s["step"] for s in report.steps] == [s.name for s in gpu_check.STEPS]  # the rest: skipped
        if worst:
            assert sum(t for _, t in started) <= gpu_check.BUDGET_S
            checks = json.loads(files["checks.json"])
            assert any(s["status"] == "skipped" for s in checks["steps"]), "the default steps' timeouts exceed it"


def test_on_a_gpu_the_pytest_step_leaves_out_what_proves_nothing_there():
    cmd = gpu_check.pytest_cmd(dry=False, on_gpu=True)
    assert {f"--ignore={t}" for t in gpu_check.GPU_SKIPPED_TESTS} <= set(cmd)
    assert "tests/kernels/test_packaging.py" in gpu_check.GPU_SKIPPED_TESTS
    assert "tests/kernels/test_triton_compile.py" in gpu_check.GPU_SKIPPED_TESTS
    assert not any(c.startswith("--ignore") for c in gpu_check.pytest_cmd(dry=False, on_gpu=False))
