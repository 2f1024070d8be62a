"""Which samples reach the loss: truncated completions under `mask_truncated_completions`, and empty ones.

Observed through behaviour only (weight updates, finiteness, step metrics), not through the trainer's
internals: a masked sample must leave no trace in the gradient, whatever its tokens are.
"""
from __future__ import annotations

import torch

from fastdash.batch import Completion, Sample
from fastdash.rollout.base import SamplingParams
from fastdash.runtime import build_run
from fastdash.trainer import Trainer
from tests.conftest import FakeEngine, sgd, tiny_config

MAX_LEN = 6
EPS32 = torch.finfo(torch.float32).eps


class GroupEngine(FakeEngine):
    """Per prompt, G = 4 completions starting "1", "3", "2", "44" (rewards 1, 1, 0, 0). The first is
    truncated (MAX_LEN tokens, no EOS) with `tail` after its "1"; with `all_truncated` so are the others,
    the rest end at EOS. `third` = "empty" or "truncated" replaces the "2" (reward 0 either way)."""

    name = "groups"

    def __init__(self, tok, tail: str = "23456", all_truncated: bool = False, third: str | None = None):
        self.tok, self.tail, self.all_truncated, self.third = tok, tail, all_truncated, third

    def completion(self, prompt, text: str, truncated: bool) -> Completion:
        ids = self.tok(text, add_special_tokens=False).input_ids
        if truncated:
            ids = (ids + self.tok(self.tail * MAX_LEN, add_special_tokens=False).input_ids)[:MAX_LEN]
        return Completion(list(prompt), ids if truncated else ids + [self.tok.eos_token_id], truncated=truncated)

    def generate(self, prompts, n, params):
        assert n == 4 and params.max_tokens == MAX_LEN
        out = []
        for p in prompts:
            group = [self.completion(p, "1", True)]
            group += [self.completion(p, t, self.all_truncated) for t in ("3", "2", "44")]
            if self.third == "empty":
                group[2] = Completion(list(p), [], truncated=False)
            elif self.third == "truncated":
                group[2] = self.completion(p, "2", True)
            out += group
        return out


def odd_first_digit(completion: str, answer: str, **_) -> float:
    """1 for "1..." and "3", 0 for "2", "44" and "": every group has advantages far from 0."""
    return float(completion[:1] in "13579" and completion[:1] != "")


def one_step(engine_kw: dict, **cfg_kw) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(step metrics, weights before, weights after) of one SGD step on a fixed tiny model. No gradient
    clipping: clipping to a norm would hide a wrongly scaled gradient."""
    cfg = tiny_config(max_completion_length=MAX_LEN, num_generations=4, train_batch_size=8,
                      generation_batch_size=8, max_grad_norm=0.0, **cfg_kw)
    run = build_run(cfg, with_plan=False)
    run.engine = GroupEngine(run.tokenizer, **engine_kw)
    run.reward_fn = odd_first_digit
    sgd(run, lr=1.0)
    before = torch.cat([p.detach().flatten().clone() for p in run.model.parameters()])
    metrics = Trainer(cfg, run).step()
    after = torch.cat([p.detach().flatten() for p in run.model.parameters()])
    return metrics, before, after


def update_gap(a: dict, b: dict, **cfg_kw) -> tuple[float, float, float]:
    """Largest difference between the weight updates of two engines, the update's size, and the
    difference float32 rounding alone could cause (a sum over at most every loss token, sqrt-grown)."""
    _, w0, wa = one_step(a, **cfg_kw)
    _, _, wb = one_step(b, **cfg_kw)
    da, db = wa - w0, wb - w0
    scale = float(da.abs().max())
    tokens = 8 * (16 + MAX_LEN)  # samples x (prompt + completion) bounds the terms of any gradient sum
    return float((da - db).abs().max()), scale, 8 * EPS32 * tokens**0.5 * scale


def test_masked_truncated_completions_leave_no_trace_in_the_update():
    gap, scale, tol = update_gap({"tail": "23456"}, {"tail": "98765"}, mask_truncated_completions=True,
                                 gradient_filtering=False)
    assert scale > 0, "the three finished completions per group must still train"
    assert gap <= tol, f"the tokens of masked truncated completions changed the update by {gap:.3g} > {tol:.3g}"


def test_unmasked_truncated_completions_do_train():
    gap, scale, tol = update_gap({"tail": "23456"}, {"tail": "98765"}, mask_truncated_completions=False,
                                 gradient_filtering=False)
    assert gap > 100 * tol, f"truncated completions should reach the loss when not masked ({gap:.3g})"


def test_every_completion_truncated_and_masked_leaves_the_weights_alone():
    metrics, before, after = one_step({"all_truncated": True}, mask_truncated_completions=True,
                                      gradient_filtering=False)
    assert torch.equal(before, after), "a step whose samples are all masked must not move the weights"
    metrics, before, after = one_step({"all_truncated": True}, mask_truncated_completions=False,
                                      gradient_filtering=False)
    assert not torch.equal(before, after)


def test_empty_completions_never_reach_the_loss():
    # grpo averages each sequence over its own tokens: an empty one reaching the loss would be 0 / 0
    metrics, before, after = one_step({"third": "empty"}, loss_type="grpo", gradient_filtering=False)
    assert metrics["filter/kept_samples"] == 6, metrics  # 8 samples, 2 empty (advantage < 0, not 0)
    assert metrics.get("skipped") == 0 and torch.isfinite(torch.tensor(metrics["loss"])), metrics
    assert torch.isfinite(after).all() and not torch.equal(before, after)


def test_an_empty_completion_trains_like_a_masked_one():
    # grpo averages over the sequences that reach the loss: an empty one counted there would rescale
    # the update, so it must match the run whose sample in that place is a masked truncated completion
    gap, scale, tol = update_gap({"third": "empty"}, {"third": "truncated"}, loss_type="grpo",
                                 mask_truncated_completions=True, gradient_filtering=False)
    assert scale > 0 and gap <= tol, f"an empty completion changed the update by {gap:.3g} > {tol:.3g}"


def test_dapo_normaliser_counts_only_unmasked_tokens_like_trl():
    # TRL's dapo divides by num_items_in_batch, counted after mask_truncated_completions zeroes the truncated
    # completions' mask; filtered samples (DASH) still count. Here the filter is off, nothing is empty, so
    # every unmasked sample is kept: dapo's normaliser is bnpo's and the two updates must be one.
    _, w0, w_dapo = one_step({}, loss_type="dapo", mask_truncated_completions=True, gradient_filtering=False)
    _, _, w_bnpo = one_step({}, loss_type="bnpo", mask_truncated_completions=True, gradient_filtering=False)
    d_dapo, d_bnpo = w_dapo - w0, w_bnpo - w0
    scale = float(d_bnpo.abs().max())
    tol = 8 * EPS32 * (8 * (16 + MAX_LEN)) ** 0.5 * scale  # as update_gap: fp32 rounding of the token sums
    assert scale > 0
    assert float((d_dapo - d_bnpo).abs().max()) <= tol, \
        f"dapo's update is {float(d_dapo.norm() / d_bnpo.norm()):.4g} x bnpo's: masked tokens in its normaliser"


def test_dapo_normaliser_is_trls_num_items_in_batch():
    # Filter on: the step's normaliser itself, against TRL's count (dapo's update above is one check of it)
    cfg = tiny_config(max_completion_length=MAX_LEN, num_generations=4, train_batch_size=8, generation_batch_size=8,
                      loss_type="dapo", mask_truncated_completions=True, gradient_filtering=True,
                      gradient_filtering_threshold=0.6)
    run = build_run(cfg, with_plan=False)
    engine = GroupEngine(run.tokenizer)
    completions = engine.generate([[5, 6], [7, 8]], 4, SamplingParams(max_tokens=MAX_LEN))
    samples = [Sample(uid=i, prompt_ids=c.prompt_ids, completion_ids=c.completion_ids, truncated=c.truncated,
                      advantage=a) for i, (c, a) in enumerate(zip(completions, [0.9, 0.5, -0.5, -0.9] * 2))]
    batch = Trainer(cfg, run).step_batch(samples)
    # TRL: the completion tokens of the samples that are not truncated, filtered ones (|A| = 0.5) included
    assert batch.normaliser == sum(len(c.completion_ids) for c in completions if not c.truncated)
    assert len(batch.kept) == 2  # the filter dropped four, the mask the two truncated |A| = 0.9 ones
