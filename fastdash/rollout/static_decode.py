"""Static-shape decode for HF causal LMs (`hf_decode=static`; opt-in until a GPU has run it): the compacting loop's
sampling and bookkeeping (`decode.Decoder`), with every decode forward on fixed shapes, so that
torch.compile compiles it once per shape and, on CUDA, replays it as a CUDA graph (gpt-fast style).

Why: the compacting loop's DynamicCache loses rows as they finish and gains a column every step, so
each decode forward has a new shape: a compiled forward would recompile every step, and a CUDA graph
cannot be captured at all. Here:

- the KV cache is one static buffer per layer, [rows, kv_heads, max_len, head_dim], held by a
  `Workspace` across calls (same shapes: compiled graphs are reused; same addresses: CUDA graphs
  replay without re-recording). max_len = prompt width + max_tokens - 1 rounded up to LEN_QUANTUM,
  and only ever grown, so a run of varying prompt widths sees one or two lengths;
- every row writes the same column each step (prompts are left padded to one width, as in the
  prefill), so one write position (StaticLayer's `cumulative_length`) serves the batch; a row's RoPE
  position comes from position_ids, its left padding and the unwritten columns are masked (a 2-D
  attention mask over max_len);
- live rows are padded up to a bucket batch size: the powers of two below the call's cap, and the cap.
  A bucket is a view of the buffers' leading rows; when the live rows fit a smaller bucket they are
  gathered into its rows (the rows stay where they are while the bucket holds). A bucket is < 2x its
  live rows, so `DecodeStats.padded_row_steps` (padding rows fed to decode forwards) is below
  `decode_row_steps` (live rows fed);
- each (bucket, max_len) compiles once (dynamic=False, fullgraph); the prefill stays eager (its width
  varies per call), on a DynamicCache, exactly the compacting loop's, then is copied into the buffers;
- no continuous admission: a waiting prompt would have to end at the running batch's write column
  and fit its remaining length, so a call with more rows than `max_batch_size` decodes in waves of
  `max_batch_size` rows, each prefilled at once and decoded until its last row ends.

Shared prompts (`share_prompts`): the prefill is the Decoder's `_admit`, so each distinct prompt of a
wave is prefilled once and its KV copied to its rows before they enter the buffers.

Sampling, per-row seeds, forced lengths, EOS ids, truncation and log-probs are the Decoder's: row r's
tokens depend on (seed, r) only, never on its bucket or wave. The logits differ from the compacting
loop's by fp32 rounding (attention over a wider, masked key axis; GEMMs of another batch size), so a
sample can differ only where its uniform falls within that rounding of a CDF step.
"""
from __future__ import annotations

import functools
import importlib.util

import torch
from transformers import StaticCache
from transformers.cache_utils import Cache, StaticLayer

from fastdash.oom import register_releasable
from fastdash.rollout import decode

LEN_QUANTUM = 256  # max_len granularity: few distinct lengths, few compiles
RECOMPILE_LIMIT = 64  # dynamo stops compiling a function after 8 shapes by default: < buckets x lengths


def buckets(cap: int) -> list[int]:
    """The batch sizes decode forwards run at: the powers of two below `cap`, and `cap`."""
    return [1 << k for k in range(cap.bit_length()) if 1 << k < cap] + [cap]


def bucket_for(n: int, cap: int) -> int:
    """The smallest bucket that holds `n` live rows (< 2n: the slack bound)."""
    return next(b for b in buckets(cap) if b >= n)


def supports(model) -> str | None:
    """None when the static loop can run `model`, else why not (the engine then uses another loop)."""
    reason = decode.supports(model)
    if reason:
        return reason
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention {impl!r} (the static loop masks a fixed key axis: sdpa or eager)"
    kinds = {type(layer).__name__ for layer in StaticCache(config=model.config, max_cache_len=1).layers}
    if kinds != {"StaticLayer"}:
        return f"static cache layers {sorted(kinds)}"
    if next(model.parameters()).is_cuda and importlib.util.find_spec("triton") is None:
        return "torch.compile's inductor backend needs triton on CUDA"
    return None


def compile_options(device: torch.device, backend=None) -> tuple:
    """(backend, mode): inductor by default; on CUDA with CUDA graphs (mode reduce-overhead)."""
    backend = backend or "inductor"
    return backend, "reduce-overhead" if device.type == "cuda" and backend == "inductor" else None


def _decode_forward(model, ids, pos, mask, cache, cache_kw: str) -> torch.Tensor:
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1,
                **{cache_kw: cache})
    return out.logits[:, -1, :].float()


@functools.cache
def compiled_forward(backend, mode):
    """One compiled wrapper per (backend, mode): dynamo's cache (one graph per shape) lives on it."""
    return torch.compile(_decode_forward, dynamic=False, fullgraph=True, backend=backend, mode=mode)


class _BucketLayer(StaticLayer):
    """transformers' StaticLayer over given buffers (views of the workspace's leading rows) and a
    write position shared by every bucket's layer of the same depth."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: torch.Tensor):
        super().__init__(max_cache_len=keys.shape[2])
        self.keys, self.values, self.cumulative_length = keys, values, length
        self.device, (self.batch_size, self.num_heads, _, self.k_head_dim) = keys.device, keys.shape
        self.v_head_dim, self.is_initialized = values.shape[-1], True
        for t in (keys, values, length):  # CUDA graphs read and write these in place (no input copy)
            torch._dynamo.mark_static_address(t)


class Workspace:
    """The static decode buffers, kept between calls and training steps so that shapes and addresses
    repeat: every bucket's compiled graph, and on CUDA its recorded CUDA graph, stays valid. `release`
    frees them: the engine's `sleep` when the plan leaves backprop no room for them, and the OOM
    back-off before it retries (`fastdash.oom`). Buffers allocated again have the same shapes: nothing
    recompiles, but CUDA graphs re-record once per bucket (new addresses), and cudagraph trees stop
    using graphs of a function re-recorded too often (`cudagraph_unexpected_rerecord_limit`)."""

    def __init__(self):
        self.release()
        register_releasable(self)

    def release(self) -> None:
        self.keys, self.values, self.lengths = [], [], []  # per layer; lengths: the write column
        self.mask = self.ids = self.pos = None  # [rows, max_len], [rows, 1], [rows, 1]
        self.layout, self._caches = None, {}

    @property
    def rows(self) -> int:
        return self.mask.shape[0] if self.mask is not None else 0

    @property
    def nbytes(self) -> int:
        held = [*self.keys, *self.values, *self.lengths, *(t for t in (self.mask, self.ids, self.pos) if t is not None)]
        return sum(t.numel() * t.element_size() for t in held)

    def ensure(self, like: list[tuple[torch.Tensor, torch.Tensor]], rows: int, max_len: int) -> None:
        """Buffers of at least rows x max_len, laid out as `like` (a prefill's per-layer keys, values)."""
        layout = [(k.shape[1], k.shape[3], v.shape[3], k.dtype, k.device) for k, v in like]
        if layout == self.layout and rows <= self.rows and max_len <= self.mask.shape[1]:
            return
        if layout == self.layout:  # grow, never shrink: shapes seen before stay compiled
            rows, max_len = max(rows, self.rows), max(max_len, self.mask.shape[1])
        self.release()
        device = layout[0][4]
        for heads, k_dim, v_dim, dtype, _ in layout:
            self.keys.append(torch.zeros(rows, heads, max_len, k_dim, dtype=dtype, device=device))
            self.values.append(torch.zeros(rows, heads, max_len, v_dim, dtype=dtype, device=device))
            self.lengths.append(torch.zeros((), dtype=torch.long, device=device))
        self.mask = torch.zeros(rows, max_len, dtype=torch.long, device=device)
        self.ids, self.pos = (torch.zeros(rows, 1, dtype=torch.long, device=device) for _ in range(2))
        self.layout = layout

    def cache(self, bucket: int) -> Cache:
        """The cache of the first `bucket` rows (built once: the compiled forward sees the same object)."""
        if bucket not in self._caches:
            self._caches[bucket] = Cache(layers=[_BucketLayer(k[:bucket], v[:bucket], n) for k, v, n in
                                                 zip(self.keys, self.values, self.lengths)])
        return self._caches[bucket]

    def gather(self, slots: torch.Tensor, written: int) -> None:
        """Move rows `slots` to the first rows (their `written` columns; the rest is unwritten)."""
        n = slots.numel()
        for k, v in zip(self.keys, self.values):
            k[:n, :, :written] = k[slots, :, :written]  # the index materialises first: overlap is safe
            v[:n, :, :written] = v[slots, :, :written]
        self.mask[:n] = self.mask[slots]


class StaticDecoder(decode.Decoder):
    """The Decoder with static-shape, compiled decode forwards (module docstring). `workspace`: the
    buffers (an engine keeps one); `backend`: torch.compile's (None = inductor; tests: "eager")."""

    def __init__(self, model, rows, params, *, workspace: Workspace, backend=None, **kwargs):
        super().__init__(model, rows, params, **kwargs)
        self.ws = workspace
        backend, mode = compile_options(self.device, backend)
        self.forward, self.cuda_graphs = compiled_forward(backend, mode), mode == "reduce-overhead"
        self.slots = self.live  # the workspace row of each live row
        self.bucket = self.column = 0  # rows fed per decode forward; the column the next step writes

    @torch.no_grad()
    def run(self) -> list[decode.RowResult]:
        for start in range(0, len(self.rows), self.cap):  # waves (no continuous admission)
            self._admit(list(range(start, min(start + self.cap, len(self.rows)))))
            while self.live.numel():
                self._decode_step()
        return self.results

    def _merge(self, rows, tokens, pos, mask, cache) -> None:
        """A prefilled wave's running rows into the first rows of the static buffers."""
        idx = self._record(rows, tokens).nonzero()[:, 0]
        if not idx.numel():
            return
        n, width = idx.numel(), mask.shape[1]
        max_len = -(-(width + self.params.max_tokens - 1) // LEN_QUANTUM) * LEN_QUANTUM
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        ws = self.ws
        ws.ensure(layers, self.cap, max_len)
        for (k, v), K, V, length in zip(layers, ws.keys, ws.values, ws.lengths):
            K[:n, :, :width], V[:n, :, :width] = k[idx], v[idx]
            length.fill_(width)
        ws.mask.zero_()
        ws.mask[:n, :width] = mask[idx]
        # padding rows attend to one (finite) column: an all-masked row may compute NaN keys / values, and
        # a later row in that slot would read them under its mask (0 * NaN = NaN)
        ws.mask[n:, 0] = 1
        self.live, self.last, self.pos = rows[idx], tokens[idx], pos[idx]
        self.slots = torch.arange(n, device=self.device)
        self.bucket, self.column = bucket_for(n, self.cap), width

    def _decode_step(self) -> None:
        b, n, ws = self.bucket, self.live.numel(), self.ws
        ws.mask[:b, self.column] = 1
        ws.ids[self.slots, 0], ws.pos[self.slots, 0] = self.last, self.pos
        if self.cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are dead: reuse them
        with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
            logits = self.forward(self.model, ws.ids[:b], ws.pos[:b], ws.mask[:b], ws.cache(b), self.cache_kw)
        logits = logits[self.slots]  # a copy: a CUDA graph's outputs are overwritten by its next replay
        self.stats.decode_steps += 1
        self.stats.decode_row_steps += n
        self.stats.padded_row_steps += b - n
        tokens = self._sample(logits, self.live)
        self.last, self.pos, self.column = tokens, self.pos + 1, self.column + 1
        self._compact(self._record(self.live, tokens))

    def _compact(self, keep: torch.Tensor) -> None:
        """Drop stopped rows; once the live rows fit a smaller bucket, gather them into its rows."""
        if bool(keep.all()):
            return
        idx = keep.nonzero()[:, 0]
        self.live, self.last, self.pos, self.slots = self.live[idx], self.last[idx], self.pos[idx], self.slots[idx]
        bucket = bucket_for(idx.numel(), self.cap) if idx.numel() else self.bucket
        if bucket < self.bucket:
            self.ws.gather(self.slots, self.column)
            self.slots = torch.arange(idx.numel(), device=self.device)
            self.bucket = bucket


def decode_static(model, rows, params, **kwargs) -> list[decode.RowResult]:
    return StaticDecoder(model, rows, params, **kwargs).run()
