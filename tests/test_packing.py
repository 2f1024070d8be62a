"""Packing: the planner's guarantees, the layouts, and packed forward == per-sample / padded forward.

The model tests use a tiny random Qwen2 in fp32 on CPU (sdpa), built in code.
"""
from __future__ import annotations

import copy
import dataclasses
import random

import pytest
import torch

from fastdash import attention
from fastdash.attention import select_attention_backend, use_packed_attention
from fastdash.batch import Sample
from fastdash.forward import forward_hidden
from fastdash.packing import (
    collate_packed,
    collate_padded,
    microbatch_cost,
    plan_microbatches,
    plan_padded_microbatches,
)

from tests.numerics import assert_fp32_close

transformers = pytest.importorskip("transformers")

VOCAB = 100
PAD = 0
N_TERMS = 128  # the longest float32 sum in the tiny model's forward (intermediate_size); tolerances grow with it


def tiny_qwen2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        tie_word_embeddings=False, attn_implementation="sdpa",
    )
    return transformers.Qwen2ForCausalLM(cfg).float().eval()


def make_samples(shapes: list[tuple[int, int]], seed: int = 0, logps: bool = False) -> list[Sample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for uid, (p, c) in enumerate(shapes):
        out.append(Sample(
            uid=uid,
            prompt_ids=torch.randint(1, VOCAB, (p,), generator=g).tolist(),
            completion_ids=torch.randint(1, VOCAB, (c,), generator=g).tolist(),
            truncated=False, advantage=float(torch.randn((), generator=g)),
            old_logps=-torch.rand(c, generator=g) if logps else None,
            ref_logps=-torch.rand(c, generator=g) if logps else None,
        ))
    return out


SHAPES = [(5, 9), (1, 1), (12, 3), (3, 17), (7, 1), (2, 6)]


@pytest.fixture(params=["sdpa", "torch_varlen", "sdpa_varlen"])
def model(request):
    """sdpa: transformers' packed path. torch_varlen: the registered `fastdash_varlen` wiring (on CPU
    in fp32 its kernel is the exact per-sequence fallback, so this checks the plumbing, not speed)."""
    m = tiny_qwen2()
    assert use_packed_attention(m, backend=request.param) == request.param
    return m


def _full_logits(model, mb):
    """[T_total, V] logits of every real position, via forward_hidden's own call with all positions."""
    everything = torch.arange(mb.input_ids.numel())
    hidden = forward_hidden(model, type(mb)(**{**mb.__dict__, "logit_index": everything}))
    return hidden @ model.lm_head.weight.T


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


# --------------------------------------------------------------------------------------------------
# packed forward == per-sample forward


def test_packed_forward_matches_per_sample(model):
    samples = make_samples(SHAPES)
    mb = collate_packed(samples)
    packed = _full_logits(model, mb)
    per_sample = torch.cat([_full_logits(model, collate_packed([s])) for s in samples])
    model64 = copy.deepcopy(model).double()  # the same maths in float64: the reference for both
    reference = torch.cat([_full_logits(model64, collate_packed([s])) for s in samples])
    assert packed.shape == (sum(s.length for s in samples), VOCAB)
    assert_fp32_close(packed, reference, N_TERMS, what="packed logits")
    assert_fp32_close(per_sample, reference, N_TERMS, what="per-sample logits")

    # gradients of the same scalar, packed vs one sample at a time
    w = torch.randn(packed.shape, generator=torch.Generator().manual_seed(1))
    model.zero_grad()
    (_full_logits(model, mb) * w).sum().backward()
    g_packed = _grads(model)
    model.zero_grad()
    offset = 0
    for s in samples:
        (_full_logits(model, collate_packed([s])) * w[offset: offset + s.length]).sum().backward()
        offset += s.length
    g_single = _grads(model)
    offset = 0
    for s in samples:
        (_full_logits(model64, collate_packed([s])) * w[offset: offset + s.length].double()).sum().backward()
        offset += s.length
    g_ref = _grads(model64)
    assert g_packed.keys() == g_single.keys() == g_ref.keys() and len(g_packed) > 0
    n_terms = max(N_TERMS, packed.shape[0])  # weight gradients also sum over every token
    for n in g_packed:
        assert_fp32_close(g_packed[n], g_ref[n], n_terms, what=f"packed grad {n}")
        assert_fp32_close(g_single[n], g_ref[n], n_terms, what=f"per-sample grad {n}")


def test_varlen_backend_receives_cu_seqlens(monkeypatch):
    """The registered attention function really runs the varlen path with the micro-batch's bounds."""
    m = tiny_qwen2()
    use_packed_attention(m, backend="torch_varlen")
    seen = []
    real = attention.varlen_attention

    def spy(q, k, v, cu, max_seqlen, **kw):
        seen.append((cu.tolist(), max_seqlen))
        return real(q, k, v, cu, max_seqlen, **kw)

    monkeypatch.setattr(attention, "varlen_attention", spy)
    mb = collate_packed(make_samples(SHAPES))
    forward_hidden(m, mb)
    assert seen == [(mb.cu_seqlens.tolist(), mb.max_seqlen)] * m.config.num_hidden_layers


def test_use_cache_and_attention_mask_trap():
    """transformers only keeps packed samples apart with attention_mask=None AND use_cache=False.

    With the cache on (the model's default) or a 2-D mask given, the row is one long sequence and
    later samples attend to earlier ones: logits differ, so the packed-vs-per-sample check catches it.
    """
    model = tiny_qwen2()
    samples = make_samples(SHAPES)
    mb = collate_packed(samples)
    model64 = copy.deepcopy(model).double()
    reference = torch.cat([_full_logits(model64, collate_packed([s])) for s in samples])  # float64
    model.set_attn_implementation("sdpa")  # the trap is transformers' own packed sdpa path
    decoder = model.get_decoder()

    def logits(**kw):
        out = decoder(input_ids=mb.input_ids, position_ids=mb.position_ids, **kw).last_hidden_state[0]
        return out @ model.lm_head.weight.T

    with torch.no_grad():
        right = logits(attention_mask=None, use_cache=False)
        with_cache = logits(attention_mask=None, use_cache=True)
        with_mask = logits(attention_mask=torch.ones_like(mb.input_ids), use_cache=False)
    assert_fp32_close(right, reference, N_TERMS, what="packed logits, no cache, no mask")
    first = slice(0, samples[0].length)  # the first sample sees nothing before it either way
    assert_fp32_close(with_cache[first], reference[first], N_TERMS, what="first sample, cache on")
    assert (with_cache - reference).abs().max() > 1e-2, "use_cache=True should leak across samples"
    assert (with_mask - reference).abs().max() > 1e-2, "a 2-D attention mask should leak across samples"


# --------------------------------------------------------------------------------------------------
# packed micro-batches == padded micro-batches: per-token log-probs and the step's gradient


def _token_logps(model, mb):
    hidden = forward_hidden(model, mb)  # [N, H]
    logits = hidden @ model.lm_head.weight.T  # [N, V]: fine at this size, the real loss is fused
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # fp32 or more (the fp64 reference)
    return torch.log_softmax(logits, -1).gather(1, mb.targets[:, None]).squeeze(1)  # [N]


def _step(model, samples, mbs):
    """One step's loss (-A * logp summed over all completion tokens / step total), accumulated."""
    total = sum(len(s.completion_ids) for s in samples)  # fixed before the first micro-batch
    model.zero_grad()
    per_uid = {}
    for mb in mbs:
        logp = _token_logps(model, mb)
        loss = -(mb.advantages[mb.token_sample] * logp).sum() / total
        loss.backward()
        for j, uid in enumerate(mb.uids):
            a, b = mb.completion_cu_seqlens[j].item(), mb.completion_cu_seqlens[j + 1].item()
            per_uid[uid] = logp[a:b].detach()
    return per_uid, _grads(model)


@pytest.mark.parametrize("budget", [24, 40, 1000])
def test_packed_and_padded_give_same_logps_and_gradient(model, budget):
    rng = random.Random(budget)
    shapes = [(rng.randint(1, 8), rng.randint(1, 14)) for _ in range(11)]
    samples = make_samples(shapes, seed=budget)
    packed = [collate_packed([samples[i] for i in b]) for b in plan_microbatches([s.length for s in samples], budget)]
    padded = [collate_padded([samples[i] for i in b], PAD) for b in plan_padded_microbatches(len(samples), 4)]
    assert sum(mb.meta["padding_tokens"] for mb in packed) == 0
    assert sum(mb.meta["padding_tokens"] for mb in padded) > 0
    logp_packed, g_packed = _step(model, samples, packed)
    logp_padded, g_padded = _step(model, samples, padded)
    logp_ref, g_ref = _step(copy.deepcopy(model).double(), samples, [collate_packed([s]) for s in samples])
    assert logp_packed.keys() == logp_padded.keys() == logp_ref.keys() == set(range(len(samples)))
    for uid in logp_packed:
        assert logp_packed[uid].shape == (len(samples[uid].completion_ids),)
        assert_fp32_close(logp_packed[uid], logp_ref[uid], N_TERMS, what=f"packed logps of {uid}")
        assert_fp32_close(logp_padded[uid], logp_ref[uid], N_TERMS, what=f"padded logps of {uid}")
    n_terms = max(N_TERMS, sum(s.length for s in samples))  # weight gradients also sum over every token
    for n in g_packed:
        assert_fp32_close(g_packed[n], g_ref[n], n_terms, what=f"packed grad {n}")
        assert_fp32_close(g_padded[n], g_ref[n], n_terms, what=f"padded grad {n}")


# --------------------------------------------------------------------------------------------------
# layouts


def test_collate_packed_layout():
    samples = make_samples([(3, 2), (1, 4), (2, 1)], logps=True)
    mb = collate_packed(samples)
    assert mb.input_ids.tolist() == [sum((s.prompt_ids + s.completion_ids for s in samples), [])]
    assert mb.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 0, 1, 2]]
    assert mb.cu_seqlens.tolist() == [0, 5, 10, 13] and mb.cu_seqlens.dtype == torch.int32
    assert mb.max_seqlen == 5 and mb.attention_mask is None
    # offset o, prompt p, completion c: positions o+p-1 .. o+p+c-2 predict completion tokens 0..c-1
    assert mb.logit_index.tolist() == [2, 3, 5, 6, 7, 8, 11]
    flat = mb.input_ids.view(-1)
    assert torch.equal(flat[mb.logit_index + 1], mb.targets)  # next-token alignment
    assert mb.targets.tolist() == sum((s.completion_ids for s in samples), [])
    assert mb.token_sample.tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert mb.completion_cu_seqlens.tolist() == [0, 2, 6, 7]
    assert mb.advantages.dtype == torch.float32 and mb.advantages.tolist() == [s.advantage for s in samples]
    assert mb.uids == [0, 1, 2]
    torch.testing.assert_close(mb.old_logps, torch.cat([s.old_logps for s in samples]))
    torch.testing.assert_close(mb.ref_logps, torch.cat([s.ref_logps for s in samples]))
    assert mb.meta == {"padding_tokens": 0, "real_tokens": 13}


def test_collate_padded_layout():
    samples = make_samples([(3, 2), (1, 4), (2, 1)])
    mb = collate_padded(samples, pad_token_id=PAD)
    assert mb.input_ids.shape == (3, 5) and mb.cu_seqlens is None
    assert mb.attention_mask.tolist() == [[1] * 5, [1] * 5, [1, 1, 1, 0, 0]]
    assert mb.input_ids[2, 3:].tolist() == [PAD, PAD]
    assert mb.logit_index.tolist() == [2, 3, 5, 6, 7, 8, 11]
    assert torch.equal(mb.input_ids.view(-1)[mb.logit_index + 1], mb.targets)
    assert mb.old_logps is None and mb.ref_logps is None
    assert mb.meta == {"padding_tokens": 2, "real_tokens": 13}


def test_collate_rejects_bad_samples():
    s = make_samples([(2, 3), (2, 2)], logps=True)
    s[1] = dataclasses.replace(s[1], ref_logps=None)
    with pytest.raises(ValueError, match="ref_logps"):
        collate_packed(s)
    s = make_samples([(2, 3)], logps=True)
    s[0] = dataclasses.replace(s[0], old_logps=s[0].old_logps[:2])
    with pytest.raises(ValueError, match="old_logps has 2 entries, expected 3"):
        collate_packed(s)
    s = make_samples([(2, 3)])
    s[0] = dataclasses.replace(s[0], prompt_ids=[])
    with pytest.raises(ValueError, match="empty prompt"):
        collate_padded(s, PAD)


# --------------------------------------------------------------------------------------------------
# the planner


def _check_plan(lengths, budget, plan):
    flat = sorted(i for b in plan for i in b)
    assert flat == list(range(len(lengths))), "every sample exactly once"
    for b in plan:
        assert b == sorted(b)
        assert len(b) == 1 or sum(lengths[i] for i in b) <= budget, (b, [lengths[i] for i in b], budget)


@pytest.mark.parametrize("seed", range(40))
def test_planner_properties_random(seed):
    rng = random.Random(seed)
    budget = rng.choice([1, 7, 64, 300, 4096])
    n = rng.randint(1, 120)
    kind = seed % 3
    if kind == 0:  # ragged, 1 token up to the whole budget
        lengths = [rng.randint(1, budget) for _ in range(n)]
    elif kind == 1:  # paper-like: many mid-size, a tail of long ones
        lengths = [max(1, min(budget, int(rng.expovariate(3.0 / budget)))) for _ in range(n)]
    else:  # adversarial: just over half the budget, plus singletons
        lengths = [min(budget, budget // 2 + 1) for _ in range(n // 2)] + [1] * (n - n // 2)
        rng.shuffle(lengths)
    plan = plan_microbatches(lengths, budget)
    _check_plan(lengths, budget, plan)
    assert plan == plan_microbatches(list(lengths), budget), "deterministic"
    lower = -(-sum(lengths) // budget)
    assert lower <= len(plan) <= len(lengths)
    # never more micro-batches than first-fit-decreasing (at most 11/9 OPT + 6/9)
    assert len(plan) <= len(_ffd(lengths, budget))


def _ffd(lengths, budget):
    room = []
    for L in sorted(lengths, reverse=True):
        for b, r in enumerate(room):
            if L <= r:
                room[b] -= L
                break
        else:
            room.append(budget - L)
    return room


def test_planner_edges():
    assert plan_microbatches([], 10) == []
    assert plan_microbatches([10], 10) == [[0]]
    assert plan_microbatches([1] * 5, 1) == [[0], [1], [2], [3], [4]]
    # equal lengths are ordered by index, so the plan is the same on every call and process
    assert plan_microbatches([3] * 6, 6) == [[0, 3], [1, 4], [2, 5]]
    with pytest.raises(ValueError, match="at least 1 token"):
        plan_microbatches([3, 0], 10)
    with pytest.raises(ValueError, match="max_tokens must be > 0"):
        plan_microbatches([3], 0)


def test_planner_balances_cost():
    # 8 samples into a budget that takes two bins: longest-first to the cheapest bin splits them
    lengths = [800, 700, 600, 500, 400, 300, 200, 100]
    plan = plan_microbatches(lengths, 2000)
    assert len(plan) == 2
    costs = [microbatch_cost([lengths[i] for i in b]) for b in plan]
    assert max(costs) / min(costs) < 1.1, costs
    assert costs == sorted(costs, reverse=True), "most expensive micro-batch first"
    # the quadratic term matters: one long sample balances against several short ones of equal tokens
    plan = plan_microbatches([1000, 250, 250, 250, 250, 100, 100], 1500, attn_scale=500.0)
    loads = sorted(sum([1000, 250, 250, 250, 250, 100, 100][i] for i in b) for b in plan)
    assert loads[0] < loads[1], "the bin with the long sample should hold fewer tokens"


def test_planner_oversize():
    with pytest.raises(ValueError) as err:
        plan_microbatches([10, 2500, 30], 2048)
    assert "2500" in str(err.value) and "2048" in str(err.value) and "allow_oversize" in str(err.value)
    plan = plan_microbatches([10, 2500, 30, 3000], 2048, allow_oversize=True)
    assert [3] in plan and [1] in plan
    _check_plan([10, 2500, 30, 3000], 2048, plan)


def test_padded_planner():
    assert plan_padded_microbatches(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert plan_padded_microbatches(0, 3) == []
    with pytest.raises(ValueError, match="micro_batch_size"):
        plan_padded_microbatches(4, 0)


def test_backend_on_cpu_is_sdpa():
    assert select_attention_backend("cpu") == "sdpa_varlen"
    assert select_attention_backend(torch.device("cpu")) == "sdpa_varlen"
    with pytest.raises(ValueError, match="backend"):
        use_packed_attention(tiny_qwen2(), backend="nope")
