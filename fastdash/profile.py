"""Profile fastdash's GPU kernels and print a roofline table.

    python -m fastdash.profile kernels                       # Qwen2.5-0.5B head, N = 16k, all backends
    python -m fastdash.profile kernels --h 1536 --n 4096 --backends triton torch

Needs a local CUDA GPU; without one it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

NCU_HELP = """
Under Nsight Compute (per-kernel counters: achieved FLOP/s, DRAM bytes, occupancy, roofline):

  ncu --set full --target-processes all -k regex:_logprob_ -c 4 -o fastdash_kernels \\
      python -m fastdash.profile kernels --backends triton --iters 1
  ncu-ui fastdash_kernels.ncu-rep        # or: ncu --import fastdash_kernels.ncu-rep --page details

-k regex:_logprob_ keeps only the Triton forward/backward kernels (_logprob_fwd_kernel,
_logprob_bwd_kernel); -c caps how many launches are profiled, since ncu replays each one many times.
For a timeline instead: nsys profile -t cuda,nvtx python -m fastdash.profile kernels.
"""

PEAK = {"H100": (989.0, 3350.0), "H200": (989.0, 4800.0), "A100": (312.0, 2039.0), "L4": (121.0, 300.0)}


def _parse(argv):
    p = argparse.ArgumentParser(
        prog="python -m fastdash.profile", description=__doc__, epilog=NCU_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = p.add_subparsers(dest="what", required=True)
    k = sub.add_parser("kernels", help="fused lm_head -> log-prob -> policy loss, fwd + bwd", epilog=NCU_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    k.add_argument("--n", type=int, default=16384, help="completion tokens (default 16384)")
    k.add_argument("--h", type=int, default=896, help="hidden size (default 896, Qwen2.5-0.5B)")
    k.add_argument("--v", type=int, default=151936, help="vocab size (default 151936)")
    k.add_argument("--backends", nargs="+", default=["triton", "torch", "liger"])
    k.add_argument("--iters", type=int, default=5)
    k.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak; default from the GPU name")
    k.add_argument("--peak-gbs", type=float, default=None, help="DRAM bandwidth; default from the GPU name")
    return p.parse_args(argv)


def profile_kernels(args) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from fastdash_kernels import fused_policy_loss

    name = torch.cuda.get_device_name()
    peak_tf, peak_gbs = next((v for k, v in PEAK.items() if k in name), (None, None))
    peak_tf, peak_gbs = args.peak_tflops or peak_tf, args.peak_gbs or peak_gbs
    n, h, v = args.n, args.h, args.v
    x = (torch.randn(n, h, device="cuda") * 0.5).bfloat16().requires_grad_(True)
    w = (torch.randn(v, h, device="cuda") * h**-0.5).bfloat16().requires_grad_(True)
    y = torch.randint(0, v, (n,), device="cuda")
    cu = torch.arange(0, n + 1, 512, device="cuda", dtype=torch.int32)
    if cu[-1] != n:
        cu = torch.cat([cu, torch.tensor([n], device="cuda", dtype=torch.int32)])
    adv = torch.randn(cu.numel() - 1, device="cuda")
    old = torch.full((n,), -3.0, device="cuda")
    tok_w = torch.full((n,), 1.0 / n, device="cuda")  # dapo: a token sum over the normaliser n
    # Minimal DRAM traffic of one fwd + bwd: read X and W, write dX and dW (bf16 in, fp32 grads accumulated).
    min_bytes = 2 * (n * h + v * h) + 4 * (n * h + v * h)
    print(f"{name}: N={n} H={h} V={v} bf16; 6NHV = {6 * n * h * v / 1e12:.2f} TFLOP"
          + (f", floor at peak {6 * n * h * v / peak_tf / 1e9:.2f} ms" if peak_tf else ""))
    print(f"{'backend':<10} {'ms':>9} {'TFLOP/s':>9} {'% peak':>7} {'GB/s':>8} {'peak MiB':>9}  top kernels (ms)")
    for backend in args.backends:
        def step():
            x.grad = w.grad = None
            out = fused_policy_loss(x, w, y, cu, adv, old_logps=old, token_weights=tok_w,
                                    backend=backend)
            out.loss.backward()
        try:
            step()
        except ImportError as e:
            print(f"{backend:<10} skipped: {e}")
            continue
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(args.iters):
                step()
            torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - base) / 2**20
        events = [e for e in prof.key_averages() if e.device_time_total > 0]
        total_ms = sum(e.device_time_total for e in events) / 1e3 / args.iters
        tf = 6 * n * h * v / (total_ms / 1e3) / 1e12
        gbs = min_bytes / (total_ms / 1e3) / 1e9
        top = sorted(events, key=lambda e: -e.device_time_total)[:3]
        tops = ", ".join(f"{e.key[:28]} {e.device_time_total / 1e3 / args.iters:.2f}" for e in top)
        pct = f"{100 * tf / peak_tf:6.1f}%" if peak_tf else "     ?"
        print(f"{backend:<10} {total_ms:9.2f} {tf:9.1f} {pct:>7} {gbs:8.0f} {extra:9.0f}  {tops}")
    print("TFLOP/s and % peak count the 6NHV floor; GB/s counts the minimal traffic (X, W in; dX, dW out).")
    return 0


def main(argv=None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    import torch

    if not torch.cuda.is_available():
        print("fastdash.profile: no CUDA GPU visible (torch.cuda.is_available() is False). "
              "Run this on a machine with an NVIDIA GPU; for CPU timings use "
              "`pytest benchmarks/bench_kernels.py --benchmark-only`.", file=sys.stderr)
        return 2
    if args.what == "kernels":
        return profile_kernels(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
