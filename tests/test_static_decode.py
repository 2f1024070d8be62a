"""The static-shape decode loop (fastdash.rollout.static_decode, `hf_decode=static`): the compacting
loop's results token for token on fixed-shape, compiled decode forwards (backend "eager" here: dynamo
traces each bucket once, no codegen), bucket slack counted and bounded, one compile per bucket used."""
from __future__ import annotations

import pytest
import torch

from fastdash.config import Config
from fastdash.models import preset_config
from fastdash.rollout import make_engine
from fastdash.rollout.base import SamplingParams
from fastdash.rollout.hf import HFEngine
from fastdash.rollout.static_decode import bucket_for, buckets
from tests.conftest import assert_sampler_logps_agree
from tests.test_decode import RAGGED, _ids, _reference_generate


def _pair(model, tok, max_batch_size, backend="eager"):
    """The compacting loop and the static one on the same model."""
    return (HFEngine(model, tok, max_batch_size=max_batch_size, decode_mode="compact"),
            HFEngine(model, tok, max_batch_size=max_batch_size, decode_mode="static", compile_backend=backend))


def _live_per_step(lengths: list[int]) -> list[int]:
    """Live rows of each decode step of one wave: a row of m tokens runs in steps 1 .. m - 1."""
    return [sum(m > k for m in lengths) for k in range(1, max(lengths))]


def test_buckets_are_powers_of_two_and_the_cap_with_less_than_2x_slack():
    assert buckets(1) == [1] and buckets(6) == [1, 2, 4, 6] and buckets(8) == [1, 2, 4, 8]
    for cap in range(1, 70):
        assert all(n <= bucket_for(n, cap) < 2 * n for n in range(1, cap + 1))


@pytest.mark.parametrize("max_batch_size", [None, 4])
def test_greedy_equals_compact_and_generate_across_bucket_shrinks(arith, max_batch_size):
    """Ragged prompts whose greedy answers end at different lengths: the bucket shrinks mid-call; with
    4 slots the 12 rows run in 3 waves."""
    model, tok = arith
    compact, static = _pair(model, tok, max_batch_size)
    prompts = _ids(tok, RAGGED) * 2
    params = SamplingParams(max_tokens=8, greedy=True)
    out = static.generate(prompts, 1, params)
    ref = compact.generate(prompts, 1, params)
    assert [c.completion_ids for c in out] == [c.completion_ids for c in ref]
    assert [c.completion_ids for c in out] == _reference_generate(model, prompts, static.eos_ids, 8)
    assert [c.truncated for c in out] == [c.truncated for c in ref]
    assert len({len(c.completion_ids) for c in out}) > 2  # rows finished at several steps
    assert static.stats.decode_row_steps == compact.stats.decode_row_steps  # the same live row-steps
    assert 0 < static.stats.padded_row_steps < static.stats.decode_row_steps


@torch.no_grad()
def test_samples_and_logps_equal_the_compacting_loop(tok, rand_model):
    """Same seed, same uniforms: the same tokens (temperature, top-k, top-p, forced lengths, 3 waves of
    4 rows). The logits differ only by fp32 rounding (a wider masked key axis, other batch sizes): a
    sample could flip only where its uniform falls within ~1e-7 of a CDF step, never seen at these
    sizes. Log-probs: each loop within test_decode's bound of a float64 forward (4x the trainer's own
    fp32 error plus 4 ulps of the largest |logit / T|), so the two within twice that of each other."""
    T = 0.8
    lengths = (3, 9, 1, 6, 2, 8, 5, 4, 9, 7, 2, 6)
    compact, static = _pair(rand_model, tok, max_batch_size=4)
    prompts = _ids(tok, RAGGED)
    params = SamplingParams(max_tokens=9, temperature=T, top_k=12, top_p=0.95, seed=7, forced_lengths=lengths)
    out, ref = static.generate(prompts, 2, params), compact.generate(prompts, 2, params)
    assert [c.completion_ids for c in out] == [c.completion_ids for c in ref]
    assert [len(c.completion_ids) for c in out] == list(lengths)
    plain = SamplingParams(max_tokens=9, temperature=T, seed=7)  # no top-k / top-p: logps are log_softmax(z / T)
    out, ref = static.generate(prompts, 2, plain), compact.generate(prompts, 2, plain)
    assert [c.completion_ids for c in out] == [c.completion_ids for c in ref]
    assert_sampler_logps_agree(rand_model, out, ref, T)


@pytest.mark.parametrize("max_batch_size", [None, 3])
def test_forced_lengths_exact_and_padding_counted(tok, rand_model, max_batch_size):
    """Every row ends at its forced length with the EOS (log-prob 0); the padded row-steps are exactly
    sum(bucket(live) - live) over the decode steps of each wave, and below the live row-steps."""
    lengths = (1, 4, 2, 9, 3, 6, 1, 5)
    static = HFEngine(rand_model, tok, max_batch_size=max_batch_size, decode_mode="static", compile_backend="eager")
    out = static.generate(_ids(tok, ["1+1=", "22+2=", "3=", "44*4="]), 2,
                          SamplingParams(max_tokens=9, temperature=1.0, seed=1, forced_lengths=lengths))
    assert [len(c.completion_ids) for c in out] == list(lengths)
    for c in out:
        assert c.completion_ids[-1] == static.eos_id and not c.truncated and c.sampler_logps[-1] == 0.0
        assert not set(c.completion_ids[:-1]) & set(static.eos_ids)
    cap = max_batch_size or len(lengths)
    waves = [list(lengths[i:i + cap]) for i in range(0, len(lengths), cap)]
    live = [n for wave in waves for n in _live_per_step(wave)]
    assert static.stats.decode_row_steps == sum(live) == sum(lengths) - len(lengths)
    assert static.stats.padded_row_steps == sum(bucket_for(n, cap) - n for w in waves for n in _live_per_step(w))
    assert static.stats.padded_row_steps < static.stats.decode_row_steps
    assert (static.stats.padded_row_steps > 0) == (cap == 8)  # buckets of cap 3 are 1, 2, 3: no padding


def test_one_compile_per_bucket_used_and_none_after_sleep(tok, rand_model):
    """Graphs compiled = distinct buckets the decode forwards ran at (one fullgraph each, dynamic=False);
    a second call and a call after `release` (the buffers freed and reallocated) compile nothing more."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    static = HFEngine(rand_model, tok, decode_mode="static", compile_backend=counting_backend)
    lengths = (7, 1, 3, 2, 7, 5, 6)
    params = SamplingParams(max_tokens=7, temperature=1.0, seed=2, forced_lengths=lengths)
    prompts = _ids(tok, ["1+1=", "22+2=", "3=", "44*4=", "5-5=", "(6)=", "77="])
    first = static.generate(prompts, 1, params)
    used = {bucket_for(n, len(lengths)) for n in _live_per_step(list(lengths))}
    assert len(graphs) == len(used) == 3  # live 6 5 4 4 3 2: buckets 7 7 4 4 4 2
    assert static.generate(prompts, 1, params) == first and len(graphs) == 3
    static.workspace.release()  # what sleep does when the plan leaves backprop no room for the buffers
    assert static.workspace.rows == 0
    assert static.generate(prompts, 1, params) == first and len(graphs) == 3


def test_decoder_choice_and_bad_values(tok, rand_model):
    """auto is the compacting loop (static is opt-in); each value reaches the engine through make_engine; a bad
    value or a model the chosen loop cannot run fails naming the key."""
    assert make_engine(Config(engine="hf"), rand_model, tok)._decoder == "compact"
    for mode in ("compact", "static", "generate"):
        assert make_engine(Config(engine="hf", hf_decode=mode), rand_model, tok)._decoder == mode
    with pytest.raises(ValueError, match="hf_decode='fast'.*must be one of"):
        Config(hf_decode="fast")
    with pytest.raises(ValueError, match="hf_decode='fast'"):
        HFEngine(rand_model, tok, decode_mode="fast")
    from transformers import Qwen2ForCausalLM

    config = preset_config("tiny", len(tok))
    config.use_sliding_window, config.sliding_window, config.max_window_layers = True, 4, 0
    config.layer_types = ["sliding_attention"] * config.num_hidden_layers
    sliding = Qwen2ForCausalLM(config)
    assert HFEngine(sliding, tok)._decoder == "generate"  # auto falls back, as before
    for mode in ("static", "compact"):
        with pytest.raises(ValueError, match=f"hf_decode={mode}: this model cannot use it"):
            HFEngine(sliding, tok, decode_mode=mode)
