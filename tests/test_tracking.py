"""report_to (TensorBoard, trackio), logging_steps and log_completions, through a real training run:
what the trackers and completions.jsonl hold is read back with their own readers."""
from __future__ import annotations

import json
import os
import statistics
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import fastdash.memory
from fastdash.train import main, run_training
from fastdash.tracking import Tracking, completion_rows, print_completions, report_to_list, scalars, wandb_mode
from tests.conftest import tiny_config

STEPS, LOGGING_STEPS, W = 3, 2, [1.0, 0.5]
REWARDS = '''
def parity(completion, answer, **_):
    return float(sum(int(c) for c in completion if c.isdigit()) % 2)


def length(completion, answer, **_):
    return len(completion) / 8
'''


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """One 3-step run: report_to tensorboard + trackio, logging_steps 2, every sample's completion logged,
    two reward functions (a user module), weighted, GDPO aggregation."""
    root = tmp_path_factory.mktemp("tracking")
    if "trackio" in sys.modules:  # it reads TRACKIO_DIR once, at import: it would write to the user's store
        pytest.fail("trackio was imported before this module set TRACKIO_DIR")
    (root / "fd_track_rewards.py").write_text(textwrap.dedent(REWARDS))
    out = root / "run"
    out.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRACKIO_DIR", str(root / "trackio"))
        mp.delenv("TRACKIO_PROJECT", raising=False)
        mp.syspath_prepend(str(root))
        mp.setattr(fastdash.memory.CpuMemoryProbe, "empty_cache", lambda self: None)  # seconds of gc, no effect
        cfg = tiny_config(output_dir=str(out), max_steps=STEPS, logging_steps=LOGGING_STEPS, run_name="tracked",
                          report_to="tensorboard,trackio", log_completions=True, num_completions_to_print=None,
                          reward=["fd_track_rewards:parity", "fd_track_rewards:length"], reward_weights=W,
                          multi_objective_aggregation="normalize_then_sum", gradient_filtering=False,
                          eval_sampled=False, num_eval_problems=4, num_threads=1)
        threads = torch.get_num_threads()
        try:
            run_training(cfg, out)
        finally:
            torch.set_num_threads(threads)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [json.loads(x) for x in (out / "evals.jsonl").read_text().splitlines()]
    return SimpleNamespace(out=out, rows=rows, evals=evals, cfg=cfg)


def test_tensorboard_reads_back_what_metrics_jsonl_holds_on_logging_steps(tracked):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked.out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    assert [r["step"] for r in tracked.rows] == [1, 2, 3]  # metrics.jsonl keeps every step
    logged = [r for r in tracked.rows if r["step"] % LOGGING_STEPS == 0]
    expected = {}  # tag -> {step: value}; the event files store fp32
    for row in logged + tracked.evals:
        for key, value in scalars(row).items():
            expected.setdefault(key, {})[row["step"]] = np.float32(value).item()
    assert "reward/mean" in expected and "time/generate_s" in expected and "rewards/parity/mean" in expected
    assert set(acc.Tags()["scalars"]) == set(expected)
    for tag, values in expected.items():
        assert {e.step: e.value for e in acc.Scalars(tag)} == values, tag
    text = acc.Tensors("completions/text_summary")
    assert [t.step for t in text] == [2] and b"| prompt |" in text[0].tensor_proto.string_val[0]


def test_trackio_local_store_has_the_run(tracked):
    from trackio.sqlite_storage import SQLiteStorage

    assert "tracked" in SQLiteStorage.get_runs("fastdash")
    logs = SQLiteStorage.get_logs("fastdash", "tracked")
    by_step = {}
    for entry in logs:
        by_step.setdefault(entry["step"], {}).update(entry)
    for row in [r for r in tracked.rows if r["step"] % LOGGING_STEPS == 0] + tracked.evals:
        for key, value in scalars(row).items():
            assert by_step[row["step"]][key] == value, key
    assert "loss" not in by_step.get(1, {}) and "loss" not in by_step.get(3, {})  # not logging steps
    table = by_step[2]["completions"]["_value"]
    on_disk = [json.loads(x) for x in (tracked.out / "completions.jsonl").read_text().splitlines()]
    assert table == on_disk
    assert SQLiteStorage.get_run_config("fastdash", "tracked")["reward_weights"] == W


def test_completions_jsonl_holds_the_sampled_rows(tracked):
    """Every sample of step 2 (num_completions_to_print=None), in order: its reward is the weighted sum of
    the two functions on the logged text, its advantage TRL's normalize_then_sum of them (float64 ref)."""
    sys.path.insert(0, str(tracked.out.parent))
    try:
        import fd_track_rewards as fns
    finally:
        sys.path.remove(str(tracked.out.parent))
    rows = [json.loads(x) for x in (tracked.out / "completions.jsonl").read_text().splitlines()]
    assert len(rows) == tracked.cfg.train_batch_size and {r["step"] for r in rows} == {2}
    parts = [[fns.parity(r["completion"], ""), fns.length(r["completion"], "")] for r in rows]
    assert [r["reward"] for r in rows] == [W[0] * a + W[1] * b for a, b in parts]
    step2 = next(r for r in tracked.rows if r["step"] == 2)
    assert step2["rewards/parity/mean"] == pytest.approx(statistics.fmean(p[0] for p in parts), rel=1e-12)
    from tests.test_reward_weights import ref_normalize_then_sum

    ref = ref_normalize_then_sum(parts, W)
    assert max(abs(r["advantage"] - x) for r, x in zip(rows, ref)) <= 2 * np.finfo(np.float32).eps * max(map(abs, ref))
    assert all(r["prompt"] and r["prompt"].endswith("=") for r in rows)  # arithmetic prompts, decoded


def test_a_resumed_run_replaces_the_steps_past_its_checkpoint(tmp_path):
    """Resuming from checkpoint 2 of 4: TensorBoard purges steps 3-4 of the first attempt, completions.jsonl
    drops them; each step then holds the resumed run's values only, as metrics.jsonl does."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_config(report_to="tensorboard", log_completions=True, num_completions_to_print=1)
    samples = [SimpleNamespace(prompt_ids=[1], completion_ids=[2], reward=1.0, advantage=0.5)]
    for start, tag in ((0, 1.0), (2, 2.0)):  # the first attempt ran to step 4; the resumed one redoes 3 and 4
        tracking = Tracking(cfg, tmp_path, start_step=start)
        for step in range(start + 1, 5):
            tracking.log_step({"step": step, "loss": tag * step}, samples, lambda ids: f"attempt {tag}")
        tracking.close()
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 6.0), (4, 8.0)]
    rows = [json.loads(x) for x in (tmp_path / "completions.jsonl").read_text().splitlines()]
    assert [(r["step"], r["prompt"]) for r in rows] == [(1, "attempt 1.0"), (2, "attempt 1.0"),
                                                      (3, "attempt 2.0"), (4, "attempt 2.0")]


def test_a_few_completions_spread_over_the_step():
    samples = [SimpleNamespace(prompt_ids=[i], completion_ids=[i, i], reward=float(i), advantage=-float(i))
               for i in range(16)]
    rows = completion_rows(7, samples, lambda ids: ",".join(map(str, ids)), k=3)
    assert [r["reward"] for r in rows] == [0.0, 5.0, 10.0]  # three prompts' groups, not the first one's G
    assert rows[1] == {"step": 7, "prompt": "5", "completion": "5,5", "reward": 5.0, "advantage": -5.0}
    assert len(completion_rows(7, samples, str, k=None)) == 16


def test_completions_print_as_a_table(capsys):
    print_completions([{"step": 4, "prompt": "12+30=", "completion": "42", "reward": 1.0, "advantage": 0.5}])
    shown = capsys.readouterr().out
    assert "completions, step 4" in shown and "12+30=" in shown and "0.500" in shown


def test_a_missing_tracker_fails_at_start_naming_the_extra(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    code = main([f"output_dir={tmp_path}", "model=random:tiny", "report_to=[trackio, tensorboard]"])
    assert code == 2
    err = capsys.readouterr().err
    assert "report_to" in err and "pip install 'fastdash[tensorboard]'" in err
    assert not (tmp_path / "config.yaml").exists()  # before anything was built or written


def test_report_to_follows_the_hf_convention(monkeypatch):
    assert report_to_list("none") == [] and report_to_list([]) == [] and report_to_list(["none"]) == []
    assert report_to_list("tensorboard") == ["tensorboard"]
    assert report_to_list("trackio, tensorboard") == report_to_list(["trackio", "tensorboard"])
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert report_to_list("all") == ["tensorboard", "trackio"]  # the installed ones
    for bad in ("mlflow", ["tensorboard", "tensorboard"], ["none", "trackio"]):
        with pytest.raises(ValueError, match="config: report_to="):
            report_to_list(bad)
    with pytest.raises(ValueError, match="config: report_to="):
        tiny_config(report_to="tensorbord")
    for key, value in (("logging_steps", 0), ("num_completions_to_print", 0)):
        with pytest.raises(ValueError, match=f"config: {key}="):
            tiny_config(**{key: value})


def test_wandb_is_offline_unless_the_user_configured_it():
    assert wandb_mode({}) == {"mode": "offline"}
    assert wandb_mode({"WANDB_MODE": "online"}) == {} and wandb_mode({"WANDB_API_KEY": "k"}) == {}
    assert wandb_mode(dict(os.environ, WANDB_MODE="disabled")) == {}
