"""Chat templates as data: per-role prefix and suffix, stop strings, the image token.

A template is chosen by name (`get_chat_template("chatml")`), by model path
(`get_chat_template_by_model_path`), or derived from a model's own Jinja template
(`chat_template_from_jinja`): render a probe conversation and cut it at marker strings, then keep
the result only if re-rendering a second conversation reproduces the Jinja output exactly.
The template's `stop_str` joins every `gen`'s stop list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum, auto
from typing import Any, Callable


class ChatTemplateStyle(Enum):
    PLAIN = auto()
    LLAMA2 = auto()  # the first user turn shares `[INST]` with the system block


@dataclass
class ChatTemplate:
    name: str
    default_system_prompt: str | None
    role_prefix_and_suffix: dict[str, tuple[str, str]]
    stop_str: tuple[str, ...] = ()
    image_token: str = "<image>"
    audio_token: str = "<audio>"
    style: ChatTemplateStyle = ChatTemplateStyle.PLAIN

    def get_prefix_and_suffix(self, role: str, hist_messages: list[dict[str, Any]]) -> tuple[str, str]:
        prefix, suffix = self.role_prefix_and_suffix.get(role, ("", ""))
        if self.style == ChatTemplateStyle.LLAMA2:
            if role == "system" and not hist_messages:
                return "[INST] <<SYS>>\n", "\n<</SYS>>\n\n"
            if role == "user" and len(hist_messages) == 1 and hist_messages[0]["role"] == "system":
                return "", suffix
        return prefix, suffix

    def get_prompt(self, messages: list[dict[str, Any]]) -> str:
        """Render messages (string contents) as the interpreter would."""
        out, hist = "", []
        for i, m in enumerate(messages):
            if i == 0 and m["role"] != "system" and self.default_system_prompt is not None:
                prefix, suffix = self.get_prefix_and_suffix("system", hist)
                out += prefix + self.default_system_prompt + suffix
                hist.append({"role": "system", "content": self.default_system_prompt})
            prefix, suffix = self.get_prefix_and_suffix(m["role"], hist)
            out += prefix + m["content"] + suffix
            hist.append(m)
        return out


_REGISTRY: dict[str, ChatTemplate] = {}
_MATCHERS: list[Callable[[str], str | None]] = []


def register_chat_template(template: ChatTemplate) -> None:
    _REGISTRY[template.name] = template


def register_chat_template_matching_function(func: Callable[[str], str | None]) -> Callable[[str], str | None]:
    _MATCHERS.append(func)
    return func


def get_chat_template(name: str = "default") -> ChatTemplate:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(_REGISTRY))}") from None


def list_chat_templates() -> list[str]:
    return sorted(_REGISTRY)


def get_chat_template_by_model_path(model_path: str | None) -> ChatTemplate:
    """First matching rule wins; None (Plait's default model) is SmolLM2; else "default"."""
    if model_path is None:
        return get_chat_template("smollm2")
    for matcher in _MATCHERS:
        name = matcher(model_path)
        if name is not None:
            return get_chat_template(name)
    return get_chat_template("default")


# ---- deriving a template from a model's Jinja chat template --------------------------------------
_MARK = {"system": "\x02SYS\x03", "user": "\x02USR\x03", "assistant": "\x02AST\x03"}

Render = Callable[[list[dict[str, str]], bool], str]  # (messages, add_generation_prompt) -> prompt


def jinja_renderer(source: str, *, bos_token: str = "", eos_token: str = "") -> Render:
    """Render a Hugging Face-style Jinja chat template without loading a tokenizer."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise ValueError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    compiled = env.from_string(source)
    return lambda messages, add_generation_prompt: compiled.render(
        messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token, eos_token=eos_token
    )


def chat_template_from_jinja(render: Render, name: str = "derived") -> ChatTemplate | None:
    """Derive prefixes/suffixes by rendering marker messages; None if the template is not of that shape."""
    msg = lambda role: {"role": role, "content": _MARK[role]}  # noqa: E731
    try:
        full = render([msg("system"), msg("user"), msg("assistant"), {"role": "user", "content": "\x02U2\x03"}], False)
        no_gen = render([msg("system"), msg("user")], False)
        with_gen = render([msg("system"), msg("user")], True)
        user_only = render([msg("user")], False)
    except Exception:  # a template may reject system messages or our layout; fall back to names
        return None
    if not with_gen.startswith(no_gen):
        return None
    asst_prefix = with_gen[len(no_gen):]
    try:
        sys_at, usr_at, ast_at = (full.index(_MARK[r]) for r in ("system", "user", "assistant"))
        u2_at = full.index("\x02U2\x03")
    except ValueError:
        return None
    sys_prefix = full[:sys_at]
    between_sys_user = full[sys_at + len(_MARK["system"]):usr_at]
    between_user_asst = full[usr_at + len(_MARK["user"]):ast_at]
    between_asst_user = full[ast_at + len(_MARK["assistant"]):u2_at]
    if not between_user_asst.endswith(asst_prefix):
        return None
    user_suffix = between_user_asst[: len(between_user_asst) - len(asst_prefix)]
    # A turn's suffix is the same for every role in these formats; the rest is the next prefix.
    if not (between_asst_user.startswith(user_suffix) and between_sys_user.startswith(user_suffix)):
        return None
    user_prefix = between_asst_user[len(user_suffix):]
    if between_sys_user[len(user_suffix):] != user_prefix:
        return None
    tail = full[u2_at + len("\x02U2\x03"):]
    asst_suffix = user_suffix
    default_system = None
    head = user_only[: user_only.index(_MARK["user"])]
    if head != user_prefix:
        if not (head.startswith(sys_prefix) and head.endswith(user_suffix + user_prefix)):
            return None
        default_system = head[len(sys_prefix): len(head) - len(user_suffix + user_prefix)]
    if tail != user_suffix:
        return None
    stop = asst_suffix.strip()
    template = ChatTemplate(
        name=name,
        default_system_prompt=default_system,
        role_prefix_and_suffix={"system": (sys_prefix, user_suffix), "user": (user_prefix, user_suffix),
                                "assistant": (asst_prefix, asst_suffix)},
        stop_str=(stop,) if stop else (),
    )
    check = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    try:
        if template.get_prompt(check) != render(check, False):
            return None
    except Exception:
        return None
    return template


# ---- built-in templates ----------------------------------------------------------------------------
def _plain(name: str, roles: dict[str, tuple[str, str]], *, system: str | None = None,
           stop: tuple[str, ...] = (), **kw: Any) -> None:
    register_chat_template(ChatTemplate(name, system, roles, stop, **kw))


_plain("default", {"system": ("SYSTEM:", "\n"), "user": ("USER:", "\n"), "assistant": ("ASSISTANT:", "\n")})
_plain("claude", {"system": ("", ""), "user": ("\n\nHuman: ", ""), "assistant": ("\n\nAssistant:", "")})
_CHATML = {r: (f"<|im_start|>{r}\n", "<|im_end|>\n") for r in ("system", "user", "assistant")}
_plain("chatml", _CHATML, stop=("<|im_end|>",))
_plain("chatml-llava", _CHATML, stop=("<|im_end|>",), image_token="<image>\n")
_plain("qwen", _CHATML, system="You are a helpful assistant.", stop=("<|im_end|>",))
_plain("qwen2-vl", _CHATML, system="You are a helpful assistant.", stop=("<|im_end|>",),
       image_token="<|vision_start|><|image_pad|><|vision_end|>")
_plain("smollm2", _CHATML, system="You are a helpful AI assistant named SmolLM, trained by Hugging Face",
       stop=("<|im_end|>",))
_plain("vicuna_v1.1", {"system": ("", " "), "user": ("USER:", " "), "assistant": ("ASSISTANT:", "</s>")},
       system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
_plain("llama-2-chat", {"system": ("<<SYS>>\n", "\n<</SYS>>\n\n"), "user": ("[INST] ", " [/INST]"),
                        "assistant": ("", " </s><s>")}, style=ChatTemplateStyle.LLAMA2)
_plain("mistral", {"system": ("[SYSTEM_PROMPT] ", " [/SYSTEM_PROMPT]"), "user": ("[INST] ", " [/INST]"),
                   "assistant": ("", " </s><s>")}, stop=("</s>",))
_plain("llama-3-instruct", {
    r: (f"<|start_header_id|>{r}<|end_header_id|>\n\n", "<|eot_id|>") for r in ("system", "user", "assistant")
}, stop=("<|eot_id|>",))
_plain("gemma-it", {"system": ("", ""), "user": ("<start_of_turn>user\n", "<end_of_turn>\n"),
                    "assistant": ("<start_of_turn>model\n", "<end_of_turn>\n")}, stop=("<end_of_turn>",))
_plain("deepseek-v3", {"system": ("", ""), "user": ("<｜User｜>", ""),
                       "assistant": ("<｜Assistant｜>", "<｜end▁of▁sentence｜>")}, stop=("<｜end▁of▁sentence｜>",))
_plain("yi-1.5", {"system": ("", ""), "user": ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n"),
                  "assistant": ("", "<|im_end|>\n")}, stop=("<|im_end|>",))


_PATH_RULES: list[tuple[str, str]] = [
    (r"deepseek-(v3|r1)(?!.*base)", "deepseek-v3"),
    (r"llama-2.*chat|codellama.*instruct", "llama-2-chat"),
    (r"(mistral|mixtral).*instruct", "mistral"),
    (r"llama-3.*instruct", "llama-3-instruct"),
    (r"smollm", "smollm2"),
    (r"tinyllama", "chatml"),
    (r"qwen.*vl", "qwen2-vl"),
    (r"qwen.*(chat|instruct)", "qwen"),
    (r"llava-onevision|llava-v1\.6-34b|llava-next-video-34b", "chatml-llava"),
    (r"vicuna|llava-v1\.5", "vicuna_v1.1"),
    (r"yi-1\.5.*chat", "yi-1.5"),
    (r"gemma.*it", "gemma-it"),
]


@register_chat_template_matching_function
def _match_known_paths(model_path: str) -> str | None:
    low = model_path.lower()
    for pattern, name in _PATH_RULES:
        if re.search(pattern, low):
            return name
    return None
