"""Models and tokenizers: a local path, the shipped tiny base model, or a random-init preset.

Nothing here downloads: `from_pretrained` is always called with `local_files_only=True`.
Presets build the real Qwen2.5 shapes with random weights, for throughput work without a hub.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

log = logging.getLogger("fastdash")

ASSETS = Path(__file__).parent / "assets"
SHIPPED = {"tiny-arith": ASSETS / "tiny-arith",  # made by scripts/make_base_model.py
           "tiny-tools": ASSETS / "tiny-tools"}  # scripts/make_tool_model.py (docs/tools.md)

# Qwen2.5 base shapes (config.json of the public checkpoints), used with random weights.
PRESETS: dict[str, dict] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, tie_word_embeddings=True),
    "qwen2.5-3b": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36,
                       num_attention_heads=16, num_key_value_heads=2, tie_word_embeddings=True),
    # The paper-shaped CPU benchmark: the real vocabulary (the tied 151,936-row head dominates the
    # cost, as in the 0.5B model) on a body small enough for 2 cores.
    "paper-cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    # The shipped model's shape, for tests that want a fresh random one.
    # rope_theta 1e4, not Qwen's 1e6: on 14-token sequences a 1e6 base leaves almost every rotary
    # dimension still, and the model cannot tell digit positions apart (SFT plateaus).
    "tiny": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=3, rope_theta=10_000.0,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
}
QWEN_VOCAB = 151936
CHAR_VOCAB = ["<pad>", "<eos>", "<unk>"] + list("0123456789+-*=() ")


def char_tokenizer():
    """A character-level tokenizer (transformers fast tokenizer) for the built-in task."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(CHAR_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", padding_side="left")


def preset_config(name: str, vocab_size: int = QWEN_VOCAB, max_positions: int = 32768) -> Qwen2Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; choose one of {sorted(PRESETS)}")
    shape = {"rope_theta": 1_000_000.0, **PRESETS[name]}
    return Qwen2Config(vocab_size=vocab_size, max_position_embeddings=max_positions,
                       rms_norm_eps=1e-6, attention_dropout=0.0,
                       bos_token_id=None, eos_token_id=1 if vocab_size == len(CHAR_VOCAB) else None,
                       pad_token_id=0 if vocab_size == len(CHAR_VOCAB) else None, **shape)


def random_model(name: str, *, vocab_size: int = QWEN_VOCAB, seed: int = 0,
                 dtype: torch.dtype = torch.float32, attn_implementation: str = "sdpa") -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = preset_config(name, vocab_size)
    config._attn_implementation = attn_implementation
    return Qwen2ForCausalLM(config).to(dtype)


def resolve_model_path(model: str) -> Path | None:
    """The local directory of `model` if it is a shipped name or an existing path, else None."""
    if model in SHIPPED:
        return SHIPPED[model]
    p = Path(model).expanduser()
    return p if p.is_dir() else None


def load_tokenizer(path: Path):
    """The tokenizer saved in `path`. One saved as a plain tokenizers backend (the shipped character
    tokenizers) loads as one: AutoTokenizer would rebuild it as the model type's class (Qwen2's BPE with
    byte-level pre-tokenisation), which drops every whitespace character of a character vocabulary."""
    saved = Path(path) / "tokenizer_config.json"
    cls = json.loads(saved.read_text()).get("tokenizer_class") if saved.exists() else None
    if cls in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True, padding_side="left")
    return AutoTokenizer.from_pretrained(path, local_files_only=True, padding_side="left")


def load_model_and_tokenizer(model: str, *, dtype: torch.dtype = torch.float32,
                             attn_implementation: str = "sdpa", seed: int = 0):
    """`model` is a shipped name ('tiny-arith'), a local HF directory, or 'random:<preset>'."""
    if model.startswith("random:"):
        preset = model.split(":", 1)[1]
        # Random presets get the char tokenizer for prompts; the model keeps the real vocabulary so the
        # lm_head has the real shape (generated ids above the char vocabulary decode to nothing).
        tok = char_tokenizer()
        vocab = len(CHAR_VOCAB) if preset == "tiny" else QWEN_VOCAB
        return random_model(preset, vocab_size=vocab, seed=seed, dtype=dtype,
                            attn_implementation=attn_implementation), tok
    path = resolve_model_path(model)
    if path is None:
        raise ValueError(
            f"model={model!r} is neither a shipped model ({sorted(SHIPPED)}), a local directory, nor "
            f"'random:<preset>' (presets: {sorted(PRESETS)}). Nothing is downloaded: put the weights "
            "in a local directory and pass its path.")
    tok = load_tokenizer(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype,
                                               attn_implementation=attn_implementation)
    return net, tok
