"""Validate the CUDA paths of fastdash in one command that fits a 15-minute GPU window
(run through scripts/gpu_check.sh; docs/gpu.md, "The one-shot GPU check").

    bash scripts/gpu_check.sh --out DIR            # on one H100/H200: at most BUDGET_S of steps
    bash scripts/gpu_check.sh --cpu-dry --out DIR  # every step at tiny sizes on CPU (CI runs this)
    python scripts/gpu_check.py --steps train,kernels

Steps, most valuable first (each in its own process group, under its own timeout):
  train       two bf16 training steps of the 0.5B DASH recipe's shape (random weights, synthetic reward,
              the scheduler's plan), kernel=triton; one more with kernel=torch to compare
  kernels     bf16 kernel correctness at Qwen2.5 shapes vs an fp32 reference; dW bit-identity
  speed       kernel speed: TFLOP/s against 6NHV and one cuBLAS [N,H]x[H,V] matmul timed in the run
  engine      the HF engine's throughput with its own bf16 copy of the fp32 master model (as training)
  static      the HF engine's static-shape decode (torch.compile per bucket, CUDA graphs) vs compact
  attention   packed varlen attention vs per-sequence sdpa; packed forward_hidden vs per sample
  scheduler   the scheduler's plan, one micro-batch at the planned budget, twice it via the back-off
  pytest      pytest tests/kernels tests/test_packing.py (GPU: without the packaging and sm_90 compile
              tests, which prove nothing there; dry: collection only)
  environment nvidia-smi, versions, varlen_attn's signature, training without datasets / math_verify

On a GPU a step starts only if the steps' elapsed time plus its timeout fits the budget (--budget,
default BUDGET_S) and the whole command still ends under TOTAL_LIMIT_S from gpu_check.sh's start;
a step that runs out its timeout is killed with its whole process group. checks.json, summary.md
and steps.log are rewritten (atomically) and flushed after every step and before each one starts,
so a run killed at any moment leaves every finished step's result. Triton autotunes in quick mode
(FASTDASH_AUTOTUNE=quick: each kernel's first config) unless --full-autotune.
Exit 0: all passed; 1: a check failed or a step crashed; 2: nothing failed but a step timed out or
was skipped.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "scripts")]
BUDGET_S = 480  # of steps; gpu_check.sh's wheel install and this process's start come before
TOTAL_LIMIT_S = 540  # the whole command, from gpu_check.sh's start (GPU_CHECK_T0) to its exit
END_RESERVE_S = 5  # after the last step: the final write and exit
KILL_GRACE_S = 3  # SIGTERM, then SIGKILL this long after; inside the step's timeout
DRY_TIMEOUT_S = 240
RECIPE = ROOT / "recipes" / "dash-qwen2.5-0.5b.yaml"


class Step(NamedTuple):
    name: str
    timeout_s: int  # on a GPU; dry steps get DRY_TIMEOUT_S
    what: str


STEPS = (  # the order of value: what a short window must bring back first
    Step("train", 180, "two bf16 training steps, recipe shape (triton; torch to compare)"),
    Step("kernels", 75, "kernel correctness at Qwen2.5 shapes (bf16 vs fp32)"),
    Step("speed", 90, "kernel speed (quick autotune)"),
    Step("engine", 45, "HF engine throughput (its bf16 copy, as training)"),
    Step("static", 120, "static decode vs compact"),
    Step("attention", 30, "packed attention + forward_hidden"),
    Step("scheduler", 45, "scheduler plan + OOM back-off"),
    Step("pytest", 60, "pytest kernels + packing"),
    Step("environment", 45, "environment"),
)
BY_NAME = {s.name: s for s in STEPS}


def sizes(dry: bool) -> dict:
    import torch

    from fastdash.models import PRESETS, QWEN_VOCAB

    if dry:
        return dict(dtype=torch.bfloat16, vocab=512, model_vocab=512, hidden=(32,), lengths=[0, 1, 7, 0, 20, 1, 9],
                    speed_n=(256,), hidden_speed=(32,), reps=2, attn_lengths=[1, 5, 17, 3], heads=(4, 2, 8),
                    preset="tiny", sample_shapes=[(4, 6), (3, 1), (5, 9)],
                    plan=dict(prompt=8, completion=24, samples=8, cpu_extra_budget=256 * 2**20),
                    engine=dict(preset="tiny", prompts=4, n=2, max_new=8, prompt_len=6, mean=4),
                    static=dict(preset="tiny", prompts=2, n=3, max_new=8, prompt_len=6, mean=4, backend="eager"),
                    train=dict(model="random:tiny", kernels=("torch", "reference"), batch=16, micro=4, prompt=12,
                               completion=8, mean=4, budget=96, plan=False))
    h = {name: PRESETS[f"qwen2.5-{name}"] for name in ("0.5b", "1.5b", "3b")}
    heads = (h["0.5b"]["num_attention_heads"], h["0.5b"]["num_key_value_heads"],
             h["0.5b"]["hidden_size"] // h["0.5b"]["num_attention_heads"])  # 14 / 2 heads of 64
    return dict(dtype=torch.bfloat16, vocab=QWEN_VOCAB, model_vocab=QWEN_VOCAB,
                hidden=(h["0.5b"]["hidden_size"], h["3b"]["hidden_size"]), lengths=[0, 1, 37, 0, 250, 1, 700, 3, 64, 400],
                speed_n=(4096, 16384), hidden_speed=tuple(p["hidden_size"] for p in h.values()), reps=5,
                attn_lengths=[1, 17, 300, 1024, 5, 600], heads=heads, preset="qwen2.5-0.5b",
                sample_shapes=[(40, 200), (100, 1), (16, 500), (200, 77)],
                plan=dict(prompt=256, completion=2048, samples=256, cpu_extra_budget=None),
                engine=dict(preset="qwen2.5-0.5b", prompts=64, n=4, max_new=256, prompt_len=128, mean=77),
                # 2 rows: buckets 2 and 1 = at most 2 inductor compiles of the 24-layer decode step
                static=dict(preset="qwen2.5-0.5b", prompts=1, n=2, max_new=256, prompt_len=128, mean=77, backend=None),
                # the recipe's lengths (prompts <= 256, completions <= 2048, micro-batches of 8), 8 prompts x 4
                # and forced lengths of mean 192 so two steps fit the window; the token budget is the plan's
                train=dict(model="random:qwen2.5-0.5b", kernels=("triton", "torch"), batch=32, micro=8, prompt=256,
                           completion=2048, mean=192, budget="auto", plan=True))


# ------------------------------------------------------------------ train, engine, pytest, environment ---
_NO_DATASETS = """
import sys
sys.modules['datasets'] = None; sys.modules['math_verify'] = None  # `import x` now raises ImportError
from fastdash.config import load_config
from fastdash.runtime import build_run
from fastdash.trainer import Trainer
cfg = load_config(None, dict(model='random:tiny', train_batch_size=8, generation_batch_size=8, micro_batch_size=4,
                             max_completion_length=4, max_prompt_length=16, num_train_problems=16, num_eval_problems=4,
                             eval_batch_size=4, max_tokens_per_microbatch=64, max_steps=1, plots=False))
m = Trainer(cfg, build_run(cfg, with_plan=False)).step()
print('trained one step, loss', m['loss'])
"""


def environment(size: dict) -> dict:
    import importlib.metadata
    import importlib.util
    import inspect

    import torch

    from fastdash.attention import select_attention_backend

    def run(cmd, timeout=20):
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
            return p.returncode, (p.stdout + p.stderr).strip()
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, str(e)

    out = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
           "cuda_available": torch.cuda.is_available(),
           "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
           "nvidia_smi": run(["nvidia-smi"])[1][-3000:], "packages": {}}
    for name in ("triton", "transformers", "liger_kernel", "cut_cross_entropy", "flash_attn", "vllm", "datasets",
                 "math_verify", "trl", "pytest_benchmark"):
        found = importlib.util.find_spec(name) is not None
        dist = {"liger_kernel": "liger-kernel", "flash_attn": "flash-attn", "math_verify": "math-verify",
                "pytest_benchmark": "pytest-benchmark"}.get(name, name)
        try:
            version = importlib.metadata.version(dist) if found else None
        except importlib.metadata.PackageNotFoundError:
            version = "?"
        out["packages"][name] = version if found else None
    try:
        from torch.nn.attention.varlen import varlen_attn

        out["varlen_attn_signature"] = str(inspect.signature(varlen_attn))
    except (ImportError, AttributeError) as e:
        out["varlen_attn_signature"] = f"unavailable: {e}"
    out["attention_backend"] = select_attention_backend("cuda" if torch.cuda.is_available() else "cpu")
    rc, text = run([sys.executable, "-c", _NO_DATASETS], timeout=25)
    out["without_datasets_math_verify"] = text[-1500:]
    out["ok"] = rc == 0
    return out


# Prove nothing on a GPU (the packaging, and what the sm_90 compiler and the launch sizing say without one).
GPU_SKIPPED_TESTS = ("tests/kernels/test_packaging.py", "tests/kernels/test_triton_compile.py",
                     "tests/kernels/test_launch.py")


def pytest_cmd(dry: bool, on_gpu: bool) -> list[str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/kernels",
           "tests/test_packing.py"]
    if on_gpu:
        cmd += [f"--ignore={t}" for t in GPU_SKIPPED_TESTS]
    return cmd + (["--collect-only"] if dry else [])


def pytest_step(size: dict, dry: bool, out_dir: Path) -> dict:
    import torch

    cmd = pytest_cmd(dry, torch.cuda.is_available())
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (out_dir / "pytest.txt").write_text(" ".join(cmd) + "\n\n" + p.stdout + p.stderr)
    tail = (p.stdout + p.stderr).strip().splitlines()
    return {"ok": p.returncode == 0, "returncode": p.returncode, "summary": tail[-1] if tail else "", "dry": dry}


def engine_step(size: dict) -> dict:
    """Generation as training runs it: fp32 master weights (build_run loads them so) and the engine
    that `runtime.build_run` makes from them, which generates with its own copy in the compute dtype."""
    import numpy as np
    import torch

    from fastdash.config import load_config
    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout import make_engine
    from fastdash.rollout.base import SamplingParams

    e = size["engine"]
    d = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(e["preset"], vocab_size=size["model_vocab"], seed=0, dtype=torch.float32).to(d)
    tok = char_tokenizer()
    cfg = load_config(None, dict(model=f"random:{e['preset']}", engine="hf", hf_decode="compact",  # static: own step
                                 max_completion_length=e["max_new"]))
    engine = make_engine(cfg, model, tok, compute_dtype=size["dtype"])  # build_run's call
    weights = next(engine.model.parameters())
    rng = np.random.default_rng(0)
    prompts = rng.integers(3, model.config.vocab_size, size=(e["prompts"], e["prompt_len"])).tolist()
    rows = e["prompts"] * e["n"]
    forced = tuple(int(x) for x in np.clip(rng.gamma(2.0, e["mean"] / 2.0, size=rows).round(), 1, e["max_new"]))
    params = SamplingParams(max_tokens=e["max_new"], seed=0, forced_lengths=forced)
    engine.generate(prompts[:2], e["n"], SamplingParams(max_tokens=4, seed=0))  # warm-up
    if d.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = engine.generate(prompts, e["n"], params)
    if d.type == "cuda":
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    lengths = [len(c.completion_ids) for c in out]
    exact = lengths == list(forced)
    copy = weights.dtype == size["dtype"] and engine.model is not model
    return {"ok": exact and copy and len(out) == rows, "seconds": sec, "tokens": sum(lengths),
            "tokens_per_s": sum(lengths) / sec, "longest": max(lengths), "mean_length": sum(lengths) / rows,
            "forced_lengths_honoured": exact, "engine_dtype": str(weights.dtype),
            "master_dtype": str(next(model.parameters()).dtype), "engine_has_own_copy": engine.model is not model,
            "engine": getattr(engine, "name", type(engine).__name__), "workload": e}


def training_step(size: dict) -> dict:
    """The 0.5B DASH recipe's config (bf16 compute, fp32 master weights, KL, gradient filtering,
    gradient checkpointing, packed micro-batches) on random weights and a synthetic reward: two steps
    with the first kernel, one with the second, from the same seed: same samples, so the first step's
    loss and grad norm must agree between kernels up to bf16 rounding."""
    import gc
    import math

    import torch

    from fastdash.config import load_config
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer
    from workload import SYNTHETIC_REWARD, PromptFeed, paper_rows

    t = size["train"]
    runs, cfg = {}, None
    for kernel, steps in zip(t["kernels"], (2, 1)):
        cfg = load_config(str(RECIPE), dict(
            model=t["model"], task="arithmetic", dataset=None, eval_dataset=None, output_dir=None, kernel=kernel,
            reward=SYNTHETIC_REWARD, train_batch_size=t["batch"], generation_batch_size=t["batch"],
            micro_batch_size=t["micro"], max_prompt_length=t["prompt"], max_completion_length=t["completion"],
            length_control_mean=t["mean"], max_tokens_per_microbatch=t["budget"], max_steps=2, num_train_problems=16,
            num_eval_problems=4, eval_batch_size=4, plots=False))
        rows = paper_rows(t["batch"] // cfg.num_generations * steps, seed=0, mean_length=t["prompt"] / 4,
                          max_length=t["prompt"] // 2, mixed_fraction=0.8, group_size=cfg.num_generations)
        trainer = Trainer(cfg, build_run(cfg, with_plan=t["plan"]), prompt_source=PromptFeed(rows))
        t0 = time.perf_counter()
        runs[kernel] = [trainer.step() for _ in range(steps)]
        runs[kernel][0]["wall_s"] = time.perf_counter() - t0
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    a, b = (runs[k][0] for k in t["kernels"])
    # a step whose every sample the gradient filter dropped runs no backward (no grad_norm): not a check
    trained = all("grad_norm" in m for ms in runs.values() for m in ms)
    if not trained:
        return {"ok": False, "error": "a step ran no backward (every sample filtered)", "steps": runs}
    finite = all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for ms in runs.values() for m in ms)
    loss_ok = abs(a["loss"] - b["loss"]) <= 2.0 ** -7 * max(abs(a["loss"]), abs(b["loss"]), 1e-3)
    norm_ok = abs(a["grad_norm"] - b["grad_norm"]) <= 2.0 ** -4 * max(a["grad_norm"], b["grad_norm"])
    keep = ("loss", "grad_norm", "microbatches", "tokens/loss", "reward/mean", "filter/kept_fraction",
            "time/generate_s", "time/backward_s", "wall_s")
    return {"ok": finite and loss_ok and norm_ok, "finite": finite, "loss_agree": loss_ok, "grad_norm_agree": norm_ok,
            "recipe": RECIPE.name, "dtype": cfg.dtype, "steps": {k: [{x: m.get(x) for x in keep} for m in ms]
                                                                 for k, ms in runs.items()}}


def run_step(name: str, dry: bool, out_dir: Path) -> dict:
    import gpu_check_steps as s

    size = sizes(dry)
    fns = {"train": lambda: training_step(size), "kernels": lambda: s.kernel_correctness(size),
           "speed": lambda: s.kernel_speed(size), "engine": lambda: engine_step(size),
           "static": lambda: s.static_decode(size), "attention": lambda: s.packed_attention(size),
           "scheduler": lambda: s.scheduler_plan(size), "pytest": lambda: pytest_step(size, dry, out_dir),
           "environment": lambda: environment(size)}
    return fns[name]()


# ------------------------------------------------------------------ orchestration --------------
def may_start(step_timeout: float, steps_elapsed: float, budget: float, since_start: float | None) -> bool:
    """A step starts only if it ends (even at its timeout) within the steps' budget and the whole
    command within TOTAL_LIMIT_S (since_start: seconds since gpu_check.sh began; None = unknown)."""
    if steps_elapsed + step_timeout > budget:
        return False
    return since_start is None or since_start + step_timeout + END_RESERVE_S <= TOTAL_LIMIT_S


def _kill_group(pgid: int, sig=signal.SIGKILL) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_in_group(cmd: list[str], timeout: float, log, env=None) -> tuple[object, float]:
    """Run cmd in a new session (its own process group) with output appended to `log`; at `timeout`
    the whole group gets SIGTERM, then SIGKILL KILL_GRACE_S later (a pytest grandchild too).
    -> (returncode or "timeout", seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    _CURRENT["pgid"] = p.pid
    try:
        rc = p.wait(timeout=max(timeout - KILL_GRACE_S, 1))
    except subprocess.TimeoutExpired:
        _kill_group(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=KILL_GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        _kill_group(p.pid)
        p.wait()
        rc = "timeout"
    _kill_group(p.pid)  # whatever the step left running in its group
    _CURRENT["pgid"] = None
    return rc, time.perf_counter() - t0


_CURRENT = {"pgid": None}  # the running step's process group, for the orchestrator's signal handler


def _watch_parent() -> None:
    """In a step's process: if the orchestrator dies (SIGKILL, the device's limit), take the step's
    whole group down rather than leave it holding the GPU."""
    parent = os.getppid()

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os.killpg(os.getpgrp(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True).start()


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class Report:
    """checks.json + summary.md, rewritten whole (temp file, os.replace) at every change."""

    def __init__(self, out: Path, dry: bool, budget: float, env: dict):
        self.out, self.dry, self.budget, self.env = out, dry, budget, env
        self.t0, self.steps, self.running = time.perf_counter(), [], None

    def write(self, finished=False) -> None:
        total = time.perf_counter() - self.t0
        steps = self.steps + ([self.running] if self.running else [])
        doc = {"dry": self.dry, "budget_s": self.budget, "total_s": total, "finished": finished, "env": self.env,
               "steps": steps}
        _write_atomic(self.out / "checks.json", json.dumps(doc, indent=1, default=str))
        _write_atomic(self.out / "summary.md", _summary(steps, self.dry, total, finished))


def _child_cmd(name: str, dry: bool, out: Path, result: Path) -> list[str]:
    return [sys.executable, __file__, "--run-step", name, "--result", str(result), "--out", str(out)] + \
        (["--cpu-dry"] if dry else [])


def run_one(step: Step, dry: bool, out: Path, log, env: dict) -> dict:
    timeout = DRY_TIMEOUT_S if dry else step.timeout_s
    result_path = Path(tempfile.gettempdir()) / f"gpu_check-{os.getpid()}-{step.name}.json"  # not in out: 8 files
    result_path.unlink(missing_ok=True)
    log.write(f"===== {step.name} ({step.what}), timeout {timeout} s\n")
    log.flush()
    rc, sec = run_in_group(_child_cmd(step.name, dry, out, result_path), timeout, log, env)
    if rc == "timeout":
        res = {"ok": None, "status": "timeout", "error": f"killed after {timeout} s (its process group)"}
    elif rc != 0 or not result_path.is_file():
        res = {"ok": False, "status": "crashed", "error": f"exit {rc}; its output: steps.log"}
    else:
        res = {**json.loads(result_path.read_text()), "status": "ran"}
    result_path.unlink(missing_ok=True)
    log.write(f"===== {step.name}: {res['status']}, ok {res.get('ok')}, {sec:.1f} s\n")
    log.flush()
    os.fsync(log.fileno())
    return {"step": step.name, "what": step.what, "timeout_s": timeout, "seconds": sec, **res}


def run_steps(steps, *, dry: bool, budget: float, report: Report, start, log, env) -> None:
    """The step loop: skip what cannot finish in time; write the report before and after each step."""
    for step in steps:
        since_start = None if start is None else time.time() - start
        timeout = DRY_TIMEOUT_S if dry else step.timeout_s
        if not dry and not may_start(timeout, time.perf_counter() - report.t0, budget, since_start):
            report.steps.append({"step": step.name, "what": step.what, "timeout_s": timeout, "status": "skipped",
                                 "ok": None, "error": f"skipped: its {timeout} s would pass the {budget:.0f} s budget"})
            report.write()
            continue
        report.running = {"step": step.name, "what": step.what, "timeout_s": timeout, "status": "running", "ok": None,
                          "started_s": time.perf_counter() - report.t0}
        report.write()
        report.steps.append(run_one(step, dry, report.out, log, env))
        report.running = None
        report.write()
        r = report.steps[-1]
        print(f"step {step.name:12s} {r['status']:8s} ok={r.get('ok')} {r.get('seconds', 0):.0f}s", flush=True)


def _summary(results: list[dict], dry: bool, total: float, finished: bool) -> str:
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    lines = [f"# gpu_check{' (CPU dry mode)' if dry else ''} {now}",
             "", f"{'Finished' if finished else 'In progress (or killed)'} after {total:.0f} s. "
             "ok: yes / NO / - (nothing to judge).", "",
             "| step | what | status | ok | seconds | key figures |", "|---|---|---|---|---|---|"]
    for r in results:
        ok = {True: "yes", False: "NO", None: "-"}[r.get("ok")]
        lines.append(f"| {r['step']} | {r['what']} | {r['status']} | {ok} | {r.get('seconds', 0):.0f} | {_key(r)} |")
    return "\n".join(lines) + "\n"


def _key(r: dict) -> str:
    """One line of the step's headline figures for the Markdown table."""
    try:
        return _KEYS[r["step"]](r)[:400] if r["status"] == "ran" else r.get("error", r["status"])[:200]
    except (KeyError, TypeError, ValueError, IndexError) as e:  # a figure missing from a failed step's result
        return f"(no figures: {type(e).__name__} {e})"


def _speed_key(r):
    ok = [x for x in r["rows"] if "ms" in x]
    return "; ".join(f"{x['backend']} N{x['N']} H{x['H']} {x['tflops_6nhv']:.0f} TF/s ({x['x_matmul']:.2f}x mm)"
                     for x in ok if x["backend"] in ("triton", "liger") or len(ok) < 4)


_KEYS = {
    "train": lambda r: (f"losses {[s[0]['loss'] for s in r['steps'].values()]}, "
                        f"grad norms {[s[0]['grad_norm'] for s in r['steps'].values()]}"),
    "kernels": lambda r: (f"{r['cases']} cases, {len(r['failed'])} failed, worst dW {r['worst_dw']['err_dw_ulps']:.1f} "
                          f"bf16 ulps; dW bit-identical: {r['dw_bit_identical_over_two_runs']}"),
    "speed": _speed_key,
    "engine": lambda r: (f"{r['tokens_per_s']:.0f} tokens/s ({r['engine_dtype']} copy of {r['master_dtype']}), "
                         f"{r['tokens']} tokens in {r['seconds']:.1f} s"),
    "static": lambda r: (f"static {r['static']['tokens_per_s']:.0f} vs compact {r['compact']['tokens_per_s']:.0f} "
                         f"tokens/s ({r['static_over_compact']:.2f}x), first call {r['static']['first_call_s']:.0f} s, "
                         f"{r['static']['graphs_first_call']} graphs for buckets {r['buckets_used']}"),
    "attention": lambda r: (f"attention ulps {({k: round(v['err_ulps'], 1) for k, v in r['attention'].items()})}, "
                            f"others bit-identical {r['forward_hidden']['others_bit_identical']}"),
    "scheduler": lambda r: (f"budget {r['max_tokens_per_microbatch']} tokens, measured/predicted peak "
                            f"{r['measured_over_predicted']:.2f}, 2x budget: backoffs {r['twice_budget']['backoffs']}"),
    "pytest": lambda r: r["summary"],
    "environment": lambda r: (f"torch {r['torch']}, cuda {r['cuda']}, {r['device_name']}, "
                              f"attention {r['attention_backend']}"),
}


def _env_header(torch) -> dict:
    return {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "autotune": os.environ.get("FASTDASH_AUTOTUNE", "full")}


def _device_dir() -> str:
    import torch

    from devices import device_slug

    date = datetime.now(timezone.utc).date().isoformat()
    return f"gpu-{device_slug('gpu') if torch.cuda.is_available() else 'none'}-{date}"


def _parse_steps(text: str) -> list[Step]:
    names = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        raise SystemExit(f"gpu_check: --steps: unknown step(s) {unknown}; choose from {', '.join(BY_NAME)}")
    return [BY_NAME[n] for n in names]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="every step at tiny sizes on CPU (no budget)")
    ap.add_argument("--steps", default=",".join(BY_NAME), help="comma-separated step names, in the order to run")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help="seconds of steps (GPU; default %(default)s)")
    ap.add_argument("--full-autotune", action="store_true", help="let Triton time every config (slow)")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results/gpu-<device>-<date>)")
    ap.add_argument("--run-step", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_step is not None:  # child: one step, its JSON to --result
        _watch_parent()
        res = run_step(args.run_step, args.cpu_dry, Path(args.out))
        _write_atomic(Path(args.result), json.dumps(res, default=str))
        return 0
    steps = _parse_steps(args.steps)
    import torch

    if not args.cpu_dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-dry for the CPU dry run", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.cpu_dry
                                           else ROOT / "benchmarks" / "results" / _device_dir())
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if not args.full_autotune:
        env["FASTDASH_AUTOTUNE"] = "quick"
    env.setdefault("PYTHONUNBUFFERED", "1")
    start = float(os.environ["GPU_CHECK_T0"]) if os.environ.get("GPU_CHECK_T0") else None
    report = Report(out, args.cpu_dry, args.budget, {**_env_header(torch), "autotune": env.get("FASTDASH_AUTOTUNE")})

    def stop(signum, _frame):  # the caller's SIGTERM / Ctrl-C: end the step's group, keep what finished
        if _CURRENT["pgid"]:
            _kill_group(_CURRENT["pgid"])
        if report.running:
            report.steps.append({**report.running, "status": "interrupted", "error": f"signal {signum}"})
            report.running = None
        report.write()
        raise SystemExit(1)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with (out / "steps.log").open("a") as log:
        run_steps(steps, dry=args.cpu_dry, budget=args.budget, report=report, start=start, log=log, env=env)
    report.write(finished=True)
    print(f"gpu_check: results in {out}")
    results = report.steps
    if any(r.get("ok") is False for r in results):
        return 1
    return 2 if any(r["status"] != "ran" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
