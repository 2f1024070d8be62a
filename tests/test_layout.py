"""The Layout (fastdash/layout.py): every auto resolved once, the plan made for the engine and the
parallelism the run uses, refusals naming the keys, layout.json and summary.json saying where it ran."""
from __future__ import annotations

import ast
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import fastdash
from fastdash import layout as L
from fastdash.config import Config
from fastdash.memory_plan import MemoryPlanError
from tests.conftest import tiny_config

CPU = torch.device("cpu")


@pytest.fixture
def fast_plan(monkeypatch):
    """The plan's activation probes replaced by a linear stand-in (the fixed part is still measured)."""
    from fastdash import scheduler

    monkeypatch.setattr(scheduler, "measure_activations", lambda *a: lambda tokens: 10_000 * tokens)


def _no_vllm(monkeypatch, reason="`import vllm` failed (test)"):
    from fastdash.rollout import vllm

    monkeypatch.setattr(vllm, "vllm_available", lambda: reason)


def test_each_auto_has_one_rule(monkeypatch):
    assert L.resolve_dtype(Config(), CPU) == "float32"
    assert L.resolve_dtype(Config(), torch.device("cuda", 1)) == "bfloat16"
    assert L.resolve_dtype(Config(dtype="float16"), CPU) == "float16"
    assert L.resolve_parallelism(Config(), 2) == "ddp"
    assert L.resolve_parallelism(Config(), 2, replica_fits=False) == "fsdp"
    assert L.resolve_parallelism(Config(), 1, replica_fits=False) == "ddp"  # one rank: nothing to shard
    assert L.resolve_parallelism(Config(parallelism="ddp"), 2, replica_fits=False) == "ddp"
    _no_vllm(monkeypatch)
    assert L.resolve_layout(Config(), world=1, cuda_devices=0, device=CPU).engine == "hf"
    with pytest.raises(RuntimeError, match="engine=vllm but vLLM cannot be used.*set engine=hf"):
        L.resolve_layout(Config(engine="vllm"), world=1, cuda_devices=0, device=CPU)


def test_auto_is_compared_only_in_its_resolving_function():
    """No module decides dtype / engine / parallelism = auto a second time (`x == "auto"` on those keys)."""
    allowed = {"resolve_dtype", "resolve_parallelism", "resolve_engine"}
    found = []
    for path in Path(fastdash.__file__).parent.rglob("*.py"):
        tree = ast.parse(path.read_text())
        for fn in (n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))):
            for node in ast.walk(fn):
                if (isinstance(node, ast.Compare) and isinstance(node.left, ast.Attribute)
                        and node.left.attr in ("dtype", "engine", "parallelism")
                        and any(isinstance(c, ast.Constant) and c.value == "auto" for c in node.comparators)):
                    found.append((path.name, fn.name))
    assert found and {name for _, name in found} <= allowed, found


def test_plan_is_made_for_hf_when_vllm_is_missing(monkeypatch, fast_plan):
    from fastdash.runtime import build_run

    _no_vllm(monkeypatch)
    # a budget far above what the process holds after the suite's earlier tests (2 GB left 0.9 GiB free in CI)
    run = build_run(tiny_config(engine="auto", memory_budget=16_000_000_000))
    assert run.layout.engine == run.plan.engine == run.engine.name == "hf"
    assert "vLLM not available" in run.layout.engine_reason


def test_plan_follows_the_fallback_when_vllm_fails_to_start(monkeypatch, fast_plan):
    """engine=auto, vLLM imports (faked) but cannot start: the run uses HF, and so does its plan."""
    from fastdash.rollout import vllm, vllm_dp
    from fastdash.runtime import build_run

    monkeypatch.setattr(vllm, "vllm_available", lambda: None)
    planned = []

    def no_start(*a, **k):
        raise RuntimeError("vLLM failed to start (faked: no platform)")

    monkeypatch.setattr(vllm_dp, "make_vllm_engines", no_start)
    import fastdash.runtime as runtime

    real = runtime.build_plan
    monkeypatch.setattr(runtime, "build_plan", lambda cfg, model, layout: planned.append(layout.engine)
                        or real(cfg, model, layout))
    # a budget far above what the process holds after the suite's earlier tests (2 GB left 0.9 GiB free in CI)
    run = build_run(tiny_config(engine="auto", memory_budget=16_000_000_000))
    assert planned == ["vllm", "hf"]  # planned for vLLM, then again for the engine the run got
    assert run.layout.engine == run.plan.engine == run.engine.name == "hf"
    assert "failed to start" in run.layout.engine_reason


def test_lora_plans_for_hf_even_with_vllm_installed(monkeypatch):
    from fastdash.rollout import vllm

    monkeypatch.setattr(vllm, "vllm_available", lambda: None)  # vLLM imports (faked)
    assert L.resolve_layout(Config(), world=1, cuda_devices=0, device=CPU).engine == "vllm"
    lora = L.resolve_layout(Config(lora_r=8), world=1, cuda_devices=0, device=CPU)
    assert lora.engine == lora.planned_engine == "hf"


def test_auto_parallelism_shards_when_no_replica_fits_and_the_layout_says_so(monkeypatch):
    """Two ranks, a plan that finds no room: the layout turns to fsdp (plan_run), and its refusals are
    checked again, naming the key."""
    import fastdash.runtime as runtime

    _no_vllm(monkeypatch)

    def no_room(cfg, model, layout):
        raise MemoryPlanError("the fixed part alone does not fit (test)")

    monkeypatch.setattr(runtime, "build_plan", no_room)
    two = L.resolve_layout(Config(train_batch_size=16, generation_batch_size=16), world=2, cuda_devices=0,
                           device=CPU)
    assert two.parallelism == "ddp"
    plan, sharded = runtime.plan_run(Config(train_batch_size=16, generation_batch_size=16), None, two)
    assert plan is None and sharded.parallelism == "fsdp"
    with pytest.raises(ValueError, match=r"config: async_generation=true with parallelism=auto resolved to fsdp"):
        runtime.plan_run(Config(train_batch_size=16, generation_batch_size=16, async_generation=True,
                                rollout_correction="tis"), None, replace(two, async_generation=True))
    one = replace(two, world_size=1, trainer_ranks=(0,))
    with pytest.raises(MemoryPlanError):  # one rank: nothing to shard, the plan's error stands
        runtime.plan_run(Config(), None, one)
    with pytest.raises(MemoryPlanError):  # parallelism=ddp pinned: the same
        runtime.plan_run(Config(parallelism="ddp", train_batch_size=16, generation_batch_size=16), None, two)


def test_refusals_name_the_keys():
    cases = [(Config(train_batch_size=16, generation_batch_size=16), 3, "train_batch_size=16"),
             (Config(generation_gpus=2), 2, "generation_gpus=2"),
             (Config(async_generation=True, rollout_correction="tis", generation_gpus=1, train_batch_size=16,
                     generation_batch_size=16), 3, "async_generation=true with generation_gpus"),
             (Config(async_generation=True, rollout_correction="tis", parallelism="fsdp", train_batch_size=16,
                     generation_batch_size=16), 2, "async_generation=true with parallelism=fsdp")]
    for cfg, world, key in cases:
        with pytest.raises(ValueError, match=f"config: {key}"):
            L.resolve_layout(replace(cfg, engine="hf"), world=world, cuda_devices=0, device=CPU)


def test_layout_json_and_summary_say_where_it_ran(tmp_path, monkeypatch, fast_plan):
    from fastdash.train import main

    _no_vllm(monkeypatch)
    out = tmp_path / "run"
    assert main(["model=random:tiny", "max_prompt_length=16", "max_completion_length=4", "train_batch_size=8",
                 "generation_batch_size=8", "micro_batch_size=4", "max_steps=1", "num_train_problems=40",
                 "num_eval_problems=4", "eval_sampled=false", "plots=false", "max_tokens_per_microbatch=64",
                 "memory_budget=2000000000", f"output_dir={out}"]) == 0
    layout = json.loads((out / "layout.json").read_text())
    assert layout["device"] == "cpu" and layout["dtype"] == "float32" and layout["engine"] == "hf"
    assert layout["world_size"] == 1 and layout["trainer_ranks"] == [0] and layout["parallelism"] == "ddp"
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["world_size"], summary["trainer_ranks"], summary["generation_ranks"]) == (1, [0], [])


def test_dry_run_prints_the_layout(capsys, monkeypatch, fast_plan):
    from fastdash.train import main

    _no_vllm(monkeypatch)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["--dry-run", "model=random:tiny", "memory_budget=2000000000"]) == 0
    out = capsys.readouterr().out
    assert '"layout": {' in out and '"trainer_ranks": [\n      0,\n      1\n    ]' in out
    assert "layout: device cpu, compute dtype float32, engine hf (auto: vLLM not available" in out
