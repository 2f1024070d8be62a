"""Several ranks on CPU (gloo): the maths of one process, resume, failures, bad combinations.

Ranks are launched as torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT env), one
subprocess each, so what is tested is the code path `torchrun -m fastdash.train` runs.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2, port: int | None = None, **popen) -> list[subprocess.Popen]:
    port = port or free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, **popen))
    return procs


def wait_all(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            raise AssertionError(f"rank did not finish within {timeout} s:\n{text[-3000:]}")
        out.append((p.returncode, text))
    return out


def _bound(ref: torch.Tensor, terms: int) -> float:
    """fp32 reordering bound of a sum: the ranks add the same per-token terms in another order (and
    pack them in other micro-batches): a few ulps of the largest magnitude per sqrt(term count)."""
    return 4 * EPS32 * float(ref.abs().max()) * terms ** 0.5 + 1e-30


def test_two_ranks_step_equals_one_process(tmp_path):
    """Gradients before the step and weights after it (SGD, lr 1) on 2 ranks = 1 process, for every
    loss type with the filter on, beta 0 and > 0, Multi with batch-std advantages and padding."""
    procs = launch([str(HERE / "dist_worker.py"), str(tmp_path)])
    for rc, text in wait_all(procs, timeout=300):
        assert rc == 0, text[-3000:]
    for i, case in enumerate(dist_worker.CASES):
        ref = dist_worker.one_step(case)
        ranks = [torch.load(tmp_path / f"case{i}-rank{r}.pt") for r in range(2)]
        assert ref["grads"], case
        assert [r["world"] for r in ranks] == [2, 2] and ref["world"] == 1
        assert [r["engine_rows"] for r in ranks] == [ref["engine_rows"] // 2] * 2  # each rank generated half
        terms = ref["metrics"]["tokens/loss"] + 2
        for name, g in ref["grads"].items():
            for got in ranks:  # every rank holds the summed gradient
                assert torch.allclose(got["grads"][name], g, rtol=0, atol=_bound(g, terms)), (case, name)
        for name, w in ref["weights"].items():
            g = ref["grads"].get(name, torch.zeros_like(w))
            for got in ranks:
                # w1 = w0 - g: the gradient's bound plus the rounding of the subtraction
                bound = _bound(g, terms) + EPS32 * float(w.abs().max())
                assert torch.allclose(got["weights"][name], w, rtol=0, atol=bound), (case, name)
        for key in ("filter/kept_samples", "filter/kept_fraction", "reward/mean", "reward/std", "tokens/loss",
                    "completion/mean_length", "mask/dropped_samples"):
            assert ranks[0]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-12), (case, key)
        assert ranks[0]["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5, abs=1e-7), case
