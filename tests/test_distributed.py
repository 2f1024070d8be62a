"""Several ranks on CPU (gloo): the maths of one process, resume, failures, bad combinations.

Ranks are launched as torchrun launches them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT env), one
subprocess each, so what is tested is the code path `torchrun -m fastdash.train` runs.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
import dist_worker  # noqa: E402

EPS32 = torch.finfo(torch.float32).eps


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(argv: list[str], world: int = 2, port: int | None = None, **popen) -> list[subprocess.Popen]:
    port = port or free_port()
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
               "PYTHONFAULTHANDLER": "1"}  # a rank that aborts prints every thread's stack
        procs.append(subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True, **popen))
    return procs


def wait_all(procs, timeout: float) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            text, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            text, _ = p.communicate()
            raise AssertionError(f"rank did not finish within {timeout} s:\n{text[-3000:]}")
        out.append((p.returncode, text))
    return out


def _bound(ref: torch.Tensor, terms: int) -> float:
    """fp32 reordering bound of a sum: the ranks add the same per-token terms in another order (and
    pack them in other micro-batches): a few ulps of the largest magnitude per sqrt(term count)."""
    return 4 * EPS32 * float(ref.abs().max()) * terms ** 0.5 + 1e-30


@pytest.mark.slow
def test_two_ranks_step_equals_one_process(tmp_path):
    """Gradients before the step and weights after it (SGD, lr 1) on 2 ranks = 1 process, for every
    loss type with the filter on, beta 0 and > 0, Multi with batch-std advantages and padding; DDP and
    FSDP2 (sharded gradients and weights gathered to compare), FSDP with a rank that keeps nothing."""
    procs = launch([str(HERE / "dist_worker.py"), str(tmp_path)])
    for rc, text in wait_all(procs, timeout=300):
        assert rc == 0, text[-3000:]
    for i, case in enumerate(dist_worker.CASES):
        ref = dist_worker.one_step(case)
        ranks = [torch.load(tmp_path / f"case{i}-rank{r}.pt") for r in range(2)]
        assert ref["grads"], case
        assert [r["world"] for r in ranks] == [2, 2] and ref["world"] == 1
        fsdp = case.get("parallelism") == "fsdp"
        assert [r["sharded"] for r in ranks] == [fsdp, fsdp] and not ref["sharded"]
        if case.get("drop_second_half"):  # rank 1 kept nothing: it ran rank 0's count of zero-loss dummies
            assert ranks[1]["metrics"]["fsdp/padding_microbatches"] == ranks[1]["metrics"]["microbatches"] > 0
        assert [r["engine_rows"] for r in ranks] == [ref["engine_rows"] // 2] * 2  # each rank generated half
        terms = ref["metrics"]["tokens/loss"] + 2
        for name, g in ref["grads"].items():
            for got in ranks:  # every rank holds the summed gradient
                assert torch.allclose(got["grads"][name], g, rtol=0, atol=_bound(g, terms)), (case, name)
        for name, w in ref["weights"].items():
            g = ref["grads"].get(name, torch.zeros_like(w))
            for got in ranks:
                # w1 = w0 - g: the gradient's bound plus the rounding of the subtraction
                bound = _bound(g, terms) + EPS32 * float(w.abs().max())
                assert torch.allclose(got["weights"][name], w, rtol=0, atol=bound), (case, name)
        for key in ("filter/kept_samples", "filter/kept_fraction", "reward/mean", "reward/std", "tokens/loss",
                    "completion/mean_length", "mask/dropped_samples"):
            assert ranks[0]["metrics"][key] == pytest.approx(ref["metrics"][key], rel=1e-12), (case, key)
        assert ranks[0]["metrics"]["loss"] == pytest.approx(ref["metrics"]["loss"], rel=1e-5, abs=1e-7), case


def test_weight_broadcast_in_buckets(tmp_path):
    """The split-placement sync protocol on gloo: rank 0's tensors land in rank 1's, bytes counted."""
    for rc, text in wait_all(launch([str(HERE / "dist_worker.py"), str(tmp_path), "broadcast"]), timeout=120):
        assert rc == 0, text[-3000:]
    a, b = (torch.load(tmp_path / f"broadcast-rank{r}.pt") for r in range(2))
    assert all(torch.equal(a["named"][k], b["named"][k]) for k in a["named"])
    assert float(b["named"]["w3"][0]) == 3.0  # rank 0's value, not rank 1's 13
    total = sum(t.numel() * t.element_size() for t in a["named"].values())
    assert a["stats"]["sync/bytes"] == b["stats"]["sync/bytes"] == total and a["stats"]["sync/buckets"] >= 3


def test_fsdp_weights_stream_one_unit_at_a_time(tmp_path):
    """An engine's sync from an FSDP model (fsdp.full_parameters): every parameter's full value on every
    rank, and whenever a tensor is handed over only its own unit (one decoder layer, or the root's
    embeddings / norm / head) is gathered: no second full copy of the weights."""
    import re

    for rc, text in wait_all(launch([str(HERE / "dist_worker.py"), str(tmp_path), "stream"]), timeout=120):
        assert rc == 0, text[-3000:]
    unit = lambda name: (re.match(r"model\.layers\.\d+\.", name) or [None])[0] or "root"  # noqa: E731
    for r in range(2):
        got = torch.load(tmp_path / f"stream-rank{r}.pt")
        assert got["values"].keys() == got["full"].keys()
        assert all(torch.equal(got["values"][k], got["full"][k]) for k in got["full"])
        assert len({unit(n) for n in got["full"]}) >= 3  # the root and at least two layers
        for name, gathered in got["gathered"]:
            assert name in gathered and {unit(n) for n in gathered} == {unit(name)}, (name, gathered)
        assert got["sharded_after"]


def test_step_batches_merge_and_resplit():
    """A 2-rank buffer re-split for 1 rank (and back) keeps every sample, its kept flag and log-probs."""
    from fastdash.batch import Sample
    from fastdash.checkpoint import merge_step_batches, split_step_batch
    from fastdash.batch import StepBatch

    def part(offset):
        samples = tuple(Sample(uid=i, prompt_ids=[1], completion_ids=[2] * (1 + (i + offset) % 3), truncated=False,
                               reward=float(i % 2), advantage=0.5 * (i % 2)) for i in range(4))
        kept = tuple(Sample(**{**s.__dict__, "ref_logps": torch.full((len(s.completion_ids),), float(offset + s.uid))})
                     for s in samples if s.advantage)
        return StepBatch(samples, kept, normaliser=12.0, masked=0)

    merged = merge_step_batches([part(0), part(10)])
    one = split_step_batch(merged, 0, 1, False)
    assert len(one.samples) == 8 and [float(s.ref_logps[0]) for s in one.kept] == [1.0, 3.0, 11.0, 13.0]
    halves = [split_step_batch(merge_step_batches([one]), r, 2, False) for r in range(2)]
    assert [[float(s.ref_logps[0]) for s in h.kept] for h in halves] == [[1.0, 3.0], [11.0, 13.0]]
    assert all(h.normaliser == 12.0 for h in halves)


# ---------------------------------------------------------------- whole runs ---------------------
def train_args(out: Path, *extra: str) -> list[str]:
    return ["-m", "fastdash.train", "max_steps=4", "train_batch_size=16", "generation_batch_size=16",
            "num_train_problems=64", "num_eval_problems=8", "eval_sampled=false", "eval_steps=0", "plots=false",
            "save_steps=1", "save_total_limit=null", "num_threads=1", "max_tokens_per_microbatch=256",
            "dist_timeout_s=30", f"output_dir={out}", *extra]


def weights(ckpt: Path) -> dict:
    """A checkpoint's fp32 weights: model.safetensors, or its sharded (DCP) files converted with
    torch's own tool (what a user runs: torch.distributed.checkpoint.format_utils), a tied head once."""
    import json
    import tempfile

    from safetensors.torch import load_file
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    if not (ckpt / "dcp").is_dir():
        return load_file(ckpt / "model.safetensors")
    with tempfile.TemporaryDirectory() as d:
        dcp_to_torch_save(ckpt / "dcp", Path(d) / "full.pt")
        model = torch.load(Path(d) / "full.pt", weights_only=False)["model"]
    tied = json.loads((ckpt / "config.json").read_text()).get("tie_word_embeddings", False)
    return {k: v for k, v in model.items() if not (tied and k == "lm_head.weight")}


def _wait_for(path: Path, procs, timeout: float) -> None:
    import time

    deadline = time.time() + timeout
    while not path.exists():
        if any(p.poll() is not None for p in procs) or time.time() > deadline:
            texts = [p.communicate(timeout=60)[0] if p.poll() is not None else "(running)" for p in procs]
            raise AssertionError(f"{path} never appeared:\n" + "\n".join(t[-2000:] for t in texts))
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_sigkill_resume_is_bit_identical_and_resumes_on_one_rank(tmp_path, parallelism):
    import shutil
    import signal

    full, cut = tmp_path / "full", tmp_path / "cut"
    steps = ("max_steps=8", f"parallelism={parallelism}")  # killed once checkpoint-2 is complete: mid-run
    for rc, text in wait_all(launch(train_args(full, *steps)), timeout=600):
        assert rc == 0, text[-3000:]
        assert parallelism != "fsdp" or "parallelism=fsdp: fp32 weights" in text, text[-3000:]
    if parallelism == "fsdp":  # checkpoint_format=auto: DCP files, every rank wrote its own shards
        assert len(list((full / "checkpoint-8" / "dcp").glob("*.distcp"))) == 2
        assert not (full / "checkpoint-8" / "model.safetensors").exists()
    procs = launch(train_args(cut, *steps))
    _wait_for(cut / "checkpoint-2" / "COMPLETE", procs, timeout=600)
    for p in procs:
        p.send_signal(signal.SIGKILL)
    for p in procs:
        p.wait(timeout=60)
    one = tmp_path / "one"  # the 2-rank checkpoint-2, resumed on one rank
    shutil.copytree(cut, one)
    for extra in one.glob("checkpoint-*"):
        if extra.name != "checkpoint-2":
            shutil.rmtree(extra)
    assert not (cut / "checkpoint-8").exists()
    for rc, text in wait_all(launch(train_args(cut, *steps, "resume=auto")), timeout=600):
        assert rc == 0, text[-3000:]
    a, b = weights(full / "checkpoint-8"), weights(cut / "checkpoint-8")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit
    done = subprocess.run([sys.executable, *train_args(one, steps[1], "resume=auto")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "written by 2 rank(s), this run has 1" in done.stderr
    assert (one / "checkpoint-4" / "COMPLETE").exists()
    if parallelism == "fsdp":  # and back: the one-process checkpoint (optimizer keyed by position) on 2 shards
        for rc, text in wait_all(launch(train_args(one, steps[1], "max_steps=6", "resume=auto")), timeout=600):
            assert rc == 0, text[-3000:]
            assert "written by 1 rank(s), this run has 2" in text, text[-3000:]
        assert (one / "checkpoint-6" / "COMPLETE").exists()


@pytest.mark.slow
def test_auto_shards_with_fsdp_when_no_replica_fits(tmp_path):
    """parallelism=auto on 2 ranks: a memory budget no full replica fits in -> FSDP2, and the run trains."""
    for rc, text in wait_all(launch(train_args(tmp_path, "max_steps=2", "memory_budget=1000")), timeout=600):
        assert rc == 0, text[-3000:]
        assert "a full replica per rank does not fit" in text and "parallelism=fsdp: fp32 weights" in text, \
            text[-3000:]
    assert (tmp_path / "checkpoint-2" / "COMPLETE").exists()


@pytest.mark.slow
def test_fsdp_in_bf16_trains_like_one_process(tmp_path):
    """The GPU path's precision on CPU: FSDP gathers bf16 weights (MixedPrecisionPolicy) where one process
    autocasts fp32 masters; step 1 (same weights) gives the same rewards and kept samples, the loss to
    bf16 rounding, and the engine's bf16 copy matches the trainer (the mismatch metric) in both."""
    import json

    extra = ("max_steps=2", "dtype=bfloat16", "beta=0.04", "save_steps=0")
    for rc, text in wait_all(launch(train_args(tmp_path / "fsdp", *extra, "parallelism=fsdp")), timeout=600):
        assert rc == 0, text[-3000:]
    one = subprocess.run([sys.executable, *train_args(tmp_path / "one", *extra)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = ([json.loads(line) for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
            for d in ("fsdp", "one"))
    for key in ("reward/mean", "filter/kept_samples", "tokens/loss"):
        assert a[0][key] == b[0][key], key
    assert a[0]["loss"] == pytest.approx(b[0]["loss"], rel=2 ** -6, abs=1e-4)  # a few bf16 ulps
    for m in (a, b):
        assert all(r["mismatch/logp_abs_mean"] < 0.05 for r in m), [r.get("mismatch/logp_abs_mean") for r in m]


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp"])
def test_split_placement_trains_like_colocated_and_resumes(tmp_path, parallelism):
    """generation_gpus=1 on 3 ranks (2 trainers served by one HF engine rank, weights broadcast after
    every step) gives the colocated 2-rank run's weights bit for bit: the same engine calls and seeds,
    only elsewhere. A split run resumed from its checkpoint-1 ends where the uninterrupted one did."""
    import json
    import shutil

    extra = ("max_steps=2", f"parallelism={parallelism}")
    split, colo, cut = tmp_path / "split", tmp_path / "colo", tmp_path / "cut"
    for rc, text in wait_all(launch(train_args(split, *extra, "generation_gpus=1"), world=3), timeout=600):
        assert rc == 0, text[-3000:]
    assert "generation rank 2: engine=hf on cpu serves trainer rank(s) [0, 1]" in text, text[-3000:]
    assert text.count("weight sync: ") == 3, text[-3000:]  # at start and after each of the 2 steps
    for rc, text in wait_all(launch(train_args(colo, *extra)), timeout=600):
        assert rc == 0, text[-3000:]
    for step in (1, 2):
        a, b = weights(split / f"checkpoint-{step}"), weights(colo / f"checkpoint-{step}")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), step
    rows = [[json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()] for d in (split, colo)]
    assert [r["reward/mean"] for r in rows[0]] == [r["reward/mean"] for r in rows[1]]
    assert all(r["mismatch/logp_abs_mean"] < 1e-5 for r in rows[0])  # the engine holds the trainer's weights
    shutil.copytree(split, cut)
    shutil.rmtree(cut / "checkpoint-2")
    for rc, text in wait_all(launch(train_args(cut, *extra, "generation_gpus=1", "resume=auto"), world=3),
                             timeout=600):
        assert rc == 0, text[-3000:]
    a, b = weights(split / "checkpoint-2"), weights(cut / "checkpoint-2")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_rank_process_ends_after_its_atexit_handlers_without_finalization():
    """A rank's process skips interpreter finalization (where freeing the process group PyTorch keeps
    alive after DDP / FSDP can abort it) but still runs its atexit handlers, flushes its output and
    keeps its exit code; an object that lives to the end is never finalized."""
    code = ("import atexit, sys\n"
            "from fastdash.train import end_rank_process\n"
            "class Held:\n"
            "    def __del__(self):\n"
            "        print('finalized', flush=True)\n"
            "held = Held()\n"
            "atexit.register(lambda: print('atexit ran', flush=True))\n"
            "print('buffered', end='')\n"
            "sys.stderr.write('to stderr')\n"
            "end_rank_process(3)\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 3, p.stderr[-2000:]
    assert p.stdout == "bufferedatexit ran\n" and p.stderr == "to stderr", (p.stdout, p.stderr)
    normal = subprocess.run([sys.executable, "-c", code.replace("end_rank_process(3)", "sys.exit(3)")],
                            capture_output=True, text=True, timeout=120)
    assert "finalized" in normal.stdout  # what the rank's exit skips: the interpreter freeing what is left


@pytest.mark.slow
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp", "split"])
def test_a_killed_rank_ends_the_survivor_naming_it(tmp_path, parallelism):
    import signal
    import time

    split = parallelism == "split"  # 2 trainers + 1 generation rank: the engine rank dies
    mode = "generation_gpus=1" if split else f"parallelism={parallelism}"
    procs = launch(train_args(tmp_path, "max_steps=400", "save_steps=0", "dist_timeout_s=20", mode),
                   world=3 if split else 2)
    _wait_for(tmp_path / "metrics.jsonl", procs, timeout=600)
    dead = 2 if split else 1
    procs[dead].send_signal(signal.SIGKILL)
    t0 = time.time()
    rc, text = wait_all(procs[:1], timeout=20 + 30)[0]
    took = time.time() - t0
    assert rc != 0 and took < 20 + 15, (rc, took, text[-2000:])
    assert f"rank {dead} is gone" in text, text[-2000:]
    for p in procs[1:]:  # the other survivor ends too (no hang)
        p.wait(timeout=60)


# ---------------------------------------------------------------- refused at start ---------------
def test_bad_combinations_fail_at_start_naming_the_key():
    from fastdash.config import Config
    from fastdash.layout import check_world, resolve_parallelism

    with pytest.raises(ValueError, match="train_batch_size=16: must be a multiple of trainer ranks x num_generations = 3 x 4"):
        check_world(Config(train_batch_size=16, generation_batch_size=16), 3, 0)
    check_world(Config(parallelism="fsdp"), 2, 0)  # FSDP2 runs on CPU (gloo)
    assert resolve_parallelism(Config(parallelism="fsdp"), 1) == "ddp"  # nothing to shard alone
    assert resolve_parallelism(Config(parallelism="fsdp"), 2) == "fsdp"
    assert resolve_parallelism(Config(), 2) == "ddp"
    check_world(Config(generation_gpus=1, engine="vllm"), 2, 4)  # split: 1 trainer + 1 engine
    check_world(Config(generation_gpus=1), 3, 0)  # 2 trainers share an HF engine rank, on CPU
    with pytest.raises(ValueError, match="generation_gpus=2: the world has 2 rank.* at least one must train"):
        check_world(Config(generation_gpus=2, engine="vllm"), 2, 2)
    with pytest.raises(ValueError, match="generation_gpus=2 is more than the 1 trainer rank"):
        check_world(Config(generation_gpus=2, train_batch_size=16), 3, 0)
    with pytest.raises(ValueError, match="multiple of trainer ranks x num_generations = 2 x 4"):
        check_world(Config(generation_gpus=1, train_batch_size=12, generation_batch_size=12), 3, 0)
    with pytest.raises(ValueError, match="every rank on its own GPU, but 4 ranks share this node's 2 GPU"):
        check_world(Config(generation_gpus=1), 4, 2)
    with pytest.raises(ValueError, match="parallelism"):
        Config(parallelism="zero3")
    with pytest.raises(ValueError, match="dist_timeout_s"):
        Config(dist_timeout_s=0)
    check_world(Config(), 2, 0)  # the default run splits over 2 ranks


def test_a_rank_draws_the_one_process_samples():
    """shifted_seed against the engines' own seeding, and the HF engine: the last 2 prompts of a call,
    generated alone with the shifted seed, give the one-process call's completions for them."""
    from fastdash import distributed
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rollout.base import SamplingParams
    from fastdash.rollout.decode import row_seed
    from fastdash.rollout.hf import HFEngine
    from fastdash.rollout.vllm import _mix

    for seed, k, j in ((7, 3, 0), (2**62 + 5, 1000, 17)):
        assert row_seed(distributed.shifted_seed(seed, k), j) == row_seed(seed, j + k) == _mix(seed, j + k)
    model, tok = load_model_and_tokenizer("tiny-arith", dtype=torch.float32)
    engine = HFEngine(model, tok)
    prompts = [tok(p, add_special_tokens=False).input_ids for p in ("12+7=", "3+4=", "50+9=", "8+8=")]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=1234)
    whole = engine.generate(prompts, 3, params)
    part = engine.generate(prompts[2:], 3, SamplingParams(max_tokens=6, temperature=1.0,
                                                          seed=distributed.shifted_seed(1234, 2 * 3)))
    assert [c.completion_ids for c in part] == [c.completion_ids for c in whole[6:]]
    assert len({tuple(c.completion_ids) for c in whole}) > 3  # sampled, not all alike


def test_step_shares_cover_every_step_once():
    from fastdash import distributed

    # Mini: a rollout of 8 prompts feeding 4 steps of 2 prompts; 2 ranks take one prompt of each step
    got = [[(a, b) for a, b in _shares(8, 2, r, 2)] for r in range(2)]
    assert got == [[(0, 1), (2, 3), (4, 5), (6, 7)], [(1, 2), (3, 4), (5, 6), (7, 8)]]
    assert distributed.step_shares(8, 2) == [(0, 8)]  # one process: everything


def _shares(n, per_step, r, w):
    from fastdash import distributed

    return [(s + distributed.share(per_step, r, w)[0], s + distributed.share(per_step, r, w)[1])
            for s in range(0, n, per_step)]


@pytest.mark.slow
def test_mini_buffer_resplit_on_one_rank_trains_the_same_step(tmp_path):
    """Mini (a rollout feeds 2 steps): checkpoint-1 of a 2-rank run holds each rank's half of step 2;
    resumed on 1 rank, step 2 trains on the merged batch: the 2-rank run's step-2 numbers."""
    import json
    import shutil

    two, one = tmp_path / "two", tmp_path / "one"
    mini = ("max_steps=2", "generation_batch_size=32")
    for rc, text in wait_all(launch(train_args(two, *mini)), timeout=600):
        assert rc == 0, text[-3000:]
    shutil.copytree(two, one)
    shutil.rmtree(one / "checkpoint-2")
    shutil.rmtree(one / "final")
    done = subprocess.run([sys.executable, *train_args(one, *mini, "resume=auto")], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the 1 step batches not yet trained on are re-split" in done.stderr
    a, b = ([json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()][-1] for d in (two, one))
    assert a["step"] == b["step"] == 2 and "rollout/samples" not in b  # no new rollout: the buffer's batch
    for key in ("reward/mean", "reward/std", "filter/kept_samples", "completion/mean_length", "tokens/loss"):
        assert a[key] == pytest.approx(b[key], rel=1e-12), key
    assert a["loss"] == pytest.approx(b["loss"], rel=1e-4, abs=1e-7)
