"""Tools as the chat template sees them: a JSON schema from each callable's type hints and docstring.

`tools: [module:function, ...]` and `environment_factory: module:Class` name Python objects (TRL's
keys); `load_object` imports them. The schema is transformers' own (`get_json_schema`, the one
`apply_chat_template(tools=...)` renders), so a function documented for transformers' tool use works
here unchanged: every argument needs a type hint and an `Args:` line in the docstring.
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

from transformers.utils import get_json_schema


def load_object(spec: str, key: str):
    """The object `spec` ('pkg.module:name') names; ValueError naming the config key otherwise."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"config: {key}={spec!r}: expected 'pkg.module:name'")
    module_name, _, attr = spec.partition(":")
    try:
        obj = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"config: {key}={spec!r}: cannot import {module_name!r}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"config: {key}={spec!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    return obj


def tool_schema(fn: Callable, key: str = "tools") -> dict:
    """{'type': 'function', 'function': {name, description, parameters}} for `fn`."""
    if not callable(fn):
        raise ValueError(f"config: {key}: {fn!r} is not callable")
    try:
        return get_json_schema(fn)
    except Exception as e:  # transformers' TypeHintParsingException / DocstringParsingException
        name = getattr(fn, "__qualname__", repr(fn))
        raise ValueError(f"config: {key}: tool {name} has no usable schema ({e}); give every argument a type "
                         "hint and an 'Args:' line in the docstring (transformers' tool-use format)") from e


def environment_methods(env) -> dict[str, Callable]:
    """The tools of an environment instance: its public methods other than `reset` (TRL's rule)."""
    out = {}
    for name, member in inspect.getmembers(type(env), predicate=inspect.isfunction):
        if not name.startswith("_") and name != "reset":
            out[name] = getattr(env, name)
    return out
