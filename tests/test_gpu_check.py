"""scripts/gpu_check.py's CPU dry mode: every step's Python entry at tiny sizes, so CI exercises
the code a GPU run will execute (the GPU sizes differ only in numbers)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_check)


# 2, 5 and 7 take 10-15 s each on an idle 2-core machine (every kernel case, the planner's probes, three
# training steps): marked slow, they still run in CI.
@pytest.mark.parametrize("step", [pytest.param(2, marks=pytest.mark.slow), 3, 4, pytest.param(5, marks=pytest.mark.slow),
                                  6, pytest.param(7, marks=pytest.mark.slow), 8])
def test_dry_step_runs_and_passes(step, tmp_path):
    res = gpu_check.run_step(step, True, tmp_path)
    json.dumps(res, default=str)  # what the child writes
    assert res["ok"] is not False, {k: v for k, v in res.items() if k != "plan"}
    if step == 2:
        assert res["cases"] == 2 * 2 * 4 * 2 and not res["failed"]  # peaked x T x loss x beta, torch backend
    if step == 3:
        assert all("ms" in r for r in res["rows"]), res["rows"]
    if step == 6:
        assert res["forced_lengths_honoured"]
    if step == 8:
        assert res["static"]["lengths_honoured"] and 0 < res["static"]["graphs_first_call"] <= len(res["buckets_used"])


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
                       capture_output=True, text=True, cwd=ROOT, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    files = list(tmp_path.iterdir())
    assert len(files) <= 8 and all(f.is_file() for f in files)
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert [s["step"] for s in checks["steps"]] == list(range(9)) and all(s["ok"] is not False for s in checks["steps"])
    assert "| 8 |" in (tmp_path / "summary.md").read_text()


def test_fastdash_trains_a_random_preset_without_datasets_or_math_verify():
    """The GPU image has neither: importing fastdash and training must not need them."""
    p = subprocess.run([sys.executable, "-c", gpu_check._NO_DATASETS], capture_output=True, text=True, cwd=ROOT,
                       timeout=600)
    assert p.returncode == 0 and "trained one step" in p.stdout, p.stderr[-3000:]
