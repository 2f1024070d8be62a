"""Shared prompts (docs/shared-prompts.md): the HF engine prefills each distinct prompt of an admitted
group once and copies its KV and last logits to the group's rows. The samples must be today's per-row
prefill's (same per-row seeds), the log-probs within fp32 rounding of them, and the prefill must cost
the distinct prompts only."""
from __future__ import annotations

import copy
import functools

import pytest
import torch

from fastdash.rollout.base import SamplingParams
from fastdash.rollout.hf import HFEngine
from tests.conftest import assert_sampler_logps_agree

EPS32 = torch.finfo(torch.float32).eps
PROMPTS = ("1+2=", "345+678=", "9+9=")


def _ids(tok, texts):
    return [tok(t, add_special_tokens=False).input_ids for t in texts]


def _engines(model, tok, mode, max_batch_size):
    kw = dict(max_batch_size=max_batch_size, decode_mode=mode, compile_backend="eager")
    return HFEngine(model, tok, share_prompts=False, **kw), HFEngine(model, tok, share_prompts=True, **kw)


@pytest.mark.parametrize("mode,max_batch_size", [("compact", None), ("compact", 2), ("static", 2)])
def test_same_samples_and_logps_prefill_once(tok, rand_model, mode, max_batch_size):
    """G = 3 rows per prompt. Ids equal; log-probs within the bound test_static_decode uses for two fp32
    computations of the same maths (a prefill of fewer rows runs GEMMs of another shape, so rounding may
    differ: 2 x (4x the trainer's own fp32 error vs float64, plus 4 ulps of the largest |logit / T|)).
    The prefill runs each distinct prompt of an admission once (with 2 slots, admissions split groups)."""
    T, G = 0.9, 3
    plain, shared = _engines(rand_model, tok, mode, max_batch_size)
    prompts = _ids(tok, PROMPTS)
    params = SamplingParams(max_tokens=6, temperature=T, seed=5)
    ref, out = plain.generate(prompts, G, params), shared.generate(prompts, G, params)
    assert [c.completion_ids for c in out] == [c.completion_ids for c in ref]
    assert [c.truncated for c in out] == [c.truncated for c in ref]
    rows = [p for p in prompts for _ in range(G)]
    assert plain.stats.prefill_tokens == sum(map(len, rows))
    assert shared.stats.prefill_rows == plain.stats.prefill_rows == len(rows)  # every row admitted by a prefill
    if max_batch_size is None:  # one admission: each prompt once
        assert shared.stats.prefill_tokens == sum(map(len, prompts))
    assert shared.stats.prefill_tokens < plain.stats.prefill_tokens
    assert_sampler_logps_agree(rand_model, out, ref, T)


def test_share_prompts_setting(tok, rand_model):
    """auto: on for the decode loops, off for the generate fallback; true there is refused, naming the key."""
    assert HFEngine(rand_model, tok).share_prompts
    assert HFEngine(rand_model, tok, share_prompts="false").share_prompts is False
    assert HFEngine(rand_model, tok, decode_mode="generate").share_prompts is False
    with pytest.raises(ValueError, match="share_prompts=true"):
        HFEngine(rand_model, tok, decode_mode="generate", share_prompts=True)
    with pytest.raises(ValueError, match="share_prompts='maybe'"):
        HFEngine(rand_model, tok, share_prompts="maybe")


def test_share_prompts_config_key():
    """The config key: auto | true | false from a dotted override; bad values and a refused combination
    name the key."""
    from fastdash.config import load_config

    assert [load_config(overrides=[f"share_prompts={v}"]).share_prompts for v in ("auto", "true", "false")] == \
        ["auto", True, False]
    with pytest.raises(ValueError, match="share_prompts='maybe'"):
        load_config(overrides=["share_prompts=maybe"])
    for why, extra in (("hf_decode=generate", ["engine=hf", "hf_decode=generate"]), ("packing=true", ["packing=false"]),
                       ("parallelism=fsdp", ["parallelism=fsdp"]), ("LoRA", ["lora_r=8"])):
        with pytest.raises(ValueError, match=f"share_prompts=True: .*{why}"):
            load_config(overrides=["share_prompts=true", *extra])
        load_config(overrides=["share_prompts=auto", *extra])  # auto turns sharing off there instead


def test_tool_rows_share_their_prompt():
    """The multi-turn loop (rollout/tool_decode.py) admits through the same prefill: with shared prompts
    its rows (tool turns included) sample the same tokens, and the first prefill runs each prompt once.
    A float64 model: the two prefills' rounding (GEMMs of other shapes) stays far below any CDF step,
    and the log-probs (fp32 in the loop) within 2 x 4 fp32 ulps of the largest |logit|."""
    from fastdash.models import random_model
    from fastdash.rollout.decode import DecodeStats
    from fastdash.rollout.tool_decode import tool_decode
    from fastdash.tools import ToolSession
    from fastdash.tools.tiny import tool_char_tokenizer

    tok = tool_char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=0).double().eval()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ["12*34=", "5*678="]]
    rows = [p for p in prompts for _ in range(3)]
    out = {}
    for share in (False, True):
        stats = DecodeStats()
        res = tool_decode(model, rows, SamplingParams(max_tokens=30), session=ToolSession({}, max_iterations=2),
                          tokenizer=tok, eos_ids=(1,), pad_id=0, max_batch_size=None, seed=3, stats=stats,
                          share_prompts=share)
        out[share] = ([(r.ids, r.mask) for r in res], [r.logps for r in res], stats)
    assert out[True][0] == out[False][0]
    assert any(0 in mask for _, mask in out[True][0])  # some rows read a tool turn and went on
    # the loop rounds logits to fp32: a float64 difference can flip one rounding, a few fp32 ulps of |logit|
    with torch.no_grad():
        seqs = [p + ids for p, (ids, _) in zip(rows, out[True][0])]
        scale = max(max(float(model(torch.tensor([q])).logits.abs().max()) for q in seqs), 1.0)
    for a, b in zip(out[True][1], out[False][1]):
        assert float((torch.tensor(a) - torch.tensor(b)).abs().max()) <= 2 * 4 * EPS32 * scale
    assert out[False][2].prefill_tokens - out[True][2].prefill_tokens == sum(map(len, rows)) - sum(map(len, prompts))


# ------------------------------------------------------------------ backprop ---------------------
def _grouped_samples():
    """Three groups (prompts of 6, 2 and 9 tokens) of kept completions; one carries a tool-style
    completion_mask (tokens in the sequence, out of the loss)."""
    from dataclasses import replace

    from tests.test_packing import make_samples

    groups = [(6, (4, 1, 7, 3)), (2, (5, 2)), (9, (3, 6, 1))]
    samples, uid = [], 0
    for g, (p, lengths) in enumerate(groups):
        raw = make_samples([(p, c) for c in lengths], seed=g)
        for s in raw:
            samples.append(replace(s, uid=uid, prompt_ids=raw[0].prompt_ids))
            uid += 1
    samples[2] = replace(samples[2], completion_mask=(1, 1, 0, 0, 1, 1, 1))
    return samples


@pytest.mark.parametrize("budget", [16, 30, 1000])
def test_shared_backprop_matches_unshared(budget):
    """Packed micro-batches that hold each prompt once give every sample's log-probs and the step's
    gradient of the unshared computation: both within fp32 bounds of a float64 reference (one sample
    per micro-batch, nothing shared), for budgets that split the step (and a group) differently, so
    the step is split-independent. The budget counts the tokens computed, each prompt once per run."""
    from fastdash.packing import collate_packed, microbatches
    from tests.numerics import assert_fp32_close
    from tests.test_packing import N_TERMS, _step, tiny_qwen2

    model, samples = tiny_qwen2(), _grouped_samples()
    make = functools.partial(microbatches, samples, budget=budget, micro_batch_size=1, pad_id=0, device="cpu")
    shared, plain = [mb for mb, _ in make(share_prompts=True)], [mb for mb, _ in make(share_prompts=False)]
    assert all(mb.meta["real_tokens"] <= budget for mb in shared)
    computed = sum(mb.meta["real_tokens"] for mb in shared)
    assert computed + sum(mb.meta["saved_prompt_tokens"] for mb in shared) == sum(s.length for s in samples)
    if budget == 1000:  # one micro-batch: each of the 3 prompts once
        assert len(shared) == 1 and computed == 6 + 2 + 9 + sum(len(s.completion_ids) for s in samples)
    if budget == 16:  # the first group (6 + 15 tokens) cannot stay whole: its prompt is computed twice
        assert len(shared) > 2
    assert computed < sum(mb.meta["real_tokens"] for mb in plain)
    logp, grads = _step(model, samples, shared)
    logp_ref, grads_ref = _step(copy.deepcopy(model).double(), samples, [collate_packed([s]) for s in samples])
    assert logp.keys() == logp_ref.keys() == {s.uid for s in samples}
    for uid in logp:
        assert_fp32_close(logp[uid], logp_ref[uid], N_TERMS, what=f"shared logps of {uid}")
    n_terms = max(N_TERMS, sum(s.length for s in samples))  # weight gradients also sum over every token
    assert grads.keys() == grads_ref.keys() and grads
    for n in grads:
        assert_fp32_close(grads[n], grads_ref[n], n_terms, what=f"shared grad {n}")


def test_trainer_step_with_shared_prompts_is_the_unshared_step(scripted_run, monkeypatch):
    """A whole step (K = 2: the old-log-prob pass; beta > 0: the reference pass; both through the
    trainer's micro-batches) with prompts shared, at two budgets, moves the weights as the unshared step
    computed in float64 does (test_invariants' bound); every pass ran on shared micro-batches."""
    import fastdash.packing as packing
    from tests.test_invariants import _assert_close, _one_step_delta

    built = []
    collate = packing.collate_shared
    monkeypatch.setattr(packing, "collate_shared", lambda s: built.append(collate(s)) or built[-1])
    common = dict(loss_type="grpo", max_grad_norm=0.0, beta=0.04, num_iterations=2)
    ref64, _, run = _one_step_delta(scripted_run, float64=True, share_prompts=False,
                                    max_tokens_per_microbatch=10_000, **common)
    assert not built
    for budget in (10_000, 22):
        built.clear()
        delta, metrics, _ = _one_step_delta(scripted_run, share_prompts=True, max_tokens_per_microbatch=budget,
                                            **common)
        assert len(built) == 3 * metrics["microbatches"]  # old-log-prob, reference and backprop passes
        assert sum(mb.meta["saved_prompt_tokens"] for mb in built) > 0
        _assert_close(delta, ref64, run.cfg)
