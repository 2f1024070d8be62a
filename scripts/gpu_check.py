"""Validate every CUDA path of fastdash in one command (run through scripts/gpu_check.sh).

    bash scripts/gpu_check.sh                 # on one H100/H200: steps 0-8 in ~10 minutes
    bash scripts/gpu_check.sh --cpu-dry       # every step at tiny sizes on CPU (CI runs this)
    python scripts/gpu_check.py --steps 2,3   # a subset

Steps (each in its own process, under its own timeout; on GPU, steps not started by BUDGET_S are skipped):
  0 environment: nvidia-smi, versions, varlen_attn's signature, optional backends, and fastdash
    building and training a random preset with `datasets` / `math_verify` made unimportable
  1 pytest -x tests/kernels tests/test_packing.py, natively (dry: collection only)
  2 bf16 kernel correctness at real shapes vs an fp32 reference; dW bit-identity over two runs
  3 kernel speed: TFLOP/s against 6NHV and against one cuBLAS [N,H]x[H,V] matmul timed in the run
  4 packed varlen attention vs per-sequence sdpa; packed forward_hidden vs per sample
  5 the scheduler's plan, one micro-batch at the planned budget, twice the budget via the back-off
  6 the HF engine: 64 prompts x 4, forced lengths, up to 256 new tokens, tokens/s
  7 two training steps of random Qwen2.5-0.5B with kernel=triton, one with kernel=torch
  8 the HF engine's static-shape decode (torch.compile per bucket, CUDA graphs) vs its compacting loop
Writes checks.json, summary.md, pytest.txt and steps.log to benchmarks/results/gpu-<device>-<date>/
(dry: a temp dir unless --out). Exit 0: all passed; 1: a correctness check failed or a step crashed;
2: nothing failed but a step timed out or was skipped.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks"), str(ROOT / "scripts")]
BUDGET_S = 540  # step 8 (last, its compiles up to TIMEOUT_S[8]) still starts after ~8 minutes of steps 0-7
TIMEOUT_S = {0: 90, 1: 240, 2: 150, 3: 150, 4: 90, 5: 120, 6: 120, 7: 180, 8: 240}
DRY_TIMEOUT_S = 240
NAMES = {0: "environment", 1: "pytest kernels + packing", 2: "kernel correctness (bf16 vs fp32)",
         3: "kernel speed", 4: "packed attention + forward_hidden", 5: "scheduler plan + OOM back-off",
         6: "HF engine throughput", 7: "training steps (triton vs torch)", 8: "static decode vs compact"}


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
                    train=dict(model="random:tiny", kernels=("torch", "reference"), batch=8, micro=4, prompt=12,
                               completion=8, mean=4, budget=64))
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
                # 8 rows: buckets 8, 4, 2, 1 = at most 4 inductor compiles of the 24-layer decode step
                static=dict(preset="qwen2.5-0.5b", prompts=2, n=4, max_new=256, prompt_len=128, mean=77, backend=None),
                train=dict(model="random:qwen2.5-0.5b", kernels=("triton", "torch"), batch=16, micro=8, prompt=64,
                           completion=128, mean=40, budget=2048))


# ------------------------------------------------------------------ steps 0, 1, 6, 7 ------------
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

    def run(cmd, timeout=60):
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
    rc, text = run([sys.executable, "-c", _NO_DATASETS], timeout=120)
    out["without_datasets_math_verify"] = text[-1500:]
    out["ok"] = rc == 0
    return out


def pytest_step(size: dict, dry: bool, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "tests/kernels", "tests/test_packing.py"]
    if dry:
        cmd.append("--collect-only")
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    (out_dir / "pytest.txt").write_text(" ".join(cmd) + "\n\n" + p.stdout + p.stderr)
    tail = (p.stdout + p.stderr).strip().splitlines()
    return {"ok": p.returncode == 0, "returncode": p.returncode, "summary": tail[-1] if tail else "", "dry": dry}


def engine_step(size: dict) -> dict:
    import numpy as np
    import torch

    from fastdash.config import load_config
    from fastdash.models import char_tokenizer, random_model
    from fastdash.rollout import make_engine
    from fastdash.rollout.base import SamplingParams

    e = size["engine"]
    d = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = random_model(e["preset"], vocab_size=size["model_vocab"], seed=0).to(d)
    tok = char_tokenizer()
    cfg = load_config(None, dict(model=f"random:{e['preset']}", engine="hf", hf_decode="compact",  # static: step 8
                                 max_completion_length=e["max_new"]))
    engine = make_engine(cfg, model, tok)
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
    return {"ok": exact and len(out) == rows, "seconds": sec, "tokens": sum(lengths), "tokens_per_s": sum(lengths) / sec,
            "longest": max(lengths), "mean_length": sum(lengths) / rows, "forced_lengths_honoured": exact,
            "engine": getattr(engine, "name", type(engine).__name__), "workload": e}


def training_step(size: dict) -> dict:
    """Two steps with the first kernel, one with the second, from the same seed: same samples, so
    the first step's loss and grad norm must agree between kernels up to bf16 rounding."""
    import gc
    import math

    import torch

    from fastdash.config import load_config
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer
    from workload import SYNTHETIC_REWARD, PromptFeed, paper_rows

    t = size["train"]
    runs = {}
    for kernel, steps in zip(t["kernels"], (2, 1)):
        cfg = load_config(None, dict(model=t["model"], kernel=kernel, reward=SYNTHETIC_REWARD, gradient_filtering=False,
                                     train_batch_size=t["batch"], generation_batch_size=t["batch"],
                                     micro_batch_size=t["micro"], max_prompt_length=t["prompt"],
                                     max_completion_length=t["completion"], length_control_mean=t["mean"],
                                     max_tokens_per_microbatch=t["budget"], learning_rate=1e-6, max_steps=2,
                                     num_train_problems=16, num_eval_problems=4, eval_batch_size=4, plots=False))
        rows = paper_rows(t["batch"] // 4 * steps, seed=0, mean_length=t["prompt"] / 2, max_length=t["prompt"],
                          mixed_fraction=0.5, group_size=4)
        trainer = Trainer(cfg, build_run(cfg, with_plan=False), prompt_source=PromptFeed(rows))
        t0 = time.perf_counter()
        runs[kernel] = [trainer.step() for _ in range(steps)]
        runs[kernel][0]["wall_s"] = time.perf_counter() - t0
        del trainer
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    a, b = (runs[k][0] for k in t["kernels"])
    finite = all(math.isfinite(m["loss"]) and math.isfinite(m["grad_norm"]) for ms in runs.values() for m in ms)
    loss_ok = abs(a["loss"] - b["loss"]) <= 2.0 ** -7 * max(abs(a["loss"]), abs(b["loss"]), 1e-3)
    norm_ok = abs(a["grad_norm"] - b["grad_norm"]) <= 2.0 ** -4 * max(a["grad_norm"], b["grad_norm"])
    keep = ("loss", "grad_norm", "microbatches", "tokens/loss", "reward/mean", "time/generate_s", "time/backward_s")
    return {"ok": finite and loss_ok and norm_ok, "finite": finite, "loss_agree": loss_ok, "grad_norm_agree": norm_ok,
            "steps": {k: [{x: m.get(x) for x in keep} for m in ms] for k, ms in runs.items()}}


def run_step(n: int, dry: bool, out_dir: Path) -> dict:
    import gpu_check_steps as s

    size = sizes(dry)
    fns = {0: lambda: environment(size), 1: lambda: pytest_step(size, dry, out_dir),
           2: lambda: s.kernel_correctness(size), 3: lambda: s.kernel_speed(size), 4: lambda: s.packed_attention(size),
           5: lambda: s.scheduler_plan(size), 6: lambda: engine_step(size), 7: lambda: training_step(size),
           8: lambda: s.static_decode(size)}
    return fns[n]()


# ------------------------------------------------------------------ orchestration --------------
def _one(n: int, dry: bool, out_dir: Path, log) -> dict:
    timeout = DRY_TIMEOUT_S if dry else TIMEOUT_S[n]
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result_path = Path(f.name)
    cmd = [sys.executable, __file__, "--run-step", str(n), "--result", str(result_path), "--out", str(out_dir)]
    cmd += ["--cpu-dry"] if dry else []
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
        rc, text = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, text = "timeout", f"timed out after {timeout} s\n{e.stdout or ''}{e.stderr or ''}"
    sec = time.perf_counter() - t0
    log.write(f"===== step {n} ({NAMES[n]}): rc {rc}, {sec:.1f} s\n{text[-6000:]}\n")
    if rc == "timeout":
        res = {"ok": None, "status": "timeout"}
    elif rc != 0 or not result_path.stat().st_size:
        res = {"ok": False, "status": "crashed", "error": text.strip().splitlines()[-1][:400] if text.strip() else ""}
    else:
        res = {**json.loads(result_path.read_text()), "status": "ran"}
    result_path.unlink(missing_ok=True)
    return {"step": n, "name": NAMES[n], "seconds": sec, **res}


def _device_dir(dry: bool) -> str:
    import torch

    from devices import device_slug

    date = datetime.now(timezone.utc).date().isoformat()
    if dry:
        return f"cpu-dry-{date}"
    return f"gpu-{device_slug('gpu') if torch.cuda.is_available() else 'none'}-{date}"


def _summary(results: list[dict], dry: bool, total: float) -> str:
    lines = [f"# gpu_check {'(CPU dry mode)' if dry else ''} {datetime.now(timezone.utc).isoformat(timespec='seconds')}",
             "", f"Total {total:.0f} s. ok: yes / NO / - (nothing to judge).", "",
             "| step | what | status | ok | seconds | key figures |", "|---|---|---|---|---|---|"]
    for r in results:
        ok = {True: "yes", False: "NO", None: "-"}[r.get("ok")]
        lines.append(f"| {r['step']} | {r['name']} | {r['status']} | {ok} | {r.get('seconds', 0):.0f} | {_key(r)} |")
    return "\n".join(lines) + "\n"


def _key(r: dict) -> str:
    """One line of the step's headline figures for the Markdown table."""
    n = r["step"]
    if r["status"] != "ran":
        return r.get("error", r["status"])[:200]
    if n == 0:
        return f"torch {r['torch']}, cuda {r['cuda']}, {r['device_name']}, attention {r['attention_backend']}"
    if n == 1:
        return r["summary"][:200]
    if n == 2:
        return (f"{r['cases']} cases, {len(r['failed'])} failed, worst dW {r['worst_dw']['err_dw_ulps']:.1f} bf16 ulps; "
                f"dW bit-identical: {r['dw_bit_identical_over_two_runs']}")
    if n == 3:
        ok = [x for x in r["rows"] if "ms" in x]
        return "; ".join(f"{x['backend']} N{x['N']} H{x['H']} {x['tflops_6nhv']:.0f} TF/s ({x['x_matmul']:.2f}x mm)"
                         for x in ok if x["backend"] in ("triton", "liger") or len(ok) < 4)[:400]
    if n == 4:
        return (f"attention ulps {({k: round(v['err_ulps'], 1) for k, v in r['attention'].items()})}, "
                f"others bit-identical {r['forward_hidden']['others_bit_identical']}")
    if n == 5:
        return (f"budget {r['max_tokens_per_microbatch']} tokens, measured/predicted peak "
                f"{r['measured_over_predicted']:.2f}, 2x budget: backoffs {r['twice_budget']['backoffs']}")
    if n == 6:
        return f"{r['tokens_per_s']:.0f} tokens/s, {r['tokens']} tokens in {r['seconds']:.1f} s"
    if n == 8:
        c, st = r["compact"], r["static"]
        return (f"static {st['tokens_per_s']:.0f} vs compact {c['tokens_per_s']:.0f} tokens/s "
                f"({r['static_over_compact']:.2f}x), first call {st['first_call_s']:.0f} s, "
                f"{st['graphs_first_call']} graphs for buckets {r['buckets_used']}")
    return f"losses {[s[0]['loss'] for s in r['steps'].values()]}, grad norms {[s[0]['grad_norm'] for s in r['steps'].values()]}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-dry", action="store_true", help="every step at tiny sizes on CPU")
    ap.add_argument("--steps", default="0,1,2,3,4,5,6,7,8")
    ap.add_argument("--out", default=None, help="output folder (default: benchmarks/results/gpu-<device>-<date>)")
    ap.add_argument("--run-step", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_step is not None:  # child: one step, its JSON to --result
        res = run_step(args.run_step, args.cpu_dry, Path(args.out))
        Path(args.result).write_text(json.dumps(res, default=str))
        return 0
    import torch

    if not args.cpu_dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; use --cpu-dry for the CPU dry run", file=sys.stderr)
        return 1
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="gpu-check-")) if args.cpu_dry
                                           else ROOT / "benchmarks" / "results" / _device_dir(False))
    out.mkdir(parents=True, exist_ok=True)
    results, t0 = [], time.perf_counter()
    with (out / "steps.log").open("w") as log:
        for n in (int(x) for x in args.steps.split(",") if x):
            if not args.cpu_dry and time.perf_counter() - t0 > BUDGET_S:  # dry: every step, for CI
                results.append({"step": n, "name": NAMES[n], "status": "skipped", "ok": None,
                                "error": f"skipped: past the {BUDGET_S} s budget"})
                continue
            results.append(_one(n, args.cpu_dry, out, log))
            r = results[-1]
            print(f"step {n} {NAMES[n]:38s} {r['status']:8s} ok={r.get('ok')} {r.get('seconds', 0):.0f}s", flush=True)
    total = time.perf_counter() - t0
    (out / "checks.json").write_text(json.dumps({"dry": args.cpu_dry, "total_s": total, "steps": results},
                                                indent=1, default=str))
    (out / "summary.md").write_text(_summary(results, args.cpu_dry, total))
    print(f"gpu_check: results in {out}")
    if any(r.get("ok") is False for r in results):
        return 1
    return 2 if any(r["status"] != "ran" for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
