"""A run's tools (`ToolSession`) and one sample's episode with them (`Episode`).

A session is built once from the config: the `tools` callables, the `environment_factory`, the
limits. Each generated sample gets an `Episode`: its own environment instance (`reset()` called once,
TRL's rule: one instance per sample), its tools by name, and its counts. `Episode.run_turn` executes
the calls of one assistant turn, in order, and returns the text the model sees; it runs on a pool
thread (`ToolSession.pool`) while the decode loop goes on with the other rows.

Per call: a user function runs in a daemon thread joined with `tool_timeout_s` (a Python thread cannot
be killed: a function that hangs keeps its thread, the row goes on with a timeout message; run
untrusted code through the `python` tool, whose sandbox is killed); the output is cut at
`tool_max_output_chars` with the cut marked; an exception becomes the output `Error: ...`.
Determinism: outputs must depend on the call's inputs only (and the environment's state), so a
resumed run regenerates the same transcripts. An environment's randomness should come from
`reset(seed=...)` (a per-row seed the resumed run regenerates); one that reads a clock, the network or
an unseeded RNG makes a resumed run differ from the uninterrupted one from that tool output on.
"""
from __future__ import annotations

import inspect
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from fastdash.tools.calls import ToolCall, cap_output, parse_calls, response_text
from fastdash.tools.python_tool import ToolFailed, ToolTimeout, make_python_tool
from fastdash.tools.schema import environment_methods, load_object, tool_schema


@dataclass
class EpisodeStats:
    calls: int = 0
    errors: int = 0
    timeouts: int = 0
    truncated_outputs: int = 0
    seconds: float = 0.0
    turns: int = 1  # assistant turns (1 + tool turns)


@dataclass
class Episode:
    tools: dict[str, Callable]
    session: "ToolSession"
    env: object | None = None
    stats: EpisodeStats = field(default_factory=EpisodeStats)
    messages: list[dict] = field(default_factory=list)  # the completion as messages (rewards see them)

    def wants_tools(self, turn_text: str) -> list[ToolCall]:
        """The calls the turn makes ([] = none: the sample ends here)."""
        return parse_calls(turn_text)

    def may_call(self) -> bool:
        limit = self.session.max_iterations
        return limit is None or self.stats.turns - 1 < limit

    def run_turn(self, turn_text: str, calls: list[ToolCall], turn_closed: bool) -> str:
        """Run the turn's calls in order; the response text to append (the format's tool turn)."""
        self.messages.append({"role": "assistant", "content": turn_text,
                              "tool_calls": [{"type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                                             for c in calls if c.error is None]})
        outputs = []
        for call in calls:
            out = self._one(call)
            self.messages.append({"role": "tool", "name": call.name, "content": out})
            outputs.append(out)
        self.stats.turns += 1
        return response_text(outputs, self.session.format, turn_closed)

    def _one(self, call: ToolCall) -> str:
        self.stats.calls += 1
        t0 = time.perf_counter()
        try:
            if call.error is not None:
                raise ToolFailed(call.error)
            fn = self.tools.get(call.name)
            if fn is None:
                raise ToolFailed(f"unknown tool {call.name!r}; tools: {sorted(self.tools)}")
            out = str(_call_with_timeout(fn, call.arguments, self.session.timeout_s))
        except ToolTimeout as e:
            self.stats.timeouts += 1
            out = f"Error: {e}"
        except Exception as e:  # noqa: BLE001 - the model sees the error, the run goes on
            self.stats.errors += 1
            out = f"Error: {e}" if isinstance(e, ToolFailed) else f"Error: {type(e).__name__}: {e}"
        finally:
            self.stats.seconds += time.perf_counter() - t0
        out, cut = cap_output(out, self.session.max_output_chars)
        self.stats.truncated_outputs += cut
        return out


def _takes_seed(fn) -> bool:
    try:
        return "seed" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False


def _call_with_timeout(fn: Callable, arguments: dict, timeout_s: float):
    box: dict = {}

    def target():
        try:
            box["value"] = fn(**arguments)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = e

    worker = threading.Thread(target=target, daemon=True, name="fastdash-tool")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise ToolTimeout(f"no result within {timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box.get("value")


class ToolSession:
    """The run's tools. `functions`: name -> callable shared by every sample; `environment_factory`:
    a class (or any callable) whose instances' public methods are per-sample tools."""

    def __init__(self, functions: dict[str, Callable], environment_factory=None, *, max_iterations: int | None = None,
                 timeout_s: float = 10.0, max_output_chars: int = 2000, format: str = "plain", workers: int = 16):
        # workers: the pool's least size; the decode loop grows it to one thread per row slot (`reserve`)
        self.functions, self.environment_factory = dict(functions), environment_factory
        self.max_iterations, self.timeout_s, self.max_output_chars = max_iterations, timeout_s, max_output_chars
        self.format = format
        self.workers = workers
        self._pool: ThreadPoolExecutor | None = None
        self._pool_size = 0
        self.schemas = [tool_schema(fn) for fn in self.functions.values()]
        if environment_factory is not None:  # one probe instance gives the schemas (reset is not called)
            self.schemas += [tool_schema(m, "environment_factory")
                             for m in environment_methods(environment_factory()).values()]

    @property
    def pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self.reserve(0)
        return self._pool

    def reserve(self, slots: int) -> None:
        """At least one pool thread per row that can hold a slot, so that no call queues behind another
        row's slow one (a slow tool holds one row, never more). Call between decodes, not during one.
        The threads mostly wait (on a sandbox process, on I/O)."""
        want = max(slots, self.workers)
        if self._pool is None or self._pool_size < want:
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool, self._pool_size = ThreadPoolExecutor(want, thread_name_prefix="fastdash-tools"), want

    def episode(self, seed: int | None = None) -> Episode:
        """A sample's episode. `seed` (the decode loop gives each row its own, reproducible on resume) goes
        to `reset(seed=...)` when reset takes a `seed` argument: an environment that draws its
        randomness from it replays the same episode in a resumed run."""
        env = None
        tools = dict(self.functions)
        if self.environment_factory is not None:
            env = self.environment_factory()
            reset = getattr(env, "reset", None)
            if reset is not None:
                reset(**({"seed": seed} if seed is not None and _takes_seed(reset) else {}))
            tools.update(environment_methods(env))
        return Episode(tools, self, env)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None


def build_session(cfg, tokenizer) -> ToolSession | None:
    """The config's tools (`tools`, `environment_factory`), or None when it names none."""
    from fastdash.tools.calls import resolve_format

    if not cfg.tools and not cfg.environment_factory:
        return None
    functions = {}
    for spec in cfg.tools or []:
        fn = (make_python_tool(cfg.tool_timeout_s, cfg.tool_max_output_chars) if spec == "python"
              else load_object(spec, "tools"))
        name = getattr(fn, "__name__", spec)
        if name in functions:
            raise ValueError(f"config: tools: two tools are named {name!r}")
        functions[name] = fn
    factory = load_object(cfg.environment_factory, "environment_factory") if cfg.environment_factory else None
    if factory is not None and not callable(factory):
        raise ValueError(f"config: environment_factory={cfg.environment_factory!r} is not a class or callable")
    return ToolSession(functions, factory, max_iterations=cfg.max_tool_calling_iterations,
                       timeout_s=cfg.tool_timeout_s, max_output_chars=cfg.tool_max_output_chars,
                       format=resolve_format(cfg.tool_call_format, tokenizer))


def attach_tools(cfg, engine, tokenizer) -> ToolSession:
    """Give the run's engine its tools, or refuse (ValueError naming the reason) where they cannot run."""
    from fastdash.distributed import planned_world

    if planned_world(cfg) > 1:
        raise ValueError("config: tools: multi-turn rollouts run in one process for now (each DDP rank would need "
                         "its own tool pool and per-rank tool metrics, untested): launch without torchrun")
    if getattr(engine, "name", None) != "hf" or getattr(engine, "_decoder", None) != "compact":
        raise ValueError(f"config: tools: need the HF engine's compacting decode loop; this run has engine "
                         f"{getattr(engine, 'name', '?')!r} decoding with {getattr(engine, '_decoder', '?')!r} "
                         "(a model whose cache cannot be compacted: sliding window, linear attention)")
    engine.tools = build_session(cfg, tokenizer)
    return engine.tools
