"""Tool-using, multi-turn rollouts (fastdash/tools, rollout/tool_decode.py): schemas and calls, the
python tool's sandbox, errors / timeouts / huge outputs, environments with state, the non-stalling
decode loop (sampler ids and log-probs = trained ids and log-probs across turns), and the masks that
keep tool tokens out of the loss and every normaliser."""
from __future__ import annotations

import random
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from fastdash.algo import loss_token_weights
from fastdash.batch import Sample
from fastdash.config import Config
from fastdash.models import random_model
from fastdash.packing import collate_packed
from fastdash.rollout.base import SamplingParams
from fastdash.rollout.decode import DecodeStats, row_seed
from fastdash.rollout.tool_decode import tool_decode
from fastdash.tools import ToolSession, parse_calls
from fastdash.tools.python_tool import make_python_tool
from fastdash.tools.schema import tool_schema
from fastdash.tools.tiny import tool_char_tokenizer
from fastdash.trainer import Trainer
from fastdash_kernels import fused_policy_loss

EPS32 = torch.finfo(torch.float32).eps


def add(a: int, b: int) -> int:
    """Add two integers.

    Args:
        a: the first
        b: the second
    """
    return a + b


class Counter:
    """An environment with state: its public methods are the sample's tools."""

    def __init__(self):
        self.total, self.resets = None, 0

    def reset(self):
        self.total, self.resets = 0, self.resets + 1

    def bump(self, n: int) -> str:
        """Add n to the counter and return the new total.

        Args:
            n: how much to add
        """
        self.total += n
        return str(self.total)


class Dice:
    """An environment with randomness: drawn from reset's seed, so a resumed run replays it."""

    def reset(self, seed: int | None = None):
        self.seed, self.rng = seed, random.Random(seed)

    def roll(self) -> str:
        """Roll a die."""
        return str(self.rng.randint(1, 6))


# ---------------------------------------------------------------- tools, calls, limits ------------
def test_schema_from_hints_and_docstring_and_a_clear_error():
    s = tool_schema(add)["function"]
    assert s["name"] == "add" and s["parameters"]["properties"]["a"]["type"] == "integer"
    assert s["parameters"]["required"] == ["a", "b"]

    def undocumented(x):
        return x

    with pytest.raises(ValueError, match="config: tools: tool .*undocumented.* type hint"):
        tool_schema(undocumented)
    with pytest.raises(ValueError, match="tools"):
        Config(tools=["not_a_spec"])
    with pytest.raises(ValueError, match="async_generation.*tools"):
        Config(tools=["python"], async_generation=True, max_staleness=0)
    assert Config(tools="python,tests.test_tools:add").tools == ["python", "tests.test_tools:add"]


def test_parse_calls():
    ok, bad, wrong = parse_calls('x<tool_call>{"name": "add", "arguments": {"a": 1, "b": 2}}</tool_call>'
                                 '<tool_call>{"name": </tool_call><tool_call>[1]</tool_call>')
    assert (ok.name, ok.arguments, ok.error) == ("add", {"a": 1, "b": 2}, None)
    assert "invalid JSON" in bad.error and "must be" in wrong.error
    assert parse_calls("no call here") == []
    assert "without a <tool_call>" in parse_calls("12</tool_call>")[0].error


def _calls(episode, *calls):
    from fastdash.tools.calls import ToolCall

    return episode.run_turn("turn", [ToolCall(n, a) for n, a in calls], turn_closed=False)


def test_errors_timeouts_and_huge_outputs_are_counted_and_marked():
    def boom(x: int) -> str:
        """Fail.

        Args:
            x: ignored
        """
        raise RuntimeError("kaput")

    def slow(x: int) -> str:
        """Sleep.

        Args:
            x: ignored
        """
        time.sleep(5)
        return "late"

    def flood(x: int) -> str:
        """Print a lot.

        Args:
            x: characters
        """
        return "y" * x

    session = ToolSession({"boom": boom, "slow": slow, "flood": flood}, timeout_s=0.3, max_output_chars=50)
    ep = session.episode()
    t0 = time.perf_counter()
    text = _calls(ep, ("boom", {"x": 1}), ("slow", {"x": 1}), ("flood", {"x": 10_000}), ("nope", {}),
                  ("flood", {"x": 3}))
    assert time.perf_counter() - t0 < 3  # the hung call cost its timeout, not its 5 s
    outs = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert outs[0] == "Error: RuntimeError: kaput"
    assert "no result within 0.3 s" in outs[1]
    assert outs[2] == "y" * 50 + "…[truncated 9950 chars]"
    assert "unknown tool 'nope'" in outs[3] and outs[4] == "yyy"
    st = ep.stats
    assert (st.calls, st.errors, st.timeouts, st.truncated_outputs, st.turns) == (5, 2, 1, 2, 2)  # the unknown-tool message is cut too
    assert text == "".join(f"<tool_response>{o}</tool_response>" for o in outs)  # plain format, in order


def test_environment_class_keeps_state_per_sample():
    session = ToolSession({}, Counter)
    assert [s["function"]["name"] for s in session.schemas] == ["bump"]  # reset is not a tool
    a, b = session.episode(), session.episode()
    assert a.env is not b.env and a.env.resets == b.env.resets == 1
    _calls(a, ("bump", {"n": 2}), ("bump", {"n": 3}))
    _calls(b, ("bump", {"n": 10}))
    assert [m["content"] for m in a.messages if m["role"] == "tool"] == ["2", "5"]
    assert [m["content"] for m in b.messages if m["role"] == "tool"] == ["10"]


def test_environment_randomness_comes_from_a_per_row_seed(tool_rows):
    """reset(seed=...) gets a per-row seed of the call's seed: the same rows replay the same episodes
    (a resumed run regenerates its rollout with the same seeds), distinct rows get distinct ones."""
    session = ToolSession({}, Dice)
    rolls = [[_calls(session.episode(seed=5), ("roll", {})) for _ in range(3)] for _ in range(2)]
    assert rolls[0] == rolls[1]
    assert session.episode().env.seed is None  # no seed given: reset() gets none
    tok, model, rows = tool_rows
    res = tool_decode(model, rows, SamplingParams(max_tokens=2), session=session, tokenizer=tok, eos_ids=(1,),
                      pad_id=0, max_batch_size=5, seed=3, stats=DecodeStats())
    assert [r.episode.env.seed for r in res] == [row_seed(3, i) for i in range(len(rows))]


def test_python_tool_runs_in_the_sandbox(tmp_path):
    """Inside a tool call: results come back, the user's files (a dataset's answers) and the network do
    not, a hang is killed at the timeout, a flood is cut and marked."""
    canary = tmp_path / "answers.jsonl"
    canary.write_text("SECRET-ANSWER-42\n")
    canary.chmod(0o644)
    session = ToolSession({"python": make_python_tool(2.0, 2000)}, timeout_s=3.0, max_output_chars=2000)
    ep = session.episode()
    _calls(ep, ("python", {"code": "6*7"}),
           ("python", {"code": f"print(open({str(canary)!r}).read())"}),
           ("python", {"code": "import socket\nsocket.create_connection(('127.0.0.1', 22), timeout=1)"}),
           ("python", {"code": "while True: pass"}),
           ("python", {"code": "print('z' * 100000)"}))
    out = [m["content"] for m in ep.messages if m["role"] == "tool"]
    assert out[0].strip() == "42"
    assert "SECRET" not in out[1] and ("No such file" in out[1] or "Permission" in out[1])
    assert out[2].startswith("Error:") and ("Network is unreachable" in out[2] or "refused" in out[2]
                                            or "not permitted" in out[2] or "Errno" in out[2])
    assert "no result within" in out[3]
    assert out[4].startswith("z" * 2000) and "[truncated" in out[4]
    assert (ep.stats.errors, ep.stats.timeouts, ep.stats.truncated_outputs) == (2, 1, 1)


# ---------------------------------------------------------------- the decode loop -----------------
@pytest.fixture(scope="module")
def tool_rows():
    """A random tiny model over the tool tokenizer: it emits `</tool_call>` now and then, each a
    (malformed) call whose error message the row reads as a tool turn before going on. One torch thread:
    these [<= 12, 1, 128] decode steps are too small to share, and on a loaded machine spinning threads
    cost 20x."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield _tool_rows()
    torch.set_num_threads(threads)


def _tool_rows():
    tok = tool_char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=0).double().eval()
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ["12*34=", "5*678=", "99*9="]]
    return tok, model, [p for p in prompts for _ in range(4)]


def _decode(tok, model, rows, cap, sync=False):
    session = ToolSession({}, max_iterations=3)
    stats = DecodeStats()
    out = tool_decode(model, rows, SamplingParams(max_tokens=60), session=session, tokenizer=tok, eos_ids=(1,),
                      pad_id=0, max_batch_size=cap, seed=3, stats=stats, sync_turns=sync)
    return out, stats


def test_multiturn_sampler_logps_match_a_full_forward(tool_rows):
    """KV reuse on re-entry is exact: each sampled token's log-prob equals a from-scratch forward of the
    final sequence (prompt + every turn, tool tokens included) at its position."""
    tok, model, rows = tool_rows
    results, stats = _decode(tok, model, rows, cap=5)
    turns = [r.episode.stats.turns for r in results]
    assert sum(t > 1 for t in turns) >= 3 and max(turns) >= 3  # the scenario pauses and resumes rows
    assert stats.prefill_calls > 3  # re-entries prefill only what is new
    for prompt, r in zip(rows, results):
        assert len(r.mask) == len(r.ids) and sum(r.mask) == len(r.logps)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + r.ids])).logits[0]
        logp = torch.log_softmax(logits, -1)
        pos = [len(prompt) - 1 + j for j, m in enumerate(r.mask) if m]
        ref = logp[pos, torch.tensor([t for t, m in zip(r.ids, r.mask) if m])]
        # the sampler's softmax is fp32: a few ulps of the largest logit, in nats
        tol = 16 * EPS32 * max(1.0, float(logits.abs().max()))
        assert torch.allclose(torch.tensor(r.logps, dtype=torch.float64), ref, rtol=0, atol=tol)
        # every tool span is exactly the tokenised tool turn, masked out (a last one may be cut at max_tokens)
        tools = [m for m in r.episode.messages if m["role"] == "tool"]
        for turn in tools[:-1] if r.truncated else tools:
            span = tok(f"<tool_response>{turn['content']}</tool_response>", add_special_tokens=False).input_ids
            starts = [j for j in range(len(r.ids)) if r.ids[j:j + len(span)] == span]
            assert starts and all(r.mask[j] == 0 for j in range(starts[0], starts[0] + len(span)))


def test_transcripts_do_not_depend_on_batching_or_tool_timing(tool_rows):
    """A row's transcript depends on the call's seed and its index only: the batch cap, and whether rows
    re-enter as soon as their tools return or wait for the whole turn, change nothing (a resumed run
    regenerates the same rollouts)."""
    tok, model, rows = tool_rows
    base, _ = _decode(tok, model, rows, cap=5)
    for cap, sync in ((12, False), (3, False), (12, True)):
        other, _ = _decode(tok, model, rows, cap=cap, sync=sync)
        assert [r.ids for r in other] == [r.ids for r in base]
        assert [r.mask for r in other] == [r.mask for r in base]


def test_every_row_slot_has_a_pool_thread(tool_rows):
    """A slow call holds its own row only: with a thread per slot, all 24 rows' calls run at once (a
    barrier of 24 passes); the old 16-thread pool queued calls 17-24 behind the first ones' latency."""
    tok, model, rows = tool_rows
    session = ToolSession({}, max_iterations=1)
    tool_decode(model, rows * 2, SamplingParams(max_tokens=1), session=session, tokenizer=tok, eos_ids=(1,),
                pad_id=0, max_batch_size=24, seed=3, stats=DecodeStats())
    barrier = threading.Barrier(24, timeout=10)
    try:
        assert all(f.result() >= 0 for f in [session.pool.submit(barrier.wait) for _ in range(24)])
    finally:
        barrier.abort()
        session.close()


# ---------------------------------------------------------------- training on it ------------------
def _masked_samples():
    g = torch.Generator().manual_seed(0)
    out = []
    for uid, (p, mask) in enumerate([(3, [1, 1, 0, 0, 0, 1, 1]), (2, [1, 0, 0, 1]), (4, [1, 1, 1])]):
        ids = torch.randint(0, 50, (p + len(mask),), generator=g).tolist()
        out.append(Sample(uid=uid, prompt_ids=ids[:p], completion_ids=ids[p:], truncated=False,
                          advantage=[1.0, -0.5, 0.25][uid], completion_mask=tuple(mask)))
    return out


def test_tool_tokens_carry_no_gradient_and_count_in_no_normaliser():
    samples = _masked_samples()
    policy = sum(sum(s.completion_mask) for s in samples)  # 4 + 2 + 3 = 9 of 14 completion tokens
    for loss_type, want in (("bnpo", policy), ("dapo", policy), ("grpo", 3), ("dr_grpo", 3 * 8)):
        cfg = SimpleNamespace(mask_truncated_completions=False, gradient_filtering=False, loss_type=loss_type,
                              max_completion_length=8)
        assert Trainer.step_batch(SimpleNamespace(cfg=cfg), samples).normaliser == want
    mb = collate_packed(samples)
    assert mb.input_ids[0].tolist() == [t for s in samples for t in s.prompt_ids + s.completion_ids]
    assert mb.targets.tolist() == [t for s in samples for t, m in zip(s.completion_ids, s.completion_mask) if m]

    T, H, V = mb.input_ids.shape[1], 16, 50
    g = torch.Generator().manual_seed(1)
    hidden_all = torch.randn(T, H, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    w = loss_token_weights("grpo", mb.completion_cu_seqlens, 3.0, num_tokens=mb.targets.numel())
    out = fused_policy_loss(hidden_all.float()[mb.logit_index], weight.float(), mb.targets, mb.completion_cu_seqlens,
                            mb.advantages, token_weights=w, backend="torch")
    out.loss.backward()

    # float64 reference from the masks alone: positions predicting sampled tokens, per-sample token means
    ref_h = hidden_all.detach().clone().requires_grad_(True)
    logp = torch.log_softmax(ref_h @ weight.T, -1)
    loss, offset, tool_positions = 0.0, 0, []
    for s in samples:
        p = len(s.prompt_ids)
        pos = [offset + p - 1 + j for j, m in enumerate(s.completion_mask) if m]
        tool_positions += [offset + p - 1 + j for j, m in enumerate(s.completion_mask) if not m]
        y = torch.tensor([t for t, m in zip(s.completion_ids, s.completion_mask) if m])
        # on-policy PPO: d(ratio)/d(theta) = d(logp); grpo: token mean per sample, / the 3 samples
        loss = loss - s.advantage * logp[pos, y].sum() / len(pos) / 3.0
        offset += s.length
    loss.backward()
    assert torch.all(hidden_all.grad[tool_positions] == 0)  # no gradient through a tool token's prediction
    scale = float(ref_h.grad.abs().max())
    assert torch.allclose(hidden_all.grad.double(), ref_h.grad, rtol=0, atol=64 * EPS32 * scale)


def test_samples_without_a_mask_are_unchanged():
    s = _masked_samples()[0]
    plain = Sample(uid=0, prompt_ids=s.prompt_ids, completion_ids=s.completion_ids, truncated=False)
    full = Sample(uid=0, prompt_ids=s.prompt_ids, completion_ids=s.completion_ids, truncated=False,
                  completion_mask=(1,) * len(s.completion_ids))
    a, b = collate_packed([plain]), collate_packed([full])
    assert torch.equal(a.logit_index, b.logit_index) and torch.equal(a.targets, b.targets)


# ---------------------------------------------------------------- kill -9 and resume -------------
@pytest.mark.slow
def test_kill_and_resume_with_tools_is_bit_identical(tmp_path):
    """The shipped tool model calling the sandboxed `python` tool: SIGKILL once step 2's completions (tool
    calls run) are back, resume from checkpoint-1; the final weights equal the uninterrupted run's bit for
    bit, and so do the metrics (tool counts included, only timings differ) and the logged transcripts."""
    import json
    import signal

    from safetensors.torch import load_file

    from tests import test_resume as R

    args = ["model=tiny-tools", "task=multiplication", "tools=python", "max_tool_calling_iterations=1",
            "max_completion_length=72", "num_threads=1", "max_steps=3", "train_batch_size=16",
            "generation_batch_size=16", "num_generations=4", "num_train_problems=64", "num_eval_problems=8",
            "eval_steps=0", "eval_sampled=false", "save_steps=1", "plots=false", "learning_rate=1e-3",
            "max_tokens_per_microbatch=256",  # pinned: the automatic budget reads the free memory
            "log_completions=true"]

    def start(out, kill_at=None, *extra):
        env = {**R.os.environ, "FASTDASH_TEST_KILL_AT": kill_at or "none:0"}
        return R.subprocess.Popen([R.sys.executable, "-c", R.RUNNER, *args, f"output_dir={out}", *extra],
                                  cwd=R.ROOT, env=env, stdout=R.subprocess.PIPE, stderr=R.subprocess.STDOUT,
                                  text=True)

    def rows(out, name):
        # not compared exactly: timings, and the sampler's log-probs (the mismatch metrics), which are
        # reproducible to float rounding only: which rows share a forward depends on when tools return
        varies = ("time/", "tools/seconds", "async/", "mismatch/")
        return [{k: v for k, v in json.loads(x).items() if not k.startswith(varies)}
                for x in (out / name).read_text().splitlines()]

    ref_dir, out = tmp_path / "ref", tmp_path / "cut"
    ref = start(ref_dir)
    R.finish(start(out, "generate:2"), -signal.SIGKILL)
    assert R.complete(out) == ["checkpoint-1"] and R.steps(out) == [1]
    assert "resumed from" in R.finish(start(out, None, "resume=auto"), 0)
    R.finish(ref, 0)
    a, b = load_file(ref_dir / "final" / "model.safetensors"), load_file(out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = rows(out, "metrics.jsonl")
    assert metrics == rows(ref_dir, "metrics.jsonl") and [m["step"] for m in metrics] == [1, 2, 3]
    assert all(m["tools/calls_per_sample"] > 0 for m in metrics)  # the regenerated steps called the tool
    for d in (out, ref_dir):  # sampler and trainer log-probs agree to fp32 rounding (a few 1e-7 nats) in both
        steps_ = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        assert all(m.get("mismatch/logp_abs_mean", 0) < 1e-5 for m in steps_)
    logged = rows(out, "completions.jsonl")
    assert logged == rows(ref_dir, "completions.jsonl")
    calls = [m for r in logged for m in r.get("messages", []) if m.get("tool_calls")]
    assert calls and all(m["tool_calls"][0]["function"]["name"] == "python" for m in calls)


# ---------------------------------------------------------------- the shipped tool model ----------
def test_shipped_tool_model_loads_its_own_tokenizer():
    """AutoTokenizer would rebuild the character tokenizer as Qwen2's byte-level BPE and drop every
    space and newline (a tool output's '\\n'): the shipped one must encode as the SFT script did."""
    from fastdash.models import SHIPPED, load_tokenizer
    from fastdash.tools.tiny import sft_completion

    tok, made = load_tokenizer(SHIPPED["tiny-tools"]), tool_char_tokenizer()
    text = "123*45=" + "".join(t for t, _ in sft_completion("123*45=", "5535", True)) + " x"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids == made(text, add_special_tokens=False).input_ids and tok.decode(ids) == text


def test_shipped_tool_model_calls_the_tool_some_of_the_time():
    """The SFT'd base model of recipes/tiny-tools.yaml, through the multi-turn loop and the sandboxed
    tool: it calls `python` on a minority of held-out problems (RL has a rate to raise), and the
    transcripts that call it are mostly right while the ones that do not are mostly wrong."""
    from fastdash.data.multiplication import make_problems
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rewards.tools import final_answer_reward

    model, tok = load_model_and_tokenizer("tiny-tools")
    problems = make_problems(64, split="heldout")
    session = ToolSession({"python": make_python_tool(5.0, 64)}, max_iterations=1, timeout_s=10.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = tool_decode(model.eval(), [tok(p["prompt"]).input_ids for p in problems], SamplingParams(max_tokens=72),
                          session=session, tokenizer=tok, eos_ids=(tok.eos_token_id,), pad_id=tok.pad_token_id,
                          max_batch_size=None, seed=1, stats=DecodeStats())
    finally:
        torch.set_num_threads(threads)
        session.close()
    texts = [tok.decode(r.ids, skip_special_tokens=True) for r in res]
    right = [final_answer_reward(t, p["answer"]) for t, p in zip(texts, problems)]
    called = [r.episode.stats.calls > 0 for r in res]
    assert 4 <= sum(called) <= 32 and not any(r.episode.stats.errors for r in res)
    assert sum(a for a, c in zip(right, called) if c) >= 0.6 * sum(called)
    assert sum(a for a, c in zip(right, called) if not c) <= 0.2 * (len(res) - sum(called))
