"""`python -m fastdash.train [--config recipes/NAME.yaml] [key=value ...] [--dry-run]`

With no arguments: RL (DASH recipe) on the shipped tiny base model and the built-in arithmetic task,
on CPU in a few minutes, ending with a before/after table of held-out accuracy.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from fastdash import distributed
from fastdash.config import Config, load_config, save_config

log = logging.getLogger("fastdash")


def _default(f: dataclasses.Field) -> str:
    return str(f.default_factory() if f.default is dataclasses.MISSING else f.default)


def parse_args(argv):
    fields = dataclasses.fields(Config)
    width = max(len(f"{f.name} = {_default(f)}") for f in fields)
    options = "\n".join(f"  {f'{f.name} = {_default(f)}':<{width}}  {f.metadata.get('help', '')}" for f in fields)
    ap = argparse.ArgumentParser(
        prog="python -m fastdash.train", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=__doc__, epilog=f"options (key=value; default, then what it does):\n{options}")
    ap.add_argument("--config", help="YAML recipe (e.g. recipes/dash-qwen2.5-0.5b.yaml)")
    ap.add_argument("--dry-run", action="store_true", help="print the resolved config and memory plan, then exit")
    ap.add_argument("overrides", nargs="*", help="key=value overrides, applied after the recipe")
    return ap.parse_args(argv)


def make_output_dir(cfg: Config) -> Path:
    out = Path(cfg.output_dir or f"runs/{datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def print_table(title: str, rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    print(f"\n{title}\n" + "-" * (width + 24))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


class TrainingInterrupted(Exception):
    """SIGINT / SIGTERM: the current step finished, a checkpoint was saved, the run stopped."""

    def __init__(self, signum: int, step: int, path: Path):
        self.signum, self.step, self.path = signum, step, path
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved to {path}. "
                         f"Continue with: python -m fastdash.train ... output_dir={path.parent} resume=auto")


def _install_stop_handlers(stop: dict) -> dict:
    """SIGINT / SIGTERM set `stop['signum']`; the loop saves after the current step and exits. A second
    signal stops at once (KeyboardInterrupt, no save). Returns the previous handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}  # signal handlers can only be set from the main thread

    def handler(signum, frame):
        if stop["signum"] is not None:
            raise KeyboardInterrupt
        stop["signum"] = signum
        log.warning("received %s: finishing the current step, then saving a checkpoint and exiting "
                    "(send it again to stop at once without saving)", signal.Signals(signum).name)

    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def run_training(cfg: Config, out: Path) -> dict:
    from fastdash.layout import resolve_layout

    stop = {"signum": None}
    layout = resolve_layout(cfg)  # where and how this rank runs, every auto resolved; bad worlds fail here
    distributed.setup(cfg)  # no-op for one process; torchrun's ranks join one group here
    previous = _install_stop_handlers(stop)
    try:
        if not distributed.is_trainer():  # split placement: this rank only generates
            from fastdash.rollout.split import serve
            from fastdash.runtime import build_server

            return serve(cfg, *build_server(cfg, layout))
        result = _run_training(cfg, out, stop, layout)
        if cfg.generation_gpus:
            from fastdash.rollout.split import finish

            finish()  # the generation ranks stop; every rank waits for all (rank 0 may host the store)
        return result
    except Exception as e:
        if distributed.joined():  # name the dead peer when a collective failed, leave our cause to the others
            distributed.record_failure(e)
            why = distributed.explain_failure(e) if distributed.collective_error(e) else None
            if why:
                raise distributed.PeerFailure(f"rank {distributed.rank()}: {why} ({type(e).__name__}: "
                                              f"{str(e).splitlines()[0][:200] if str(e) else ''})") from e
        raise
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        if cfg.generation_gpus:
            from fastdash.rollout.split import close_clients

            close_clients()  # after a failure too (best effort)
        distributed.teardown()


def _run_training(cfg: Config, out: Path, stop: dict, layout) -> dict:
    from tqdm.auto import tqdm

    from fastdash.checkpoint import check_output_dir, resume_if_asked, save_checkpoint, save_final
    from fastdash.evaluate import evaluate, pass_keys
    from fastdash.metrics import PHASES, MetricsLog, plot_run
    from fastdash.rollout.base import stop_engine
    from fastdash.runtime import build_run
    from fastdash.tracking import Tracking, require_trackers
    from fastdash.trainer import Trainer

    t_start = time.perf_counter()
    main = distributed.is_main()  # rank 0 logs, evaluates, plots and writes the final model
    if main:
        require_trackers(cfg.report_to)  # a missing tracker fails now, not after the model loaded
    distributed.main_first(lambda: check_output_dir(cfg, out))
    run = build_run(cfg, layout=layout)
    if main:
        save_config(cfg, out / "config.yaml")
        run.layout.save(out)  # layout.json: device, dtype, engine, parallelism, ranks (after any fallback)
        if run.plan is not None:  # none when parallelism=auto found no room for a replica (FSDP then)
            run.plan.log_and_save(str(out))  # memory_plan.json + the table (and any warning) in the log
    trainer = Trainer(cfg, run)
    resumed_from = resume_if_asked(cfg, run, trainer, out)
    metrics_log = MetricsLog(out / "metrics.jsonl", start_step=run.state.step) if main else distributed.NullLog()
    tracking = Tracking(cfg, out, start_step=run.state.step, enabled=main)  # report_to, log_completions
    evals_path = out / "evals.jsonl"
    evals = []
    if resumed_from and evals_path.exists():  # keep evaluations up to the checkpoint; later ones (and the
        step = run.state.step                    # final one, redone below) would appear twice
        evals = [e for e in map(json.loads, evals_path.read_text().splitlines())
                 if e["step"] < step or (e["step"] == step < run.total_steps)]
    if main:
        evals_path.write_text("".join(json.dumps(e) + "\n" for e in evals))

    def record_eval(step):
        if not main:  # the others wait at their next collective (dist_timeout_s > an evaluation)
            return {}
        e = evaluate(run, step)
        evals.append(e)
        tracking.log_eval(e)
        with evals_path.open("a") as f:
            f.write(json.dumps(e) + "\n")
        return e

    t_eval = time.perf_counter()
    if resumed_from:  # the step-0 evaluation of the original run (none if its evals.jsonl is gone)
        before = evals[0] if evals and evals[0]["step"] == 0 else {}
    else:
        before = record_eval(0)
    eval_s = time.perf_counter() - t_eval
    bar = tqdm(total=run.total_steps, initial=run.state.step, desc="DASH", unit="step", dynamic_ncols=True,
               disable=not main)
    t_train = time.perf_counter()
    saved_step = run.state.step if resumed_from else None

    def save_now():
        nonlocal saved_step
        saved_step = run.state.step
        return save_checkpoint(cfg, run, trainer, out)

    try:
        while run.state.step < run.total_steps:
            if distributed.active():  # every rank stops after the same step, however the signals arrived
                signums = distributed.all_gather_objects(stop["signum"])
                stop["signum"] = next((s for s in signums if s is not None), None)
            if stop["signum"] is not None:
                path = out / f"checkpoint-{run.state.step}" if saved_step == run.state.step else save_now()
                raise TrainingInterrupted(stop["signum"], run.state.step, path)
            t0 = time.perf_counter()
            try:
                row = trainer.step()
            except Exception:
                # Save the weights after the last completed step (no optimizer step of the failed one
                # reached them), so the error loses no training; the failed step's rollout is dropped.
                if saved_step != run.state.step and run.state.step > 0 and not distributed.active():
                    try:
                        log.error("step %d failed; saving the state after step %d", run.state.step + 1, run.state.step)
                        save_now()
                    except Exception:  # noqa: BLE001 - never hide the original error behind a save error
                        log.exception("could not save a checkpoint after the failure")
                raise
            row["time/step_s"] = time.perf_counter() - t0
            row["samples"] = run.state.samples
            metrics_log.write(row)
            tracking.log_step(row, trainer.last_batch.samples, run.decode)
            bar.update(1)
            bar.set_postfix(reward=f"{row.get('reward/mean', 0):.3f}", kept=f"{row['filter/kept_fraction']:.2f}")
            if cfg.eval_steps and run.state.step % cfg.eval_steps == 0 and run.state.step < run.total_steps:
                t_eval = time.perf_counter()
                record_eval(run.state.step)
                eval_s += time.perf_counter() - t_eval
            if cfg.save_steps and run.state.step % cfg.save_steps == 0:
                save_now()
    except BaseException:
        tracking.close()  # flush what was logged (TensorBoard buffers events for up to two minutes)
        raise
    finally:
        trainer.close()  # stops the async generation worker, if one runs
    bar.close()
    train_s = time.perf_counter() - t_train
    t_eval = time.perf_counter()
    after = record_eval(run.state.step)
    eval_s += time.perf_counter() - t_eval
    tracking.close()
    save_final(cfg, run, trainer, out, checkpoint=saved_step != run.state.step)
    stop_engine(run.engine)  # now, not at exit: an in-process vLLM built its groups in our
    # torch.distributed world, and tears them down with it
    if not main:
        return {}
    totals = {f"time/{p}_s": sum(r.get(f"time/{p}_s", 0.0) for r in metrics_log.rows) for p in PHASES}
    summary = {
        "eval/accuracy_before": before.get("eval/accuracy_greedy"),
        "eval/accuracy_after": after["eval/accuracy_greedy"],
        "eval/accuracy_sampled_before": before.get("eval/accuracy_sampled"),
        "eval/accuracy_sampled_after": after.get("eval/accuracy_sampled"),
        **{f"{key}_{when}": e.get(key) for key in pass_keys(cfg)
           for when, e in (("before", before), ("after", after))},
        "eval/num_eval_samples": cfg.num_eval_samples if cfg.eval_sampled else None,
        "eval/problems": len(run.eval_problems), "samples": run.state.samples, "optimizer_steps": run.state.step,
        "time/total_s": time.perf_counter() - t_start, "time/train_s": train_s, "time/eval_s": eval_s, **totals,
        "counters": run.state.counters, "resumed_from": str(resumed_from) if resumed_from else None,
        "world_size": run.layout.world_size, "trainer_ranks": list(run.layout.trainer_ranks),
        "generation_ranks": list(run.layout.generation_ranks), "parallelism": run.layout.parallelism,
        "engine": run.layout.engine,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.plots:
        plot_run(metrics_log.rows, evals, out)
    return summary


def report(summary: dict, out: Path) -> None:
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [("held-out accuracy, greedy", f"{fmt(summary['eval/accuracy_before'])} -> {fmt(summary['eval/accuracy_after'])}"),
            *[(f"held-out {key[5:]}, {summary['eval/num_eval_samples']} samples per problem",
               f"{fmt(summary[key + '_before'])} -> {fmt(summary[key + '_after'])}")
              for key in (k[:-7] for k in summary if k.startswith("eval/pass@") and k.endswith("_before"))
              if summary["eval/num_eval_samples"]],
            ("held-out problems", str(summary["eval/problems"])),
            ("samples seen", str(summary["samples"])), ("optimizer steps", str(summary["optimizer_steps"]))]
    rows += [(k.replace("time/", "time ").replace("_s", " (s)"), f"{v:.1f}") for k, v in summary.items()
             if k.startswith("time/")]
    print_table(f"fastdash run finished: {out}", rows)


def dry_run_plan(cfg: Config, layout=None):
    """(model, memory plan, layout) as a real run builds them (`runtime.build_run`): the fp32 master model
    on the layout's device, planned for the layout's engine and compute dtype (so the plan counts fp32
    weights and grads and the engine's compute-dtype copy); parallelism=auto may turn to FSDP (no plan)."""
    from fastdash.layout import resolve_layout
    from fastdash.runtime import load_policy, plan_run

    layout = resolve_layout(cfg) if layout is None else layout
    model, _ = load_policy(cfg, layout)
    plan, layout = plan_run(cfg, model, layout)
    return model, plan, layout


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    try:
        cfg = load_config(args.config, args.overrides)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.dry_run:
        print(json.dumps(cfg.to_dict(), indent=2))
        try:
            model, plan, layout = dry_run_plan(cfg)
        except (ValueError, RuntimeError) as e:  # a world, an engine or a model (check_head) refused
            print(f"error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"layout": layout.to_dict()}, indent=2))
        print(layout.describe(cfg, sum(p.numel() for p in model.parameters())))
        print(plan.to_table() if plan is not None else "memory plan: none (FSDP: a full replica does not fit)")
        return 0
    out = make_output_dir(cfg)
    try:
        summary = run_training(cfg, out)
    except TrainingInterrupted as e:
        print(f"\nfastdash: {e}", file=sys.stderr)
        return 128 + e.signum
    except ValueError as e:  # bad data, checkpoint or config found while setting up: a message, no traceback
        print(f"error: {e}", file=sys.stderr)
        return 2
    except distributed.PeerFailure as e:  # another rank died: say which, no traceback of our own
        print(f"error: {e}", file=sys.stderr)
        return 1
    if summary:  # rank 0's
        report(summary, out)
    return 0


def end_rank_process(rc: int) -> None:
    """A rank of a multi-process run exits here, after its atexit handlers, without interpreter finalization.

    Once DDP or FSDP has used it, PyTorch keeps the gloo / NCCL process group (and its worker threads)
    alive past destroy_process_group; freeing it while the interpreter finalizes races the GIL's
    teardown and can abort a rank that finished its work ("terminate called without an active
    exception", SIGABRT: once in CI on 2026-12-02, FSDP resume test). The run's own cleanup has
    already happened (teardown in run_training); the atexit handlers still run, here, while
    everything is alive."""
    import atexit
    import os

    atexit._run_exitfuncs()  # what a normal exit runs first (logging's flush among them)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


def cli() -> None:
    """`python -m fastdash.train` and the `fastdash-train` command."""
    code = main()
    if distributed.planned_world() > 1:  # torchrun / a launcher's rank
        end_rank_process(code)
    raise SystemExit(code)


if __name__ == "__main__":
    cli()
