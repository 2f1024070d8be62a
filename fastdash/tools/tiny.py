"""The tiny tool-using model (`tiny-tools`, made by scripts/make_tool_model.py): its tokenizer (the
arithmetic characters, what a JSON tool call needs, and the four call / response tags as single tokens,
so a turn can pause on `</tool_call>`) and its SFT transcripts."""
from __future__ import annotations

import json

from fastdash.models import CHAR_VOCAB
from fastdash.tools.calls import CLOSE, OPEN, response_text

TAGS = [OPEN, CLOSE, "<tool_response>", "</tool_response>"]
TOOL_CHARS = list("abcdefghijklmnopqrstuvwxyz{}\":,._\n")


def tool_char_tokenizer():
    """Character-level, like `models.char_tokenizer` (same ids for its 20 tokens), plus TOOL_CHARS and TAGS."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = CHAR_VOCAB + TOOL_CHARS
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(vocab)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("[\\s\\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_tokens([AddedToken(t, normalized=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def call_text(code: str) -> str:
    """A `python` call as the tiny model writes it: compact JSON between the single-token tags."""
    return OPEN + json.dumps({"name": "python", "arguments": {"code": code}}, separators=(",", ":")) + CLOSE


def sft_completion(prompt: str, answer: str, use_tool: bool) -> list[tuple[str, bool]]:
    """One SFT transcript of `prompt` ('123*45='), as (text, trained) parts. With the tool: the call,
    the tool's output exactly as the `python` tool prints it (plain format, not trained on: the
    model reads it), then the answer copied from it. Without: the answer straight away."""
    if not use_tool:
        return [(answer + "<eos>", True)]
    code = prompt.rstrip("=")
    return [(call_text(code), True), (response_text([answer + "\n"], "plain", turn_closed=False), False),
            (answer + "<eos>", True)]
