"""The compacting decode loop (fastdash.rollout.decode) behind the HF engine: it must be `generate`
token for token when greedy, sample the right distribution per row independently of its batch
companions, return the trainer's log-probs, stop at every EOS id, and cost the tokens it keeps."""
from __future__ import annotations

import copy

import pytest
import torch

from fastdash.rollout.base import SamplingParams
from fastdash.rollout.decode import _inverse_cdf
from fastdash.rollout.hf import HFEngine

EPS32 = torch.finfo(torch.float32).eps


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


RAGGED = ("1+2=", "345+678=", "9+9=", "12*3=", "(7-2)*4=", "0=")


def _reference_generate(model, prompts, eos_ids, max_new_tokens, pad_id=0):
    """model.generate, greedy, left padded, cut after the first EOS."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=list(eos_ids), pad_token_id=pad_id)[:, width:].tolist()
    cut = []
    for row in out:
        stop = next((i for i, t in enumerate(row) if t in eos_ids), None)
        cut.append(row if stop is None else row[:stop + 1])
    return cut


@pytest.mark.parametrize("max_batch_size", [None, 2])
def test_greedy_equals_generate_with_compaction(arith, max_batch_size):
    """Rows stop at different lengths (compaction every step); with 2 slots prompts are admitted."""
    model, tok = arith
    engine = HFEngine(model, tok, max_batch_size=max_batch_size)
    prompts = _ids(tok, RAGGED)
    out = engine.generate(prompts, 1, SamplingParams(max_tokens=8, greedy=True))
    ref = _reference_generate(model, prompts, engine.eos_ids, 8)
    assert [c.completion_ids for c in out] == ref
    assert len({len(r) for r in ref}) > 1 and any(not c.truncated for c in out)  # compaction happened
    assert [c.truncated for c in out] == [r[-1] not in engine.eos_ids for r in ref]


def test_greedy_equals_generate_without_compaction(tok, rand_model):
    """No row of the random model stops before 3 tokens: the whole batch runs to the end."""
    engine = HFEngine(rand_model, tok)
    prompts = _ids(tok, RAGGED)
    out = engine.generate(prompts, 1, SamplingParams(max_tokens=3, greedy=True))
    ref = _reference_generate(rand_model, prompts, engine.eos_ids, 3)
    assert [c.completion_ids for c in out] == ref and {len(r) for r in ref} == {3}


def _chi2_pvalue(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    assert expected.min() >= 5, "cells too small for the chi-square approximation"
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor(float(len(counts) - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(df / 2, stat / 2))


def _processed(model64, seq, temperature, top_k):
    """The float64 sampling distribution after `seq`: softmax(top_k(logits / T))."""
    logits = model64(torch.tensor([seq])).logits[0, -1] / temperature
    keep = logits.topk(top_k).indices
    probs = torch.zeros_like(logits)
    probs[keep] = torch.softmax(logits[keep], -1)
    return probs


@torch.no_grad()
def test_two_token_samples_follow_the_processed_distribution(tok, rand_model):
    """Joint law of (token 1, token 2) over 3000 rows of one call (prefill and decode sampling),
    temperature and top-k through transformers' warpers, against a float64 forward."""
    engine = HFEngine(rand_model, tok)
    prompt = _ids(tok, ["12+34="])[0]
    params = SamplingParams(max_tokens=2, temperature=0.3, top_k=4, seed=11)
    out = engine.generate([prompt], 3000, params)
    model64 = copy.deepcopy(rand_model).double()
    first = _processed(model64, prompt, 0.3, 4)
    cells, probs = [], []
    for a in first.nonzero()[:, 0].tolist():
        if a in engine.eos_ids:
            cells.append((a,)), probs.append(first[a])
            continue
        second = _processed(model64, prompt + [a], 0.3, 4)
        for b in second.nonzero()[:, 0].tolist():
            cells.append((a, b)), probs.append(first[a] * second[b])
    seen = [tuple(c.completion_ids) for c in out]
    assert set(seen) <= set(cells)  # nothing outside top-k
    counts = torch.tensor([seen.count(c) for c in cells], dtype=torch.float64)
    assert _chi2_pvalue(counts, torch.stack(probs)) > 1e-3


def test_inverse_cdf_matches_a_float64_cumsum():
    """The two-level sampler picks the same token as a plain float64 inverse CDF, across block ends
    and a vocabulary that is not a multiple of the block, and never a zero-probability token."""
    gen = torch.Generator().manual_seed(0)
    for vocab in (7, 1024, 3001):
        logits = torch.randn(200, vocab, generator=gen) * 3
        logits[:, ::3] = float("-inf")  # filtered tokens
        probs = torch.softmax(logits, -1)
        u = torch.rand(200, dtype=torch.float64, generator=gen)
        cdf = probs.double().cumsum(-1)
        ref = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
        got = _inverse_cdf(probs, u, block=64)
        assert torch.equal(got, ref) and bool((probs.gather(-1, got[:, None]) > 0).all())


def test_samples_do_not_depend_on_batch_companions(tok, rand_model):
    """Row r's draws come from its own generator (seed, r): other prompts, their count and the
    concurrency limit (admission order) leave its samples unchanged."""
    a, b, c = _ids(tok, ["12+34=", "567*8=", "(1-9)*(2+3)="])
    params = SamplingParams(max_tokens=7, temperature=1.0, top_p=0.9, seed=5)
    engine = HFEngine(rand_model, tok)
    ref = [x.completion_ids for x in engine.generate([a, b], 3, params)][:3]
    assert [x.completion_ids for x in engine.generate([a, c], 3, params)][:3] == ref
    assert [x.completion_ids for x in engine.generate([a], 3, params)] == ref
    for slots in (1, 2, 4):
        engine.max_batch_size = slots
        assert [x.completion_ids for x in engine.generate([a, c], 3, params)][:3] == ref
    assert len({tuple(x) for x in ref}) > 1  # the three samples of one prompt differ


@torch.no_grad()
def test_sampler_logps_equal_the_trainers_log_softmax(tok, rand_model):
    """Per-token log-probs equal log_softmax(logits / T) of a plain forward over prompt + completion.
    Reference in float64; the engine must be as close to it as the trainer's own fp32 forward (x4),
    plus a few ulps of the largest |logit / T| (the log of an fp32 probability)."""
    temperature = 0.7
    engine = HFEngine(rand_model, tok, max_batch_size=3)
    prompts = _ids(tok, RAGGED)
    out = engine.generate(prompts, 2, SamplingParams(max_tokens=9, temperature=temperature, seed=2))
    model64 = copy.deepcopy(rand_model).double()
    err_engine = err_trainer = scale = 0.0
    for c in out:
        seq = torch.tensor([c.prompt_ids + c.completion_ids])
        cols = torch.arange(len(c.prompt_ids) - 1, seq.shape[1] - 1)
        target = seq[0, len(c.prompt_ids):]
        lp = {}
        for name, m in (("32", rand_model), ("64", model64)):
            logits = m(seq).logits[0, cols].double() / temperature
            lp[name] = torch.log_softmax(logits, -1).gather(-1, target[:, None])[:, 0]
            scale = max(scale, float(logits.abs().max()))
        got = torch.tensor(c.sampler_logps, dtype=torch.float64)
        assert got.shape == lp["64"].shape
        err_engine = max(err_engine, float((got - lp["64"]).abs().max()))
        err_trainer = max(err_trainer, float((lp["32"] - lp["64"]).abs().max()))
    assert err_engine <= 4 * err_trainer + 4 * EPS32 * max(scale, 1.0), (err_engine, err_trainer, scale)


def test_greedy_logps_are_the_raw_log_softmax(arith):
    model, tok = arith
    engine = HFEngine(model, tok)
    c = engine.generate(_ids(tok, ["345+678="]), 1, SamplingParams(max_tokens=6, greedy=True))[0]
    with torch.no_grad():
        seq = torch.tensor([c.prompt_ids + c.completion_ids])
        logits = model(seq).logits[0, len(c.prompt_ids) - 1:-1].double()
    ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.completion_ids)[:, None])[:, 0]
    tol = 16 * EPS32 * max(1.0, float(logits.abs().max()))
    assert torch.allclose(torch.tensor(c.sampler_logps, dtype=torch.float64), ref, rtol=0, atol=tol)


@pytest.mark.parametrize("max_batch_size", [None, 3])
def test_forced_lengths_are_exact(tok, rand_model, max_batch_size):
    lengths = (1, 4, 2, 9, 3, 6, 1, 5)
    rand_model.generation_config.eos_token_id = [1, 16]  # a second EOS the random model often emits
    try:
        engine = HFEngine(rand_model, tok, max_batch_size=max_batch_size)
        out = engine.generate(_ids(tok, ["1+1=", "22+2=", "3=", "44*4="]), 2,
                              SamplingParams(max_tokens=9, temperature=1.0, seed=1, forced_lengths=lengths))
    finally:
        rand_model.generation_config.eos_token_id = 1
    assert [len(c.completion_ids) for c in out] == list(lengths)
    for c in out:  # every EOS id banned before the forced one, which has probability 1
        assert c.completion_ids[-1] == engine.eos_id and not c.truncated and c.sampler_logps[-1] == 0.0
        assert not set(c.completion_ids[:-1]) & set(engine.eos_ids)


def test_row_steps_are_the_tokens_kept(arith):
    """No slack: a row's first token comes from the prefill, each later one from one decode row-step."""
    model, tok = arith
    for slots in (None, 2, 5):
        engine = HFEngine(model, tok, max_batch_size=slots)
        out = engine.generate(_ids(tok, RAGGED), 3, SamplingParams(max_tokens=8, temperature=1.0, seed=3))
        tokens = sum(len(c.completion_ids) for c in out)
        assert engine.stats.tokens == tokens and engine.stats.prefill_rows == len(out)
        assert engine.stats.decode_row_steps == tokens - len(out)
        assert any(not c.truncated for c in out) and any(c.truncated for c in out)


def test_stops_at_every_eos_id_and_keeps_it(tok, rand_model):
    """generation_config may list several EOS ids (Qwen2.5-Instruct: two): any of them stops a row,
    and the completion keeps the one sampled; rows without one are truncated at max_tokens."""
    prompts = _ids(tok, RAGGED)
    params = SamplingParams(max_tokens=8, temperature=1.0, seed=4)
    plain = HFEngine(rand_model, tok).generate(prompts, 2, params)
    extra = next(t for c in plain for t in c.completion_ids[1:-1] if t != 1)  # stops some row mid-way
    rand_model.generation_config.eos_token_id = [1, extra]
    try:
        engine = HFEngine(rand_model, tok)
        out = engine.generate(prompts, 2, params)
    finally:
        rand_model.generation_config.eos_token_id = 1
    assert engine.eos_ids == (1, extra)
    assert any(c.completion_ids[-1] == extra for c in out)
    for c, p in zip(out, plain):  # same draws: each row is the plain one cut at its first EOS id
        stop = next((i for i, t in enumerate(p.completion_ids) if t in (1, extra)), None)
        if stop is None:
            assert c.truncated and c.completion_ids == p.completion_ids and len(c.completion_ids) == 8
        else:
            assert not c.truncated and c.completion_ids == p.completion_ids[:stop + 1]


def test_sliding_window_models_fall_back_to_generate(tok):
    """Sliding-window cache layers cannot take merged rows: the engine says so and uses generate,
    which still stops at every EOS id and returns processed log-probs."""
    from transformers import Qwen2ForCausalLM

    from fastdash.models import preset_config

    config = preset_config("tiny", len(tok))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = [1, 16]
    engine = HFEngine(model, tok)
    assert engine._decoder == "generate"
    out = engine.generate(_ids(tok, RAGGED), 2, SamplingParams(max_tokens=6, temperature=1.0, seed=0))
    for c in out:
        assert len(c.sampler_logps) == len(c.completion_ids) and max(c.sampler_logps) <= 0
        assert c.truncated == (c.completion_ids[-1] not in (1, 16))
        assert not set(c.completion_ids[:-1]) & {1, 16}
