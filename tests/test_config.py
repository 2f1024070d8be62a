"""Config: recipes, overrides, and errors that name the key and the fix."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from fastdash.config import Config, load_config
from fastdash.train import main

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


def test_defaults_are_the_tiny_dash_run():
    cfg = Config()
    assert cfg.model == "tiny-arith" and cfg.task == "arithmetic"
    assert cfg.generation_batch_size == cfg.train_batch_size == 256 and cfg.gradient_filtering
    assert not cfg.needs_old_logps and cfg.steps_per_generation == 1


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_every_recipe_loads(path):
    cfg = load_config(str(path))
    if "qwen2.5" in path.stem:  # the paper's recipes (tiny and smollm2 are CPU runs)
        assert cfg.learning_rate == 3e-6 and cfg.num_generations == 4 and cfg.loss_type == "dr_grpo"
        assert cfg.max_completion_length == 2048 and cfg.top_k == 50 and cfg.temperature == 0.9


def test_recipe_variants_mean_what_the_paper_says():
    grpo = load_config("recipes/grpo-qwen2.5-0.5b.yaml")
    dash = load_config("recipes/dash-qwen2.5-0.5b.yaml")
    mini = load_config("recipes/mini-qwen2.5-0.5b.yaml")
    multi = load_config("recipes/multi-qwen2.5-0.5b.yaml")
    assert grpo.rollout_size // grpo.generation_batch_size == 32 and not grpo.gradient_filtering
    assert dash.rollout_size == dash.generation_batch_size == 256 and dash.gradient_filtering_threshold == 0.1
    assert mini.steps_per_generation == 32 and mini.needs_old_logps
    assert multi.steps_per_generation == 3 and multi.needs_old_logps
    assert load_config("recipes/nokl-qwen2.5-0.5b.yaml").beta == 0.0 and dash.beta == 0.04


def test_overrides_are_typed():
    cfg = load_config(None, ["learning_rate=1e-5", "beta=0.1", "packing=false", "max_tokens_per_microbatch=4096",
                             "epsilon_high=null", "extra.my_key=3"])
    assert cfg.learning_rate == 1e-5 and cfg.beta == 0.1 and cfg.packing is False
    assert cfg.max_tokens_per_microbatch == 4096 and cfg.epsilon_high is None and cfg.extra == {"my_key": 3}


@pytest.mark.parametrize("override, words", [
    (["lerning_rate=1e-4"], ["unknown key", "lerning_rate", "learning_rate"]),
    (["num_generations=abc"], ["num_generations", "wrong type", "int"]),
    (["train_batch_size=30"], ["train_batch_size", "multiple of num_generations=4"]),
    (["generation_batch_size=24", "train_batch_size=16"], ["generation_batch_size", "divide"]),
    (["loss_type=ppo"], ["loss_type", "grpo", "dr_grpo"]),
    (["temperature=0"], ["temperature", "> 0"]),
    (["task=gsm8k"], ["dataset", "gsm8k"]),
    (["num_generations=1", "train_batch_size=8", "generation_batch_size=8"], ["num_generations", "at least 2"]),
])
def test_bad_config_names_the_key(override, words):
    with pytest.raises(ValueError) as e:
        load_config(None, override)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_cli_rejects_bad_key_with_exit_2(capsys):
    assert main(["no_such_key=1"]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_cli_help_lists_options_with_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for key in ("num_generations = 4", "gradient_filtering_threshold = 0.1", "loss_type = dr_grpo", "--dry-run"):
        assert key in text
    for f in dataclasses.fields(Config):  # every option says what it does, on its own line
        assert f.metadata.get("help"), f"config field {f.name} has no help text"
        assert any(line.split()[0] == f.name and f.metadata["help"] in line for line in text.splitlines()
                   if line.strip()), f.name


def test_dry_run_prints_config_and_plan(capsys):
    assert main(["--dry-run", "model=random:tiny", "memory_budget=2000000000"]) == 0
    out = capsys.readouterr().out
    assert '"num_generations": 4' in out and "max_tokens_per_microbatch" in out


def test_dry_run_on_two_ranks_with_fsdp_prints_the_sharded_share(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it; --dry-run joins no process group
    assert main(["--dry-run", "model=random:tiny", "memory_budget=2000000000", "parallelism=fsdp"]) == 0
    out = capsys.readouterr().out
    assert "ranks: 2 (fsdp:" in out and "fsdp per rank:" in out and "1/2 of" in out and "memory plan" in out
    assert "placement: colocated; every rank generates its share with its own engine on CPU" in out


def test_dry_run_with_split_placement_prints_trainers_and_generation_ranks(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")  # 2 trainer ranks + 1 generation rank
    assert main(["--dry-run", "model=random:tiny", "memory_budget=2000000000", "generation_gpus=1",
                 "train_batch_size=16", "generation_batch_size=16"]) == 0
    out = capsys.readouterr().out
    assert "ranks: 2 (ddp:" in out and "per rank: 8 samples" in out, out[-2000:]
    assert "placement: split; trainer ranks 0..1, generation ranks 2..2" in out and "over gloo" in out, out[-2000:]


def test_a_choice_named_none_is_a_string_not_null():
    cfg = load_config(None, ["rollout_correction=none", "scale_rewards=none", "epsilon_high=none"])
    assert cfg.rollout_correction == "none" and cfg.scale_rewards == "none" and cfg.epsilon_high is None
