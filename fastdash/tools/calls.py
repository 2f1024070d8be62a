"""Tool calls in the completion's text, and the text a tool's output is appended as.

The call format is the one Qwen2 / Qwen2.5 chat templates teach (Hermes style):
    <tool_call>
    {"name": "python", "arguments": {"code": "123*456"}}
    </tool_call>
Outputs go back in the template's tool turn. Two layouts (`tool_call_format`):
  chatml  Qwen2.5's: the assistant turn is closed, the outputs come as a user turn of
          `<tool_response>` blocks, then a new assistant turn opens:
          <|im_end|>\n<|im_start|>user\n<tool_response>\nOUT\n</tool_response><|im_end|>\n<|im_start|>assistant\n
          (the leading <|im_end|> only when the model did not sample it itself).
  plain   models without a chat template (the shipped tiny models): <tool_response>OUT</tool_response>
          right after the call, and the same turn goes on.
SmolLM2-135M-Instruct's template (ChatML, read from its GGUF) renders no tools and no tool role, and
its vocabulary has no <tool_call> token: it can use chatml, the tags as plain text, with the tools
described in the system prompt.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass

OPEN, CLOSE = "<tool_call>", "</tool_call>"
_BLOCK = re.compile(re.escape(OPEN) + r"(.*?)" + re.escape(CLOSE), re.DOTALL)
FORMATS = ("auto", "chatml", "plain")
TRUNCATED = "…[truncated {n} chars]"


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict
    error: str | None = None  # why the call could not be parsed (the model sees it as the output)


def parse_calls(text: str) -> list[ToolCall]:
    """The calls of one assistant turn, in order; [] when the turn requests no tool. A malformed call
    is kept, with `error` set, so the model is told what was wrong (and it counts as an error)."""
    calls = []
    for block in _BLOCK.findall(text):
        try:
            obj = json.loads(block.strip())
        except json.JSONDecodeError as e:
            calls.append(ToolCall("", {}, f"invalid JSON in tool call: {e.msg}"))
            continue
        args = obj.get("arguments", {}) if isinstance(obj, dict) else None
        if isinstance(args, str):  # some templates send the arguments as a JSON string
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                args = None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not isinstance(args, dict):
            calls.append(ToolCall("", {}, 'a tool call must be {"name": str, "arguments": {...}}'))
            continue
        calls.append(ToolCall(obj["name"], args))
    if not calls and text.rstrip().endswith(CLOSE):  # a closing tag with no call before it
        calls.append(ToolCall("", {}, f"{CLOSE} without a {OPEN} before it"))
    return calls


def cap_output(text: str, max_chars: int) -> tuple[str, bool]:
    """`text` cut to `max_chars`, the cut marked in the text itself (the model must know it is partial)."""
    if len(text) <= max_chars:
        return text, False
    return text[:max_chars] + TRUNCATED.format(n=len(text) - max_chars), True


def response_text(outputs: list[str], fmt: str, turn_closed: bool) -> str:
    """The text appended after a turn's calls: its outputs in the format's tool turn. `turn_closed`:
    the model sampled the end-of-turn token itself (chatml then does not repeat it)."""
    if fmt == "plain":
        return "".join(f"<tool_response>{o}</tool_response>" for o in outputs)
    blocks = "".join(f"\n<tool_response>\n{o}\n</tool_response>" for o in outputs)
    return ("" if turn_closed else "<|im_end|>") + "\n<|im_start|>user" + blocks + "<|im_end|>\n<|im_start|>assistant\n"


def resolve_format(fmt: str, tokenizer) -> str:
    """auto: chatml when the tokenizer's template is ChatML (<|im_start|>), else plain."""
    if fmt != "auto":
        return fmt
    template = getattr(tokenizer, "chat_template", None) or ""
    return "chatml" if "<|im_start|>" in str(template) else "plain"
