"""Build everything a run needs from a Config and its Layout (`fastdash.layout`: device, dtype, engine,
parallelism, resolved once): model(s), data, reward, engine, optimizer, memory plan.

Kept apart from the trainer so `trainer.py` reads as the algorithm alone.
"""
from __future__ import annotations

import copy
import logging
import math
import os
import random
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from fastdash.config import Config
from fastdash.data import load_task, prompt_key, render_prompt
from fastdash.layout import Layout, engine_failed, rank_call_samples, resolve_layout, without_replica
from fastdash.memory_plan import MemoryPlan
from fastdash.metrics import PhaseTimer
from fastdash.models import load_model_and_tokenizer
from fastdash.rewards import RewardFn
from fastdash.rewards.weighted import build_reward
from fastdash.rollout import Engine, EngineStartError, make_engine
from fastdash.state import TrainState

log = logging.getLogger("fastdash")
DEFAULT_REWARD = {"arithmetic": "arithmetic", "arithmetic_chat": "gsm8k", "gsm8k": "gsm8k", "math": "math", "mbpp": "code",
                  "multiplication": "final_answer"}


@dataclass
class Run:
    cfg: Config
    device: torch.device
    model: torch.nn.Module  # fp32 master weights (mixed precision: README "Precision"); LoRA: a PeftModel
    ref_model: torch.nn.Module | None  # in the compute dtype; only when beta > 0 (LoRA: `model`, adapters off)
    tokenizer: object
    engine: Engine
    train_problems: list[dict]
    eval_problems: list[dict]
    reward_fn: RewardFn
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: MemoryPlan | None
    total_steps: int
    compute_dtype: torch.dtype = torch.float32  # forward / backward run in it (autocast)
    state: TrainState = field(default_factory=TrainState)
    timer: PhaseTimer | None = None
    layout: Layout | None = None  # where and how this run runs (layout.json)
    _prompt_cache: dict = field(default_factory=dict)

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def prompt_ids(self, problem: dict) -> list[int]:
        key = prompt_key(problem["prompt"])  # text, or chat messages rendered with the tokenizer's template
        if key not in self._prompt_cache:
            self._prompt_cache[key] = render_prompt(self.tokenizer, problem["prompt"], self.cfg)
        return self._prompt_cache[key]

    def decode(self, ids: list[int]) -> str:
        vocab = len(self.tokenizer)  # random-weight presets can emit ids the tokenizer lacks
        return self.tokenizer.decode([i for i in ids if i < vocab], skip_special_tokens=True)

    def forced_lengths(self, rollout: int, count: int) -> list[int]:
        """Length-controlled generation: per-sample completion lengths, gamma-distributed around
        `length_control_mean` (a long right tail like the paper's Fig. 6b), capped at the maximum."""
        rng = np.random.default_rng([self.cfg.seed, rollout])
        mean, cap = self.cfg.length_control_mean, self.cfg.max_completion_length
        return [int(x) for x in np.clip(rng.gamma(2.0, mean / 2.0, size=count).round(), 1, cap)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def count_steps(cfg: Config, n_problems: int) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    rollouts = math.ceil(cfg.num_train_epochs * n_problems / (cfg.rollout_size // cfg.num_generations))
    return max(1, rollouts * cfg.steps_per_generation)


def _drop_long_prompts(cfg: Config, tok, problems: list[dict], what: str) -> list[dict]:
    kept = [p for p in problems if len(render_prompt(tok, p["prompt"], cfg)) <= cfg.max_prompt_length]
    if len(kept) < len(problems):
        log.warning("%s: skipped %d of %d problems whose prompt is longer than max_prompt_length=%d tokens",
                    what, len(problems) - len(kept), len(problems), cfg.max_prompt_length)
    if not kept:
        raise ValueError(f"{what}: every prompt is longer than max_prompt_length={cfg.max_prompt_length}; raise it")
    return kept


def check_head(model) -> None:
    """The fused loss computes logits as hidden @ lm_head.weight.T / temperature: refuse models whose
    head does more (a bias, soft-capping, scaling), rather than train on wrong log-probs."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError(f"{type(model).__name__}: the fused loss needs a bias-free linear lm_head")
    for attr in ("final_logit_softcapping", "logit_scale", "logits_scaling"):
        if getattr(model.config, attr, None) not in (None, 1, 1.0):
            raise ValueError(f"{type(model).__name__}: config.{attr}={getattr(model.config, attr)} is not "
                             "supported by the fused loss (it assumes logits = hidden @ W.T)")


def build_optimizer(cfg: Config, model: torch.nn.Module, total_steps: int):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.learning_rate,
                            betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay)

    def factor(step: int) -> float:  # linear warmup, then linear decay to 0 (HF Trainer default)
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.lr_scheduler_type == "constant":
            return 1.0
        return max(0.0, (total_steps - step) / max(1, total_steps - cfg.warmup_steps))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def build_plan(cfg: Config, model, layout: Layout):
    """The memory plan (scheduler) for the layout's engine, compute dtype and trainer ranks (a rank plans
    for its share of each step and engine call); pinned budgets are validated against it."""
    from fastdash.scheduler import plan_memory

    T = layout.trainers
    return plan_memory(
        model, max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
        samples_per_step=cfg.train_batch_size // T, samples_per_generation=rank_call_samples(cfg, T),
        beta=cfg.beta, engine=layout.planned_engine, compute_dtype=layout.compute_dtype,
        lora=cfg.lora_r > 0,
        memory_budget=cfg.memory_budget,
        max_tokens_per_microbatch=cfg.max_tokens_per_microbatch, generation_concurrency=cfg.generation_concurrency,
        gpu_memory_utilization=cfg.gpu_memory_utilization)


def plan_run(cfg: Config, model, layout: Layout, with_plan: bool = True) -> tuple[MemoryPlan | None, Layout]:
    """(memory plan, layout): the plan made for the layout's engine and parallelism. parallelism=auto on
    several ranks shards with FSDP2 when the plan finds no room for a full replica per rank: the layout
    then says fsdp, and there is no plan (it counts a full replica)."""
    from fastdash.memory_plan import MemoryPlanError

    try:
        return (build_plan(cfg, model, layout) if with_plan else None), layout
    except MemoryPlanError as e:
        sharded = without_replica(cfg, layout, str(e))
        if sharded is None:
            raise
        return None, sharded


def load_policy(cfg: Config, layout: Layout):
    """The trained model as a run holds it (and `--dry-run` plans for): fp32 master weights whatever
    the compute dtype, on the layout's device, in train mode. (model, tokenizer).

    fp32: an AdamW update of ~lr (3e-6) rounds to nothing on a bf16 weight (its spacing near 0.05 is
    2e-4), so bf16 parameters would barely learn."""
    model, tok = load_model_and_tokenizer(cfg.model, dtype=torch.float32, attn_implementation=cfg.attn_implementation,
                                          seed=cfg.seed)
    model.to(layout.torch_device).train()
    check_head(model)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        if cfg.lora_r:  # a frozen embedding's output needs grad for the checkpointed layers' adapters
            model.enable_input_require_grads()
    if cfg.lora_r:  # LoRA: a frozen base in the compute dtype under fp32 adapters (fastdash/lora.py)
        from fastdash.lora import apply_lora

        model = apply_lora(model, cfg, layout.compute_dtype)
    return model, tok


def build_run(cfg: Config, *, with_plan: bool = True, layout: Layout | None = None) -> Run:
    """A trainer rank's run, for `layout` (default: this process's, `resolve_layout`)."""
    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)  # before any engine starts (vLLM replaces it with a no-op)
    seed_everything(cfg.seed)
    layout = resolve_layout(cfg) if layout is None else layout
    device, dtype = layout.torch_device, layout.compute_dtype
    model, tok = load_policy(cfg, layout)
    ref_model = None
    if cfg.beta > 0:  # the reference policy exists only when the KL term does
        ref_model = model if cfg.lora_r else copy.deepcopy(model).to(dtype).eval().requires_grad_(False)
    train, evals = load_task(cfg)
    train = _drop_long_prompts(cfg, tok, train, "train data")
    evals = _drop_long_prompts(cfg, tok, evals, "eval data")
    total = count_steps(cfg, len(train))
    plan, layout = plan_run(cfg, model, layout, with_plan)
    mode = layout.parallelism
    if layout.placement == "split":  # the engine lives on a generation rank
        from fastdash.rollout.split import SplitEngine

        engine = SplitEngine(cfg, model, dtype)
    else:  # bf16 compute (or a model to shard): the HF engine keeps its own full copy
        try:
            engine = make_engine(cfg, model, tok, plan, compute_dtype=dtype, own_copy=mode == "fsdp",
                                 kind=layout.engine)
        except EngineStartError as e:  # auto chose a vLLM that cannot start: HF, planned for HF
            layout = engine_failed(layout, str(e))
            plan, layout = plan_run(cfg, model, layout, with_plan)
            engine = make_engine(cfg, model, tok, plan, compute_dtype=dtype, own_copy=mode == "fsdp", kind="hf")
    if cfg.tools or cfg.environment_factory:
        from fastdash.tools.session import attach_tools

        attach_tools(cfg, engine, tok)
    if mode == "fsdp":  # after the engine's and the reference's full copies; before the optimizer
        from fastdash.fsdp import shard

        shard(model, dtype)
    optimizer, lr_scheduler = build_optimizer(cfg, model, total)
    reward_fn = build_reward(cfg.reward or DEFAULT_REWARD[cfg.task], cfg.reward_weights)
    return Run(cfg=cfg, device=device, model=model, ref_model=ref_model, tokenizer=tok, engine=engine,
               train_problems=train, eval_problems=evals, reward_fn=reward_fn, optimizer=optimizer,
               lr_scheduler=lr_scheduler, plan=plan, total_steps=total, compute_dtype=dtype,
               timer=PhaseTimer(device), layout=layout)


def build_server(cfg: Config, layout: Layout):
    """A generation rank of split placement (`rollout.split.serve` answers with them): (model, engine).
    The model in the compute dtype only (no master weights: the trainers' broadcast brings them)."""
    from fastdash.rollout.split import DEDICATED_GPU_SHARE, engine_devices

    if cfg.num_threads > 0:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    device, dtype = layout.torch_device, layout.compute_dtype
    model, tok = load_model_and_tokenizer(cfg.model, dtype=dtype, attn_implementation=cfg.attn_implementation,
                                          seed=cfg.seed)
    model = model.to(device).eval().requires_grad_(False)
    if cfg.gpu_memory_utilization == "auto":  # the GPU is the engine's alone
        cfg = replace(cfg, gpu_memory_utilization=DEDICATED_GPU_SHARE)
    # vLLM's engine core in a process of its own: in this one its torch.distributed setup would wait forever
    # on ours. Forced, not defaulted: a "0" inherited from a parent that ran a colocated engine hung CI.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"
    devices = engine_devices(device)
    try:
        engine = make_engine(cfg, model, tok, compute_dtype=dtype, devices=devices, kind=layout.engine)
    except EngineStartError as e:  # auto chose a vLLM that cannot start here: HF
        engine = make_engine(cfg, model, tok, compute_dtype=dtype, devices=devices,
                             kind=engine_failed(layout, str(e)).engine)
    return model, engine
