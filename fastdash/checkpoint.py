"""Atomic checkpoints and exact resume.

A checkpoint is a directory `checkpoint-<step>/` holding the model (safetensors, loadable with
`from_pretrained`), the tokenizer, the config, and `trainer_state.pt`: optimizer and LR-scheduler
state, the `TrainState` (step, data position, counters), RNG states (python, numpy, torch, CUDA),
the token budget and any rollout samples not yet trained on (Mini / Multi reuse a rollout across
steps; with async generation the rollouts in flight are awaited and saved as step batches). It is
written under a temporary name and renamed into place only once complete (with a `COMPLETE` marker
inside), so a kill during a save never leaves a half checkpoint that looks whole.
`trainer_state.pt` is a pickle: load only checkpoints you (or your runs) wrote.

LoRA (lora_r > 0): the model files are a peft adapter directory (the fp32 adapters; the frozen base is
`model`'s own files), and `final/` is one too (`PeftModel.from_pretrained`), plus `final/merged/` with
merge_lora. docs/lora.md.

Several ranks (DDP: every rank holds the same full fp32 weights and optimizer state) write one
checkpoint collectively: rank 0 writes the weights and states above plus `rank_states.pt`, every
rank's RNG, token budget and rollout buffer (its shares of the step batches not yet trained on),
gathered to it. The same world size resumes each rank exactly; another world size merges the
buffers' step batches and re-splits them over the new ranks (and says so).

`checkpoint_format=sharded` (the default under FSDP2) writes the weights and optimizer state with
torch.distributed.checkpoint instead: every rank its own shards into `dcp/` (no full copy on any
rank), loadable at any world size, sharded or not. The rest of the checkpoint is as above.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from fastdash import distributed, fsdp
from fastdash.config import save_config
from fastdash.lora import adapter_state, is_lora, load_adapter_state, save_adapters, save_merged

log = logging.getLogger("fastdash")
MARKER = "COMPLETE"
FORMAT = 1
STATE_KEYS = ("optimizer", "lr_scheduler", "state", "rng", "config")
# Changing any of these between a checkpoint and its resume would change what the run computes
# (which problems exist and in what order, the shapes of a step, the loss). learning_rate may change.
MUST_MATCH = ("model", "task", "dataset", "dataset_split", "prompt_template", "chat_template", "system_prompt",
              "num_generations",
              "generation_batch_size", "train_batch_size", "num_iterations", "loss_type", "seed", "shuffle",
              "num_train_problems", "max_prompt_length", "max_completion_length",
              "lora_r", "lora_alpha", "lora_target_modules")


class UnreadableCheckpoint(ValueError):
    """A checkpoint whose files cannot be read (truncated, corrupt, from another program)."""


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    """Delete a directory so that no kill leaves a half-deleted one that still looks complete:
    rename it to a hidden name first (atomic), then delete."""
    doomed = path.with_name(f".{path.name}.del-{os.getpid()}")
    path.rename(doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def _begin(final: Path) -> Path:
    """The hidden temporary directory a checkpoint is written into before its rename."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def _write_atomically(final: Path, write, tmp: Path | None = None) -> Path:
    tmp = tmp or _begin(final)
    write(tmp)
    for f in tmp.rglob("*"):  # data on disk before the rename makes it visible
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    (tmp / MARKER).write_text("ok\n")
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        # A directory cannot be replaced in one rename; a kill between these two renames leaves
        # only `old`, which `recover` renames back on the next start.
        final.rename(old)
    tmp.rename(final)
    _fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)
    return final


def recover(out: Path) -> None:
    """Tidy what a killed save left in `out`: put back a complete checkpoint that a kill caught
    between the two renames of a replacement, and delete temporary / half-deleted directories."""
    if not out.is_dir():
        return
    for p in sorted(out.glob(".*.old-*")):
        name = p.name[1:].rsplit(".old-", 1)[0]
        if (p / MARKER).exists() and not (out / name).exists():
            p.rename(out / name)
            log.warning("restored %s (a save was killed while replacing it)", out / name)
    for pattern in (".*.tmp-*", ".*.old-*", ".*.del-*"):
        for p in out.glob(pattern):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)


def save_checkpoint(cfg, run, trainer, out: Path) -> Path:
    step = run.state.step
    trainer.drain()  # async generation: in-flight rollouts become buffered step batches, saved below
    ranks = distributed.gather_objects({"rng": _rng_state(), "buffer": trainer.buffer, "budget": trainer.budget})
    final, tmp, weights, optimizer = out / f"checkpoint-{step}", None, None, None
    if sharded(cfg, run):  # every rank writes its own shards into rank 0's temporary directory
        tmp = Path(distributed.broadcast_object(str(_begin(final)) if distributed.is_main() else None))
        fsdp.save_sharded(run.model, run.optimizer, tmp / fsdp.DCP_DIR)
    else:
        weights = fsdp.full_model_state(run.model)  # FSDP: gathered to rank 0 (collective), else the model's own
        optimizer = fsdp.full_optimizer_state(run.model, run.optimizer)
    if not distributed.is_main():  # rank 0 writes; the others wait until the checkpoint is complete
        distributed.barrier()
        return final

    def write(d: Path):
        if is_lora(run.model):  # the adapters (fp32, a peft adapter dir): the base is cfg.model's own files
            save_adapters(run.model, d)
        elif weights is None:  # the weights and optimizer state are the DCP files
            run.model.config.save_pretrained(d)
        else:
            _save_pretrained(run.model, d, weights)
        run.tokenizer.save_pretrained(d)
        save_config(cfg, d / "config.yaml")
        torch.save({"format": FORMAT, "optimizer": optimizer,
                    "lr_scheduler": run.lr_scheduler.state_dict(), "state": dataclasses.asdict(run.state),
                    "rng": _rng_state(), "buffer": trainer.buffer, "budget": trainer.budget,
                    "config": cfg.to_dict(), "world": len(ranks)}, d / "trainer_state.pt")
        if len(ranks) > 1:
            torch.save(ranks, d / "rank_states.pt")

    path = _write_atomically(final, write, tmp)
    log.info("saved checkpoint %s%s", path, " (sharded: torch.distributed.checkpoint)" if tmp else "")
    _prune(out, cfg.save_total_limit)
    distributed.barrier()
    return path


def sharded(cfg, run) -> bool:
    """`checkpoint_format`: DCP files (each rank its shards; auto = under FSDP) or full ones on rank 0."""
    return cfg.checkpoint_format == "sharded" or cfg.checkpoint_format == "auto" and fsdp.is_sharded(run.model)


def final_dtype(cfg, run) -> torch.dtype:
    """`save_dtype`, with auto = the compute dtype: what a user loads for inference."""
    return run.compute_dtype if cfg.save_dtype == "auto" else getattr(torch, cfg.save_dtype)


def save_final(cfg, run, trainer, out: Path, checkpoint: bool = True) -> Path:
    """The final model (loadable with from_pretrained) in `save_dtype`, plus, unless this step was just
    saved (`checkpoint=False`), a full checkpoint of the last step (fp32 master weights: exact resume)."""
    if checkpoint:
        save_checkpoint(cfg, run, trainer, out)
    if is_lora(run.model):
        return _write_atomically(out / "final", lambda d: _save_lora_final(cfg, run, d))
    full = fsdp.full_model_state(run.model)  # collective when sharded
    if not distributed.is_main():
        return out / "final"
    dtype = final_dtype(cfg, run)

    def write(d: Path):
        _save_pretrained(run.model, d, {k: v.to(dtype) for k, v in full.items()})
        config = json.loads((d / "config.json").read_text())  # save_pretrained writes the fp32 master's dtype
        config["dtype"] = str(dtype).removeprefix("torch.")
        (d / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        run.tokenizer.save_pretrained(d)

    return _write_atomically(out / "final", write)


def _save_lora_final(cfg, run, d: Path) -> None:
    """final/: a peft adapter directory (fp32 adapters, `PeftModel.from_pretrained(base, final)`), the
    tokenizer, and with merge_lora the adapters folded into the base under merged/, in `save_dtype`."""
    save_adapters(run.model, d)
    run.tokenizer.save_pretrained(d)
    if cfg.merge_lora:
        save_merged(run.model, d / "merged", final_dtype(cfg, run))
        run.tokenizer.save_pretrained(d / "merged")


def _save_pretrained(model, d: Path, weights: dict) -> None:
    """save_pretrained with the given full weights; a tied head is stored once (the embedding), as
    for an unsharded model (a gathered state dict holds it as a second tensor)."""
    if getattr(model.config, "tie_word_embeddings", False):
        weights = {k: v for k, v in weights.items() if k != "lm_head.weight"}
    model.save_pretrained(d, state_dict=weights, safe_serialization=True)


def _step_of(p: Path) -> int | None:
    tail = p.name.split("-", 1)[1] if "-" in p.name else ""
    return int(tail) if tail.isdigit() else None


def list_checkpoints(out: Path) -> list[Path]:
    """Complete checkpoints, oldest first; half-written ones (no marker) are ignored."""
    found = [p for p in out.glob("checkpoint-*") if p.is_dir() and (p / MARKER).exists() and _step_of(p) is not None]
    return sorted(found, key=_step_of)


def _prune(out: Path, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    for old in list_checkpoints(out)[:-limit]:
        _remove(old)


def check_output_dir(cfg, out: Path) -> None:
    """Before anything is built or written: tidy what a killed save left, and refuse a new run in a
    directory with checkpoints (a later resume=auto would mix the two runs)."""
    recover(out)
    if not cfg.resume and list_checkpoints(out):
        raise ValueError(f"output_dir {out} already holds checkpoints of an earlier run; pass resume=auto to "
                         "continue it, or choose a new output_dir")
    if cfg.resume == "auto" and cfg.output_dir is None:
        raise ValueError("resume=auto needs output_dir=DIR (the run to continue); without it every run "
                         "gets a new timestamped directory")


def resume_if_asked(cfg, run, trainer, out: Path) -> Path | None:
    """Load the checkpoint `cfg.resume` names: `auto` = the newest complete one in `out` that can be
    read (a corrupt one is skipped with a warning); a checkpoint directory; or a run directory (its
    newest). `check_output_dir` (called first, before the model is built) guards a run without resume."""
    if not cfg.resume:
        return None
    if cfg.resume == "auto":
        candidates = list_checkpoints(out)[::-1]
        if not candidates:
            log.info("resume=auto: no complete checkpoint in %s; starting from scratch", out)
            return None
    else:
        path = Path(cfg.resume)
        if not path.is_dir():
            raise ValueError(f"resume={cfg.resume!r} does not exist; pass a checkpoint directory "
                             "(e.g. runs/X/checkpoint-100), a run directory, or resume=auto")
        candidates = [path] if (path / MARKER).exists() else list_checkpoints(path)[::-1][:1]
        if not candidates:
            raise ValueError(f"resume={cfg.resume!r} is not a complete fastdash checkpoint (no {MARKER} marker; "
                             "it may be half-written) and holds none; pass another or resume=auto")
    for path in candidates[:-1]:  # resume=auto only: older checkpoints stand in for an unreadable one
        try:
            load_checkpoint(cfg, run, trainer, path)
            return path
        except UnreadableCheckpoint as e:
            log.warning("%s; trying the previous checkpoint", e)
    load_checkpoint(cfg, run, trainer, candidates[-1])  # the last candidate's error is the user's to see
    return candidates[-1]


def _read(path: Path) -> tuple[dict, dict]:
    """trainer_state.pt and the weights: {name: tensor}, or {name: shape} of a sharded checkpoint."""
    try:
        blob = torch.load(path / "trainer_state.pt", weights_only=False)
        if (path / fsdp.DCP_DIR).is_dir():  # sharded: the names and shapes are in its metadata
            return blob, fsdp.sharded_shapes(path / fsdp.DCP_DIR)
        files = sorted(path.glob("*.safetensors"))  # one file, or shards of a large model
        if not files:
            raise FileNotFoundError(f"no *.safetensors in {path}")
        weights = {}
        for f in files:
            weights.update(load_file(f))
    except Exception as e:  # noqa: BLE001 - any unreadable file means an unusable checkpoint
        raise UnreadableCheckpoint(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e)[:200]}); "
                                   "delete it or pass another resume=PATH") from e
    if not isinstance(blob, dict) or any(k not in blob for k in STATE_KEYS):
        raise UnreadableCheckpoint(f"checkpoint {path}: trainer_state.pt is not a fastdash trainer state "
                                   f"(expected keys {list(STATE_KEYS)})")
    return blob, weights


def load_checkpoint(cfg, run, trainer, path: Path) -> None:
    """Validate everything first (files, config, weight names and shapes), then restore; a failed
    check leaves the run untouched."""
    blob, weights = _read(path)
    saved = blob["config"]
    diff = {k: (saved[k], getattr(cfg, k)) for k in MUST_MATCH  # keys an older checkpoint lacks: not compared
            if k in saved and saved[k] != getattr(cfg, k)}
    if diff:
        raise ValueError(f"checkpoint {path} was made with a different config: "
                         + ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
                         + "; resume with the checkpoint's values or start a new output_dir")
    lora = is_lora(run.model)  # the checkpoint holds the adapters only, by peft's names
    own = adapter_state(run.model) if lora else run.model.state_dict()
    tied = getattr(run.model.config, "tie_word_embeddings", False)
    missing = [k for k in own if k not in weights and not (k == "lm_head.weight" and tied)]
    unexpected = [k for k in weights if k not in own]
    shape = {k: tuple(getattr(v, "shape", v)) for k, v in weights.items()}
    shapes = [f"{k}: checkpoint {shape[k]} vs model {tuple(own[k].shape)}"
              for k in weights if k in own and shape[k] != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        raise ValueError(f"checkpoint {path} does not fit the model {cfg.model!r}: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}, shape mismatches {shapes[:3]}")
    dcp = path / fsdp.DCP_DIR
    if lora:
        load_adapter_state(run.model, weights)
    elif not dcp.is_dir():
        fsdp.load_model_state(run.model, weights)
    try:
        if dcp.is_dir():  # weights and optimizer state, re-sharded to this run's ranks
            fsdp.load_sharded(run.model, run.optimizer, dcp)
        else:
            fsdp.load_optimizer_state(run.model, run.optimizer, blob["optimizer"])
        run.lr_scheduler.load_state_dict(blob["lr_scheduler"])
    except (ValueError, KeyError, RuntimeError) as e:
        raise ValueError(f"checkpoint {path}: optimizer state does not fit this model ({e}); "
                         "start a new output_dir") from e
    if saved.get("learning_rate") != cfg.learning_rate:
        _set_base_lr(run.lr_scheduler, cfg.learning_rate)
        log.warning("resume: learning_rate %s -> %s (the schedule continues from step %d at the new rate)",
                    saved.get("learning_rate"), cfg.learning_rate, blob["state"]["step"])
    for k, v in blob["state"].items():
        setattr(run.state, k, v)
    trainer.buffer = blob.get("buffer", [])
    trainer.budget = blob.get("budget", trainer.budget)
    _set_rng_state(blob["rng"])
    _restore_rank_state(cfg, trainer, path, blob)
    trainer.engine.sync_weights(run.model)  # an engine with its own copy (vLLM) built before the load
    log.info("resumed from %s at step %d", path, run.state.step)


def _set_base_lr(sched, lr: float) -> None:
    """The optimizer's state carries the old rate; rebase a LambdaLR schedule on the new one."""
    sched.base_lrs = [lr] * len(sched.optimizer.param_groups)
    for group, fn in zip(sched.optimizer.param_groups, sched.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * fn(sched.last_epoch)


def _restore_rank_state(cfg, trainer, path: Path, blob: dict) -> None:
    """This rank's buffer, budget and RNG; re-split over the ranks when the world size changed."""
    saved, now, r = blob.get("world", 1), distributed.world_size(), distributed.rank()
    if saved == now == 1:
        return
    ranks = torch.load(path / "rank_states.pt", weights_only=False) if saved > 1 else \
        [{"rng": blob["rng"], "buffer": blob.get("buffer", []), "budget": blob.get("budget")}]
    mine = ranks[min(r, saved - 1)]
    trainer.budget = mine["budget"] if mine["budget"] is not None else trainer.budget
    _set_rng_state(mine["rng"])
    if saved == now:
        trainer.buffer = mine["buffer"]
        return
    trainer.buffer = [split_step_batch(merge_step_batches(parts), r, now, cfg.mask_truncated_completions)
                      for parts in zip(*(rank["buffer"] for rank in ranks))]
    log.warning("resume: %s was written by %d rank(s), this run has %d: the %d step batches not yet trained "
                "on are re-split over the new ranks (rank %d continues rank %d's RNG); the maths are the same, "
                "the floating-point sums are not bit-identical to the %d-rank run",
                path, saved, now, len(trainer.buffer), r, min(r, saved - 1), saved)


def merge_step_batches(parts):
    """One step's batch from every rank's share (rank order = the step's sample order)."""
    from fastdash.batch import StepBatch

    samples, kept = [], []  # uids renumbered: each rank's start at 0
    for b in parts:
        by_uid = {s.uid: s for s in b.kept}  # kept holds the samples with their old / reference log-probs
        for s in b.samples:
            if s.uid in by_uid:
                kept.append((len(samples), dataclasses.replace(by_uid[s.uid], uid=len(samples))))
            samples.append(dataclasses.replace(s, uid=len(samples)))
    batch = StepBatch(tuple(samples), tuple(s for _, s in kept), parts[0].normaliser, sum(b.masked for b in parts),
                      entropy_threshold=parts[0].entropy_threshold)  # a step-wide value, the same on every rank
    return batch, [i for i, _ in kept]


def split_step_batch(merged, r: int, world: int, mask_truncated: bool):
    """Rank r's contiguous share of a merged step batch (groups stay whole: validated at start)."""
    from fastdash.batch import StepBatch

    batch, kept_at = merged
    lo, hi = distributed.share(len(batch.samples), r, world)
    kept = tuple(s for i, s in zip(kept_at, batch.kept) if lo <= i < hi)
    mine = batch.samples[lo:hi]
    masked = sum(1 for s in mine if not s.completion_ids or (mask_truncated and s.truncated))  # as algo.loss_mask
    return StepBatch(mine, kept, batch.normaliser, masked, entropy_threshold=batch.entropy_threshold)
