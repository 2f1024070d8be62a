"""The HF engine: the policy's own transformers model, decoded by the compacting loop of `decode`.

Which decode implementation runs is decided here, in `HFEngine._choose_decoder`, and nowhere else
(`hf_decode` = auto | compact | static | generate; auto = compact where the model allows, else generate;
static is opt-in until scripts/gpu_check.sh step 8 has run it on a GPU):
- `decode.Decoder` (compact): prefill, then one token per step for the live rows only, finished rows
  dropped from the KV cache, waiting prompts admitted as rows leave (continuous batching), per-row
  seeds, sampler log-probs. A long-tailed batch costs the tokens it keeps.
- `static_decode.StaticDecoder` (static): the same sampling and bookkeeping, decode forwards on static
  shapes (rows padded to power-of-two buckets, a fixed-length KV buffer), compiled once per bucket
  and on CUDA replayed as CUDA graphs; calls larger than `max_batch_size` decode in waves.
- `model.generate` (fallback, for models whose cache layers are not plain `DynamicLayer`s: sliding
  window, linear attention): every row decodes until the longest ends; seeds are per call, not per row.
- transformers' `generate_batch` (continuous batching over a paged cache) is not used. Measured on the
  paper-shaped CPU workload scaled to cap 160 (random Qwen2, 151,936 vocab, hidden 128, 2 layers;
  64 rows, forced gamma lengths mean 53; 1 thread on a shared, loaded 2-core machine, one run each):
  this loop 46 s, `generate_batch` (per-request max_new_tokens, default settings) 105 s,
  `model.generate` 252 s. (Forced lengths were emulated there by per-request max_new_tokens with no
  EOS; its sampling has no per-row generators, so batch-independent seeds would need more work.)

Shared prompts (`share_prompts`, auto = on for every loop but generate): a group's prompt is
prefilled once and its KV copied to its rows (`decode.Decoder._admit`, docs/shared-prompts.md).

Weights: with `dtype` unset or equal to the model's, the engine generates with the training model
itself (sync is free, samples on-policy by construction). With a different `dtype` (fp32 master weights,
bf16 generation) it keeps its own eval copy in `dtype`; `sync_weights` copies the trainer's tensors
into it in place (tied weights stay tied, nothing is re-allocated).
LoRA (a peft policy): the engine decodes on the policy's own frozen base with the adapters applied at
run time, and `sync_weights` moves only the adapters (`fastdash.lora.engine_model`, docs/lora.md).
"""
from __future__ import annotations

import copy
import logging

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from fastdash.batch import Completion
from fastdash.lora import engine_model, is_lora, sync_adapters
from fastdash.rollout import decode, static_decode
from fastdash.rollout.base import HF_DECODES, SamplingParams, eos_ids_of

log = logging.getLogger("fastdash")


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch_size: int | None = None, dtype: torch.dtype | None = None,
                 own_copy: bool = False, decode_mode: str = "auto", compile_backend=None,
                 workspace_room: int | None = None, share_prompts: str | bool = "auto"):
        if decode_mode not in HF_DECODES:
            raise ValueError(f"hf_decode={decode_mode!r}: must be one of {list(HF_DECODES)}")
        self.tok = tokenizer
        self.max_batch_size = max_batch_size  # concurrent sequences; from the scheduler
        self.eos_ids = eos_ids_of(model, tokenizer)
        self.eos_id = self.eos_ids[0]  # the one a forced length emits
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id
        self.stats = decode.DecodeStats()
        # shared: generate with the trained module itself (same dtype; not when it will be sharded)
        self.shared = not own_copy and (dtype is None or dtype == next(model.parameters()).dtype)
        self.lora = is_lora(model)  # adapters applied at run time; the base is the policy's own tensors
        if self.lora:
            self.model, self.shared = engine_model(model, dtype)
        else:
            self.model = model if self.shared else _eval_copy(model, dtype or next(model.parameters()).dtype)
        self.sync_bytes: int | None = None  # bytes the last sync_weights wrote (logged as sync/bytes)
        self.compile_backend = compile_backend  # static: torch.compile's backend (None = inductor)
        self.workspace = static_decode.Workspace()  # static: the KV buffers, kept between calls
        self.workspace_room = workspace_room  # bytes they may hold through backprop (None: no limit)
        self.tools = None  # a tools.ToolSession: multi-turn rollouts with tool calls (rollout/tool_decode.py)
        self._decoder, reason = self._choose_decoder(decode_mode)
        if reason:
            log.warning("hf engine: decoding with model.generate (%s)", reason)
        self.share_prompts = self._choose_sharing(share_prompts)

    def _choose_sharing(self, share) -> bool:
        """Prefill a group's prompt once (docs/shared-prompts.md): every loop but the generate fallback."""
        share = {"true": True, "false": False}.get(share, share) if isinstance(share, str) else share
        if share not in ("auto", True, False):
            raise ValueError(f"share_prompts={share!r}: must be auto, true or false")
        if share is True and self._decoder == "generate":
            raise ValueError("share_prompts=true: the model.generate fallback prefills every row; "
                             "set share_prompts=auto or false, or hf_decode=compact")
        return share is True or (share == "auto" and self._decoder != "generate")

    def _choose_decoder(self, mode: str):
        """The one place the decode implementation is chosen (see the module docstring): (name, why
        generate replaced the compacting loop, or None). An explicit mode the model cannot run fails."""
        if mode == "generate":
            return "generate", None
        reason = static_decode.supports(self.model) if mode == "static" else decode.supports(self.model)
        if reason and mode != "auto":
            raise ValueError(f"hf_decode={mode}: this model cannot use it ({reason}); set hf_decode=auto")
        if reason:
            return "generate", reason
        # auto stays compact on CUDA too: the compiled CUDA-graph path has not run on a GPU yet
        return ("static" if mode == "static" else "compact"), None

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        rows = [list(p) for p in prompts for _ in range(n)]
        if params.forced_lengths is not None:
            if len(params.forced_lengths) != len(rows):
                raise ValueError(f"forced_lengths has {len(params.forced_lengths)} entries for {len(rows)} completions")
            if min(params.forced_lengths, default=1) < 1:
                raise ValueError("forced_lengths must be >= 1 (the EOS token itself counts)")
        # seed None continues the engine's stream (torch's global RNG, seeded by the trainer)
        seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()))
        was_training = self.model.training
        self.model.eval()
        try:
            return self._decode(rows, params, seed)
        finally:
            self.model.train(was_training)

    def _decode(self, rows: list[list[int]], params: SamplingParams, seed: int) -> list[Completion]:
        """All rows of one call, at most `max_batch_size` at a time."""
        if self._decoder == "generate":
            torch.manual_seed(seed)
            step = self.max_batch_size or len(rows)
            forced = params.forced_lengths
            return [c for i in range(0, len(rows), step)
                    for c in self._generate_hf(rows[i:i + step], params, forced[i:i + step] if forced else None)]
        kwargs = dict(eos_ids=self.eos_ids, pad_id=self.pad_id, max_batch_size=self.max_batch_size, seed=seed,
                      stats=self.stats, share_prompts=self.share_prompts)
        if self.tools is not None:  # the compacting loop with rows that pause on tool calls
            from fastdash.rollout.tool_decode import tool_decode

            results = tool_decode(self.model, rows, params, session=self.tools, tokenizer=self.tok, **kwargs)
            return [Completion(p, r.ids, r.truncated, sampler_logps=r.logps, completion_mask=r.mask,
                               episode=r.episode) for p, r in zip(rows, results)]
        if self._decoder == "static":
            results = static_decode.decode_static(self.model, rows, params, workspace=self.workspace,
                                                  backend=self.compile_backend, **kwargs)
        else:
            results = decode.decode(self.model, rows, params, **kwargs)
        return [Completion(p, r.ids, r.truncated, sampler_logps=r.logps) for p, r in zip(rows, results)]

    # ------------------------------------------------------------------ fallback: generate -------
    @torch.no_grad()
    def _generate_hf(self, rows, params: SamplingParams, forced) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the same column
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        kwargs = dict(max_new_tokens=params.max_tokens, pad_token_id=self.pad_id, eos_token_id=list(self.eos_ids),
                      use_cache=True, return_dict_in_generate=True, output_scores=True)
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        if forced is not None:
            kwargs["logits_processor"] = LogitsProcessorList([ForceLengths(list(forced), width, self.eos_ids)])
        out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        gen = out.sequences[:, width:]
        logps = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1)  # processed scores
        logps = logps.gather(-1, gen[:, :logps.shape[1], None])[..., 0]
        return [self._completion(r, g, lp) for r, g, lp in zip(rows, gen.tolist(), logps.tolist())]

    def _completion(self, prompt, generated, logps) -> Completion:
        stop = next((i for i, t in enumerate(generated) if t in self.eos_ids), None)
        if stop is None:
            return Completion(prompt, generated, truncated=True, sampler_logps=logps[:len(generated)])
        return Completion(prompt, generated[:stop + 1], truncated=False, sampler_logps=logps[:stop + 1])

    # ------------------------------------------------------------------ weights ------------------
    def sync_weights(self, model) -> None:
        if self.lora:  # only the adapters move; none when the engine decodes with the policy itself
            self.sync_bytes = 0 if self.shared else sync_adapters(self.model, model)
            return
        self.sync_bytes = 0
        if model is self.model:
            return
        self.sync_bytes = sum(p.numel() * p.element_size() for p in self.model.parameters())
        if self.shared:  # a separate same-dtype module (e.g. a compiled wrapper)
            self.model.load_state_dict(model.state_dict())
            return
        from fastdash.fsdp import full_parameters

        _copy_into(self.model, model, full_parameters(model))  # FSDP: one unit gathered at a time

    def sleep(self) -> None:
        """Backprop is next. Static decode's KV buffers stay (shapes and addresses kept: no bucket's CUDA
        graph re-records next step) unless they need more than `workspace_room` (the compacting loop
        frees its own cache)."""
        if self.workspace_room is not None and self.workspace.nbytes > self.workspace_room:
            self.workspace.release()

    def wake(self) -> None:
        pass


def _eval_copy(model, dtype: torch.dtype):
    """The engine's own generation copy: floating parameters in `dtype` (cast straight from the
    trainer's, no transient second fp32 copy; a tied weight is one tensor, converted once), buffers
    as they are (RoPE's inv_freq stays fp32, as under autocast), no grads, eval mode."""
    memo = {id(p): torch.nn.Parameter(p.detach().to(dtype) if p.is_floating_point() else p.detach().clone(),
                                      requires_grad=False) for p in model.parameters()}
    return copy.deepcopy(model, memo).eval()


def _names(module, kind: str) -> dict[str, torch.Tensor]:
    items = module.named_parameters() if kind == "parameters" else module.named_buffers()
    return {name.replace("_orig_mod.", ""): t for name, t in items}


@torch.no_grad()
def _copy_into(dst, src, params=None) -> None:
    """Copy `src`'s parameters (or the (name, tensor) pairs `params` yields) and buffers into `dst`'s
    tensors in place (casting dtype)."""
    for kind in ("parameters", "buffers"):
        theirs, ours = _names(src, kind), _names(dst, kind)
        if theirs.keys() != ours.keys():
            missing = sorted(set(theirs) ^ set(ours))[:5]
            raise ValueError(f"sync_weights: the model's {kind} do not match the engine's copy ({missing}); "
                             "sync a model of the same architecture")
        for name, t in (params if kind == "parameters" and params is not None else theirs.items()):
            ours[name.replace("_orig_mod.", "")].copy_(t)


class ForceLengths(LogitsProcessor):
    """`generate` fallback of forced lengths: row r emits EOS exactly at token lengths[r]."""

    def __init__(self, lengths: list[int], prompt_width: int, eos_ids: tuple[int, ...]):
        self.lengths = torch.tensor(lengths)
        self.prompt_width, self.eos_ids = prompt_width, list(eos_ids)

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        stop = self.lengths.to(scores.device) - 1 == t
        low = torch.finfo(scores.dtype).min
        scores[:, self.eos_ids] = torch.where(stop[:, None], scores[:, self.eos_ids], low)
        eos_only = torch.full_like(scores, low)
        eos_only[:, self.eos_ids[0]] = 0.0
        return torch.where(stop[:, None], eos_only, scores)
