"""LoRA RL (fastdash/lora.py): a frozen compute-dtype base, fp32 adapters, adapter-only sync, the base
as the reference policy, peft adapter checkpoints that resume bit for bit."""
from __future__ import annotations

import re
import signal

import pytest
import torch
from safetensors.torch import load_file

from fastdash.config import Config
from fastdash.forward import compute_autocast, forward_hidden
from fastdash.memory_plan import Workload, fixed_part
from fastdash.models import load_model_and_tokenizer
from fastdash_kernels import fused_linear_logprob
from tests.conftest import tiny_config
from tests.test_resume import complete, finish, start

peft = pytest.importorskip("peft")
BF16 = torch.bfloat16
LORA = dict(lora_r=4, lora_alpha=8.0, reward="tests.resume_rewards:digit_parity", num_threads=1)


@pytest.mark.parametrize("key,value,says", [
    ("lora_r", -1, "must be >= 0"), ("lora_alpha", 0.0, "must be > 0"), ("lora_dropout", 1.0, "[0, 1)"),
    ("lora_target_modules", " , ", "module names"), ("merge_lora", True, "set lora_r > 0"),
])
def test_bad_lora_values_name_the_key(key, value, says):
    with pytest.raises(ValueError, match=rf"config: {key}=.*{re.escape(says)}"):
        Config(**{key: value})


@pytest.mark.parametrize("key,values", [("engine", {"engine": "vllm"}), ("parallelism", {"parallelism": "fsdp"}),
                                        ("generation_gpus", {"generation_gpus": 1}),
                                        ("async_generation", {"async_generation": True, "max_staleness": 0})])
def test_unsupported_combinations_are_refused_at_start(key, values):
    with pytest.raises(ValueError, match=rf"config: {key}=.*not supported with lora_r > 0"):
        Config(lora_r=8, **values)
    Config(lora_r=0, **values)  # the same values are fine without LoRA


def test_unknown_target_module_names_the_key():
    from fastdash.lora import apply_lora

    model, _ = load_model_and_tokenizer("random:tiny")
    with pytest.raises(ValueError, match="lora_target_modules='nope_proj'"):
        apply_lora(model, Config(lora_r=4, lora_target_modules="nope_proj"), torch.float32)


def test_fixed_part_counts_a_frozen_base_once_in_the_compute_dtype():
    """bf16 compute: base 2 B/param, no grad, no AdamW, no reference copy; adapters 4 + 4 + 8 B/param
    plus the engine's own bf16 adapters (2 B); full fine-tuning: 4 + 4 + 8 + reference 2 + engine 2."""
    from fastdash.lora import adapter_parameters, apply_lora

    full, _ = load_model_and_tokenizer("random:tiny")
    n = sum(p.numel() for p in full.parameters())
    buffers = sum(b.numel() * b.element_size() for b in full.buffers())  # fp32 (RoPE)
    ft = fixed_part(full, Workload(16, 8, 16, beta=0.04, compute_dtype=BF16))
    assert (ft.weights, ft.grads, ft.optimizer, ft.reference) == (4 * n + buffers, 4 * n, 8 * n, 2 * n + buffers // 2)
    lora = apply_lora(full, Config(lora_r=4), BF16)
    a = sum(p.numel() for p in adapter_parameters(lora).values())
    fp = fixed_part(lora, Workload(16, 8, 16, beta=0.04, compute_dtype=BF16, lora=True))
    assert (fp.weights, fp.grads, fp.optimizer, fp.reference, fp.generation_weights) == \
        (2 * n + 4 * a + buffers, 4 * a, 8 * a, 0, 2 * a)
    assert fp.base_params == n and fp.adapter_bytes == 16 * a


# ------------------------------------------------------------------ a short LoRA run (bf16 compute)
@pytest.fixture(scope="module")
def trained():
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer

    cfg = tiny_config(**LORA, beta=0.04, dtype="bfloat16", max_steps=3)
    run = build_run(cfg, with_plan=False)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainer = Trainer(cfg, run)
    metrics = [trainer.step() for _ in range(cfg.max_steps)]
    trainer.rollout()  # a fresh rollout's reference log-probs, taken with trained adapters
    return cfg, run, trainer, before, metrics


def test_base_is_bit_identical_and_only_adapters_change(trained):
    cfg, run, _, before, metrics = trained
    assert sum(m.get("skipped", 0) == 0 for m in metrics) >= 2  # optimizer steps happened
    changed = {n for n, p in run.model.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, p in run.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert changed and changed <= trainable  # the base did not move, not by one bit
    assert all(p.dtype == BF16 for n, p in run.model.named_parameters() if n not in trainable)
    assert all(p.dtype == torch.float32 for n, p in run.model.named_parameters() if n in trainable)
    opt_params = {id(p) for g in run.optimizer.param_groups for p in g["params"]}
    assert opt_params == {id(p) for n, p in run.model.named_parameters() if n in trainable}


def test_sync_moves_adapter_bytes_only(trained):
    _, run, trainer, _, metrics = trained
    from fastdash.lora import adapter_parameters

    adapters = adapter_parameters(run.model)
    assert all(m["sync/bytes"] == 2 * sum(p.numel() for p in adapters.values()) for m in metrics)
    engine = run.engine.model
    ours = dict(run.model.get_base_model().named_parameters())
    for name, p in engine.named_parameters():
        if ".lora_" in name:  # the engine's own bf16 adapters, equal to the policy's after the sync
            assert p.dtype == BF16 and torch.equal(p, ours[name].to(BF16)) and p.data_ptr() != ours[name].data_ptr()
        else:  # the base: the policy's own tensors, not a copy
            assert p.data_ptr() == ours[name].data_ptr()


def test_reference_logprobs_are_the_base_models(trained):
    """beta > 0: the reference pass (adapters disabled) gives exactly the log-probs of the original
    base model, run separately on the same micro-batches, and the policy's differ from them."""
    cfg, run, trainer, _, _ = trained
    base, _ = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    for p in base.parameters():
        p.data = p.data.to(BF16)
    kept = [s for b in trainer.buffer for s in b.kept]
    assert kept and all(s.ref_logps is not None for s in kept)
    moved = False
    with torch.no_grad():
        for mb, members in trainer._microbatches(kept, fallback=kept[0]):
            cu = mb.completion_cu_seqlens.tolist()
            for model, is_base in ((base, True), (run.model, False)):
                with compute_autocast("cpu", BF16):
                    hidden = forward_hidden(model, mb)
                logps = fused_linear_logprob(hidden.to(BF16), model.get_output_embeddings().weight.to(BF16),
                                             mb.targets, temperature=cfg.temperature, backend=cfg.kernel)
                for j, s in enumerate(members):
                    same = torch.equal(logps[cu[j]:cu[j + 1]].float(), s.ref_logps)
                    assert same if is_base else True
                    moved |= not is_base and not same
    assert moved  # not vacuous: the trained adapters change the policy's log-probs


def test_final_dir_loads_in_peft_and_merged_model(trained, tmp_path):
    from transformers import AutoModelForCausalLM

    from fastdash.checkpoint import save_final

    cfg, run, trainer, _, _ = trained
    cfg = Config(**{**cfg.to_dict(), "merge_lora": True})
    final = save_final(cfg, run, trainer, tmp_path, checkpoint=False)
    assert not (final / "model.safetensors").exists()  # no base weights in the adapter directory
    base, _ = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    loaded = peft.PeftModel.from_pretrained(base, final)
    ours = dict(run.model.named_parameters())
    for name, p in loaded.named_parameters():
        if ".lora_" in name:
            assert torch.equal(p, ours[name])
    # merged/: W + (alpha / r) B A, stored in the compute dtype: within half a bf16 ulp of the fp64 sum
    merged = AutoModelForCausalLM.from_pretrained(final / "merged", local_files_only=True, dtype=torch.float64)
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    w = ours[f"{q}.base_layer.weight"].double() + cfg.lora_alpha / cfg.lora_r * (
        ours[f"{q}.lora_B.default.weight"].double() @ ours[f"{q}.lora_A.default.weight"].double())
    got = merged.model.layers[0].self_attn.q_proj.weight
    assert (got - w).abs().max() <= w.abs().max() * 2.0**-8
    assert not torch.equal(got.to(BF16), ours[f"{q}.base_layer.weight"])  # the adapters were folded in


@pytest.mark.slow  # three runs in fresh processes: ~30 s of CPU
def test_lora_resume_after_kill_is_bit_identical(tmp_path):
    """SIGKILL after checkpoint-2 (tests/test_resume.py's harness), resume: the final adapters equal
    the uninterrupted run's bit for bit; checkpoints hold adapters, not the base."""
    ref_dir, out = tmp_path / "ref", tmp_path / "cut"
    extra = ("lora_r=8", "max_steps=4", "eval_steps=0")
    ref = start(ref_dir, None, *extra)
    finish(start(out, "generate:3", *extra), -signal.SIGKILL)
    assert complete(out) == ["checkpoint-2"]
    ckpt = out / "checkpoint-2"
    assert (ckpt / "adapter_model.safetensors").exists() and not (ckpt / "model.safetensors").exists()
    assert "resumed from" in finish(start(out, None, *extra, "resume=auto"), 0)
    finish(ref, 0)
    a, b = (load_file(d / "final" / "adapter_model.safetensors") for d in (ref_dir, out))
    mid = load_file(ckpt / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], mid[k]) for k in a)  # not vacuous: steps 3-4 moved the adapters
