"""The HF engine: order, EOS / truncation, left padding, seeds, forced lengths, log-probs, and the
bf16 generation copy of fp32 master weights."""
from __future__ import annotations

import copy

import pytest
import torch

from fastdash.models import char_tokenizer, random_model
from fastdash.rollout.base import Engine, SamplingParams
from fastdash.rollout.hf import HFEngine
from tests.conftest import assert_well_formed


@pytest.fixture(scope="module")
def engine():
    tok = char_tokenizer()
    return HFEngine(random_model("tiny", vocab_size=len(tok), seed=3), tok)


def _ids(engine, text):
    return engine.tok(text, add_special_tokens=False).input_ids


def test_is_an_engine(engine):
    assert isinstance(engine, Engine)


def test_n_per_prompt_in_order_with_eos_or_truncation(engine):
    prompts = [_ids(engine, t) for t in ("1+2=", "345+678=", "9=")]
    out = engine.generate(prompts, 3, SamplingParams(max_tokens=5, temperature=1.0, seed=0))
    assert_well_formed(out, prompts, 3, engine.eos_id, 5)
    assert all(engine.pad_id not in c.completion_ids for c in out if not c.truncated)


def test_greedy_is_independent_of_batch_composition(engine):
    """Left padding must not change what a prompt generates."""
    short, long_ = _ids(engine, "1+2="), _ids(engine, "123+456+789=")
    params = SamplingParams(max_tokens=6, greedy=True)
    alone = engine.generate([short], 1, params)[0].completion_ids
    batched = engine.generate([long_, short], 1, params)[1].completion_ids
    assert alone == batched


def test_seed_reproduces_samples(engine):
    p = [_ids(engine, "12+34=")]
    a = engine.generate(p, 4, SamplingParams(max_tokens=6, seed=7))
    b = engine.generate(p, 4, SamplingParams(max_tokens=6, seed=7))
    c = engine.generate(p, 4, SamplingParams(max_tokens=6, seed=8))
    assert [x.completion_ids for x in a] == [x.completion_ids for x in b]
    assert [x.completion_ids for x in a] != [x.completion_ids for x in c]


def test_forced_lengths_control_every_completion(engine):
    lengths = (1, 4, 2, 7)
    out = engine.generate([_ids(engine, "1+1="), _ids(engine, "22+2=")], 2,
                          SamplingParams(max_tokens=8, seed=1, forced_lengths=lengths))
    assert [len(c.completion_ids) for c in out] == list(lengths)
    assert all(c.completion_ids[-1] == engine.eos_id and not c.truncated for c in out)


def test_max_batch_size_chunks_give_the_same_greedy_result(engine):
    prompts = [_ids(engine, t) for t in ("1+2=", "34+5=", "678+9=", "0=")]
    params = SamplingParams(max_tokens=5, greedy=True)
    whole = [c.completion_ids for c in engine.generate(prompts, 1, params)]
    engine.max_batch_size = 1
    try:
        chunked = [c.completion_ids for c in engine.generate(prompts, 1, params)]
    finally:
        engine.max_batch_size = None
    assert whole == chunked


def test_forced_lengths_count_is_checked(engine):
    with pytest.raises(ValueError, match="forced_lengths"):
        engine.generate([[4, 5]], 2, SamplingParams(max_tokens=4, forced_lengths=(1,)))


def test_sampler_logps_come_with_every_completion(engine):
    out = engine.generate([_ids(engine, "1+2=")], 3, SamplingParams(max_tokens=5, seed=0))
    assert all(len(c.sampler_logps) == len(c.completion_ids) and max(c.sampler_logps) <= 0 for c in out)


def _greedy(engine, prompts):
    return [c.completion_ids for c in engine.generate(prompts, 1, SamplingParams(max_tokens=6, greedy=True))]


def test_same_dtype_shares_the_model():
    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=4)
    for dtype in (None, torch.float32):
        engine = HFEngine(model, tok, dtype=dtype)
        assert engine.model is model
        engine.sync_weights(model)  # free


@torch.no_grad()
def test_bf16_generation_copy_follows_the_fp32_trainer_after_sync():
    """fp32 master weights, bf16 generation: the engine's own copy is bf16, tied, gradient-free, and
    after sync_weights generates what a fresh bf16 cast of the trained weights generates."""
    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=4)
    engine = HFEngine(model, tok, dtype=torch.bfloat16)
    twin = engine.model
    assert twin is not model and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in twin.parameters())
    assert twin.lm_head.weight is twin.model.embed_tokens.weight  # tied weights stay one tensor
    assert twin.model.rotary_emb.inv_freq.dtype == torch.float32
    ptrs = [p.data_ptr() for p in twin.parameters()]
    prompts = [_ids(engine, t) for t in ("1+2=", "345+678=", "9=")]
    before = _greedy(engine, prompts)

    torch.manual_seed(0)
    for p in model.parameters():  # a large "training" step on the fp32 master weights
        p.add_(torch.randn_like(p) * 0.5)
    assert _greedy(engine, prompts) == before  # not synced yet: still the old weights
    engine.sync_weights(model)
    assert [p.data_ptr() for p in twin.parameters()] == ptrs and twin.lm_head.weight is twin.model.embed_tokens.weight
    for (name, mine), theirs in zip(twin.named_parameters(), model.parameters()):
        assert torch.equal(mine, theirs.to(torch.bfloat16)), name
    fresh = HFEngine(copy.deepcopy(model).to(torch.bfloat16), tok)
    after = _greedy(engine, prompts)
    assert after == _greedy(fresh, prompts) and after != before


def test_make_engine_passes_the_compute_dtype():
    from fastdash.config import Config
    from fastdash.rollout import make_engine

    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=4)
    engine = make_engine(Config(engine="hf"), model, tok, compute_dtype=torch.bfloat16)
    assert engine.model is not model and next(engine.model.parameters()).dtype == torch.bfloat16
    assert make_engine(Config(engine="hf"), model, tok).model is model
