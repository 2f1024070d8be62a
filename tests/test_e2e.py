"""A short real run on CPU: the shipped base model learns, and the run directory is complete."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from fastdash.config import Config
from fastdash.models import SHIPPED
from fastdash.train import run_training

STEPS = 40
STEP_KEYS = ("step", "reward/mean", "reward/std", "filter/kept_fraction", "completion/mean_length", "loss",
             "time/generate_s", "time/reward_s", "time/logprob_s", "time/backward_s", "time/optimizer_s",
             "time/sync_s", "time/step_s")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    if not (SHIPPED["tiny-arith"] / "model.safetensors").exists():
        pytest.fail("the shipped base model is missing: run scripts/make_base_model.py")
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(2)
    cfg = Config(output_dir=str(out), max_steps=STEPS, train_batch_size=128, generation_batch_size=128,
                 num_eval_problems=300, beta=0.02, save_steps=20)
    return out, run_training(cfg, out)


def test_reward_rises(short_run):
    out, _ = short_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    first = sum(r["reward/mean"] for r in rows[:5]) / 5
    last = sum(r["reward/mean"] for r in rows[-5:]) / 5
    assert last > first + 0.05, (first, last)


def test_heldout_greedy_accuracy_rises(short_run):
    _, summary = short_run
    assert summary["eval/accuracy_after"] > summary["eval/accuracy_before"] + 0.05, summary


def test_run_directory_is_complete(short_run):
    out, summary = short_run
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    for key in STEP_KEYS + ("kl",):
        assert all(key in r for r in rows), key
    for key in ("eval/accuracy_before", "eval/accuracy_after", "samples", "optimizer_steps", "time/total_s",
                "time/generate_s", "time/backward_s"):
        assert key in summary, key
    assert summary["samples"] == STEPS * 128 and summary["optimizer_steps"] == STEPS
    assert 0.0 < summary["eval/accuracy_before"] < 1.0
    for name in ("config.yaml", "summary.json", "reward.png", "time.png", "memory_plan.json"):
        assert (out / name).exists(), name
    assert (out / f"checkpoint-{STEPS}" / "COMPLETE").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(out / "final", local_files_only=True)
    assert reloaded.config.hidden_size == 128
