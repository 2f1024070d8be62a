"""The vLLM engine against the HF engine and the trainer's own log-probs (CPU build of vLLM).

Tests that need vLLM skip with the reason when it does not import; the mismatch metric and the
"missing vLLM" path run everywhere. One vLLM instance for the whole module (it takes seconds to start
and in-process engines do not share a process well).
"""
from __future__ import annotations

import sys

import pytest
import torch

from fastdash.config import Config
from fastdash.rollout.base import Engine, SamplingParams
from fastdash.metrics import inference_mismatch
from fastdash.rollout.vllm import vllm_available
from tests.conftest import assert_well_formed

REASON = vllm_available()
needs_vllm = pytest.mark.skipif(REASON is not None, reason=f"vLLM not usable: {REASON}")
T = 0.8  # sampling temperature for the log-prob comparisons (not 1, so a missing 1/T would show)


# ------------------------------------------------------------------ no vLLM needed -----------------
def test_inference_mismatch_matches_hand_computed_values():
    trainer = [torch.tensor([-1.0, -2.0]), torch.tensor([-0.5])]
    sampler = [[-1.1, -2.0], [-0.2]]
    d = torch.tensor([0.1, 0.0, -0.3], dtype=torch.float64)
    m = inference_mismatch(trainer, sampler)
    assert m["mismatch/tokens"] == 3
    assert m["mismatch/logp_abs_mean"] == pytest.approx(0.4 / 3)
    assert m["mismatch/logp_abs_max"] == pytest.approx(0.3)
    assert m["mismatch/k3_kl"] == pytest.approx(float((d.exp() - 1 - d).mean()))
    assert m["mismatch/k3_kl"] > 0
    same = inference_mismatch(trainer, [t.tolist() for t in trainer])
    assert same["mismatch/logp_abs_max"] == 0 and same["mismatch/k3_kl"] == 0


def test_inference_mismatch_skips_missing_and_rejects_bad_shapes():
    assert inference_mismatch([torch.zeros(2)], [None]) == {"mismatch/tokens": 0}
    with pytest.raises(ValueError, match="sample 0 has 2 trainer"):
        inference_mismatch([torch.zeros(2)], [[0.0]])
    with pytest.raises(ValueError, match="2 trainer samples vs 1"):
        inference_mismatch([torch.zeros(1), torch.zeros(1)], [[0.0]])


def test_missing_vllm_gives_a_reason_and_auto_falls_back(monkeypatch):
    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout import make_engine

    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError
    reason = vllm_available()
    assert reason is not None and "import vllm" in reason
    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok))
    assert make_engine(Config(engine="auto"), model, tok).name == "hf"
    with pytest.raises(RuntimeError, match="pip install"):
        make_engine(Config(engine="vllm"), model, tok)


def test_data_parallel_device_sets():
    from fastdash.rollout.vllm_dp import _cpu_core_sets, _cuda_device_sets

    assert _cuda_device_sets(2, 1, 2, None) == ["0", "1"]
    assert _cuda_device_sets(2, 2, 5, "7, 5,3,1,0") == ["7,5", "3,1"]  # indices into the visible GPUs
    with pytest.raises(ValueError, match="needs 4 GPUs, but 3 are visible"):
        _cuda_device_sets(2, 2, 3, None)
    assert _cpu_core_sets(2, 1, [0, 1]) == ["0", "1"]
    assert _cpu_core_sets(2, 1, [2, 3, 4, 5, 6]) == ["2,3", "4,5"]
    assert _cpu_core_sets(2, 2, list(range(8))) == ["0,1|2,3", "4,5|6,7"]
    assert _cpu_core_sets(2, 1, [0]) == [None, None]  # too few cores: vLLM's own binding


def test_weight_exporter_writes_once_per_optimizer_step(monkeypatch):
    """H engines syncing to one model share one file, rewritten only after the weights change, with
    every state_dict key (the tied lm_head too: without it vLLM's reload keeps its old lm_head)."""
    import safetensors.torch as st

    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout.vllm import _WeightExporter

    model = random_model("tiny", vocab_size=len(char_tokenizer()))
    assert model.lm_head.weight is model.model.embed_tokens.weight  # tied: the case that matters
    writes = []
    save = st.save_file
    monkeypatch.setattr(st, "save_file", lambda *a, **k: writes.append(1) or save(*a, **k))
    ex = _WeightExporter()
    path = ex.export(model)
    assert ex.export(model) == path and len(writes) == 1
    _nudge(model)
    ex.export(model)
    assert len(writes) == 2
    saved = st.load_file(f"{path}/model.safetensors")
    assert saved.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():  # the file holds the stepped weights
        assert torch.equal(saved[name], t), name


# ------------------------------------------------------------------ with vLLM --------------------
def _config(**overrides) -> Config:
    base = dict(model="random:tiny", engine="vllm", max_prompt_length=16, max_completion_length=8,
                train_batch_size=16, generation_batch_size=16, micro_batch_size=4, learning_rate=1e-3,
                max_steps=2, temperature=T, top_k=0, num_train_problems=200, num_eval_problems=20,
                plots=False, max_tokens_per_microbatch=64)
    base.update(overrides)
    return Config(**base)


@pytest.fixture(scope="module")
def setup():
    """(engine, hf_engine, model, tokenizer): both engines start on the same random tiny Qwen2."""
    if REASON is not None:
        pytest.skip(f"vLLM not usable: {REASON}")
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rollout import make_engine
    from fastdash.rollout.hf import HFEngine

    cfg = _config(max_prompt_length=160)  # room for prompts longer than a KV block (prefix caching)
    model, tok = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    engine = make_engine(cfg, model, tok)  # the trainer's path: engine=vllm, model saved to a temp dir
    assert engine.name == "vllm"
    return engine, HFEngine(model, tok), model, tok


def _ids(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def _trainer_logps(model, prompt, completion, temperature=1.0) -> torch.Tensor:
    """The trainer's view: log_softmax(logits / T) of each completion token, full vocabulary."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1 : -1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0]


def _nudge(model, seed=0):
    """One real optimizer step (Adam on a language-model loss) so every weight moves."""
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    ids = torch.randint(3, model.config.vocab_size, (2, 12))
    model(ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


@needs_vllm
def test_generate_has_the_hf_engine_shape_and_meaning(setup):
    engine, hf, model, tok = setup
    engine.sync_weights(model)
    assert isinstance(engine, Engine)
    prompts = [_ids(tok, t) for t in ("1+2=", "345+678=", "9=")]
    params = SamplingParams(max_tokens=5, temperature=T, seed=0)
    for out in (engine.generate(prompts, 3, params), hf.generate(prompts, 3, params)):
        assert_well_formed(out, prompts, 3, engine.eos_id, 5)
    out = engine.generate(prompts, 3, params)
    assert any(c.truncated for c in out) and any(not c.truncated for c in out)  # both cases exercised
    for c in out:  # sampler log-probs: one per token, the trainer's log_softmax(logits / T)
        ref = _trainer_logps(model, c.prompt_ids, c.completion_ids, T)
        assert torch.allclose(torch.tensor(c.sampler_logps), ref, atol=1e-5), (c.sampler_logps, ref)


@needs_vllm
def test_greedy_equals_hf_greedy(setup):
    engine, hf, model, tok = setup
    engine.sync_weights(model)
    prompts = [_ids(tok, t) for t in ("1+2=", "123+456+789=", "7*8=")]
    params = SamplingParams(max_tokens=8, greedy=True)
    assert ([c.completion_ids for c in engine.generate(prompts, 1, params)]
            == [c.completion_ids for c in hf.generate(prompts, 1, params)])


@needs_vllm
def test_seed_reproduces_and_prompts_do_not_share_draws(setup):
    engine, _, model, tok = setup
    engine.sync_weights(model)
    p = _ids(tok, "12+34=")
    params = SamplingParams(max_tokens=8, temperature=1.5, seed=7)
    a = [c.completion_ids for c in engine.generate([p, p], 4, params)]
    b = [c.completion_ids for c in engine.generate([p, p], 4, params)]
    c = [c.completion_ids for c in engine.generate([p, p], 4, SamplingParams(max_tokens=8, temperature=1.5, seed=8))]
    assert a == b and a != c
    assert a[:4] != a[4:]  # the same prompt twice in one call gets different samples
    assert len({tuple(x) for x in a[:4]}) > 1  # the n samples of one request differ


@needs_vllm
def test_forced_lengths_control_every_completion(setup):
    engine, _, model, tok = setup
    lengths = (1, 4, 2, 7)
    out = engine.generate([_ids(tok, "1+1="), _ids(tok, "22+2=")], 2,
                          SamplingParams(max_tokens=8, seed=1, forced_lengths=lengths))
    assert [len(c.completion_ids) for c in out] == list(lengths)
    assert all(c.completion_ids[-1] == engine.eos_id and not c.truncated for c in out)
    assert all(engine.eos_id not in c.completion_ids[:-1] for c in out)
    assert [len(c.sampler_logps) for c in out] == list(lengths)


@needs_vllm
def test_sync_after_an_optimizer_step_and_a_skipped_sync_is_detected(setup):
    engine, _, model, tok = setup
    seqs = [_ids(tok, "12+345=357"), _ids(tok, "9*9=81 (8)")]
    # Longer than one KV block (128 tokens on CPU): only whole blocks enter the prefix cache.
    prompts = [_ids(tok, "12+345=" * 20), _ids(tok, "6-7=" * 35)]
    params = SamplingParams(max_tokens=8, temperature=T, seed=3)

    def mismatch():
        out = engine.generate(prompts, 4, params)
        return inference_mismatch([_trainer_logps(model, c.prompt_ids, c.completion_ids, T) for c in out],
                                  [c.sampler_logps for c in out])

    engine.sync_weights(model)
    engine.generate(prompts, 4, params)  # fills the prefix cache with these prompts' blocks
    _nudge(model)
    engine.sync_weights(model)
    for seq, got in zip(seqs, engine.prompt_logprobs(seqs)):  # raw prompt log-probs, temperature 1
        ref = _trainer_logps(model, seq[:1], seq[1:])
        assert torch.allclose(torch.tensor(got), ref, atol=1e-5), (got, ref)
    synced = mismatch()
    assert synced["mismatch/logp_abs_max"] < 1e-4 and synced["mismatch/k3_kl"] < 1e-8
    _nudge(model, seed=1)  # an optimizer step whose sync is "forgotten"
    stale = mismatch()
    assert stale["mismatch/logp_abs_max"] > 1e-2 and stale["mismatch/k3_kl"] > 1e-5
    engine.sync_weights(model)
    assert mismatch()["mismatch/logp_abs_max"] < 1e-4


@needs_vllm
def test_torch_thread_control_stays_with_the_trainer(setup):
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(before)


def _ones_reward(completion: str, answer: str, **_) -> float:
    """Learnable by a random model in a few steps: the share of '1' characters."""
    return completion.count("1") / max(len(completion), 1)


@needs_vllm
@pytest.mark.slow
def test_short_training_run_learns_like_the_hf_engine(setup):
    """Same run, same seeds, HF vs vLLM sampling: both raise the reward by similar amounts, and after
    the run the engine holds the trained weights (the trainer's per-step sync works)."""
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer

    engine = setup[0]
    cfg = _config(engine="hf", max_steps=6, learning_rate=1e-2, gradient_filtering=False)
    curves = {}
    for arm in ("hf", "vllm"):
        run = build_run(cfg, with_plan=False)
        run.reward_fn = _ones_reward
        if arm == "vllm":  # the module's engine (one vLLM per process), synced to this run's model
            engine.sync_weights(run.model)
            run.engine = engine
        trainer = Trainer(cfg, run)
        rewards = [trainer.step()["reward/mean"] for _ in range(cfg.max_steps)]
        curves[arm] = (sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3)
        if arm == "vllm":
            out = engine.generate([run.prompt_ids(p) for p in run.eval_problems[:4]], 2,
                                  SamplingParams(max_tokens=8, temperature=T, seed=0))
            m = inference_mismatch([_trainer_logps(run.model, c.prompt_ids, c.completion_ids, T) for c in out],
                                   [c.sampler_logps for c in out])
            assert m["mismatch/logp_abs_max"] < 1e-4, m
    for arm, (first, last) in curves.items():
        assert last > first + 0.1, (arm, curves)
    gain = {arm: last - first for arm, (first, last) in curves.items()}
    print("reward first-3 / last-3 means:", curves)
    assert 0.33 < gain["vllm"] / gain["hf"] < 3, curves


# ------------------------------------------------------------------ data parallel ----------------
@pytest.fixture(scope="module")
def dp_setup(setup):
    """(round-robin engine over 2 vLLM engines, model, tokenizer) through make_engine, own model."""
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rollout import make_engine

    cfg = _config(max_prompt_length=160, vllm_data_parallel_size=2)
    model, tok = load_model_and_tokenizer(cfg.model, seed=cfg.seed)
    engine = make_engine(cfg, model, tok)
    yield engine, model, tok
    # Stop the engine-core processes now rather than at interpreter exit, both at once (~4 s each).
    list(engine.pool.map(lambda e: e.shutdown(), engine.engines))


@needs_vllm
def test_data_parallel_alternates_prompts_and_matches_one_engine(setup, dp_setup, monkeypatch):
    single, _, single_model, _ = setup
    rr, model, tok = dp_setup
    assert rr.name == "round_robin" and len(rr.engines) == 2
    assert all(not e.in_process and e.max_num_seqs == 8 for e in rr.engines)  # 16 split in two
    # really a child process each, though the module's in-process engine froze vLLM's env reads
    assert {type(e.llm.llm_engine.engine_core).__name__ for e in rr.engines} == {"SyncMPClient"}
    served = {0: [], 1: []}
    for h, e in enumerate(rr.engines):  # record which engine gets which prompt
        def spy(prompts, n, params, h=h, inner=e.generate):
            served[h].extend(prompts)
            return inner(prompts, n, params)
        monkeypatch.setattr(e, "generate", spy)
    prompts = [_ids(tok, t) for t in ("1+2=", "345+678=", "9=", "12*3=", "7-7=")]
    out = rr.generate(prompts, 3, SamplingParams(max_tokens=5, temperature=T, seed=0))
    assert served == {0: [prompts[0], prompts[2], prompts[4]], 1: [prompts[1], prompts[3]]}
    assert [c.prompt_ids for c in out] == [p for p in prompts for _ in range(3)]
    assert any(c.truncated for c in out) and any(not c.truncated for c in out)
    eos = rr.engines[0].eos_id
    for c in out:  # same meaning as one engine: EOS last unless truncated, log-probs the trainer's
        assert (len(c.completion_ids) == 5 and eos not in c.completion_ids) if c.truncated else \
            (c.completion_ids[-1] == eos and eos not in c.completion_ids[:-1])
        ref = _trainer_logps(model, c.prompt_ids, c.completion_ids, T)
        assert torch.allclose(torch.tensor(c.sampler_logps), ref, atol=1e-5), (c.sampler_logps, ref)
    greedy = SamplingParams(max_tokens=8, greedy=True)
    single.sync_weights(model)  # the in-process engine on the same weights
    try:
        want = [c.completion_ids for c in single.generate(prompts, 1, greedy)]
    finally:
        single.sync_weights(single_model)
    assert [c.completion_ids for c in rr.generate(prompts, 1, greedy)] == want


@needs_vllm
def test_data_parallel_sync_after_an_optimizer_step(dp_setup):
    rr, model, tok = dp_setup
    # Longer than one KV block (128 tokens on CPU), two per engine: stale prefix caches would show.
    prompts = [_ids(tok, t) for t in ("12+345=" * 20, "6-7=" * 35, "8*9=" * 35, "1+1=" * 38)]
    params = SamplingParams(max_tokens=8, temperature=T, seed=3)

    def mismatch(engine):
        out = engine.generate(prompts, 2, params)
        return inference_mismatch([_trainer_logps(model, c.prompt_ids, c.completion_ids, T) for c in out],
                                  [c.sampler_logps for c in out])["mismatch/logp_abs_max"]

    rr.sync_weights(model)
    rr.generate(prompts, 2, params)  # fills both engines' prefix caches
    _nudge(model)
    rr.sync_weights(model)
    assert [mismatch(e) < 1e-4 for e in rr.engines] == [True, True]  # every engine has the new weights
    _nudge(model, seed=1)  # an optimizer step whose sync is "forgotten"
    assert mismatch(rr) > 1e-2
    rr.sync_weights(model)
    assert mismatch(rr) < 1e-4


# ------------------------------------------------------------------ speculative decoding (issue 16.4) --
@needs_vllm
def test_speculative_ngram_keeps_greedy_outputs(setup):
    """speculative={method: ngram} passes through to vLLM; greedy completions are those of the plain
    engine (proposals are verified by the target model), and sampler log-probs still come back."""
    from fastdash.rollout.vllm import VLLMEngine

    engine, _, model, tok = setup
    cfg = _config(max_prompt_length=160, speculative={"method": "ngram", "num_speculative_tokens": 3,
                                                      "prompt_lookup_max": 3, "prompt_lookup_min": 1})
    try:  # own process: a second in-process vLLM would share the first one's globals
        spec = VLLMEngine(cfg, model, tok, own_process=True)
    except RuntimeError as e:
        assert "speculative=null" in str(e)  # the clear message where this build does not support it
        pytest.skip(f"this vLLM build has no speculative decoding here: {e}")
    try:
        engine.sync_weights(model)  # both engines on the very same weights
        prompts = [_ids(tok, "12+12=12+12=12+"), _ids(tok, "7*7=49 7*7="), _ids(tok, "abcabcabcab")]
        params = SamplingParams(max_tokens=8, greedy=True)
        plain, fast = engine.generate(prompts, 1, params), spec.generate(prompts, 1, params)
        assert [c.completion_ids for c in fast] == [c.completion_ids for c in plain]
        assert all(c.sampler_logps is not None and len(c.sampler_logps) == len(c.completion_ids) for c in fast)
    finally:
        spec.shutdown()


def test_speculative_config_reaches_vllm_and_an_unsupported_build_says_what_to_do(monkeypatch):
    """No vLLM needed: a stand-in `vllm.LLM` records what the engine passes, or fails as vLLM's older
    CPU backend does ('spec decode is not supported')."""
    import types

    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout.vllm import VLLMEngine

    seen, fail = {}, []

    class FakeLLM:
        def __init__(self, **kwargs):
            seen.update(kwargs)
            if fail:
                raise AssertionError("spec decode is not supported.")

        def collective_rpc(self, *args, **kwargs):
            pass

    platforms = types.ModuleType("vllm.platforms")
    platforms.current_platform = types.SimpleNamespace(is_unspecified=lambda: False)
    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=FakeLLM, platforms=platforms))
    monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
    monkeypatch.setattr(torch, "set_num_threads", torch.set_num_threads)  # the engine restores it
    tok = char_tokenizer()
    model = random_model("tiny", vocab_size=len(tok))
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_max": 3}
    VLLMEngine(_config(speculative=spec), model, tok)
    assert seen["speculative_config"] == spec
    seen.clear()
    VLLMEngine(_config(), model, tok)
    assert "speculative_config" not in seen
    fail.append(1)
    with pytest.raises(RuntimeError, match="set speculative=null"):
        VLLMEngine(_config(speculative=spec), model, tok)


# ------------------------------------------------------------------ several ranks ----------------
@needs_vllm
@pytest.mark.slow
def test_two_ranks_with_vllm_split_or_colocated_give_the_one_process_run(tmp_path, monkeypatch):
    """2 ranks, vLLM, against the one-process colocated vLLM run.
    - generation_gpus=1: the trainer's calls run on a vLLM engine in rank 1 (its engine core in its own
      process, so weights reach it through the file fallback after the broadcast): every step's
      metrics equal the one-process run's.
    - colocated, 2 DDP ranks, an in-process engine each (vLLM builds its groups inside our
      torch.distributed world): the same samples and rewards, losses and gradient norms to fp32
      reordering (two micro-batches instead of one), and a clean exit (the engines are shut down
      before our teardown: after it, vLLM's exit handler raised on the groups already gone).
    Every engine always holds the trainer's weights (mismatch at fp32 rounding; a missed sync shows
    as ~0.3 at step 2)."""
    import json
    import subprocess

    from tests.test_distributed import launch, wait_all

    args = ["-m", "fastdash.train", "model=tiny-arith", "engine=vllm", "max_steps=2", "train_batch_size=16",
            "generation_batch_size=16", "num_train_problems=64", "num_eval_problems=8", "eval_sampled=false",
            "eval_steps=0", "plots=false", "save_steps=0", "num_threads=1", "max_tokens_per_microbatch=256",
            "dist_timeout_s=120"]
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "ERROR")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # what a colocated engine leaves in its process's environment (and CI's pytest passed to the ranks):
    # the generation rank must still put vLLM's engine core in a process of its own (this hung once)
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    for rc, text in wait_all(launch([*args, "generation_gpus=1", f"output_dir={tmp_path / 'split'}"]), timeout=300):
        assert rc == 0, text[-3000:]
    assert "generation rank 1: engine=vllm" in text, text[-3000:]
    for rc, text in wait_all(launch([*args, f"output_dir={tmp_path / 'ddp'}"]), timeout=300):
        assert rc == 0 and "Traceback" not in text, text[-3000:]
    one = subprocess.run([sys.executable, *args, f"output_dir={tmp_path / 'one'}"], capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0 and "Traceback" not in one.stderr, one.stderr[-3000:]
    split, ddp, ref = ([{k: v for k, v in json.loads(line).items() if not k.startswith("time/")}
                        for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
                       for d in ("split", "ddp", "one"))
    assert split == ref
    # sums over ranks round differently from one process's (entropy/mean: a per-token mean reduced over ranks)
    numeric = ("loss", "grad_norm", "microbatches", "entropy/mean") + tuple(k for k in ref[0] if k.startswith("mismatch/"))
    assert [{k: v for k, v in r.items() if k not in numeric} for r in ddp] == \
        [{k: v for k, v in r.items() if k not in numeric} for r in ref]
    for a, b in zip(ddp, ref):
        assert abs(a["loss"] - b["loss"]) <= 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * b["grad_norm"]
        assert abs(a["entropy/mean"] - b["entropy/mean"]) <= 1e-5 * b["entropy/mean"]
    assert all(r["mismatch/logp_abs_max"] < 1e-4 for r in split + ddp), [r.get("mismatch/logp_abs_max") for r in ddp]
