"""Cost model of the fused lm_head -> log-prob -> loss forward + backward, per design and shape.

Counts FLOPs, HBM bytes, SM <-> L2 bytes and atomics from the tiling, and turns them into a time
under stated assumptions (GPUS, EFFICIENCY): max(compute, HBM, L2) + atomics. It is a model to
compare GPU measurements against (benchmarks/bench_kernels.py prints both), not a measurement.

    python -m fastdash_kernels.cost_model          # the table in COST_MODEL.md
    python -m fastdash_kernels.cost_model --launch # programs per kernel at the recipe shapes (needs triton)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Dense bf16 peak, HBM bandwidth; L2 -> SM bandwidth and atomic rate are assumptions to calibrate
# against the cuBLAS floor measured in the same run.
GPUS = {
    "H100": dict(tflops=989.0, hbm_tbs=3.35, l2_tbs=7.0, sms=132),
    "H200": dict(tflops=989.0, hbm_tbs=4.8, l2_tbs=7.0, sms=132),
}
EFFICIENCY = dict(tensor=0.7, hbm=0.85)  # sustained fractions for Triton-tiled GEMM work / streaming
ATOMIC_BYTES_PER_S_FRACTION = 0.25  # fp32 red.add at a quarter of the L2 streaming rate (assumption)
SCRATCH_BYTES = 512 * 2**20


@dataclass
class Cost:
    design: str
    flops: float
    hbm: float  # bytes
    l2: float  # bytes between SMs and L2
    atomics: float  # fp32 atomic adds
    extra_mem: float  # bytes beyond inputs and gradients

    def time_ms(self, gpu: str) -> float:
        g = GPUS[gpu]
        compute = self.flops / (g["tflops"] * 1e12 * EFFICIENCY["tensor"])
        hbm = self.hbm / (g["hbm_tbs"] * 1e12 * EFFICIENCY["hbm"])
        l2 = self.l2 / (g["l2_tbs"] * 1e12)
        atom = self.atomics * 4 / (g["l2_tbs"] * 1e12 * ATOMIC_BYTES_PER_S_FRACTION)
        return 1e3 * (max(compute, hbm, l2) + atom)


def floor(n, h, v, b=2) -> Cost:
    """6NHV at full peak: the issue's bar (measured as cuBLAS GEMMs of the same shapes)."""
    return Cost("6NHV floor", 6 * n * h * v, b * 2 * (n * h + v * h), 0, 0, 0)


def old_triton(n, h, v, b=2) -> Cost:
    """Before: 64 x 128 tiles, 8NHV, fp32 atomics into dX and dW at every BLOCK_K = 64 step."""
    tiles = math.ceil(n / 64) * math.ceil(v / 128) * math.ceil(h / 64)
    atomics = tiles * (64 * 64 + 128 * 64)
    l2 = 2 * n * v * h * b * (1 / 128 + 1 / 64) + atomics * 4  # fwd + recompute operand loads, atomics
    hbm = b * (n * h + v * h) * 2 + 4 * n * h * math.ceil(v / 128)  # dX (59 MB fp32 > L2) re-streamed
    return Cost("old: per-tile atomics", 8 * n * h * v, hbm, l2, atomics, 4 * (n * h + v * h))


def new_triton(n, h, v, b=2, skip=0.0, tm=128, tv=128, bd=128, sms=132) -> Cost:
    """This design: 2-D forward, dZ scratch per vocabulary chunk, owned dX / dW tiles, no atomics.

    skip: fraction of (token, vocabulary) tiles dropped by filtering; they cost no recompute and no
    dX / dW work (so the work can fall below 6NHV: the floor assumes every tile is needed)."""
    keep = 1.0 - skip
    vc = max(tv, SCRATCH_BYTES // (n * b) // tv * tv)
    chunks = math.ceil(v / vc)
    flops = 2 * n * h * v + 6 * n * h * v * keep
    per_pass_l2 = n * v * h * b * (1 / tm + 1 / tv)  # operand tiles of one z / GEMM pass
    gemm_l2 = n * v * h * b * (1 / bd + 1 / tv)
    l2 = per_pass_l2 * (1 + keep) + 2 * gemm_l2 * keep
    waves = max(1, math.ceil(n / tm) / sms)
    hbm = (b * v * h * waves * (1 + 2 * keep)  # W re-streamed once per wave of token blocks
           + 3 * n * v * b * keep  # dZ written, read by the dX and dW GEMMs
           + 8 * n * h * (chunks - 1) + b * (n * h + v * h))  # dX fp32 read-modify-write per extra chunk
    extra = min(n * vc * b, n * v * b) + (4 * n * h if chunks > 1 else 0) + 4 * n * math.ceil(v / tv) * (skip > 0)
    return Cost("new: owned tiles" + (f", {skip:.0%} skipped" if skip else ""), flops, hbm, l2, 0, extra)


def single_triton(n, h, v, b=2, tm=128, tv=128, bd=128) -> Cost:
    """The single pass (triton_single.py): token chunks of C, fp32 logits stored by the forward and
    turned into dZ in place, the owned-tile GEMMs; 6NHV, ~14 B of HBM traffic per logit (fp32 z written
    and read, dZ written and read by both GEMMs), W streamed three times per chunk and the fp32 dW
    read-modify-written per extra chunk."""
    c = max(tm, SCRATCH_BYTES // (v * (4 + b)) // tm * tm)
    chunks = math.ceil(n / c)
    l2 = n * v * h * b * (1 / tm + 1 / tv) + 2 * n * v * h * b * (1 / bd + 1 / tv)
    hbm = (4 + 4 + b + 2 * b) * n * v + chunks * 3 * b * v * h + (chunks - 1) * 8 * v * h + b * (n * h + v * h)
    extra = min(c, n) * v * (4 + b) + (4 * v * h if chunks > 1 else 0)
    return Cost("single pass (K = 1 / token-level)", 6 * n * h * v, hbm, l2, 0, extra)


def single_pass_pays(n, h, v, b=2, gpu="H100") -> bool:
    """The model's pick for the grad-in-forward path: the single pass when predicted faster than
    forward + recompute (new_triton). Unmeasured on a GPU: bench_kernels prints both designs."""
    return single_triton(n, h, v, b).time_ms(gpu) < new_triton(n, h, v, b).time_ms(gpu)


def torch_chunked(n, h, v, b=2) -> Cost:
    """kernel=torch on CUDA: 6NHV in cuBLAS, fp32 [C, V] logits with ~50 B of elementwise traffic each
    (GEMM write, max / logsumexp / gather reads, three in-place passes, bf16 cast, two GEMM reads),
    and the fp32 dW accumulated once per chunk."""
    c = max(1, 2**27 // v)
    chunks = math.ceil(n / c)
    hbm = 50 * n * v + chunks * 12 * v * h + b * 2 * (n * h + v * h)
    return Cost("torch: chunked logits", 6 * n * h * v, hbm, 0, 0, 4 * c * v + 4 * v * h)


def designs(n, h, v):
    return [floor(n, h, v), old_triton(n, h, v), new_triton(n, h, v), new_triton(n, h, v, skip=0.9),
            single_triton(n, h, v), torch_chunked(n, h, v)]


def table(shapes=((4096, 896), (16384, 896), (4096, 1536), (16384, 1536), (4096, 2048), (16384, 2048)),
          v=151936) -> str:
    lines = ["| N | H | design | TFLOP | HBM GB | L2 GB | atomics | extra GB | H100 ms | H200 ms | x floor (H100) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for n, h in shapes:
        base = floor(n, h, v).time_ms("H100")
        for c in designs(n, h, v):
            t100, t200 = c.time_ms("H100"), c.time_ms("H200")
            if c.design.startswith("6NHV"):  # the floor is at full peak, not at EFFICIENCY
                t100 = c.flops / (GPUS["H100"]["tflops"] * 1e9)
                t200 = c.flops / (GPUS["H200"]["tflops"] * 1e9)
                base = t100
            lines.append(f"| {n} | {h} | {c.design} | {c.flops / 1e12:.1f} | {c.hbm / 1e9:.1f} | {c.l2 / 1e9:.0f} | "
                         f"{c.atomics:.2g} | {c.extra_mem / 1e9:.2f} | {t100:.1f} | {t200:.1f} | {t100 / base:.2f} |")
    return "\n".join(lines)


RECIPE_SHAPES = [(n, h) for n in (1024, 4096, 16384, 131072, 500_000) for h in (896, 1536, 2048)]


def launch_programs(n, h, v=151936, sms=132, itemsize=2) -> dict:
    """Programs each kernel launches at this shape, per design, from the launchers' own sizing
    (fwd_splits, dx_split, dw_split, the chunk sizes) at BLOCK_D = 128 (the first GEMM config; 64 doubles
    and 256 halves the dX / dW counts). The smallest chunk counts (the single pass's last token chunk,
    the recompute's last vocabulary chunk). Needs triton; without TRITON_INTERPRET for the GPU's tiles."""
    import triton

    from .triton_backward import chunk_vocab, dw_split, dx_split
    from .triton_logprob import fwd_splits
    from .triton_single import chunk_tokens
    from .triton_tiles import TILE_M, TILE_V

    cd, hb = triton.cdiv, triton.cdiv(h, 128)
    c = chunk_tokens(n, v, itemsize)
    n_vt = cd(v, TILE_V)
    single = {}
    for nc in {c, n - (n - 1) // c * c}:  # a full chunk and the last one
        mt = cd(nc, TILE_M)
        progs = dict(fwd=mt * fwd_splits(nc, v, sms), dz=mt * n_vt, dx=hb * mt * dx_split(mt, n_vt, h, sms),
                     dw=hb * n_vt)
        single = {k: min(single.get(k, p), p) for k, p in progs.items()}
    vc, mt = chunk_vocab(n, v, itemsize), cd(n, TILE_M)
    recompute = {}
    for rows in {min(vc, v), v - (v - 1) // vc * vc}:
        tiles = cd(rows, TILE_V)
        progs = dict(fwd=mt * fwd_splits(n, v, sms), dz=mt * tiles, dx=hb * mt * dx_split(mt, tiles, h, sms),
                     dw=hb * tiles * dw_split(mt, rows, h, sms))
        recompute = {k: min(recompute.get(k, p), p) for k, p in progs.items()}
    return {"single": single, "recompute": recompute}


def launch_table(sms=132) -> str:
    lines = [f"| N | H | single pass: fwd / dZ / dX / dW programs | recompute: fwd / dZ / dX / dW | "
             f"fewest waves ({sms} SMs) |", "|---|---|---|---|---|"]
    for n, h in RECIPE_SHAPES:
        p = launch_programs(n, h, sms=sms)
        fewest = min(min(d.values()) for d in p.values())
        lines.append(f"| {n} | {h} | {' / '.join(str(x) for x in p['single'].values())} | "
                     f"{' / '.join(str(x) for x in p['recompute'].values())} | {fewest / sms:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import sys

    print(launch_table() if "--launch" in sys.argv else table())
