"""Tools in a chat request: checking the definitions and `tool_choice`, showing the tools to the
model, and choosing how its output is read.

- The tools reach the model through the chat template (`tools=`, which Jinja templates of
  tool-calling models render in their own format). A template that never mentions `tools` would
  drop them silently, so for those we add a preamble to the system message that lists the tools
  and asks for calls in the format of the parser in use (`FALLBACK_PREAMBLE`), and write earlier
  calls and tool results of the conversation as plain text in that same format.
- `tool_choice` "auto" reads the output with the `--tool-call-parser` (or, without the flag, the
  format the template itself writes: `<tool_call>` tags are Hermes/Qwen's, `<|python_tag|>` or
  `"parameters"` Llama 3's; our preamble asks for Hermes tags).
- `tool_choice` "required" or a named function constrains the output (through the grammar
  backend) to a JSON array of calls `[{"name": ..., "parameters": {...}}]` whose names are the
  allowed tools and whose arguments follow each tool's parameter schema, so the response always
  holds valid calls, even from a model that would not write them on its own.
- "none" leaves the tools out of the prompt and reads the output as plain text.
"""

from __future__ import annotations

import copy
import json
import re
from typing import Any, NamedTuple

from plait.runtime.constrained.base import (
    DEFAULT_GRAMMAR_BACKEND,
    GrammarError,
    GrammarKey,
    backend_class,
)
from plait.runtime.server.protocol import (
    ApiError,
    ChatCompletionRequest,
    ToolDefinition,
)
from plait.runtime.server.tool_parser import (
    TOOL_CALL_PARSERS,
    HermesParser,
    JsonArrayParser,
    ToolParser,
)

FALLBACK_PREAMBLE = (
    "You may call one or more functions to assist with the user query. The functions are listed"
    " within <tools></tools> XML tags, one JSON object each:\n<tools>\n{tools}\n</tools>\n\n{instructions}"
)
TOOL_RESULT = "<tool_response>\n{content}\n</tool_response>"  # a tool's result, in the fallback format


class ToolPlan(NamedTuple):
    messages: list[dict[str, Any]]  # what the chat template renders
    template_tools: list[dict[str, Any]] | None  # the template's `tools=` argument
    parser: ToolParser | None  # reads calls out of the output; None: plain text
    max_calls: int | None  # `parallel_tool_calls: false` -> 1
    json_schema: str | None  # the output constraint for "required" and named functions


def plan_tools(req: ChatCompletionRequest, messages: list[dict[str, Any]], *, chat_template: str,
               parser_name: str | None, grammar_backend: str | None = None) -> ToolPlan:
    """Check the request's tools and `tool_choice`; raise ApiError (400) with what is wrong."""
    tools = req.tools or []
    choice = _tool_choice(req.tool_choice, tools)
    renders_tools = template_renders_tools(chat_template)
    native = parser_name or detect_parser(chat_template)
    if not tools or choice == "none":
        fallback = None if renders_tools else TOOL_CALL_PARSERS[native or "hermes"](set())
        return ToolPlan(_history(messages, fallback), None, None, None, None)
    names = [t.function.name for t in tools]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise ApiError(400, f"tools: two functions are named {duplicate!r}; names must be unique", param="tools")
    max_calls = 1 if req.parallel_tool_calls is False else None
    json_schema = None
    if choice == "auto":
        if native is None:
            raise ApiError(400, "tool_choice 'auto' needs to know how this model writes tool calls: start the"
                                f" server with --tool-call-parser ({', '.join(TOOL_CALL_PARSERS)}), or use"
                                " tool_choice 'required' or a named function", param="tool_choice")
        parser: ToolParser = TOOL_CALL_PARSERS[native](set(names))
    else:
        allowed = [t for t in tools if choice in ("required", t.function.name)]
        max_calls = 1 if choice != "required" else max_calls
        json_schema = _checked(calls_schema(allowed, max_calls=max_calls), grammar_backend)
        parser = JsonArrayParser({t.function.name for t in allowed})
    if renders_tools:
        return ToolPlan(_history(messages, None), [t.model_dump(exclude_none=True) for t in tools], parser,
                        max_calls, json_schema)
    messages = _history(messages, parser)
    preamble = FALLBACK_PREAMBLE.format(
        tools="\n".join(json.dumps(t.model_dump(exclude_none=True)) for t in tools), instructions=parser.instructions)
    if messages and messages[0]["role"] == "system":
        messages[0] = {**messages[0], "content": preamble + "\n\n" + messages[0]["content"]}
    else:
        messages.insert(0, {"role": "system", "content": preamble})
    return ToolPlan(messages, None, parser, max_calls, json_schema)


def template_renders_tools(chat_template: str) -> bool:
    return re.search(r"\btools\b", chat_template) is not None


def detect_parser(chat_template: str | None) -> str | None:
    """The parser for the format a chat template teaches its model; None if unknown. A template
    that does not render tools gets our preamble, which asks for the Hermes format."""
    if chat_template is None or not template_renders_tools(chat_template):
        return "hermes"
    if HermesParser.start in chat_template:
        return "hermes"
    if "<|python_tag|>" in chat_template or '"parameters"' in chat_template:
        return "llama3"
    return None


def calls_schema(tools: list[ToolDefinition], *, max_calls: int | None) -> dict[str, Any]:
    """The JSON schema of `[{"name": ..., "parameters": {...}}, ...]` calls to these tools. Schema
    definitions (`$defs`) of the tools move to the top, where their `$ref`s point."""
    defs: dict[str, dict[str, Any]] = {}
    variants = []
    for tool in tools:
        params = copy.deepcopy(tool.function.parameters) or {"type": "object", "properties": {}}
        for key in ("$defs", "definitions"):
            for name, sub in (params.pop(key, None) or {}).items():
                if defs.setdefault(key, {}).setdefault(name, sub) != sub:
                    raise ApiError(400, f"tools: two functions define a different {key}/{name} in their parameters",
                                   param="tools")
        variants.append({"type": "object", "properties": {"name": {"enum": [tool.function.name]}, "parameters": params},
                         "required": ["name", "parameters"]})
    schema: dict[str, Any] = {"type": "array", "items": variants[0] if len(variants) == 1 else {"anyOf": variants},
                              "minItems": 1}
    if max_calls is not None:
        schema["maxItems"] = max_calls
    return {**schema, **defs}


def _checked(schema: dict[str, Any], grammar_backend: str | None) -> str:
    spec = json.dumps(schema)
    try:
        backend_class(grammar_backend or DEFAULT_GRAMMAR_BACKEND).check(GrammarKey("json_schema", spec))
    except GrammarError as e:
        raise ApiError(400, f"tools: the functions' parameters cannot be used as a constraint: {e}",
                       param="tools") from None
    return spec


def _tool_choice(value: Any, tools: list[ToolDefinition]) -> str:
    """"none", "auto", "required" or the name of the function to call."""
    if value is None:
        return "auto" if tools else "none"
    if isinstance(value, str):
        if value not in ("none", "auto", "required"):
            raise ApiError(400, f"tool_choice must be 'none', 'auto', 'required' or"
                                f' {{"type": "function", "function": {{"name": ...}}}}, got {value!r}',
                           param="tool_choice")
        if value == "required" and not tools:
            raise ApiError(400, "tool_choice 'required' needs tools", param="tool_choice")
        return value
    function = value.get("function") if isinstance(value, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if value.get("type") != "function" or not isinstance(name, str) or set(value) != {"type", "function"}:
        raise ApiError(400, 'a named tool_choice must be {"type": "function", "function": {"name": ...}}',
                       param="tool_choice")
    if name not in {t.function.name for t in tools}:
        known = ", ".join(t.function.name for t in tools) or "none"
        raise ApiError(400, f"tool_choice names the function {name!r}, which is not among the tools ({known})",
                       param="tool_choice")
    return name


def _history(messages: list[dict[str, Any]], fallback: ToolParser | None) -> list[dict[str, Any]]:
    """Earlier calls and tool results, ready for the template. Templates that render tools take a
    call's arguments as an object (`| tojson`), not OpenAI's JSON string; for the others (`fallback`)
    calls become assistant text in the parser's format and results user messages."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        calls = [(c["function"]["name"], _arguments(c["function"]["arguments"], i)) for c in m.get("tool_calls") or []]
        if fallback is None:
            if calls:
                m = {**m, "tool_calls": [{**c, "function": {"name": n, "arguments": a}}
                                         for c, (n, a) in zip(m["tool_calls"], calls)]}
            out.append(m)
        elif m["role"] in ("tool", "function"):
            result = TOOL_RESULT.format(content=m.get("content", ""))
            if out and out[-1].get("tool_results"):  # results of one turn's calls go in one message
                out[-1]["content"] += "\n" + result
            else:
                out.append({"role": "user", "content": result, "tool_results": True})
        elif calls:
            text = "\n".join(part for part in (m.get("content"), fallback.render(calls)) if part)
            out.append({k: v for k, v in m.items() if k != "tool_calls"} | {"content": text})
        else:
            out.append(m)
    for m in out:
        m.pop("tool_results", None)
    return out


def _arguments(arguments: Any, index: int) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        raise ApiError(400, f"messages[{index}].tool_calls: the arguments {arguments!r} are not valid JSON",
                       param="messages") from None
