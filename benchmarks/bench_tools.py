"""Tool calls that never stall the batch: non-stalling multi-turn generation against turn-synchronous.

    pytest -s benchmarks/bench_tools.py --benchmark-only

One call's rows (a random tiny model over the tool tokenizer) with a tool whose latency is seeded and
long-tailed (lognormal: median 0.22 s, a few calls take seconds, capped at 3 s). Three workloads:
  sparse   24 rows that end a turn with `</tool_call>` now and then (15 of 24 call at all); the
           outputs are the (long) error messages of those malformed calls.
  agentic  64 rows that all call several times (up to 4 turns; the close tag's logit is raised), with
           short outputs, as an agent's tool loop does.
  agentic_fast  the same with latencies / 10 (median 22 ms): decoding, not waiting, is the cost.
Modes: `nonstall`, a row leaves the batch while its tool runs and re-enters when it returns
(rollout/tool_decode.py); `sync_turns`, every row waits for the slowest call of the turn, as a loop over
whole turns does; `nonstall_pool16` (agentic only), non-stalling with the 16-thread pool the session had
before it got a thread per row slot, where calls past the 16th queued; `nonstall_eager` (agentic_fast),
non-stalling with each return re-entering at once, in a prefill of its own (REENTRY_STEPS = 0).
Same rows, same seeds, so the same transcripts (asserted). Reported in extra_info: wall seconds,
decode row-steps per decode step over the rows (row-step utilisation), the critical row's total tool
latency (no schedule finishes before it), and the speedup over sync_turns (printed once both arms ran,
in either order). One untimed forward first: a process's first forward passes are slower.
"""
from __future__ import annotations

import random
import time
import zlib

import pytest
import torch

from fastdash.models import random_model
from fastdash.rollout.base import SamplingParams
from fastdash.rollout.decode import DecodeStats
import fastdash.rollout.tool_decode as tool_decode_module
from fastdash.rollout.tool_decode import tool_decode
from fastdash.tools.calls import response_text
from fastdash.tools.session import Episode, ToolSession
from fastdash.tools.tiny import tool_char_tokenizer

RESULTS: dict[tuple[str, str], dict] = {}
WORKLOADS = {"sparse": dict(rows=24, close_bias=0.0, scale=1.0), "agentic": dict(rows=64, close_bias=2.0, scale=1.0),
             "agentic_fast": dict(rows=64, close_bias=2.0, scale=0.1)}


def latency(turn_text: str, turn: int, scale: float) -> float:
    rng = random.Random(zlib.crc32(f"{turn_text}|{turn}".encode()))
    return scale * min(3.0, rng.lognormvariate(-1.5, 1.2))


class SlowEpisode(Episode):
    def run_turn(self, turn_text, calls, turn_closed):
        wait = latency(turn_text, self.stats.turns, self.session.scale)
        self.slept = getattr(self, "slept", 0.0) + wait
        time.sleep(wait)
        if not self.session.short_outputs:
            return super().run_turn(turn_text, calls, turn_closed)
        self.stats.calls, self.stats.turns = self.stats.calls + 1, self.stats.turns + 1
        return response_text([f"{self.slept:.3f}"], self.session.format, turn_closed)


class SlowSession(ToolSession):
    def __init__(self, *, short_outputs: bool, scale: float, fixed_pool: int | None = None):
        super().__init__({}, max_iterations=4)
        self.short_outputs, self.scale, self.fixed_pool = short_outputs, scale, fixed_pool

    def episode(self, seed=None):
        return SlowEpisode(dict(self.functions), self)

    def reserve(self, slots):
        super().reserve(0 if self.fixed_pool else slots)


def setup(workload: str):
    w = WORKLOADS[workload]
    torch.set_num_threads(1)
    tok = tool_char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok), seed=0).eval()
    if w["close_bias"]:  # turns end with a call more often, and EOS less: every row calls several times
        bias = torch.zeros(len(tok))
        bias[tok.convert_tokens_to_ids("</tool_call>")], bias[tok.eos_token_id] = w["close_bias"], -3.0
        model.lm_head.register_forward_hook(lambda m, i, o: o + bias)
    prompts = [tok(f"{a}*{b}=", add_special_tokens=False).input_ids
               for a, b in zip(range(101, 999, 37), range(11, 99, 7))]
    return tok, model, [prompts[i % len(prompts)] for i in range(w["rows"])]


@pytest.mark.parametrize("workload,mode", [("sparse", "sync_turns"), ("sparse", "nonstall"),
                                           ("agentic", "sync_turns"), ("agentic", "nonstall"),
                                           ("agentic", "nonstall_pool16"), ("agentic_fast", "sync_turns"),
                                           ("agentic_fast", "nonstall"), ("agentic_fast", "nonstall_eager")])
def test_tool_latency(benchmark, monkeypatch, workload, mode):
    tok, model, rows = setup(workload)
    out = {}
    if mode == "nonstall_eager":  # before re-entries were gathered: each return, a prefill of its own
        monkeypatch.setattr(tool_decode_module, "REENTRY_STEPS", 0)

    def once():
        session = SlowSession(short_outputs=workload != "sparse", scale=WORKLOADS[workload]["scale"],
                              fixed_pool=16 if mode.endswith("16") else None)
        stats = DecodeStats()
        t0 = time.perf_counter()
        res = tool_decode(model, rows, SamplingParams(max_tokens=96), session=session, tokenizer=tok,
                          eos_ids=(tok.eos_token_id,), pad_id=0, max_batch_size=len(rows), seed=7, stats=stats,
                          sync_turns=mode == "sync_turns")
        session.close()
        out.update(wall=time.perf_counter() - t0, stats=stats, ids=[r.ids for r in res],
                   calls=sum(r.episode.stats.calls for r in res),
                   critical=max(getattr(r.episode, "slept", 0.0) for r in res))

    with torch.no_grad():  # warm-up
        model(torch.tensor([rows[0]]))
    benchmark.pedantic(once, rounds=1, iterations=1, warmup_rounds=0)
    st = out["stats"]
    info = {"wall_s": out["wall"], "calls": out["calls"], "critical_row_tool_s": out["critical"],
            "row_step_utilisation": st.decode_row_steps / max(1, st.decode_steps * len(rows)),
            "decode_steps": st.decode_steps, "decode_row_steps": st.decode_row_steps,
            "prefill_calls": st.prefill_calls}
    RESULTS[workload, mode] = {**info, "ids": out["ids"]}
    benchmark.extra_info.update(info)
    print(workload, mode, {k: round(v, 3) if isinstance(v, float) else v for k, v in info.items()})
    base = RESULTS.get((workload, "sync_turns"))
    for (w, m), r in RESULTS.items():
        if base is not None and w == workload and m != "sync_turns" and (m == mode or mode == "sync_turns"):
            assert r["ids"] == base["ids"]  # same transcripts
            r["speedup_vs_sync_turns"] = base["wall_s"] / r["wall_s"]
            print(f"{w} {m}: {r['speedup_vs_sync_turns']:.2f}x sync_turns")
