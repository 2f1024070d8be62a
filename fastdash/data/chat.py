"""Prompt rendering: plain text or chat messages (TRL's conversational format) -> prompt token ids.

A problem's ``prompt`` is either a string or a list of ``{"role": ..., "content": ...}`` messages.
``chat_template`` decides how it becomes tokens:
  auto  = message lists go through the tokenizer's chat template, strings are tokenized as they are
  true  = strings are wrapped as one user message and rendered with the template too
  false = never apply a template (a message list is then an error)
``system_prompt`` is prepended as a system message to every templated prompt that has none.
The template is applied with ``add_generation_prompt=True``, as TRL does, so the completion is the
assistant's turn; the rendered text is tokenized without adding special tokens (the template has them).
"""
from __future__ import annotations

import json
import logging

log = logging.getLogger("fastdash")
CHAT_TEMPLATE_CHOICES = ("auto", True, False)
_logged_first = False


def is_messages(prompt) -> bool:
    return isinstance(prompt, (list, tuple))


def check_messages(prompt) -> list[dict]:
    """The message list as plain dicts, or ValueError saying which message is malformed."""
    if not prompt:
        raise ValueError("prompt: an empty message list")
    out = []
    for i, m in enumerate(prompt):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise ValueError(f"prompt: message {i} is {m!r}; expected {{'role': str, 'content': str}} "
                             "(TRL's conversational format)")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def prompt_key(prompt) -> str:
    """A hashable key for a prompt of either kind (the prompt-id cache uses it)."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def prompt_messages(prompt, chat_template="auto", system_prompt: str | None = None) -> list[dict] | None:
    """The messages to render with the chat template, or None when the prompt is used as raw text."""
    if chat_template not in CHAT_TEMPLATE_CHOICES:
        raise ValueError(f"chat_template={chat_template!r}: expected one of {list(CHAT_TEMPLATE_CHOICES)}")
    if isinstance(prompt, str):
        if chat_template is not True:
            if system_prompt:
                raise ValueError(f"system_prompt is set but prompts are plain text and chat_template={chat_template!r}: "
                                 "set chat_template=true to wrap them as user messages, or drop system_prompt")
            return None
        messages = [{"role": "user", "content": prompt}]
    elif is_messages(prompt):
        if chat_template is False:
            raise ValueError("chat_template=false but a prompt is a list of messages: set chat_template=auto "
                             "(or use a dataset whose prompt column is plain text)")
        messages = check_messages(prompt)
    else:
        raise ValueError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")
    if system_prompt and messages[0]["role"] != "system":
        messages = [{"role": "system", "content": system_prompt}] + messages
    return messages


def render_text(tokenizer, prompt, chat_template="auto", system_prompt: str | None = None) -> str:
    """The prompt as the text the model sees."""
    messages = prompt_messages(prompt, chat_template, system_prompt)
    if messages is None:
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            f"chat_template={chat_template!r} needs the tokenizer's chat template, and this tokenizer has none "
            "(no chat_template in tokenizer_config.json / chat_template.jinja). Use a chat model's tokenizer, "
            "or set chat_template=false with plain-text prompts.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def render_prompt(tokenizer, prompt, cfg) -> list[int]:
    """Prompt token ids for `prompt` under cfg.chat_template / cfg.system_prompt; logs the first one."""
    global _logged_first
    text = render_text(tokenizer, prompt, getattr(cfg, "chat_template", "auto"), getattr(cfg, "system_prompt", None))
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not _logged_first:
        _logged_first = True
        log.info("first rendered prompt (%d tokens): %r", len(ids), text)
    return ids
