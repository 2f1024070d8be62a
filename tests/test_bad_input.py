"""Bad input never crashes a run mid-way without saving, and never goes unexplained: malformed or empty
data, over-long prompts, empty completions, failing rewards, non-finite losses, missing / corrupt /
incompatible checkpoints, a config that does not match its checkpoint, SIGINT."""
from __future__ import annotations

import json
import logging
import math
import os
import signal

import pytest
import torch
from safetensors.torch import load_file, save_file

import fastdash.memory
import fastdash.trainer as trainer_mod
from fastdash.batch import Completion
from fastdash.checkpoint import MARKER, check_output_dir, load_checkpoint, resume_if_asked, save_checkpoint
from fastdash.runtime import build_run
from fastdash.train import TrainingInterrupted, main, run_training
from fastdash.trainer import Trainer
from tests.conftest import ScriptedEngine, digit_sum_reward, tiny_config


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def fast_plan(monkeypatch):
    """run_training plans memory by measuring; its gc passes cost seconds and change nothing here."""
    monkeypatch.setattr(fastdash.memory.CpuMemoryProbe, "empty_cache", lambda self: None)
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------- data --------------------------------
def test_malformed_and_empty_rows_are_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(30)]
    rows += [{"prompt": "", "answer": "1"}, {"prompt": "1+1=", "answer": ""}, {"answer": "3"}, {"prompt": "2+2="}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fastdash"):
        run = build_run(tiny_config(task="plain", reward="arithmetic", dataset=path, num_eval_problems=5),
                        with_plan=False)
    assert len(run.train_problems) + len(run.eval_problems) == 30
    assert "skipped 4 of 34 rows" in caplog.text


def test_dataset_without_usable_rows_says_what_to_fix(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "1+1=", "answer": "2"}] * 5)
    with pytest.raises(ValueError, match="no usable rows.*expected columns: prompt, answer"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=path), with_plan=False)


def test_empty_dataset_file_says_what_to_fix(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(tmp_path / "empty.jsonl")),
                  with_plan=False)


def test_broken_jsonl_line_names_file_and_line(tmp_path):
    good = json.dumps({"prompt": "1+1=", "answer": "2"})
    path = tmp_path / "broken.jsonl"
    path.write_text(f"{good}\n{good}\n{{\"prompt\": \"2+2=\", \"answer\": \n{good}\n")
    with pytest.raises(ValueError, match=r"broken.jsonl, line 3: not valid JSON.*one JSON object per line") as e:
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(path)), with_plan=False)
    assert "DatasetGenerationError" not in str(e.value)
    path.write_text(f"{good}\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2: a JSON list, not an object"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(path)), with_plan=False)


def test_unreadable_json_and_parquet_files_say_what_was_expected(tmp_path):
    (tmp_path / "d.json").write_text('[{"prompt": "1+1=", "answer": "2"}, {"prompt": ')
    with pytest.raises(ValueError, match=r"cannot read .*d.json' as json.*expected a JSON array"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(tmp_path / "d.json")), with_plan=False)
    (tmp_path / "d.parquet").write_bytes(b"not a parquet file at all")
    with pytest.raises(ValueError, match=r"cannot read .*d.parquet' as parquet.*expected a parquet table"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(tmp_path / "d.parquet")),
                  with_plan=False)


def test_columns_of_the_wrong_type_are_named(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": [1, 2, 3], "answer": ["1", "2", "3"]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match=r"no usable rows.*3 prompt is int, not text.*expected columns: prompt, answer"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=str(tmp_path / "d.parquet")),
                  with_plan=False)


def test_prompts_longer_than_max_prompt_length(tmp_path, caplog):
    short, long = {"prompt": "1+1=", "answer": "2"}, {"prompt": "1+" * 20 + "1=", "answer": "21"}
    rows = [short, short, long] * 10
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="fastdash"):
        run = build_run(tiny_config(task="plain", reward="arithmetic", dataset=path, num_eval_problems=5,
                                    max_prompt_length=8),
                        with_plan=False)
    assert all(len(run.prompt_ids(p)) <= 8 for p in run.train_problems + run.eval_problems)
    assert "longer than max_prompt_length=8" in caplog.text
    with pytest.raises(ValueError, match="every prompt is longer than max_prompt_length=2; raise it"):
        build_run(tiny_config(task="plain", reward="arithmetic", dataset=path, max_prompt_length=2), with_plan=False)


# ---------------------------------------------------------------- one step ----------------------------
class EmptyEngine(ScriptedEngine):
    """Every other completion (or all of them) comes back empty."""

    def __init__(self, every: int, **kw):
        super().__init__(**kw)
        self.every = every

    def generate(self, prompts, n, params):
        out = super().generate(prompts, n, params)
        return [Completion(c.prompt_ids, [], False) if i % self.every == 0 else c for i, c in enumerate(out)]


def test_empty_completions_are_never_trained_on(scripted_run):
    cfg, run = scripted_run(gradient_filtering=False)
    run.engine = EmptyEngine(every=2)
    trainer = Trainer(cfg, run)
    metrics = trainer.step()
    assert metrics["skipped"] == 0 and metrics["filter/kept_samples"] == 8  # the 8 non-empty ones

    cfg, run = scripted_run(gradient_filtering=False)
    run.engine = EmptyEngine(every=1)
    before = _weights(run.model)
    metrics = Trainer(cfg, run).step()
    assert metrics["skipped"] == 1 and _same(before, _weights(run.model))
    assert run.state.counters["skipped_empty_steps"] == 1


def test_reward_that_raises_or_returns_garbage_scores_zero_and_is_counted(scripted_run):
    cfg, run = scripted_run()
    calls = []

    def flaky(completion, answer, **kw):
        calls.append(1)
        kind = len(calls) % 6
        if kind == 1:
            raise RuntimeError("grader crashed")
        return {2: float("nan"), 3: None, 4: [1.0], 5: float("inf")}.get(kind, digit_sum_reward(completion, answer))

    run.reward_fn = flaky
    trainer = Trainer(cfg, run)
    metrics = trainer.step()
    failed = sum(1 for i in range(1, 17) if i % 6 != 0)  # every kind but the last is a failure
    assert metrics["reward/failures"] == failed == run.state.counters["reward_failures"]
    assert math.isfinite(metrics["loss"]) and math.isfinite(metrics["reward/mean"])
    assert run.state.step == 1


def _nan_loss(monkeypatch, from_call: int = 1):
    real, calls = trainer_mod.fused_policy_loss, []

    def nan_loss(*a, **k):
        calls.append(1)
        out = real(*a, **k)
        if len(calls) >= from_call:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(trainer_mod, "fused_policy_loss", nan_loss)
    return calls


def test_nonfinite_loss_skips_the_step_keeps_weights_then_stops(scripted_run, monkeypatch):
    cfg, run = scripted_run(max_nonfinite_steps=3, max_steps=5)
    _nan_loss(monkeypatch)
    trainer = Trainer(cfg, run)
    before, opt_before = _weights(run.model), run.optimizer.state_dict()
    for k in (1, 2):
        metrics = trainer.step()
        assert metrics["skipped"] == 1 and math.isnan(metrics["grad_norm"])
        assert run.state.counters["nonfinite_steps"] == k and run.state.nonfinite_streak == k
    assert _same(before, _weights(run.model)) and run.optimizer.state_dict()["state"] == opt_before["state"]
    assert all(p.grad is None for p in run.model.parameters())
    with pytest.raises(RuntimeError, match="3 optimizer steps in a row had non-finite gradients; lower learning_rate"):
        trainer.step()
    assert _same(before, _weights(run.model))


# ---------------------------------------------------------------- checkpoints -------------------------
@pytest.fixture
def saved(scripted_run, tmp_path):
    """A checkpoint after one real step, and a fresh run to load it into."""
    cfg, run = scripted_run(output_dir=str(tmp_path))
    trainer = Trainer(cfg, run)
    trainer.step()
    path = save_checkpoint(cfg, run, trainer, tmp_path)
    return path, scripted_run


def test_checkpoint_round_trip(saved):
    path, make = saved
    cfg, run = make()
    trainer, fresh = Trainer(cfg, run), _weights(run.model)
    torch.manual_seed(123)  # the checkpoint's RNG state must replace this
    load_checkpoint(cfg, run, trainer, path)
    saved_weights = load_file(path / "model.safetensors")
    blob = torch.load(path / "trainer_state.pt", weights_only=False)
    own = run.model.state_dict()
    assert all(torch.equal(own[k], v) for k, v in saved_weights.items())
    assert any(not torch.equal(fresh[k], v) for k, v in saved_weights.items())  # the step moved them
    assert torch.equal(torch.get_rng_state(), blob["rng"]["torch"])
    assert run.state.step == 1 and run.state.samples == 16 and run.optimizer.state_dict()["state"]


def test_missing_partial_and_corrupt_checkpoints(saved, tmp_path):
    path, make = saved
    cfg, run = make(resume=str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="does not exist"):
        resume_if_asked(cfg, run, Trainer(cfg, run), tmp_path)
    (path / MARKER).unlink()  # a half-written checkpoint
    cfg, run = make(resume=str(path))
    with pytest.raises(ValueError, match="not a complete fastdash checkpoint"):
        resume_if_asked(cfg, run, Trainer(cfg, run), tmp_path)
    (path / MARKER).write_text("ok\n")
    (path / "model.safetensors").write_bytes(b"garbage")
    before = _weights(run.model)
    with pytest.raises(ValueError, match="cannot be read.*delete it or pass another resume=PATH"):
        resume_if_asked(cfg, run, Trainer(cfg, run), tmp_path)
    assert _same(before, _weights(run.model)) and run.state.step == 0
    torch.save({"something": "else"}, path / "trainer_state.pt")
    with pytest.raises(ValueError, match="cannot be read|not a fastdash trainer state"):
        resume_if_asked(cfg, run, Trainer(cfg, run), tmp_path)


def test_incompatible_checkpoint_weights(saved):
    path, make = saved
    weights = load_file(path / "model.safetensors")
    weights["model.norm.weight"] = torch.ones(7)
    save_file(weights, path / "model.safetensors")
    cfg, run = make()
    before = _weights(run.model)
    with pytest.raises(ValueError, match="does not fit the model.*model.norm.weight"):
        load_checkpoint(cfg, run, Trainer(cfg, run), path)
    assert _same(before, _weights(run.model)) and run.state.step == 0


def test_config_that_does_not_match_the_checkpoint(saved):
    path, make = saved
    cfg, run = make(seed=7, num_generations=2)
    before = _weights(run.model)
    with pytest.raises(ValueError, match="different config: num_generations: checkpoint 4 vs now 2, seed: "
                                         "checkpoint 42 vs now 7"):
        load_checkpoint(cfg, run, Trainer(cfg, run), path)
    assert _same(before, _weights(run.model)) and run.state.step == 0


def test_a_changed_chat_rendering_refuses_the_checkpoint(saved):
    path, make = saved
    cfg, run = make(chat_template=False)  # every prompt the run trains on would be rendered otherwise
    with pytest.raises(ValueError, match="different config: chat_template: checkpoint 'auto' vs now False"):
        load_checkpoint(cfg, run, Trainer(cfg, run), path)


def test_learning_rate_may_change_on_resume(saved):
    path, make = saved
    cfg, run = make(learning_rate=1e-5)
    load_checkpoint(cfg, run, Trainer(cfg, run), path)
    assert run.lr_scheduler.base_lrs == [1e-5]
    assert run.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5 * (2 - 1) / 2)  # linear decay, step 1 of 2


def test_kill_while_replacing_a_checkpoint_is_recovered(saved, tmp_path):
    path, make = saved
    path.rename(tmp_path / ".checkpoint-1.old-999")  # a re-save killed between its two renames
    (tmp_path / ".checkpoint-1.tmp-999").mkdir()  # next to a half-written replacement
    cfg, run = make(resume="auto", output_dir=str(tmp_path))
    check_output_dir(cfg, tmp_path)  # what a run does first: tidy what the killed save left
    assert resume_if_asked(cfg, run, Trainer(cfg, run), tmp_path) == tmp_path / "checkpoint-1"
    assert run.state.step == 1 and not list(tmp_path.glob(".checkpoint-*"))


def test_new_run_refuses_a_directory_with_checkpoints(saved, tmp_path):
    _, make = saved
    cfg, run = make()
    with pytest.raises(ValueError, match="already holds checkpoints.*resume=auto"):
        check_output_dir(cfg, tmp_path)
    cfg, run = make(resume="auto")
    with pytest.raises(ValueError, match="resume=auto needs output_dir"):
        check_output_dir(cfg, tmp_path)


# ---------------------------------------------------------------- whole runs --------------------------
def test_sigint_saves_then_stops_and_a_mismatched_resume_is_refused(tmp_path, monkeypatch, fast_plan, capsys):
    real_step = Trainer.step

    def step(self):
        if self.state.step == 1:
            os.kill(os.getpid(), signal.SIGINT)  # arrives mid-step; the step still completes
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    previous = signal.getsignal(signal.SIGINT)
    cfg = tiny_config(output_dir=str(tmp_path), max_steps=4, num_eval_problems=5, num_threads=1,
                      reward="tests.resume_rewards:digit_parity")
    with pytest.raises(TrainingInterrupted, match="stopped by SIGINT after step 2") as e:
        run_training(cfg, tmp_path)
    assert signal.getsignal(signal.SIGINT) is previous
    assert e.value.path == tmp_path / "checkpoint-2" and (e.value.path / MARKER).exists()
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]

    args = ["model=random:tiny", "max_steps=4", "train_batch_size=16", "generation_batch_size=16",
            "max_completion_length=6", "num_eval_problems=5", "plots=false", f"output_dir={tmp_path}",
            "resume=auto", "num_train_problems=100"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "different config: num_train_problems: checkpoint 200 vs now 100" in err and "Traceback" not in err


def test_run_that_fails_mid_way_saves_first(tmp_path, monkeypatch, fast_plan):
    real_step, real_loss = Trainer.step, trainer_mod.fused_policy_loss

    def nan_loss(*a, **k):
        out = real_loss(*a, **k)
        out.loss = out.loss * float("nan")
        return out

    def step(self):  # steps 1-2 train; from step 3 on every loss is NaN
        if self.state.step == 2:
            monkeypatch.setattr(trainer_mod, "fused_policy_loss", nan_loss)
        return real_step(self)

    monkeypatch.setattr(Trainer, "step", step)
    cfg = tiny_config(output_dir=str(tmp_path), max_steps=8, num_eval_problems=5, num_threads=1,
                      max_nonfinite_steps=2, save_steps=0,
                      reward="tests.resume_rewards:digit_parity")
    with pytest.raises(RuntimeError, match="2 optimizer steps in a row had non-finite gradients"):
        run_training(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3] and rows[2]["skipped"] == 1 and rows[2]["grad_norm"] is None
    state = torch.load(tmp_path / "checkpoint-3" / "trainer_state.pt", weights_only=False)
    assert state["state"]["step"] == 3 and state["state"]["counters"]["nonfinite_steps"] == 2
