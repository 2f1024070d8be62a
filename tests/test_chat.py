"""Chat prompts: rendering with a tokenizer's chat template, TRL conversational datasets, the chat task."""
from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fastdash.config import Config, load_config
from fastdash.data import load_task, prompt_key, render_prompt
from fastdash.data.chat import render_text
from fastdash.data.loaders import load_problems
from fastdash.data.word_problems import KINDS, heldout_capacity, is_heldout, make_word_problems
from fastdash.rewards import get_reward_fn
from fastdash.runtime import DEFAULT_REWARD, _drop_long_prompts

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def _tokenizer(template: str | None = CHATML):
    """A character-level tokenizer whose two ChatML markers are single special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(i) for i in range(32, 127)] + ["\n"]
    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"] + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    out = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"])
    out.chat_template = template
    return out


def cfg(**kw):
    return SimpleNamespace(**{"chat_template": "auto", "system_prompt": None, **kw})


USER = [{"role": "user", "content": "1+2?"}]
RENDERED = "<|im_start|>user\n1+2?<|im_end|>\n<|im_start|>assistant\n"


def test_messages_use_the_template_with_a_generation_prompt():
    tok = _tokenizer()
    ids = render_prompt(tok, USER, cfg())
    assert tok.decode(ids) == RENDERED
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")  # markers are tokens, not their characters
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1


def test_text_prompts_stay_raw_unless_chat_template_true():
    tok = _tokenizer()
    assert render_text(tok, "1+2?", "auto") == "1+2?"
    assert render_text(tok, "1+2?", False) == "1+2?"
    assert render_text(tok, "1+2?", True) == RENDERED


def test_system_prompt_is_prepended_once():
    tok = _tokenizer()
    text = render_text(tok, USER, "auto", "Be brief.")
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n" + RENDERED
    own = [{"role": "system", "content": "Mine."}] + USER
    assert render_text(tok, own, "auto", "Be brief.").count("system") == 1  # the row's own system message wins


@pytest.mark.parametrize("tok, prompt, chat, system", [
    (_tokenizer(None), USER, "auto", None),  # messages, but the tokenizer has no template
    (_tokenizer(None), "1+2?", True, None),
    (_tokenizer(), USER, False, None),  # messages with the template switched off
    (_tokenizer(), "1+2?", "auto", "Be brief."),  # a system prompt that would be silently dropped
])
def test_unrenderable_prompts_are_errors_naming_chat_template(tok, prompt, chat, system):
    with pytest.raises(ValueError, match="chat_template"):
        render_prompt(tok, prompt, cfg(chat_template=chat, system_prompt=system))


def test_malformed_messages_are_errors():
    with pytest.raises(ValueError, match="role"):
        render_prompt(_tokenizer(), [{"content": "x"}], cfg())


def test_prompt_key_tells_prompts_apart():
    a, b = [{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]
    assert prompt_key(a) != prompt_key(b) and prompt_key(a) == prompt_key([dict(a[0])])
    assert prompt_key("a") == "a" and len({prompt_key(a), prompt_key(b), prompt_key("a")}) == 3


def test_config_chat_fields():
    assert Config().chat_template == "auto" and Config().system_prompt is None
    c = load_config(None, ["chat_template=true", "system_prompt=Be brief."])
    assert c.chat_template is True and c.system_prompt == "Be brief."
    assert load_config(None, ["chat_template=false"]).chat_template is False
    with pytest.raises(ValueError, match="chat_template"):
        Config(chat_template="always")
    assert Config(task="arithmetic_chat").dataset is None  # built in: no dataset needed
    assert DEFAULT_REWARD["arithmetic_chat"] == "gsm8k"


def test_trl_conversational_jsonl(tmp_path):
    rows = [{"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"}], "answer": "4"},
            {"prompt": [{"role": "user"}], "answer": "1"},  # malformed: skipped with a warning
            {"prompt": "3+3?", "answer": "6"}]  # plain strings may sit beside messages
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    probs = load_problems(str(path), task="plain")
    assert [p["answer"] for p in probs] == ["4", "6"]
    assert probs[0]["prompt"] == rows[0]["prompt"] and probs[1]["prompt"] == "3+3?"
    tok = _tokenizer()
    assert tok.decode(render_prompt(tok, probs[0]["prompt"], cfg())).startswith("<|im_start|>system\nS<|im_end|>")
    with pytest.raises(ValueError, match="prompt_template"):
        load_problems(str(path), task="plain", prompt_template="Q: {prompt}")


def test_word_problems_are_deterministic_and_correct():
    a, b = make_word_problems(50, seed=3), make_word_problems(50, seed=3)
    assert a == b and a != make_word_problems(50, seed=4)
    for p in a:
        text = p["prompt"][0]["content"]
        numbers = [int(w.strip(",.?")) for w in text.split() if w.strip(",.?").isdigit()]
        assert p["answer"] == str(KINDS[p["kind"]][2](*numbers)) and int(p["answer"]) >= 0


def test_word_problem_heldout_split_is_disjoint():
    def calc(p):
        text = p["prompt"][0]["content"]
        return p["kind"], tuple(int(w.strip(",.?")) for w in text.split() if w.strip(",.?").isdigit())

    held = make_word_problems(200, split="heldout")
    train = make_word_problems(3000, split="train", seed=1)
    assert len({calc(p) for p in held}) == 200  # distinct calculations
    assert all(is_heldout(*calc(p)) for p in held) and not any(is_heldout(*calc(p)) for p in train)
    with pytest.raises(ValueError, match="held-out"):
        make_word_problems(heldout_capacity() + 1, split="heldout")


def test_chat_task_end_to_end_prompt_ids():
    c = Config(task="arithmetic_chat", num_train_problems=20, num_eval_problems=10, max_prompt_length=200,
               system_prompt="Reply with only the final number.")
    train, evals = load_task(c)
    tok = _tokenizer()
    kept = _drop_long_prompts(c, tok, train, "train")
    assert len(kept) == 20
    text = tok.decode(render_prompt(tok, kept[0]["prompt"], c))
    assert text.startswith("<|im_start|>system\nReply with only") and text.endswith("<|im_start|>assistant\n")
    reward = get_reward_fn(DEFAULT_REWARD[c.task])
    assert reward(f"So {evals[0]['answer']}.", evals[0]["answer"]) == 1.0
    assert reward("I do not know", evals[0]["answer"]) == 0.0


def test_fastdash_imports_without_datasets():
    code = ("import sys; sys.modules['datasets'] = None\n"  # any `import datasets` now raises ImportError
            "import fastdash.train, fastdash.runtime, fastdash.data, fastdash.data.loaders\n"
            "from fastdash.config import Config\nfrom fastdash.data import load_task\n"
            "assert len(load_task(Config(task='arithmetic_chat', num_train_problems=4, num_eval_problems=2))[0]) == 4")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
