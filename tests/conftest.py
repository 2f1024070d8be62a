"""Shared test helpers: tiny configs and runs on a random tiny Qwen2, and a deterministic engine."""
from __future__ import annotations

import hashlib

import pytest
import torch

from fastdash.batch import Completion
from fastdash.config import Config


def tiny_config(**overrides) -> Config:
    """A seconds-fast config on a random tiny model (no shipped weights needed)."""
    base = dict(model="random:tiny", max_prompt_length=16, max_completion_length=6, num_eval_problems=20,
                train_batch_size=16, generation_batch_size=16, micro_batch_size=4, learning_rate=1e-3,
                max_steps=2, temperature=1.0, top_k=0, num_train_problems=200, plots=False,
                max_tokens_per_microbatch=64)
    base.update(overrides)
    return Config(**base)


class FakeEngine:
    """The Engine protocol's no-op parts, for test engines that only script `generate`."""

    name = "fake"
    max_batch_size = None  # the Engine protocol's concurrency setting

    def sync_weights(self, model):
        pass

    def sleep(self):
        pass

    def wake(self):
        pass


class ScriptedEngine(FakeEngine):
    """Returns the same completion for (prompt, j-th sample of that prompt) however calls are batched,
    so two arms that batch generation differently see identical samples."""

    name = "scripted"

    def __init__(self, vocab: int = 20, eos: int = 1, max_len: int = 6):
        self.vocab, self.eos, self.max_len = vocab, eos, max_len
        self.calls: list[int] = []
        self.seen: dict[tuple, int] = {}

    def generate(self, prompts, n, params):
        self.calls.append(len(prompts) * n)
        out = []
        for p in prompts:
            for _ in range(n):
                j = self.seen.get(tuple(p), 0)
                self.seen[tuple(p)] = j + 1
                h = hashlib.sha256(f"{p}-{j}".encode()).digest()
                length = 1 + h[0] % params.max_tokens
                ids = [3 + b % (self.vocab - 3) for b in h[1 : 1 + length]]
                truncated = h[0] % 5 == 0
                out.append(Completion(list(p), ids if truncated else ids[:-1] + [self.eos], truncated=truncated))
        return out


def digit_sum_reward(completion: str, answer: str, **_) -> float:
    """A reward that varies across samples of a random model: parity of the digit sum."""
    return float(sum(int(c) for c in completion if c.isdigit()) % 2)


@pytest.fixture
def scripted_run():
    from fastdash.runtime import build_run

    def make(**overrides):
        cfg = tiny_config(**{"engine": "hf", **overrides})  # replaced below: never start vLLM for it
        run = build_run(cfg, with_plan=False)
        run.engine = ScriptedEngine(max_len=cfg.max_completion_length)
        run.reward_fn = digit_sum_reward
        return cfg, run

    return make


def sgd(run, lr: float = 1.0):
    """Swap in plain SGD so a weight delta equals lr x gradient (Adam's first step is ~sign(g))."""
    run.optimizer = torch.optim.SGD(run.model.parameters(), lr=lr)
    run.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, lambda _: 1.0)


def assert_well_formed(out, prompts, n: int, eos_id: int, max_tokens: int) -> None:
    """What every engine must return: n completions per prompt in prompt order, each either ending at
    its only EOS or truncated at exactly max_tokens without one."""
    assert [c.prompt_ids for c in out] == [p for p in prompts for _ in range(n)]
    for c in out:
        if c.truncated:
            assert len(c.completion_ids) == max_tokens and eos_id not in c.completion_ids
        else:
            assert c.completion_ids[-1] == eos_id and eos_id not in c.completion_ids[:-1]



def assert_sampler_logps_agree(model, out, ref, temperature: float) -> None:
    """Two decode paths' sampler log-probs of the same samples agree within twice the bound of one path:
    4x the fp32 model's error against its float64 copy + 4 ulps of the largest |logit / T| (they may
    round differently: other batch shapes, other matmul orders)."""
    import copy

    eps32 = torch.finfo(torch.float32).eps
    model64 = copy.deepcopy(model).double()
    err_trainer = scale = gap = 0.0
    for c, r in zip(out, ref):
        seq = torch.tensor([c.prompt_ids + c.completion_ids])
        cols = torch.arange(len(c.prompt_ids) - 1, seq.shape[1] - 1)
        target = seq[0, len(c.prompt_ids):, None]
        lp = {}
        for name, m in (("32", model), ("64", model64)):
            with torch.no_grad():
                logits = m(seq).logits[0, cols].double() / temperature
            lp[name] = torch.log_softmax(logits, -1).gather(-1, target)[:, 0]
            scale = max(scale, float(logits.abs().max()))
        err_trainer = max(err_trainer, float((lp["32"] - lp["64"]).abs().max()))
        gap = max(gap, float((torch.tensor(c.sampler_logps) - torch.tensor(r.sampler_logps)).abs().max()))
    assert gap <= 2 * (4 * err_trainer + 4 * eps32 * max(scale, 1.0)), (gap, err_trainer, scale)

# ---------------------------------------------------------------- decode-loop tests' models ------
@pytest.fixture(scope="module")
def tok():
    """The character tokenizer of the built-in task (test_decode, test_static_decode)."""
    from fastdash.models import char_tokenizer

    return char_tokenizer()


@pytest.fixture(scope="module")
def rand_model(tok):
    from fastdash.models import random_model

    return random_model("tiny", vocab_size=len(tok), seed=3)


@pytest.fixture(scope="module")
def arith():
    """The shipped tiny model: its greedy answers end at EOS after different lengths (compaction)."""
    from fastdash.models import load_model_and_tokenizer

    return load_model_and_tokenizer("tiny-arith")
