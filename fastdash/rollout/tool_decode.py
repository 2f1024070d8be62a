"""Multi-turn decoding with tools, on the compacting loop of `decode`: a tool call never stalls the batch.

A row whose turn ends (an EOS, or the single `</tool_call>` token where the tokenizer has one) with tool
calls in it leaves the decode batch like a finished row; the turn's calls go to the session's thread pool
and the other rows keep decoding. When the calls return, the tool turn's text is tokenised once and
the row re-enters the batch with the next prefill (`_resume`), ahead of waiting prompts.

A re-entering row reuses its KV cache: when it leaves, its cache columns (and mask) are kept aside
(`stash`); on re-entry only what is new is prefilled, its last sampled token (never fed yet) and the
tool turn's tokens, on top of the kept cache. Re-prefilling the whole row would cost its full length
again per turn (prompt + every earlier turn), quadratic in the turns; the kept cache costs memory
only for as long as the tool runs. The row keeps its slot meanwhile: live + paused rows <= the
batch cap, so a paused row's cache is memory the cap already counted, and a slow tool holds one row.

Trained ids = sampled ids: a row's `ids` are its sampled tokens and the tool turns' tokens, in order,
never re-tokenised; `mask` is 1 on sampled tokens, 0 on tool / template tokens; `logps` cover the
sampled tokens only (one per 1 in `mask`). Randomness stays per row and per completion index (the
tool tokens take their indices' uniforms unused), so a row's transcript does not depend on which
rows share its batch nor on when its tools return.

`sync_turns=True` is the turn-synchronous baseline (the benchmark's): rows re-enter only once no row
is decoding and every pending tool call has returned, as a loop over whole turns would.
"""
from __future__ import annotations

from collections import deque
from concurrent.futures import FIRST_COMPLETED, wait
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from fastdash.rollout.decode import Decoder, RowResult, _pad_left, row_seed
from fastdash.tools.calls import CLOSE

REENTRY_STEPS = 4  # decode steps over which returning rows are gathered into one re-entry prefill


@dataclass
class ToolRowResult(RowResult):
    mask: list[int] = field(default_factory=list)  # 1 = sampled (trained), 0 = tool / template tokens
    episode: object = None  # the row's tools.Episode (stats, messages)


class ToolDecoder(Decoder):
    def __init__(self, model, rows, params, *, session, tokenizer, sync_turns: bool = False, **kwargs):
        super().__init__(model, rows, params, **kwargs)
        self.session, self.tok, self.sync_turns = session, tokenizer, sync_turns
        self.seed = kwargs["seed"]
        session.reserve(self.cap)  # a thread per slot: a call never waits for another row's
        self.results = [ToolRowResult() for _ in rows]
        close = tokenizer.convert_tokens_to_ids(CLOSE)
        single = close is not None and close != tokenizer.unk_token_id
        self.turn_end = torch.tensor(sorted(set(self.eos_ids) | ({close} if single else set())), device=self.device)
        self.turn_start = [0] * len(rows)  # index into ids where the row's current turn began
        self.stash: dict[int, tuple] = {}  # paused row -> (keys per layer, values per layer, mask [1, S], position)
        self.pending: dict = {}  # future -> row
        self.ready: deque = deque()  # (row, response text) whose tools have returned
        self._src = None  # (cache, mask, pos) that `_record`'s rows index, when not the live batch's
        self.steps_since_reentry = REENTRY_STEPS

    # ------------------------------------------------------------------ loop ---------------------
    @torch.no_grad()
    def run(self):
        waiting = deque(range(len(self.rows)))
        admit_at = 1 if self.cap == len(self.rows) else max(1, self.cap // 8)
        try:
            while waiting or self.live.numel() or self.pending or self.ready:
                can_admit = bool(waiting) and self._slots() < self.cap
                self._collect(block=not self.live.numel() and bool(self.pending) and not can_admit
                              and (self.sync_turns or not self.ready))
                if self.ready and self._reenter_now():
                    self._resume([self.ready.popleft() for _ in range(len(self.ready))])
                    self.steps_since_reentry = 0
                    continue
                free = self.cap - self._slots()
                if waiting and free > 0 and (free >= admit_at or not self.live.numel()):
                    self._admit([waiting.popleft() for _ in range(min(free, len(waiting)))])
                elif self.live.numel():
                    self._decode_step()
        finally:
            for fut in self.pending:
                fut.cancel()
        return self.results

    def _reenter_now(self) -> bool:
        """Whether the rows whose tools returned re-enter now. Each re-entry is a prefill forward in which
        the decoding rows do not advance, so while rows decode, returns are gathered for REENTRY_STEPS
        decode steps and re-enter together (a few steps' wait against a tool's latency); with no row
        decoding, at once. Turn-synchronous: once every row of the turn has its tools' results."""
        if self.sync_turns:
            return not self.live.numel() and not self.pending
        return not self.live.numel() or self.steps_since_reentry >= REENTRY_STEPS

    def _slots(self) -> int:
        """Rows holding a slot: decoding, or paused on a tool call."""
        return self.live.numel() + len(self.stash)

    def _collect(self, block: bool) -> None:
        if not self.pending:
            return
        done, _ = wait(list(self.pending), timeout=None if block else 0, return_when=FIRST_COMPLETED)
        for fut in done:
            self.ready.append((self.pending.pop(fut), fut.result()))

    def _admit(self, new):
        for r in new:
            # the sample's environment: reset once, seeded per row (a resumed run replays it)
            self.results[r].episode = self.session.episode(seed=row_seed(self.seed, r))
        super()._admit(new)

    def _decode_step(self) -> None:
        super()._decode_step()
        self.steps_since_reentry += 1

    # ------------------------------------------------------------------ turn ends ----------------
    def _sample(self, logits, rows):
        tokens = super()._sample(logits, rows)
        for r in rows.tolist():
            self.results[r].mask.append(1)
        return tokens

    def _merge(self, rows, tokens, pos, mask, cache):
        self._src = (cache, mask, pos)
        try:
            super()._merge(rows, tokens, pos, mask, cache)
        finally:
            self._src = None

    def _record(self, rows: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """As `Decoder._record`, and a row whose turn ended with tool calls (and may still call) pauses."""
        cont = super()._record(rows, tokens)
        ended = ~cont | torch.isin(tokens, self.turn_end)
        for i in ended.nonzero()[:, 0].tolist():
            r = int(rows[i])
            res = self.results[r]
            turn = res.ids[self.turn_start[r]:]
            if turn and turn[-1] in self.eos_ids:  # the end-of-turn token is not part of the message
                turn = turn[:-1]
            text = self.tok.decode(turn, skip_special_tokens=False)
            calls = [] if res.truncated else res.episode.wants_tools(text)
            if not calls or not res.episode.may_call():  # the sample ends with this turn
                res.episode.messages.append({"role": "assistant", "content": text})
                cont[i] = False
                continue
            self._pause(i, r, text, calls, closed=int(tokens[i]) in self.eos_ids)
            cont[i] = False
        return cont

    def _pause(self, i: int, r: int, text: str, calls, closed: bool) -> None:
        """Keep row r's cache columns aside (batch index i of the source) and run its calls on the pool."""
        cache, mask, pos = self._src or (self.cache, self.mask, self.pos)
        first = int(mask[i].to(torch.int8).argmax())  # drop the row's leading padding
        self.stash[r] = ([layer.keys[i:i + 1, :, first:].clone() for layer in cache.layers],
                         [layer.values[i:i + 1, :, first:].clone() for layer in cache.layers],
                         mask[i:i + 1, first:].clone(), int(pos[i]))
        fut = self.session.pool.submit(self.results[r].episode.run_turn, text, calls, closed)
        self.pending[fut] = r

    # ------------------------------------------------------------------ re-entry -----------------
    def _resume(self, ready: list[tuple[int, str]]) -> None:
        """Rows whose tools returned re-enter with a prefill of their new tokens on their kept caches.

        Not inside the next decode step (one forward for both): a rectangular batch would feed every
        live row as many columns as the longest tool turn, masked, and keep them in its cache; on CPU
        that measured 1.6x slower than the extra forward (docs/tools.md, "Benchmark")."""
        rows, new, kept = self._take(ready)
        if rows:
            self._prefill(rows, new, kept)

    def _take(self, ready: list[tuple[int, str]]):
        """Append each row's tool turn; (rows, tokens to prefill, kept caches) of those that go on."""
        rows, new = [], []
        for r, text in ready:
            res = self.results[r]
            add = self.tok(text, add_special_tokens=False).input_ids
            room = self.params.max_tokens - len(res.ids)
            last = res.ids[-1]  # the turn's last sampled token: never fed yet, so it is prefilled first
            res.ids += add[:room]
            res.mask += [0] * len(add[:room])
            if len(add) >= room:  # no room left to sample after the tool turn: the sample ends here
                res.truncated = True
                del self.stash[r]
                continue
            self.turn_start[r] = len(res.ids)
            rows.append(r)
            new.append([last] + add)
        return rows, new, [self.stash.pop(r) for r in rows]

    def _new_columns(self, new: list[list[int]], start: list[int], width: int):
        """ids, mask and positions [len(new), width] of sequences `new` left-padded, the i-th from
        position start[i] on."""
        ids = torch.full((len(new), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(new), width), dtype=torch.long)
        pos = torch.ones((len(new), width), dtype=torch.long)
        for b, (seq, p0) in enumerate(zip(new, start)):
            ids[b, width - len(seq):] = torch.tensor(seq)
            mask[b, width - len(seq):] = 1
            pos[b, width - len(seq):] = torch.arange(p0, p0 + len(seq))
        return ids.to(self.device), mask.to(self.device), pos.to(self.device)

    def _prefill(self, rows, new, kept) -> None:
        """A forward of the new tokens only, on top of the rows' kept caches; they then join the batch."""
        width_c, width_n = max(k[2].shape[1] for k in kept), max(map(len, new))
        cache = DynamicCache(config=self.model.config)
        for j, layer in enumerate(cache.layers):
            layer.update(torch.cat([_pad_left(k[0][j], width_c) for k in kept]),
                         torch.cat([_pad_left(k[1][j], width_c) for k in kept]))
        ids, mask_n, pos = self._new_columns(new, [k[3] for k in kept], width_n)
        mask_c = torch.cat([_pad_left(k[2], width_c) for k in kept])
        mask = torch.cat([mask_c, mask_n.to(mask_c)], dim=1)
        logits = self._forward(ids, mask, pos, cache)
        self.stats.prefill_calls += 1
        self.stats.prefill_rows += len(rows)
        self.stats.prefill_tokens += sum(map(len, new))
        rows_t = torch.tensor(rows, device=self.device)
        tokens = self._sample(logits, rows_t)
        self._merge(rows_t, tokens, pos[:, -1] + 1, mask, cache)


def tool_decode(model, rows, params, **kwargs) -> list[ToolRowResult]:
    return ToolDecoder(model, rows, params, **kwargs).run()
