"""Scale-out on CPU: 2 ranks x 1 thread (DDP, FSDP2, split placement: 1 trainer + 1 generation rank)
against 1 process x 2 threads, on the paper-shaped workload of harness.py (random Qwen2, 151,936 vocab, long-tailed forced lengths,
synthetic reward), fastdash's arm (packing, fused loss, planned budget).

    python benchmarks/bench_ranks.py [--steps 4]
    pytest benchmarks/bench_ranks.py -k ranks       # not part of the default benchmark run (~5 min)

Each arm runs in its own processes, one arm after the other (ranks are launched as torchrun
launches them: RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), every rank on the same prompt rows;
the first step is untimed. On 2 cores no speed-up is expected: the point is the overhead (gradient
all-reduce, FSDP's per-layer all-gathers and reduce-scatters, the padding of micro-batch counts)
and that the maths are those of one process (the rewards, kept counts and losses are reported
side by side). Then the weight sync of split placement at Qwen2.5-0.5B's shapes: the bucketed
broadcast against the file fallback. Results: benchmarks/results/ranks-<device>-<date>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]
RESULTS = Path(__file__).resolve().parent / "results"
# arm -> (ranks, overrides)
ARMS = {"1 rank x 2 threads": (1, dict(num_threads=2)),
        "ddp 2 ranks x 1 thread": (2, dict(num_threads=1, parallelism="ddp")),
        "fsdp 2 ranks x 1 thread": (2, dict(num_threads=1, parallelism="fsdp")),
        # split placement: rank 0 trains, rank 1 only generates (HF engine), weights broadcast per step
        "split 1 trainer + 1 generation rank x 1 thread": (2, dict(num_threads=1, generation_gpus=1))}
SYNC_MODEL, SYNC_REPEATS = "qwen2.5-0.5b", 3


def worker(arm: str, steps: int, out: Path) -> None:
    """One rank of one arm: `steps` steps (the first untimed); rank 0 writes the per-step record."""
    import harness
    from fastdash import distributed
    from fastdash.runtime import build_run
    from fastdash.trainer import Trainer
    from workload import PromptFeed, rows_for

    size = harness.SIZES["paper"]
    cfg = harness.make_config("fastdash", size, 0, max_steps=steps, dist_timeout_s=300, **ARMS[arm][1])
    distributed.setup(cfg)
    try:
        if not distributed.is_trainer():  # split placement's generation rank
            from fastdash.layout import resolve_layout
            from fastdash.rollout.split import serve
            from fastdash.runtime import build_server

            return serve(cfg, *build_server(cfg, resolve_layout(cfg)))
        rows = rows_for(size, 0, cfg.rollout_size * steps // size["num_generations"])
        run = build_run(cfg, with_plan=True)
        trainer = Trainer(cfg, run, prompt_source=PromptFeed(rows))
        record = []
        for _ in range(steps):
            distributed.barrier()
            t0 = time.perf_counter()
            m = trainer.step()
            record.append({"wall_s": time.perf_counter() - t0, "samples": cfg.train_batch_size,
                           **{k: m.get(k) for k in ("time/generate_s", "time/backward_s", "time/optimizer_s",
                                                    "time/sync_s", "reward/mean", "filter/kept_samples", "loss",
                                                    "microbatches", "fsdp/padding_microbatches")}})
        if distributed.is_main():
            out.write_text(json.dumps({"arm": arm, "world": distributed.world_size(), "steps": record}))
        if cfg.generation_gpus:
            from fastdash.rollout.split import finish

            finish()
    finally:
        distributed.teardown()


def sync_worker(out: Path) -> None:
    """Trainer -> engine weights of Qwen2.5-0.5B's shapes in bf16 (random), rank 0 -> rank 1: the split
    placement broadcast (gloo here, NCCL on GPUs) against the file fallback (safetensors in /dev/shm,
    written by rank 0, read by rank 1; vLLM's own reload after it is not counted)."""
    import torch
    import torch.distributed as dist
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2ForCausalLM

    from fastdash.models import preset_config
    from fastdash.rollout.split import broadcast_weights

    dist.init_process_group("gloo")
    r = dist.get_rank()
    with torch.device("meta"):
        shapes = [(n, p.shape) for n, p in Qwen2ForCausalLM(preset_config(SYNC_MODEL)).named_parameters()]
    named = [(n, torch.full(shape, float(r), dtype=torch.bfloat16)) for n, shape in shapes]
    where = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(out).parent
    box = [str(where / f"fastdash-bench-sync-{os.getpid()}.safetensors")]
    dist.broadcast_object_list(box, src=0)  # rank 0's name
    path, times = Path(box[0]), {"broadcast": [], "file": []}
    for _ in range(SYNC_REPEATS):
        dist.barrier()
        t0 = time.perf_counter()
        stats = broadcast_weights(named, src=0)
        dist.barrier()
        times["broadcast"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if r == 0:
            save_file(dict(named), str(path))
        dist.barrier()
        if r == 1:
            got = load_file(str(path))
            assert all(torch.equal(got[n], t) for n, t in named)  # rank 0's values arrived both ways
        dist.barrier()
        times["file"].append(time.perf_counter() - t0)
    if r == 0:
        path.unlink(missing_ok=True)
        out.write_text(json.dumps({"model": SYNC_MODEL, "bytes": stats["sync/bytes"], "buckets": stats["sync/buckets"],
                                   "seconds": times}))
    dist.destroy_process_group()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_arm(arm: str, steps: int, tmp: Path) -> dict:
    world, out = ARMS[arm][0], tmp / f"{arm.replace(' ', '_').replace('+', 'and')}.json"
    return _launch(world, ["--worker", arm, "--steps", str(steps), "--result", str(out)], out)


def _launch(world: int, args: list[str], out: Path) -> dict:
    port, argv = _port(), [sys.executable, __file__, *args]
    procs = [subprocess.Popen(argv,
                              env={**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
                                   "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(world)]
    logs = [p.communicate(timeout=1800)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError(f"{args} failed:\n" + "\n".join(t[-3000:] for t in logs))
    return json.loads(out.read_text())


def run(steps: int = 4, out_dir: Path = RESULTS) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        arms = [run_arm(arm, steps, Path(tmp)) for arm in ARMS]
        sync = _launch(2, ["--sync", "--result", str(Path(tmp) / "sync.json")], Path(tmp) / "sync.json")
    summary = {}
    for a in arms:
        timed = a["steps"][1:]
        summary[f"{a['arm']}/step_s_median"] = statistics.median(s["wall_s"] for s in timed)
        summary[f"{a['arm']}/samples_per_s"] = sum(s["samples"] for s in timed) / sum(s["wall_s"] for s in timed)
    base = summary[f"{arms[0]['arm']}/samples_per_s"]
    for a in arms[1:]:
        summary[f"{a['arm']}/vs_one_process"] = summary[f"{a['arm']}/samples_per_s"] / base
    for way, secs in sync["seconds"].items():
        summary[f"sync {way}/s_median"] = statistics.median(secs)
    from devices import cpu_name

    report = {"device": "cpu", "cpu": cpu_name(), "date": date.today().isoformat(), "cpu_count": os.cpu_count(),
              "load_avg_1m": os.getloadavg()[0], "steps": steps, "arms": arms, "sync": sync, "summary": summary}
    write(report, out_dir)
    return report


def write(report: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"ranks-{report['device']}-{report['date']}"
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2))
    s = report["summary"]
    lines = [f"# Trainer ranks on CPU, {report['device']}, {report['date']}", "",
             f"{report['cpu_count']} CPU cores ({report.get('cpu', '?')}), load {report['load_avg_1m']:.1f} at the end. "
             "Paper-shaped workload "
             f"(harness.py `paper`), fastdash arm, {report['steps']} steps per arm, the first untimed; arms one "
             "after the other.", "",
             "| arm | median step s | samples/s | vs 1 process |", "|---|---|---|---|"]
    for a in report["arms"]:
        ratio = s.get(f"{a['arm']}/vs_one_process")
        lines.append(f"| {a['arm']} | {s[a['arm'] + '/step_s_median']:.2f} | {s[a['arm'] + '/samples_per_s']:.2f} | "
                     f"{'1' if ratio is None else f'{ratio:.2f}'} |")
    sync = report["sync"]
    lines += ["", f"Weight sync, {sync['model']} shapes in bf16 ({sync['bytes'] / 2**20:.0f} MiB), rank 0 -> rank 1, "
              f"median of {len(sync['seconds']['broadcast'])}: split placement's bucketed broadcast (gloo, "
              f"{sync['buckets']} buckets) {s['sync broadcast/s_median']:.2f} s; the file fallback (safetensors "
              f"written to /dev/shm by rank 0, read by rank 1; an engine's reload not counted) "
              f"{s['sync file/s_median']:.2f} s."]
    lines += ["", "Per step (the same maths on every arm: rewards and kept counts equal, losses to rounding):", "",
              "| arm | step | wall s | generate s | backward s | optimizer s | sync s | reward | kept | loss | "
              "micro-batches | FSDP padding |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for a in report["arms"]:
        for i, st in enumerate(a["steps"]):
            cells = [f"{st['wall_s']:.2f}"] + [f"{st.get(k) or 0:.2f}" for k in
                                               ("time/generate_s", "time/backward_s", "time/optimizer_s", "time/sync_s")]
            cells += [f"{st['reward/mean']:.4f}", str(st["filter/kept_samples"]), f"{st['loss']:.6g}",
                      str(st["microbatches"]), str(st.get("fsdp/padding_microbatches") or "-")]
            lines.append(f"| {a['arm']} | {i + 1}{'' if i else ' (untimed)'} | " + " | ".join(cells) + " |")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


def test_ranks(request, benchmark):
    """Selected only with `-k ranks` (about 5 minutes on 2 cores)."""
    import harness

    harness.run_when_asked(request, benchmark, "ranks", run, "the trainer-ranks benchmark")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--sync", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.sync:
        sync_worker(a.result)
    elif a.worker:
        worker(a.worker, a.steps, a.result)
    else:
        print(json.dumps(run(a.steps, a.out)["summary"], indent=2))
