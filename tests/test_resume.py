"""Kill a short real run (SIGKILL, SIGTERM) at several points and resume it: the resumed run must end
with the uninterrupted run's weights, bit for bit, and the same metrics, steps and evaluations.

Every run is `python -m fastdash.train`'s `main` in a fresh process. The kill points are set by a
test-only wrapper (`RUNNER` below) that patches the trainer in that process, so production code
carries no kill hooks:
  generate:N  SIGKILL once the engine returned step N's completions (before rewards and backward)
  backward:N  SIGKILL in step N's backward, after the first micro-batch's gradients accumulated
  save:N      SIGKILL in the middle of writing checkpoint-N (model written, state not yet)
  term:N      SIGTERM during step N's generation: the run finishes step N, saves, exits 143
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["model=random:tiny", "reward=tests.resume_rewards:digit_parity", "num_threads=1", "max_steps=6",
        "train_batch_size=16", "generation_batch_size=16", "max_completion_length=6", "num_train_problems=200",
        "num_eval_problems=10", "eval_steps=3", "save_steps=2", "save_total_limit=2", "plots=false",
        "max_tokens_per_microbatch=64", "learning_rate=1e-3"]
NOISY = "reward=tests.resume_rewards:noisy_digit_parity"  # reads the global RNGs (tests/test_rng_resume.py)

RUNNER = r"""
import os, signal, sys
import fastdash.checkpoint as C
import fastdash.memory as M
import fastdash.rollout.hf as H
import fastdash.trainer as T
from fastdash.train import main

# Speed only: the memory plan's gc passes cost seconds and change nothing the run computes.
M.CpuMemoryProbe.empty_cache = lambda self: None
phase, at = os.environ.get("FASTDASH_TEST_KILL_AT", "none:0").split(":")
at = int(at)
cur = {"step": 0, "losses": 0}

def hit():
    os.kill(os.getpid(), signal.SIGTERM if phase == "term" else signal.SIGKILL)

step = T.Trainer.step
def traced_step(self):
    cur["step"], cur["losses"] = self.state.step + 1, 0
    try:
        return step(self)
    finally:
        cur["step"] = 0  # evaluation also generates: never a kill point
T.Trainer.step = traced_step

generate = H.HFEngine.generate
def traced_generate(self, *a, **k):
    out = generate(self, *a, **k)
    if phase in ("generate", "term") and cur["step"] == at:
        hit()
    return out
H.HFEngine.generate = traced_generate

loss = T.fused_policy_loss
def traced_loss(*a, **k):
    cur["losses"] += 1
    if phase == "backward" and cur["step"] == at and cur["losses"] == 2:
        hit()  # micro-batch 1's backward has run, micro-batch 2's has not
    return loss(*a, **k)
T.fused_policy_loss = traced_loss

save_config = C.save_config
def traced_save_config(cfg, path):
    if phase == "save" and path.parent.name.startswith(f".checkpoint-{at}.tmp"):
        hit()
    return save_config(cfg, path)
C.save_config = traced_save_config

sys.exit(main(sys.argv[1:]))
"""


def start(out: Path, kill_at: str | None = None, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "FASTDASH_TEST_KILL_AT": kill_at or "none:0"}
    return subprocess.Popen([sys.executable, "-c", RUNNER, *ARGS, f"output_dir={out}", *extra], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen, expected_rc: int) -> str:
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == expected_rc, f"exit {proc.returncode}, expected {expected_rc}:\n{log[-4000:]}"
    return log


def steps(out: Path, name: str = "metrics.jsonl") -> list[int]:
    return [json.loads(x)["step"] for x in (out / name).read_text().splitlines()]


def complete(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*") if (p / "COMPLETE").exists())


def untimed(out: Path, name: str) -> list[dict]:
    rows = [json.loads(x) for x in (out / name).read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The uninterrupted run (in parallel) and one run killed four times, resumed after each kill. The
    reward draws from the global RNGs (python, numpy, torch): a resume must restore them too."""
    ref_dir, out = tmp_path_factory.mktemp("uninterrupted"), tmp_path_factory.mktemp("killed")
    ref = start(ref_dir, None, NOISY)
    logs = {}

    logs["generate"] = finish(start(out, "generate:3", NOISY), -signal.SIGKILL)
    assert complete(out) == ["checkpoint-2"] and steps(out) == [1, 2]

    logs["term"] = finish(start(out, "term:3", NOISY, "resume=auto"), 128 + signal.SIGTERM)
    assert "stopped by SIGTERM after step 3" in logs["term"] and "resume=auto" in logs["term"]
    assert complete(out) == ["checkpoint-2", "checkpoint-3"] and steps(out) == [1, 2, 3]  # 3: the signal's save

    logs["backward"] = finish(start(out, "backward:5", NOISY, "resume=auto"), -signal.SIGKILL)
    assert complete(out) == ["checkpoint-3", "checkpoint-4"] and steps(out) == [1, 2, 3, 4]

    logs["save"] = finish(start(out, "save:6", NOISY, "resume=auto"), -signal.SIGKILL)
    partial = list(out.glob(".checkpoint-6.tmp-*"))
    assert len(partial) == 1 and (partial[0] / "model.safetensors").exists()
    assert not (partial[0] / "COMPLETE").exists() and complete(out) == ["checkpoint-3", "checkpoint-4"]
    # Plant what a crash or a bad disk leaves: a half checkpoint without marker, and a newer one with a
    # marker whose files are truncated. resume=auto must skip both and continue from checkpoint-4.
    (out / "checkpoint-99").mkdir()
    (out / "checkpoint-99" / "model.safetensors").write_bytes(b"\0" * 100)
    shutil.copytree(out / "checkpoint-4", out / "checkpoint-5")
    blob = (out / "checkpoint-5" / "trainer_state.pt").read_bytes()
    (out / "checkpoint-5" / "trainer_state.pt").write_bytes(blob[: len(blob) // 2])

    logs["final"] = finish(start(out, None, NOISY, "resume=auto"), 0)
    logs["ref"] = finish(ref, 0)
    return ref_dir, out, logs


def test_resumed_weights_equal_uninterrupted_run_bit_for_bit(runs):
    ref_dir, out, logs = runs
    assert "checkpoint-5 cannot be read" in logs["final"] and "resumed from" in logs["final"]
    a, b = load_file(ref_dir / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    unequal = [k for k in a if not torch.equal(a[k], b[k])]
    assert not unequal, f"{len(unequal)} tensors differ, e.g. {unequal[:3]}"
    # Not vacuous: training moved the weights after the last kill's checkpoint.
    mid = load_file(ref_dir / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(a[k], mid[k]) for k in a)


def test_metrics_continue_without_duplicate_or_missing_steps(runs):
    ref_dir, out, _ = runs
    assert steps(out) == steps(ref_dir) == [1, 2, 3, 4, 5, 6]
    # Same samples in the same order: every per-step number (rewards, lengths, losses, sample count) agrees.
    assert untimed(out, "metrics.jsonl") == untimed(ref_dir, "metrics.jsonl")
    assert steps(out, "evals.jsonl") == [0, 3, 6]
    assert untimed(out, "evals.jsonl") == untimed(ref_dir, "evals.jsonl")
    s_ref, s_out = (json.loads((d / "summary.json").read_text()) for d in (ref_dir, out))
    assert s_out["samples"] == s_ref["samples"] == 6 * 16
    assert s_out["optimizer_steps"] == s_ref["optimizer_steps"] == 6
    assert s_out["counters"] == s_ref["counters"]
    assert s_out["eval/accuracy_before"] == s_ref["eval/accuracy_before"]


def test_checkpoint_directory_after_resume(runs):
    _, out, _ = runs
    assert "checkpoint-6" in complete(out) and not list(out.glob(".checkpoint-*"))  # partial save tidied
    state = torch.load(out / "checkpoint-6" / "trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 6 and state["state"]["samples"] == 96
    assert set(state["rng"]) >= {"python", "numpy", "torch"}
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)


def test_sharded_checkpoint_format_resumes_bit_for_bit(tmp_path):
    """checkpoint_format=sharded (torch.distributed.checkpoint files) on one process: killed after
    checkpoint-2, resumed, the final weights equal the uninterrupted run's bit for bit."""
    ref_dir, out = tmp_path / "ref", tmp_path / "cut"
    extra = ("checkpoint_format=sharded", "max_steps=4", "eval_steps=0")
    ref = start(ref_dir, None, *extra)
    finish(start(out, "generate:3", *extra), -signal.SIGKILL)
    ckpt = out / "checkpoint-2"
    assert complete(out) == ["checkpoint-2"] and (ckpt / "dcp" / ".metadata").exists()
    assert not (ckpt / "model.safetensors").exists()
    assert "resumed from" in finish(start(out, None, *extra, "resume=auto"), 0)
    finish(ref, 0)
    a, b = load_file(ref_dir / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
