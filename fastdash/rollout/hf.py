"""The transformers `generate` engine: batched, left-padded, sharing the policy's weights.

It generates with the training model itself, so weight sync is free and samples are on-policy by
construction. Slower than vLLM on long generations, but it runs everywhere (the CPU default).
"""
from __future__ import annotations

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from fastdash.batch import Completion
from fastdash.rollout.base import SamplingParams


class ForceLengths(LogitsProcessor):
    """Length-controlled generation (benchmarks): row r emits EOS exactly at token lengths[r]."""

    def __init__(self, lengths: list[int], prompt_width: int, eos_id: int):
        self.lengths = torch.tensor(lengths)
        self.prompt_width, self.eos_id = prompt_width, eos_id

    def __call__(self, input_ids, scores):
        t = input_ids.shape[1] - self.prompt_width  # tokens generated so far
        lengths = self.lengths.to(scores.device)
        stop = lengths - 1 == t
        scores[:, self.eos_id] = torch.where(stop, scores[:, self.eos_id], torch.finfo(scores.dtype).min)
        eos_only = torch.full_like(scores, torch.finfo(scores.dtype).min)
        eos_only[:, self.eos_id] = 0.0
        return torch.where(stop[:, None], eos_only, scores)


class HFEngine:
    name = "hf"

    def __init__(self, model, tokenizer, *, max_batch_size: int | None = None):
        self.model, self.tok = model, tokenizer
        self.max_batch_size = max_batch_size  # concurrent sequences; from the scheduler
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def generate(self, prompts: list[list[int]], n: int, params: SamplingParams) -> list[Completion]:
        rows = [p for p in prompts for _ in range(n)]
        if params.forced_lengths is not None and len(params.forced_lengths) != len(rows):
            raise ValueError(f"forced_lengths has {len(params.forced_lengths)} entries for {len(rows)} completions")
        if params.seed is not None:
            torch.manual_seed(params.seed)
        step = self.max_batch_size or len(rows)
        out: list[Completion] = []
        for i in range(0, len(rows), step):
            forced = params.forced_lengths[i : i + step] if params.forced_lengths else None
            out += self._generate_chunk(rows[i : i + step], params, forced)
        return out

    @torch.no_grad()
    def _generate_chunk(self, rows, params: SamplingParams, forced) -> list[Completion]:
        device = next(self.model.parameters()).device
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every prompt ends at the same column
            ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
            mask[i, width - len(r):] = 1
        kwargs = dict(max_new_tokens=params.max_tokens, pad_token_id=self.pad_id, eos_token_id=self.eos_id,
                      use_cache=True)
        if params.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                          top_k=params.top_k or None)
        if forced is not None:
            kwargs["logits_processor"] = LogitsProcessorList([ForceLengths(list(forced), width, self.eos_id)])
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), **kwargs)
        finally:
            self.model.train(was_training)
        return [self._completion(r, gen) for r, gen in zip(rows, out[:, width:].tolist())]

    def _completion(self, prompt: list[int], generated: list[int]) -> Completion:
        if self.eos_id in generated:
            return Completion(prompt, generated[: generated.index(self.eos_id) + 1], truncated=False)
        return Completion(prompt, generated, truncated=True)

    def sync_weights(self, model) -> None:
        if model is not self.model:  # a separate copy (e.g. a compiled wrapper): copy tensors in place
            self.model.load_state_dict(model.state_dict())

    def sleep(self) -> None:
        pass

    def wake(self) -> None:
        pass
