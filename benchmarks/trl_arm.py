"""Arm 5 of the end-to-end benchmark: Hugging Face TRL's GRPOTrainer on the same work.

Same model, prompt rows (the harness's, in the same order), reward, samples per optimizer step
(prompts_per_step x G, one generation per optimizer step) and sampling/loss settings as the fastdash
arms; TRL's own loop does everything else. Sub-arms: TRL's default gradient checkpointing on ("trl")
and off ("trl_no_gc", its best CPU setting). On the paper-shaped workload the reward is the same
synthetic one and the completion lengths are the ones fastdash's trainer forces (the same draw per
rollout): the model's `generate` gets fastdash's `ForceLengths` logits processor, the only way to
hand TRL per-row lengths.

trl may live in another virtualenv than fastdash's (it can pull other transformers versions), so
the arm always runs in a worker process: the interpreter itself when it imports trl, else
$FASTDASH_TRL_PYTHON. The worker runs `trainer.train()` and blocks at the end of every optimizer
step until the harness says "go", so its steps interleave with the in-process arms like any other
arm's; while it waits it is idle and takes no CPU from them.

TRL reports its per-phase times only to wandb/mlflow/trackio, so phases are timed from outside, by
wrapping the trainer instance's methods: generate = `_generate`, reward = `_calculate_rewards`,
logprob = `_get_per_token_logps_and_entropies` called from inside `_generate_and_score_completions`
(old/ref log-probs; none with beta=0 and one generation per step), backward = `training_step`
minus `_generate_and_score_completions` (loss forward + backward), optimizer = `_clip_grad_norm` +
`optimizer.step` (callbacks on either side). Wall time per step runs from "go" to `on_step_end`,
so it includes TRL's data loading and bookkeeping as fastdash's `Trainer.step()` does.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# TRL's own best micro-batch on the CPU size (probed 3 steps each, no checkpointing, 1 thread):
# 8 (fastdash's micro_batch_size) 1.39 s/step, 32 0.53, 128 0.49, 256 0.55. Generation is one call
# of all 256 completions whatever this is (steps_per_generation = gradient_accumulation_steps).
TRL_MICRO = 128
TRL_ARMS = {"trl": {"gradient_checkpointing": True, "per_device_train_batch_size": TRL_MICRO},
            "trl_no_gc": {"gradient_checkpointing": False, "per_device_train_batch_size": TRL_MICRO}}
ENV_PYTHON = "FASTDASH_TRL_PYTHON"
MARK = "@@fastdash-trl@@ "  # protocol lines on the worker's stdout; anything else there is passed through
ROOT = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def _python_with_trl(candidate: str) -> str | None:
    """Why `candidate` cannot run the arm, or None when it can."""
    if not Path(candidate).exists():
        return f"{ENV_PYTHON}={candidate} does not exist"
    probe = subprocess.run([candidate, "-c", "import trl, fastdash, datasets; print(trl.__version__)"],
                           capture_output=True, text=True, timeout=300)
    if probe.returncode:
        return f"{ENV_PYTHON}={candidate} cannot import trl/fastdash/datasets: {probe.stderr.strip()[-200:]}"
    return None


def trl_python() -> tuple[str | None, str | None]:
    """(interpreter that imports trl, None) or (None, reason the TRL arm is skipped)."""
    if importlib.util.find_spec("trl") is not None:
        return sys.executable, None
    env = os.environ.get(ENV_PYTHON)
    if not env:
        return None, (f"trl is not installed (pip install -e '.[bench]', or point {ENV_PYTHON} at a "
                      "python that has it); TRL arm skipped")
    why = _python_with_trl(env)
    return (None, f"{why}; TRL arm skipped") if why else (env, None)


def skip_reason() -> str | None:
    return trl_python()[1]


# ------------------------------------------------------------------ harness side ---------------
class TRLArm:
    """ArmRun-like handle on one worker: `step()`, `evaluate()`, `close()`, `setup_s`, `resolved`."""

    def __init__(self, arm: str, size: dict, seed: int, steps: int, rows: list[dict], python: str | None = None):
        if arm not in TRL_ARMS:
            raise ValueError(f"unknown TRL arm {arm!r}; choose from {list(TRL_ARMS)}")
        python = python or trl_python()[0]
        if python is None:
            raise ValueError(skip_reason())
        spec = {"arm": arm, "size": size, "seed": seed, "steps": steps, "rows": rows}
        t0 = time.perf_counter()
        self._spec = tempfile.NamedTemporaryFile("w", suffix=".json", prefix="fastdash-trl-spec-", delete=False)
        json.dump(spec, self._spec)  # rows can be long for a command line
        self._spec.close()
        self.proc = subprocess.Popen([python, str(Path(__file__).resolve()), "--worker", self._spec.name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1, cwd=ROOT)
        ready = self._read()
        self.setup_s, self.resolved = time.perf_counter() - t0, ready["resolved"]

    def _read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stdout.write(line)
        raise RuntimeError(f"TRL worker exited with code {self.proc.wait()} (its stderr is above)")

    def _ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self._read()

    def step(self) -> dict:
        return self._ask("go")

    def evaluate(self) -> float:
        return self._ask("eval")["accuracy"]

    def close(self) -> None:
        proc = getattr(self, "proc", None)  # None when __init__ failed before starting it
        if proc is not None and proc.poll() is None:
            proc.stdin.close()  # EOF: the worker exits
            proc.wait(timeout=120)
        if getattr(self, "_spec", None) is not None:
            Path(self._spec.name).unlink(missing_ok=True)

    __del__ = close


# ------------------------------------------------------------------ worker side ----------------
def _send(obj: dict) -> None:
    sys.stdout.write(MARK + json.dumps(obj) + "\n")
    sys.stdout.flush()


def _wait_command() -> str:
    line = sys.stdin.readline()
    return line.strip() or "quit"


def _score(size: dict):
    """The reward the fastdash arms get: arithmetic on the learning task, else the synthetic one."""
    if size.get("workload", "arith") == "arith":
        from fastdash.rewards.math import arithmetic_reward

        return lambda completions, rows: [arithmetic_reward(c, r["answer"]) for c, r in zip(completions, rows)]
    from fastdash.rewards.synthetic import synthetic_reward

    return synthetic_reward.batch


def _force_lengths(model, tok, size: dict, seed: int, rollout: list[int]) -> None:
    """Completion lengths as fastdash's trainer forces them: Run.forced_lengths of the same (seed,
    rollout), applied by fastdash's ForceLengths logits processor around this model's generate."""
    from types import SimpleNamespace

    from transformers import LogitsProcessorList

    from fastdash.rollout.hf import ForceLengths
    from fastdash.runtime import Run

    cfg = SimpleNamespace(seed=seed, length_control_mean=size["length_control_mean"],
                          max_completion_length=size["max_completion_length"])
    generate = model.generate

    @functools.wraps(generate)
    def forced(*args, **kwargs):
        ids = kwargs["input_ids"]
        lengths = Run.forced_lengths(SimpleNamespace(cfg=cfg), rollout[0], ids.shape[0])
        rollout[0] += 1
        kwargs["logits_processor"] = LogitsProcessorList([ForceLengths(lengths, ids.shape[1], (tok.eos_token_id,))])
        return generate(*args, **kwargs)

    model.generate = forced


def build_trainer(arm: str, size: dict, seed: int, steps: int, rows: list[dict], out_dir: str):
    """The GRPOTrainer for one arm and seed, plus the per-step record it fills in."""
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastdash.metrics import PHASES
    from fastdash.models import load_model_and_tokenizer

    G, batch = size["num_generations"], size["train_batch_size"]
    micro = min(batch, size.get("trl_micro_batch_size") or TRL_ARMS[arm]["per_device_train_batch_size"])
    if batch % micro:
        raise ValueError(f"train_batch_size={batch} must be a multiple of micro_batch_size={micro}")
    torch.set_num_threads(size.get("num_threads") or torch.get_num_threads())
    keys = ("prompt", "answer", "uid", "p_success")
    data = Dataset.from_list([{k: r[k] for k in keys if k in r} for r in rows])  # the harness's order
    rec: dict = {"phases": {}, "rewards": [], "tokens": 0, "prompts": []}
    score = _score(size)

    def reward(prompts, completions, completion_ids, **columns):
        cols = {k: columns[k] for k in keys[1:] if k in columns}
        r = score(completions, [dict(zip(cols, vals)) for vals in zip(*cols.values())])
        rec["rewards"] += r
        rec["tokens"] += sum(len(c) for c in completion_ids)
        rec["prompts"] += [u for j, u in enumerate(columns["uid"]) if j % G == 0]  # one per group, like ArmRun's log
        return r

    model, tok = load_model_and_tokenizer(size["model"], dtype=torch.float32, seed=seed)
    if size.get("length_control_mean"):
        _force_lengths(model, tok, size, seed, rollout=[0])
    args = GRPOConfig(
        output_dir=out_dir, seed=seed, data_seed=seed, shuffle_dataset=False, max_steps=steps,
        num_generations=G, per_device_train_batch_size=micro, gradient_accumulation_steps=batch // micro,
        max_completion_length=size["max_completion_length"], temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=size.get("learning_rate", 1e-4), lr_scheduler_type="linear", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, beta=0.0, epsilon=0.2, loss_type="dr_grpo", scale_rewards="group",
        bf16=False, fp16=False, use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no",
        eval_strategy="no", disable_tqdm=True, dataloader_num_workers=0, log_completions=False,
        gradient_checkpointing=TRL_ARMS[arm]["gradient_checkpointing"])
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=data, processing_class=tok)
    ph = rec["phases"]
    inside = [False]

    def timed(name, phase, flag=False):
        orig = getattr(trainer, name)

        @functools.wraps(orig)
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            if flag:
                inside[0] = True
            try:
                return orig(*a, **k)
            finally:
                inside[0] = inside[0] and not flag
                p = phase() if callable(phase) else phase
                if p:
                    ph[p] = ph.get(p, 0.0) + time.perf_counter() - t0
        setattr(trainer, name, wrapper)

    timed("_generate", "generate")
    timed("_calculate_rewards", "reward")
    timed("_get_per_token_logps_and_entropies", lambda: "logprob" if inside[0] else None)
    timed("_generate_and_score_completions", "_gen_and_score", flag=True)
    timed("training_step", "_train_step")
    timed("_clip_grad_norm", "optimizer")

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            _send({"ready": True, "resolved": {
                "trl": __import__("trl").__version__, "transformers": __import__("transformers").__version__,
                "gradient_checkpointing": args.gradient_checkpointing, "per_device_train_batch_size": micro,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "steps_per_generation": args.steps_per_generation, "generation_batch_size": args.generation_batch_size}})
            self._go()

        def _go(self):
            if _wait_command() != "go":
                raise SystemExit(0)
            ph.clear(), rec["rewards"].clear(), rec["prompts"].clear()
            rec["tokens"], rec["t0"] = 0, time.perf_counter()

        def on_pre_optimizer_step(self, *_, **__):
            rec["t_opt"] = time.perf_counter()

        def on_optimizer_step(self, *_, **__):
            ph["optimizer"] = ph.get("optimizer", 0.0) + time.perf_counter() - rec["t_opt"]

        def on_step_end(self, _args, state, *__, **___):
            wall = time.perf_counter() - rec["t0"]
            phases = {p: ph.get(p, 0.0) for p in PHASES}
            phases["backward"] = max(0.0, ph.get("_train_step", 0.0) - ph.get("_gen_and_score", 0.0))
            r = rec["rewards"]
            _send({"wall_s": wall, "phases": phases, "samples": len(r), "tokens": float(rec["tokens"]),
                   "reward": sum(r) / len(r) if r else None, "kept_fraction": None,
                   "prompts": list(rec["prompts"]), "optimizer_step": state.global_step})
            if state.global_step < steps:
                self._go()

    trainer.add_callback(Clock())
    return trainer, tok, model


def heldout_accuracy(model, tok, size: dict) -> float:
    """Greedy accuracy on the same held-out problems the fastdash arms are scored on."""
    import torch

    from fastdash.data.arithmetic import make_problems
    from fastdash.rewards.math import arithmetic_reward

    problems = make_problems(size["num_eval_problems"], split="heldout", seed=0)
    model.eval()
    hits, bs = 0, size.get("eval_batch_size", 200)
    with torch.no_grad():
        for i in range(0, len(problems), bs):
            chunk = problems[i : i + bs]
            enc = tok([p["prompt"] for p in chunk], return_tensors="pt", padding=True, add_special_tokens=False)
            out = model.generate(**enc, max_new_tokens=size["max_completion_length"], do_sample=False,
                                 pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
            texts = tok.batch_decode(out[:, enc.input_ids.shape[1]:], skip_special_tokens=True)
            hits += sum(arithmetic_reward(t, p["answer"]) >= 1.0 for t, p in zip(texts, chunk))
    return hits / len(problems)


def worker(spec: dict) -> int:
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory(prefix="fastdash-trl-") as out:
        trainer, tok, model = build_trainer(spec["arm"], spec["size"], spec["seed"], spec["steps"], spec["rows"], out)
        trainer.train()
        while (cmd := _wait_command()) != "quit":
            if cmd != "eval":
                raise ValueError(f"TRL worker: unknown command {cmd!r} after training")
            _send({"accuracy": heldout_accuracy(model, tok, spec["size"])})
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--worker":
        raise SystemExit("usage: trl_arm.py --worker SPEC_FILE  (started by benchmarks/harness.py)")
    raise SystemExit(worker(json.loads(Path(sys.argv[2]).read_text())))
