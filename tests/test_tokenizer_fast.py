"""`FastTokenizer` (a saved tokenizer folder read with the `tokenizers` library alone) and the chat
template renderer answer exactly as transformers does; tokenizers loaded that way keep transformers
out of the process."""

from __future__ import annotations

import json
import pickle

import pytest

from plait.runtime import fast_tokenizer
from plait.runtime.chat_template import render
from plait.runtime.tokenizer import Tokenizer

TEXTS = ["Hello world", "  leading spaces and trailing  ", "<|im_start|>user\nhi<|im_end|>", "naïve café 日本語 🎉",
         "a\n\n\nb\t\tc", "", "<|endoftext|>x<unk>", "def f(x):\n    return x ** 2  # squared"]


@pytest.fixture(scope="module")
def pair(default_tokenizer, tmp_path_factory):
    """(FastTokenizer, transformers tokenizer) of the default model, read from the same saved folder."""
    folder = tmp_path_factory.mktemp("tok")
    hf = default_tokenizer.hf
    hf.save_pretrained(folder)
    fast = fast_tokenizer.load(str(folder))
    assert fast is not None
    return fast, hf


def test_encode_decode_and_special_tokens_match_transformers(pair):
    fast, hf = pair
    for text in TEXTS:
        assert fast.encode(text) == hf.encode(text)
        assert fast.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False)
    ids = list(range(0, len(hf), 61)) + list(range(20)) + [len(hf) - 1]
    for skip in (True, False):
        assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
    assert fast.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert fast.convert_ids_to_tokens(5) == hf.convert_ids_to_tokens(5)
    assert fast.convert_tokens_to_ids(["<|im_end|>", "no-such-token"]) == hf.convert_tokens_to_ids(
        ["<|im_end|>", "no-such-token"])
    assert fast.all_special_ids == hf.all_special_ids
    assert fast.all_special_tokens == hf.all_special_tokens
    assert len(fast) == len(hf)
    assert (fast.bos_token, fast.eos_token, fast.pad_token, fast.unk_token) == (
        hf.bos_token, hf.eos_token, hf.pad_token, hf.unk_token)
    assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (hf.bos_token_id, hf.eos_token_id,
                                                                          hf.pad_token_id)
    assert fast.special_tokens_map == hf.special_tokens_map
    assert fast.chat_template == hf.chat_template


def test_a_config_asking_for_more_is_left_to_transformers(pair, tmp_path):
    _, hf = pair
    hf.save_pretrained(tmp_path)
    config_path = tmp_path / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["add_bos_token"] = True  # transformers would change the post-processor for this
    config_path.write_text(json.dumps(config))
    assert fast_tokenizer.load(str(tmp_path)) is None
    assert fast_tokenizer.load(str(tmp_path / "missing")) is None


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
TEMPLATES = {
    "chatml-with-tools": (
        "{{ bos_token }}{% if tools %}<tools>{{ tools | tojson(indent=2) }}</tools>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
        "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
        "{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% if enable_thinking is defined and not "
        "enable_thinking %}<think></think>{% endif %}{% endif %}"),
    "namespace-loopcontrols-raise": (
        "{% set ns = namespace(n=0) %}{% for m in messages %}{% if m.role == 'tool' %}{% continue %}{% endif %}"
        "{% set ns.n = ns.n + 1 %}{% if m.role not in ['user', 'assistant', 'system'] %}"
        "{{ raise_exception('bad role ' + m.role) }}{% endif %}[{{ ns.n }}:{{ m.role }}] {{ m.content }}\n"
        "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"),
    "generation-tag": (
        "{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}A: {{ m.content }}{% endgeneration %}"
        "{% else %}U: {{ m.content }}{% endif %}\n{% endfor %}"),
}
CHATS = [
    [{"role": "user", "content": "Tell me about Paris."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Ünïcödé ✓"},
     {"role": "assistant", "content": "Sure.", "reasoning": "they want it short", "tool_calls": None},
     {"role": "user", "content": "More"}],
]


@pytest.mark.parametrize("name", sorted(TEMPLATES))
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_templates_render_as_transformers_renders_them(pair, name, chat):
    _, hf = pair
    template, messages = TEMPLATES[name], CHATS[chat]
    variables = hf.special_tokens_map
    for kwargs in ({"add_generation_prompt": True}, {"add_generation_prompt": False, "tools": TOOLS},
                   {"add_generation_prompt": True, "enable_thinking": False}):
        expected = hf.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
        assert render(template, messages, **{**variables, **kwargs}) == expected
    if messages[-1]["role"] == "user":
        continued = messages + [{"role": "assistant", "content": "The answer is"}]
        if name != "namespace-loopcontrols-raise":
            expected = hf.apply_chat_template(continued, chat_template=template, tokenize=False,
                                              continue_final_message=True)
            assert render(template, continued, continue_final_message=True, **variables) == expected
    assert messages == CHATS[chat]  # the caller's messages are not edited


def test_template_errors_are_the_same():
    import jinja2

    bad = [{"role": "robot", "content": "x"}]
    with pytest.raises(jinja2.exceptions.TemplateError, match="bad role robot"):
        render(TEMPLATES["namespace-loopcontrols-raise"], bad)
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{% set ns = namespace(_x=1) %}", bad)
    with pytest.raises(ValueError):
        render(TEMPLATES["generation-tag"], [])


def test_the_wrapper_uses_the_fast_tokenizer_and_pickles_without_transformers(pair):
    fast, hf = pair
    tok = Tokenizer(fast)
    messages = CHATS[1]
    assert tok.apply_chat_template(messages) == hf.apply_chat_template(messages, add_generation_prompt=True,
                                                                       tokenize=False)
    assert tok.eos_token_ids == Tokenizer(hf).eos_token_ids
    assert tok.hf.encode("x y") == hf.encode("x y")  # built on demand, for grammar backends
    copy = pickle.loads(pickle.dumps(tok))
    assert copy._hf is None and copy.encode("Hello") == tok.encode("Hello")
