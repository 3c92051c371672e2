"""Chat templates as data: built-ins by name and by model path, and templates derived from a model's
own Jinja template (checked by re-rendering through Jinja)."""

from __future__ import annotations

import pytest

from plait.lang.chat_template import (
    chat_template_from_jinja,
    get_chat_template,
    get_chat_template_by_model_path,
    jinja_renderer,
)

SMOLLM = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
NO_SYSTEM = (
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}{{ '<start_of_turn>' + message['role'] + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
)

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


def test_derive_chatml_with_default_system_prompt():
    render = jinja_renderer(SMOLLM)
    t = chat_template_from_jinja(render)
    assert t is not None
    assert t.role_prefix_and_suffix["user"] == ("<|im_start|>user\n", "<|im_end|>\n")
    assert t.role_prefix_and_suffix["assistant"] == ("<|im_start|>assistant\n", "<|im_end|>\n")
    assert t.default_system_prompt == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert t.stop_str == ("<|im_end|>",)
    for messages in (CONVERSATION, CONVERSATION[1:]):
        assert t.get_prompt(messages) == render(messages, False)
    # The built-in for the default model is the same data.
    smollm = get_chat_template("smollm2")
    assert smollm.role_prefix_and_suffix == t.role_prefix_and_suffix and smollm.stop_str == t.stop_str
    assert smollm.default_system_prompt == t.default_system_prompt


def test_derive_llama3_and_reject_unusual_templates():
    render = jinja_renderer(LLAMA3)  # BOS is the tokenizer's job, not the transcript's
    t = chat_template_from_jinja(render)
    assert t is not None and t.stop_str == ("<|eot_id|>",) and t.default_system_prompt is None
    assert t.role_prefix_and_suffix["system"][0] == "<|start_header_id|>system<|end_header_id|>\n\n"
    assert t.get_prompt(CONVERSATION) == render(CONVERSATION, False)
    # Text before the first turn that is not a system block cannot be expressed per role.
    assert chat_template_from_jinja(jinja_renderer(LLAMA3, bos_token="<|begin_of_text|>")) is None
    assert chat_template_from_jinja(jinja_renderer(NO_SYSTEM)) is None  # falls back to names


def test_by_name_and_by_model_path():
    assert get_chat_template("llama-3-instruct").stop_str == ("<|eot_id|>",)
    assert get_chat_template_by_model_path("meta-llama/Meta-Llama-3.1-8B-Instruct").name == "llama-3-instruct"
    assert get_chat_template_by_model_path("Qwen/Qwen2.5-7B-Instruct").name == "qwen"
    assert get_chat_template_by_model_path("models/SmolLM2-135M-Instruct.Q4_1.gguf").name == "smollm2"
    assert get_chat_template_by_model_path(None).name == "smollm2"  # Plait's default model
    assert get_chat_template_by_model_path("some/unknown-model").name == "default"
    with pytest.raises(ValueError, match="unknown chat template"):
        get_chat_template("nope")


def test_llama2_style_merges_system_into_first_turn():
    t = get_chat_template("llama-2-chat")
    prompt = t.get_prompt([{"role": "system", "content": "S"}, {"role": "user", "content": "U"},
                           {"role": "assistant", "content": "A"}])
    assert prompt == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU [/INST]A </s><s>"
