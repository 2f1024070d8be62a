"""One typed config: dataclass defaults <- YAML recipe <- `key=value` overrides, validated up front.

The defaults are the tiny CPU run (`python -m fastdash.train` with no arguments); the paper's runs
are recipes in `recipes/` that set the paper's values (comments below give them).

Names follow TRL's GRPOConfig where TRL has the concept, so a TRL user can read a recipe as is.
Batch shape, one set of knobs for every variant (paper, section 3):
  DASH          generation_batch_size = train_batch_size = 256  (one engine call per step)
  baseline GRPO generation_batch_size = micro_batch_size = 8    (one engine call per micro-batch)
  Multi         num_iterations = 3                              (K steps on each generation)
  Mini          generation_batch_size = 256, train_batch_size = 8 (PPO ratios vs the sampler)
"""
from __future__ import annotations

import dataclasses
import difflib
import json
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from fastdash.algo import LOSS_TYPES, SCALE_REWARDS, PreemptiveSampling, preemptive_sampling
from fastdash.algo import MULTI_OBJECTIVE_AGGREGATIONS
from fastdash.correction import CORRECTIONS, IS_LEVELS, OLD_LOGPROBS
from fastdash.rewards.weighted import check_weights
from fastdash.rollout.base import ENGINES, HF_DECODES  # the engines' vocabulary (docs/architecture.md)
from fastdash.tracking import report_to_list
from fastdash_kernels import BACKENDS as KERNELS
from fastdash_kernels import KL_ESTIMATORS

DTYPES = ("auto", "float32", "bfloat16", "float16")
PARALLELISMS = ("auto", "ddp", "fsdp")
TASKS = ("arithmetic", "arithmetic_chat", "multiplication", "gsm8k", "math", "mbpp", "plain")
BUILTIN_TASKS = ("arithmetic", "arithmetic_chat", "multiplication")  # generated in fastdash/data, no dataset needed


def opt(default, text: str):
    """A config field with its one-line `--help` text (TRL's GRPOConfig keeps help beside each field too)."""
    return field(default=default, metadata={"help": text})


@dataclass
class Config:
    # --- model and data ---
    model: str = opt("tiny-arith", "shipped name, local HF directory, or random:<preset>")
    dtype: str = opt(
        "auto", "compute dtype (weights, grads, AdamW stay fp32); auto = bfloat16 on CUDA, float32 on CPU")
    save_dtype: str = opt("auto", "dtype of the final model in output_dir/final; auto = the compute dtype")
    attn_implementation: str = opt(
        "sdpa", "transformers attention for the model (sdpa; packed micro-batches pick a varlen backend)")
    task: str = opt(
        "arithmetic", "problem family: arithmetic (built in), arithmetic_chat (built in), gsm8k, math, mbpp, plain")
    dataset: str | None = opt(None, "local dir / .jsonl / .parquet / cached dataset name; None = built in")
    dataset_split: str = opt("train", "split of `dataset` to train on")
    eval_dataset: str | None = opt(
        None, "held-out problems, same formats as dataset (built-in tasks make their own)")
    eval_split: str = opt("test", "split of `eval_dataset` to evaluate on")
    prompt_template: str | None = opt(
        None, "Python format string over the row's columns, e.g. '{question}\\nAnswer:'")
    chat_template: bool | str = opt("auto", "auto: template message-list prompts; true: text too; false: never")
    system_prompt: str | None = opt(None, "a system message prepended to every chat-templated prompt")
    reward: str | list | None = opt(
        None, "registry name or dotted path, or a list of them (TRL's reward_funcs); None = the task's reward")
    reward_weights: list | None = opt(None, "one weight per reward function; None = all 1.0 (docs/rewards.md)")
    multi_objective_aggregation: str = opt(
        "sum_then_normalize", "several rewards: sum_then_normalize (weighted sum, then scale_rewards) | "
        "normalize_then_sum (GDPO: each normalised in its group, weighted sum, normalised over the batch)")
    num_train_problems: int = opt(50_000, "problems generated for the built-in tasks")
    num_eval_problems: int = opt(500, "held-out problems evaluated")
    max_prompt_length: int = opt(16, "prompt tokens; longer prompts are skipped with a warning (the paper: 256)")
    shuffle: bool = opt(True, "shuffle the training problems each epoch (seeded)")
    # --- rollout ---
    engine: str = opt("auto", "rollout engine: auto (vLLM when it imports, else HF) | hf | vllm")
    hf_decode: str = opt(
        "auto", "HF engine decode loop: auto (= compact) | compact | static (compiled, opt-in) | generate")
    share_prompts: bool | str = opt(
        "auto", "prefill a group's prompt once in generation (docs/shared-prompts.md): auto (= on where "
        "supported) | true | false")
    num_generations: int = opt(4, "G, completions per prompt (the group of the group-relative advantage)")
    generation_batch_size: int = opt(
        256, "samples per engine call: = train_batch_size is DASH, = micro_batch_size baseline GRPO")
    max_completion_length: int = opt(8, "new tokens per completion (the paper: 2048)")
    temperature: float = opt(1.0, "sampling temperature; log-probs are log_softmax(logits / T) (the paper: 0.9)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1 = off)")
    top_k: int = opt(0, "top-k sampling (0 = off; the paper: 50)")
    mask_truncated_completions: bool = opt(False, "drop completions that hit max_completion_length from the loss")
    length_control_mean: int = opt(0, "benchmarks: force EOS at lengths ~ this mean (0 = off)")
    # --- the paper's maths ---
    loss_type: str = opt(
        "dr_grpo", "grpo | bnpo | dr_grpo | dapo | cispo | sapo: normaliser and surrogate (docs/losses.md)")
    scale_rewards: str = opt("group", "group (std-scaled, eps 1e-4) | none (dr_grpo style); bools accepted")
    beta: float = opt(0.0, "KL coefficient; the reference model is loaded only when > 0")
    kl_estimator: str = opt("k3", "k1 | k2 | k3 estimator of KL(pi || pi_ref)")
    epsilon: float = opt(0.2, "PPO clip range: ratio kept in [1 - epsilon, 1 + epsilon_high]")
    epsilon_high: float | None = opt(None, "None = epsilon")
    num_iterations: int = opt(1, "K, optimizer steps on each step batch (Multi when > 1)")
    gradient_filtering: bool = opt(
        True, "DASH's gradient filter: drop samples with |A| <= tau before any forward pass")
    gradient_filtering_threshold: float = opt(0.1, "tau: keep |A| > tau")
    # --- the loss family beyond the paper (docs/losses.md; TRL's GRPOConfig names and meanings) ---
    importance_sampling_level: str = opt(
        "token", "PPO ratio per token | sequence (GSPO: exp of the sequence's mean log-ratio, clipped per sequence)")
    delta: float | None = opt(
        None, "two-sided clip: the ratio's bound when A < 0; must be > 1 + epsilon_high (None = off; INTELLECT-2: 4)")
    sapo_temperature_pos: float = opt(1.0, "loss_type=sapo: temperature of the soft gate for A > 0")
    sapo_temperature_neg: float = opt(1.05, "loss_type=sapo: temperature of the soft gate for A <= 0")
    top_entropy_quantile: float = opt(
        1.0, "rho: only the step's top-rho fraction of loss tokens by entropy get a policy gradient (1 = all)")
    off_policy_mask_threshold: float | None = opt(
        None, "drop the policy term of sequences with A < 0 whose mean KL(sampler || current) exceeds it (None = off)")
    use_bias_correction_kl: bool = opt(
        False, "multiply the KL term by the PPO ratio (DeepSeek-V3.2; TRL 1.16's default); false = the paper's")
    # --- beyond DASH: the sampler's own log-probs (fastdash/correction.py) ---
    rollout_correction: str = opt(
        "none", "none | tis (truncated IS) | mis (masked IS), against the sampler's log-probs")
    rollout_is_cap: float = opt(2.0, "C: tis weight min(rho, C); mis keeps rho in [1/C, C]")
    rollout_is_level: str = opt("token", "token | sequence (one ratio per sequence: geometric mean of its tokens')")
    old_logprobs: str = opt(
        "trainer", "Multi / Mini PPO denominator: trainer (an extra forward) | sampler (engine's)")
    async_generation: bool = opt(
        False, "pipelined generation: a worker process generates rollout n + max_staleness while step n trains")
    max_staleness: int = opt(1, "async_generation: S, rollouts generated ahead; a sample trains <= S steps after its weights")
    async_engine_threads: int = opt(1, "async_generation: torch threads of the generation worker process")
    speculative: dict | None = opt(None, "vLLM speculative_config, e.g. {method: ngram, num_speculative_tokens: 4}")
    # --- tools: multi-turn rollouts (docs/tools.md; TRL's names) ---
    tools: list[str] | None = opt(None, "tools the policy may call: python (the built-in sandbox) and / or module:function")
    environment_factory: str | None = opt(
        None, "module:Class: one instance per sample, its public methods are tools, reset() starts the episode")
    max_tool_calling_iterations: int | None = opt(None, "tool turns per sample (None = until max_completion_length)")
    tool_timeout_s: float = opt(10.0, "seconds per tool call; past it the model reads a timeout error")
    tool_max_output_chars: int = opt(2000, "a tool output is cut to this many characters, the cut marked in the text")
    tool_call_format: str = opt("auto", "auto | chatml (Qwen2.5's tool turns) | plain (no chat template: tiny models)")
    # --- backprop shape ---
    train_batch_size: int = opt(256, "samples per optimizer step")
    micro_batch_size: int = opt(8, "samples per padded micro-batch (packing off)")
    packing: bool = opt(
        True, "pack micro-batches end to end under a token budget (no padding); false = padded micro_batch_size rows")
    max_tokens_per_microbatch: int | str = opt("auto", "token budget when packing; auto = scheduler")
    memory_budget: int | None = opt(None, "bytes the scheduler may plan for on CPU (None = available RAM)")
    generation_concurrency: int | str = opt("auto", "sequences per engine batch (HF) / max_num_seqs (vLLM)")
    gpu_memory_utilization: float | str = opt("auto", "vLLM's share of the GPU when colocated")
    vllm_data_parallel_size: int = opt(1, "H vLLM engines behind a round robin (the paper's H inference servers)")
    vllm_tensor_parallel_size: int = opt(1, "GPUs per vLLM engine")
    vllm_enforce_eager: bool = opt(False, "CUDA: skip vLLM's CUDA-graph capture (faster start, slower decode)")
    kernel: str = opt(
        "auto", "fused lm_head/log-prob/loss backend: auto | triton (CUDA) | torch | liger | cce | reference")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward (less memory, ~30% more compute)")
    # --- LoRA (fastdash/lora.py, docs/lora.md; needs `pip install 'fastdash[peft]'`) ---
    lora_r: int = opt(0, "LoRA rank: train adapters on a frozen base held in the compute dtype (0 = full fine-tuning)")
    lora_alpha: float = opt(32.0, "LoRA scaling numerator: the adapter's update is scaled by lora_alpha / lora_r")
    lora_dropout: float = opt(0.0, "dropout on the adapters' input (0: keeps the PPO ratio exactly 1 on-policy)")
    lora_target_modules: str = opt(
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        "comma-separated module names given adapters (default: the attention and MLP projections), or all-linear")
    merge_lora: bool = opt(False, "LoRA: output_dir/final also gets merged/, the adapters folded into the base")
    # --- optimiser ---
    learning_rate: float = opt(1e-4, "the paper: 3e-6 (for 0.5B-3B models)")
    lr_scheduler_type: str = opt("linear", "linear | constant")
    warmup_steps: int = opt(0, "linear learning-rate warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay")
    adam_beta1: float = opt(0.9, "AdamW beta1")
    adam_beta2: float = opt(0.999, "AdamW beta2")
    max_grad_norm: float = opt(1.0, "clip the gradient norm to this (0 = no clipping)")
    max_steps: int = opt(200, "> 0 overrides num_train_epochs; the default run's length")
    num_train_epochs: float = opt(1.0, "epochs over the training problems when max_steps <= 0")
    max_nonfinite_steps: int = opt(5, "stop after this many non-finite steps in a row")
    # --- run ---
    seed: int = opt(42, "seed of data order, sampling and initialisation")
    output_dir: str | None = opt(None, "None = runs/<timestamp>")
    save_steps: int = opt(0, "0 = only the final checkpoint")
    save_total_limit: int | None = opt(2, "checkpoints kept (oldest pruned; None = all)")
    checkpoint_format: str = opt(
        "auto", "auto (sharded under parallelism=fsdp, else full) | full (safetensors + optimizer, gathered to "
        "rank 0) | sharded (torch.distributed.checkpoint: every rank writes its shards)")
    resume: str | None = opt(None, "auto | a checkpoint path")
    logging_steps: int = opt(1, "send metrics (and log_completions) to report_to every N steps; metrics.jsonl: all")
    report_to: str | list = opt(
        "none", "trackers: none | tensorboard | trackio | wandb | all, or a list; offline (docs/tracking.md)")
    run_name: str | None = opt(None, "the run's name in the trackers; None = output_dir's name")
    log_completions: bool = opt(
        False, "every logging_steps: prompt, completion, reward, advantage to report_to, completions.jsonl, console")
    num_completions_to_print: int | None = opt(None, "log_completions: samples per logged step (None = all)")
    eval_steps: int = opt(50, "held-out eval every N steps (0 = only before and after training)")
    eval_batch_size: int = opt(500, "completions per engine call during evaluation")
    eval_sampled: bool = opt(True, "also report sampled (temperature) held-out accuracy")
    num_eval_samples: int = opt(4, "sampled completions per held-out problem: pass@1 and pass@k, k = this")
    num_threads: int = opt(0, "CPU threads; 0 = torch's default")
    # --- several ranks (torchrun; README "Several GPUs / torchrun") ---
    parallelism: str = opt(
        "auto", "auto | ddp (a full fp32 replica per rank) | fsdp (FSDP2: weights, grads, AdamW in shards)")
    generation_gpus: int = opt(0, "split placement: the last K torchrun ranks only generate, each with its own "
                                  "engine on its own GPU (CPU: process), the rest train; 0 = colocated")
    dist_timeout_s: int = opt(600, "collective timeout; a silent peer ends the run after this (> an eval's time)")
    plots: bool = opt(True, "write reward.png / time.png / accuracy plots at the end of the run")
    extra: dict = field(default_factory=dict, metadata={"help": "free-form, e.g. for user reward functions"})

    def __post_init__(self):
        if isinstance(self.scale_rewards, bool):
            self.scale_rewards = "group" if self.scale_rewards else "none"
        self.validate()

    # ---- derived shape ----
    @property
    def prompts_per_step(self) -> int:
        return self.train_batch_size // self.num_generations

    @property
    def preemptive_sampling(self) -> PreemptiveSampling:
        """How a rollout is generated (engine calls) and consumed (optimizer steps): `fastdash.algo`."""
        return preemptive_sampling(self.generation_batch_size, self.train_batch_size, self.num_iterations,
                                   self.num_generations)

    @property
    def needs_old_logps(self) -> bool:
        return self.preemptive_sampling.needs_old_logps

    @property
    def steps_per_generation(self) -> int:
        """Optimizer steps that consume one rollout buffer (Mini and Multi reuse one generation)."""
        return self.preemptive_sampling.steps

    @property
    def rollout_size(self) -> int:
        """Samples generated per rollout (several engine calls when generation_batch_size is small)."""
        return self.preemptive_sampling.samples

    def validate(self) -> None:
        def bad(key, msg):
            raise ValueError(f"config: {key}={getattr(self, key)!r}: {msg}")

        choices = dict(loss_type=LOSS_TYPES, kl_estimator=KL_ESTIMATORS, kernel=KERNELS,
                       engine=ENGINES, hf_decode=HF_DECODES, task=TASKS, scale_rewards=SCALE_REWARDS,
                       lr_scheduler_type=("linear", "constant"), dtype=DTYPES, save_dtype=DTYPES,
                       checkpoint_format=("auto", "full", "sharded"),
                       rollout_correction=CORRECTIONS, rollout_is_level=IS_LEVELS, old_logprobs=OLD_LOGPROBS,
                       importance_sampling_level=IS_LEVELS)
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {list(allowed)}")
        if self.share_prompts not in ("auto", True, False) or type(self.share_prompts) is int:
            bad("share_prompts", "must be auto, true or false")
        if self.share_prompts is True:  # auto turns these off; an explicit true names what blocks it
            for refused, why in ((self.engine == "hf" and self.hf_decode == "generate",
                                  "hf_decode=generate prefills every row (set hf_decode=compact)"),
                                 (not self.packing, "backprop shares prompts in packed micro-batches only "
                                  "(set packing=true)"),
                                 (self.parallelism == "fsdp", "not yet with parallelism=fsdp"),
                                 (self.lora_r > 0, "not yet with LoRA (lora_r > 0)")):
                if refused:
                    bad("share_prompts", f"{why}; or set share_prompts=auto")
        G = self.num_generations
        if G < 2:
            bad("num_generations", "group-relative advantages need at least 2 samples per prompt")
        if self.num_iterations > 0:
            self.preemptive_sampling  # raises, naming the key, when the batch sizes don't fit together
        positive = ("vllm_data_parallel_size", "vllm_tensor_parallel_size", "micro_batch_size", "max_completion_length", "max_prompt_length", "num_iterations",
                    "num_eval_problems", "eval_batch_size", "max_nonfinite_steps", "num_eval_samples")
        for key in positive:
            if getattr(self, key) <= 0:
                bad(key, "must be > 0")
        if isinstance(self.generation_concurrency, str) and self.generation_concurrency != "auto" or \
                isinstance(self.generation_concurrency, int) and self.generation_concurrency <= 0:
            bad("generation_concurrency", "must be 'auto' or a positive integer")
        if isinstance(self.gpu_memory_utilization, str) and self.gpu_memory_utilization != "auto" or \
                isinstance(self.gpu_memory_utilization, float) and not 0 < self.gpu_memory_utilization <= 1:
            bad("gpu_memory_utilization", "must be 'auto' or a fraction in (0, 1]")
        if isinstance(self.max_tokens_per_microbatch, str) and self.max_tokens_per_microbatch != "auto":
            bad("max_tokens_per_microbatch", "must be 'auto' or a positive integer")
        if isinstance(self.max_tokens_per_microbatch, int) and self.max_tokens_per_microbatch <= 0:
            bad("max_tokens_per_microbatch", "must be 'auto' or a positive integer")
        if self.temperature <= 0:
            bad("temperature", "must be > 0 (log-probs divide the logits by it)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must be in (0, 1]")
        if self.top_k < 0:
            bad("top_k", "must be >= 0 (0 = off)")
        if self.beta < 0 or self.epsilon < 0 or (self.epsilon_high or 0) < 0:
            bad("beta", "beta, epsilon and epsilon_high must be >= 0")
        if self.gradient_filtering_threshold < 0:
            bad("gradient_filtering_threshold", "must be >= 0 (samples with |A| <= tau are dropped)")
        if self.learning_rate <= 0:
            bad("learning_rate", "must be > 0")
        if self.max_steps <= 0 and self.num_train_epochs <= 0:
            bad("max_steps", "set max_steps > 0 or num_train_epochs > 0")
        self._validate_rewards_and_tracking(bad)
        if self.task == "plain" and not self.reward:
            bad("reward", "task='plain' has no default reward: pass reward=NAME or reward=pkg.module:func")
        if self.chat_template not in ("auto", True, False) or isinstance(self.chat_template, int) and \
                not isinstance(self.chat_template, bool):
            bad("chat_template", "must be auto, true or false")
        self._validate_beyond_dash(bad)
        self._validate_lora(bad)
        if self.task not in BUILTIN_TASKS and self.dataset is None:
            bad("dataset", f"task={self.task!r} needs a dataset (local path or cached dataset name)")
        if self.parallelism not in PARALLELISMS:
            bad("parallelism", f"must be one of {list(PARALLELISMS)}")
        if self.generation_gpus < 0:
            bad("generation_gpus", "must be >= 0 (0 = every rank generates its own share on its own device)")
        if self.dist_timeout_s <= 0:
            bad("dist_timeout_s", "must be > 0 seconds (and longer than an evaluation, which rank 0 runs alone)")

    def _validate_rewards_and_tracking(self, bad) -> None:
        rewards = self.reward if isinstance(self.reward, list) else [self.reward]
        if isinstance(self.reward, list) and (not rewards or not all(isinstance(r, str) and r for r in rewards)):
            bad("reward", "a list of reward names / dotted paths, e.g. [math, mypkg.rewards:format_reward]")
        if self.reward_weights is not None:
            why = check_weights(self.reward_weights)
            if why is None and len(self.reward_weights) != len(rewards):
                why = f"{len(self.reward_weights)} weights, but reward names {len(rewards)} function(s): one each"
            if why:
                bad("reward_weights", why)
        if self.multi_objective_aggregation not in MULTI_OBJECTIVE_AGGREGATIONS:
            bad("multi_objective_aggregation", f"must be one of {list(MULTI_OBJECTIVE_AGGREGATIONS)}")
        report_to_list(self.report_to)  # raises, naming the key
        if self.logging_steps <= 0:
            bad("logging_steps", "must be > 0")
        if self.num_completions_to_print is not None and self.num_completions_to_print <= 0:
            bad("num_completions_to_print", "must be > 0, or null for every sample of the step")

    def _validate_loss_family(self, bad) -> None:
        eps_hi = self.epsilon if self.epsilon_high is None else self.epsilon_high
        if self.delta is not None and self.loss_type in ("cispo", "sapo"):
            bad("delta", f"bounds the clipped objective's ratio; loss_type={self.loss_type} has no clip: "
                "set delta=null")
        if self.delta is not None and not self.delta > 1 + eps_hi:
            bad("delta", f"must be > 1 + epsilon_high = {1 + eps_hi} (else it also clips positive advantages)")
        if self.loss_type == "cispo" and self.epsilon_high is None:
            bad("epsilon_high", "loss_type=cispo caps the importance weight at epsilon_high itself (not "
                "1 + epsilon_high): set it, e.g. epsilon_high=5.0 (TRL's and ScaleRL's recommendation)")
        for key in ("sapo_temperature_pos", "sapo_temperature_neg"):
            if not getattr(self, key) > 0:
                bad(key, "must be > 0 (the soft gate is sigmoid(tau (r - 1)) * 4 / tau)")
        if not 0 <= self.top_entropy_quantile <= 1:
            bad("top_entropy_quantile", "must be in [0, 1] (1 = every token; 0.2 = the paper's top 20%)")
        if self.off_policy_mask_threshold is not None and self.off_policy_mask_threshold < 0:
            bad("off_policy_mask_threshold", "must be >= 0 (a mean KL per token), or null for off")
        if self.use_bias_correction_kl and self.beta == 0:
            bad("use_bias_correction_kl", "corrects the KL term, which beta=0 turns off: set beta > 0 or false")
        masks = self.top_entropy_quantile < 1 or self.off_policy_mask_threshold is not None
        if self.kernel == "liger" and (self.loss_type in ("cispo", "sapo") or self.delta is not None
                                       or self.importance_sampling_level != "token" or self.use_bias_correction_kl
                                       or (masks and self.beta != 0)):
            bad("kernel", "liger offers only the token-level clipped loss (no cispo, sapo, delta, sequence level, "
                "bias-corrected KL; no masks with beta > 0): use kernel=torch or triton")

    def _validate_beyond_dash(self, bad) -> None:
        self._validate_loss_family(bad)
        if not self.rollout_is_cap > 1:
            bad("rollout_is_cap", "must be > 1 (tis weights are min(rho, C); mis keeps rho in [1/C, C])")
        if self.rollout_correction != "none" and self.kernel == "liger" and self.beta != 0:
            bad("kernel", "liger cannot weight the policy-gradient term apart from the KL term: with "
                "rollout_correction use kernel=torch / triton, or beta=0")
        self._validate_async(bad)
        self._validate_tools(bad)
        if self.speculative is None:
            return
        if not isinstance(self.speculative, dict) or not isinstance(self.speculative.get("method"), str):
            bad("speculative", "must be null or a vLLM speculative_config mapping with a method, e.g. "
                "{method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 4}")
        k = self.speculative.get("num_speculative_tokens")
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k <= 0):
            bad("speculative", "num_speculative_tokens must be a positive integer")
        if self.engine == "hf":
            bad("engine", "speculative decoding is a vLLM option: set engine=vllm, or speculative=null")

    @property
    def lora_modules(self) -> list[str] | str:
        """`lora_target_modules` as peft's target_modules: a list of names, or 'all-linear'."""
        names = [m.strip() for m in self.lora_target_modules.split(",") if m.strip()]
        return "all-linear" if names == ["all-linear"] else names

    def _validate_lora(self, bad) -> None:
        if self.lora_r < 0:
            bad("lora_r", "must be >= 0 (0 = full fine-tuning, > 0 = the LoRA rank, e.g. 16)")
        if not self.lora_alpha > 0:
            bad("lora_alpha", "must be > 0 (the update is scaled by lora_alpha / lora_r)")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        names = [] if self.lora_modules == "all-linear" else self.lora_modules
        if not self.lora_modules or not all(re.fullmatch(r"[\w.\-]+", m) for m in names):
            bad("lora_target_modules", "must be comma-separated module names, e.g. q_proj,v_proj, or all-linear")
        if self.merge_lora and not self.lora_r:
            bad("merge_lora", "merges LoRA adapters: set lora_r > 0 too, or merge_lora=false")
        if not self.lora_r:
            return
        # combinations not built yet: refused here, with the reason, instead of training wrongly
        why = {"engine": (self.engine == "vllm", "the vLLM engine has no adapter sync yet (its LoRA requests are "
                          "untested here): set engine=hf"),
               "parallelism": (self.parallelism == "fsdp", "LoRA keeps one frozen base per rank (DDP all-reduces "
                               "the adapters); FSDP sharding of a frozen base is not supported: parallelism=ddp"),
               "generation_gpus": (self.generation_gpus > 0, "split placement ships full weights to the generation "
                                   "ranks; with LoRA set generation_gpus=0"),
               "async_generation": (self.async_generation, "the generation worker process holds a full copy of "
                                    "the policy and syncs full weights; with LoRA set async_generation=false")}
        for key, (refused, reason) in why.items():
            if refused:
                bad(key, f"not supported with lora_r > 0: {reason}")

    def _validate_tools(self, bad) -> None:
        if isinstance(self.tools, str):  # tools=python,pkg.mod:fn on the command line
            self.tools = [t.strip() for t in self.tools.split(",") if t.strip()]
        for t in self.tools or []:
            if not isinstance(t, str) or (t != "python" and ":" not in t):
                bad("tools", "each tool is 'python' (the built-in sandbox) or 'pkg.module:function'")
        if self.environment_factory is not None and ":" not in str(self.environment_factory):
            bad("environment_factory", "must be 'pkg.module:Class'")
        if self.tool_call_format not in ("auto", "chatml", "plain"):
            bad("tool_call_format", "must be one of ['auto', 'chatml', 'plain']")
        if self.max_tool_calling_iterations is not None and self.max_tool_calling_iterations < 0:
            bad("max_tool_calling_iterations", "must be >= 0 or null (no limit)")
        if not self.tool_timeout_s > 0 or self.tool_max_output_chars <= 0:
            bad("tool_timeout_s", "tool_timeout_s and tool_max_output_chars must be > 0")
        if not (self.tools or self.environment_factory):
            return
        # multi-turn rollouts run in the HF engine's compacting loop only (rollout/tool_decode.py)
        why = {"async_generation": "async_generation's worker process has no tool pool yet: set async_generation=false",
               "engine": "tools run in the HF engine's decode loop (vLLM: not yet): set engine=hf",
               "hf_decode": "tools need the compacting decode loop: set hf_decode=auto or compact",
               "generation_gpus": "split placement's generation ranks have no tool pool yet: set generation_gpus=0"}
        for key, refused in (("async_generation", self.async_generation), ("engine", self.engine == "vllm"),
                             ("hf_decode", self.hf_decode in ("static", "generate")),
                             ("generation_gpus", self.generation_gpus > 0)):
            if refused:
                bad(key, f"not supported with tools: {why[key]}")

    def _validate_async(self, bad) -> None:
        if self.max_staleness < 0:
            bad("max_staleness", "must be >= 0 (0 = generate each rollout just before its own step)")
        if self.async_engine_threads <= 0:
            bad("async_engine_threads", "must be > 0")
        if not self.async_generation:
            return
        if self.steps_per_generation != 1:
            bad("async_generation", "pipelines one rollout per optimizer step: needs num_iterations=1 and "
                "generation_batch_size <= train_batch_size (Multi / Mini reuse a rollout over several steps)")
        if self.engine == "vllm":
            bad("engine", "async_generation runs an HF engine in its own process (vLLM there is not supported "
                "yet): set engine=hf or auto")
        if self.max_staleness > 0 and self.rollout_correction == "none":
            bad("rollout_correction", f"async_generation trains samples up to max_staleness={self.max_staleness} "
                "steps older than the weights: set rollout_correction=tis (or mis) to importance-weight them "
                "against the policy that generated them, or max_staleness=0")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- parsing --------------------------
def _coerce(key: str, raw, annotation):
    """Turn a YAML / CLI value into the field's declared type, or say what is wrong."""
    hint = str(annotation)
    if isinstance(raw, str) and raw == "none" and "None" not in hint and "str" in hint:
        return raw  # a choice named "none" (rollout_correction, scale_rewards), not a null
    if raw is None or (isinstance(raw, str) and raw.lower() in ("null", "none")):
        if "None" in hint:
            return None
        raise ValueError(f"config: {key} cannot be null (expected {hint})")
    if isinstance(raw, str):
        raw = yaml.safe_load(raw) if raw.strip() else raw  # "3" -> 3, "true" -> True, "1e-4" -> str
    if key == "scale_rewards" and isinstance(raw, bool):
        return raw
    for typ, conv in ((bool, None), (int, int), (float, float), (str, str), (dict, None), (list, None)):
        if typ.__name__ not in hint:
            continue
        if typ is bool and isinstance(raw, bool):
            return raw
        if typ in (dict, list) and isinstance(raw, typ):
            return raw
        if typ is int and isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if typ is float and isinstance(raw, (int, float)) and not isinstance(raw, bool):
            return float(raw)
        if typ is float and isinstance(raw, str):
            try:
                return float(raw)
            except ValueError:
                pass
        if typ is str and isinstance(raw, str):
            return raw
    raise ValueError(f"config: {key}={raw!r} has the wrong type; expected {hint.replace('typing.', '')}")


def _field_types() -> dict:
    hints = typing.get_type_hints(Config)
    return {f.name: hints[f.name] for f in dataclasses.fields(Config)}


def apply_overrides(values: dict, overrides: dict) -> dict:
    types = _field_types()
    out = dict(values)
    for key, raw in overrides.items():
        top = key.split(".", 1)[0]
        if top not in types:
            close = difflib.get_close_matches(top, list(types), n=3, cutoff=0.6) or sorted(types)
            raise ValueError(f"config: unknown key {key!r}; did you mean one of {close}? "
                             "(`python -m fastdash.train --help` lists every option)")
        if "." in key:  # dotted key into a dict field, e.g. extra.my_option=3
            if types[top] is not dict:
                raise ValueError(f"config: {key!r}: {top} is not a mapping, use {top}=VALUE")
            out[top] = {**out.get(top, {}), key.split(".", 1)[1]: yaml.safe_load(str(raw))}
            continue
        out[key] = _coerce(key, raw, types[key])
    return out


def load_config(path: str | None = None, overrides: list[str] | dict | None = None) -> Config:
    values: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ValueError(f"config file {path!r} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ValueError(f"config file {path!r} must hold a mapping of key: value")
        values = apply_overrides(values, loaded)
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"override {item!r} must look like key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v
        overrides = pairs
    values = apply_overrides(values, overrides or {})
    return Config(**values)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))


def config_from_json(text: str) -> Config:
    return Config(**json.loads(text))
