"""The HF generate engine: order, EOS / truncation, left padding, seeds, forced lengths."""
from __future__ import annotations

import pytest

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
