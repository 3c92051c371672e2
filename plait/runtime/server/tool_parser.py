"""Tool calls in model output: the formats models write them in, parsed into OpenAI's `tool_calls`.

A parser turns the text generated so far into `Parsed(content, calls)`: the reply text that is
safe to show, and the calls whose function name is known, each with the text of its arguments so
far. It is called again on every longer text while streaming and once more with `final=True`.
Its output only grows between calls (content by appending, calls by appending, each call's
arguments by appending), so `ToolCallStream` can turn the difference into OpenAI's stream deltas;
a non-streaming response is the same difference taken once, and the two cannot disagree.

Formats (`--tool-call-parser`):
- `hermes` (= `qwen25`): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number,
  with text around them (Hermes 2 Pro, Qwen 2.5/3; also the format of our fallback preamble for
  chat templates without tools).
- `llama3`: the reply is `{"name": ..., "parameters": {...}}` objects separated by `;`, possibly
  after `<|python_tag|>` (Llama 3.1-3.3's JSON tool calling).
- `pythonic`: the reply is a Python list of calls, `[get_weather(city="Paris"), ...]` (Llama 3.2, 4).
- `json_array` (not a flag): `[{"name": ..., "parameters": {...}}, ...]`, what the constrained
  `tool_choice` "required" / named function makes the model write.

A call counts only if it names one of the request's tools; anything else stays reply text.
Arguments are passed on as the model wrote them (valid JSON whenever the model wrote valid JSON,
always under a constraint), so streamed pieces add up to the non-streamed string exactly.
"""

from __future__ import annotations

import ast
import json
import uuid
from typing import Any, NamedTuple


class PartialCall(NamedTuple):
    name: str
    arguments: str  # the JSON text so far ("" until the arguments begin)
    complete: bool


class Parsed(NamedTuple):
    content: str
    calls: list[PartialCall]


class ToolParser:
    """One output format. `parse` must only ever grow its result as `text` grows (see above)."""

    name = ""
    # The fallback preamble's instructions, for chat templates that cannot render tools.
    instructions = ""

    def __init__(self, tool_names: set[str]):
        self.tool_names = tool_names

    def parse(self, text: str, *, final: bool) -> Parsed:
        raise NotImplementedError

    def render(self, calls: list[tuple[str, Any]]) -> str:
        """Calls (name, arguments object) of an earlier assistant turn, written in this format."""
        raise NotImplementedError


# ---- JSON scanning over unfinished text ---------------------------------------------------------------
_WS = " \t\n\r"


class _Bad(Exception):
    """The text cannot be the JSON expected here."""


def _skip_ws(text: str, i: int) -> int:
    while i < len(text) and text[i] in _WS:
        i += 1
    return i


def _string_end(text: str, i: int, quote: str = '"') -> int | None:
    """`text[i]` opens a string: the index after its closing quote, None if the text ends first."""
    i += 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return None


def _bracket_end(text: str, i: int, quotes: str = '"') -> int | None:
    """`text[i]` opens a bracket: the index after the matching close, None if the text ends first."""
    depth = 0
    while i < len(text):
        ch = text[i]
        if ch in quotes:
            end = _string_end(text, i, ch)
            if end is None:
                return None
            i = end
            continue
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


def _value_end(text: str, i: int) -> int | None:
    """The end of the JSON value starting at `text[i]`; None while it may still go on."""
    ch = text[i]
    if ch == '"':
        return _string_end(text, i)
    if ch in "{[":
        return _bracket_end(text, i)
    j = i
    while j < len(text) and (text[j].isalnum() or text[j] in "+-."):
        j += 1
    if j == i:
        raise _Bad
    return j if j < len(text) else None


class _Object(NamedTuple):
    fields: dict[str, tuple[int, int | None]]  # key -> (value start, value end; None while unfinished)
    end: int | None  # the index after `}` (or of the first bad character); None while unfinished
    bad: bool


def _scan_object(text: str, i: int) -> _Object:
    """The top-level keys of the (possibly unfinished) JSON object opening at `text[i]`."""
    fields: dict[str, tuple[int, int | None]] = {}
    i = _skip_ws(text, i + 1)
    try:
        if i < len(text) and text[i] == "}":
            return _Object(fields, i + 1, False)
        while i < len(text):
            if text[i] != '"':
                raise _Bad
            key_end = _string_end(text, i)
            if key_end is None:
                break
            key = json.loads(text[i:key_end])
            i = _skip_ws(text, key_end)
            if i == len(text):
                break
            if text[i] != ":":
                raise _Bad
            i = _skip_ws(text, i + 1)
            if i == len(text):
                break
            end = _value_end(text, i)
            fields[key] = (i, end)
            if end is None:
                break
            i = _skip_ws(text, end)
            if i == len(text):
                break
            if text[i] == "}":
                return _Object(fields, i + 1, False)
            if text[i] != ",":
                raise _Bad
            i = _skip_ws(text, i + 1)
    except (_Bad, ValueError):
        return _Object(fields, i, True)
    return _Object(fields, None, False)


def _call(text: str, obj: _Object, tool_names: set[str], argument_keys: tuple[str, ...]) -> PartialCall | None:
    """The call an object makes, once its name is known to be one of the tools; else None."""
    span = obj.fields.get("name")
    if span is None or span[1] is None:
        return None
    try:
        name = json.loads(text[span[0] : span[1]])
    except ValueError:
        return None
    if not isinstance(name, str) or name not in tool_names:
        return None
    complete = obj.end is not None
    key = next((k for k in argument_keys if k in obj.fields), None)
    if key is None:
        return PartialCall(name, "{}" if complete else "", complete)
    start, end = obj.fields[key]
    raw = text[start:end] if end is not None else text[start:]
    if raw.startswith('"'):  # arguments given as a JSON string: its content, once whole
        try:
            decoded = json.loads(raw) if end is not None else ""
        except ValueError:
            decoded = ""
        return PartialCall(name, decoded if isinstance(decoded, str) else "", complete)
    return PartialCall(name, raw, complete)


def _call_sequence(text: str, i: int, separator: str, tool_names: set[str],
                   argument_keys: tuple[str, ...]) -> tuple[list[PartialCall], bool]:
    """Call objects from `text[i]` on, separated by `separator`. Returns (calls, whether the text
    turned out not to start with a call)."""
    calls: list[PartialCall] = []
    while True:
        i = _skip_ws(text, i)
        if i == len(text):
            return calls, False
        if text[i] != "{":
            return calls, not calls
        obj = _scan_object(text, i)
        call = _call(text, obj, tool_names, argument_keys)
        if call is None:
            return calls, obj.end is not None and not calls
        calls.append(call)
        if obj.end is None or obj.bad:
            return calls, False
        i = _skip_ws(text, obj.end)
        if i < len(text) and text[i] == separator:
            i += 1
            continue
        return calls, False


class _Builder:
    """Assembles `Parsed`. Whitespace between reply text and a call is dropped; while not final,
    the end of the text is held back where it may be the start of a call (a partial tag) or
    whitespace a call would swallow, so that what was shown never has to be taken back."""

    def __init__(self, *, final: bool, tag: str = ""):
        self.final = final
        self.tag = tag
        self.content = ""
        self.calls: list[PartialCall] = []
        self.after_call = False

    def text(self, piece: str) -> None:
        if self.after_call:
            piece = piece.lstrip()
            if not piece:
                return
            self.after_call = False
            if self.content:
                piece = "\n" + piece
        self.content += piece

    def call(self, call: PartialCall) -> None:
        self.content = self.content.rstrip()
        self.calls.append(call)
        self.after_call = True

    def result(self) -> Parsed:
        content = self.content
        if not self.final:
            held = next((k for k in range(len(self.tag) - 1, 0, -1) if content.endswith(self.tag[:k])), 0)
            content = content[: len(content) - held].rstrip()
        elif self.calls:
            content = content.rstrip()
        return Parsed(content, self.calls)


# ---- the formats --------------------------------------------------------------------------------------
class HermesParser(ToolParser):
    name = "hermes"
    start, end = "<tool_call>", "</tool_call>"
    instructions = (
        "For each function call, return a JSON object with the function name and arguments within"
        " <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    )

    def parse(self, text: str, *, final: bool) -> Parsed:
        out = _Builder(final=final, tag=self.start)
        i = 0
        while True:
            j = text.find(self.start, i)
            if j < 0:
                out.text(text[i:])
                break
            out.text(text[i:j])
            k = text.find(self.end, j)
            closed = k >= 0
            region = text[: k if closed else len(text)]
            call = None
            start = _skip_ws(region, j + len(self.start))
            if start < len(region) and region[start] == "{":
                call = _call(region, _scan_object(region, start), self.tool_names, ("arguments", "parameters"))
            region_end = k + len(self.end) if closed else len(text)
            if call is not None:
                out.call(call)
            elif closed or final:
                out.text(text[j:region_end])  # not a call of ours: it is reply text
            else:
                break  # cannot tell yet
            if not closed:
                break
            i = region_end
        return out.result()

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return "\n".join(f"{self.start}\n{json.dumps({'name': n, 'arguments': a})}\n{self.end}" for n, a in calls)


class Llama3JsonParser(ToolParser):
    name = "llama3"
    tag = "<|python_tag|>"
    instructions = (
        "To call a function, respond with only a JSON object of the form"
        ' {"name": <function-name>, "parameters": <args-json-object>};'
        " separate several calls with a semicolon."
    )

    def parse(self, text: str, *, final: bool) -> Parsed:
        out = _Builder(final=final, tag=self.tag)
        tag = text.find(self.tag)
        if tag >= 0:
            out.text(text[:tag])
            start = tag + len(self.tag)
        else:
            start = _skip_ws(text, 0)
            if start == len(text) or text[start] != "{":
                out.text(text)
                return out.result()
        calls, not_calls = _call_sequence(text, start, ";", self.tool_names, ("parameters", "arguments"))
        for call in calls:
            out.call(call)
        if not calls and (not_calls or final):
            out.text(text[tag:] if tag >= 0 else text)
        return out.result()

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls)


class JsonArrayParser(ToolParser):
    name = "json_array"
    instructions = (
        "To call functions, respond with only a JSON array of calls:"
        ' [{"name": <function-name>, "parameters": <args-json-object>}, ...]'
    )

    def parse(self, text: str, *, final: bool) -> Parsed:
        out = _Builder(final=final)
        start = _skip_ws(text, 0)
        if start < len(text) and text[start] == "[":
            calls, not_calls = _call_sequence(text, start + 1, ",", self.tool_names, ("parameters", "arguments"))
            if calls:
                for call in calls:
                    out.call(call)
                return out.result()
            if not (not_calls or final):
                return Parsed("", [])
        out.text(text)
        return out.result()

    def render(self, calls: list[tuple[str, Any]]) -> str:
        return json.dumps([{"name": n, "parameters": a} for n, a in calls])


class PythonicParser(ToolParser):
    name = "pythonic"
    markers = ("<|python_start|>", "<|python_end|>")
    instructions = (
        "To call functions, respond with only a Python list of calls with keyword arguments:"
        " [func_name1(param1=value1, param2=value2), func_name2(param=value)]"
    )

    def parse(self, text: str, *, final: bool) -> Parsed:
        out = _Builder(final=final)
        clean = text
        for marker in self.markers:
            clean = clean.replace(marker, "")
        start = _skip_ws(clean, 0)
        if start == len(clean) or clean[start] != "[":
            out.text(text)
            return out.result()
        end = _bracket_end(clean, start, quotes="\"'")
        if end is None and not final:
            return Parsed("", [])  # the list is not closed yet: calls come whole
        calls = self._calls(clean[start:end]) if end is not None else None
        if not calls:
            out.text(text)
            return out.result()
        for call in calls:
            out.call(call)
        out.text(clean[end:])
        return out.result()

    def _calls(self, source: str) -> list[PartialCall] | None:
        try:
            tree = ast.parse(source, mode="eval").body
        except SyntaxError:
            return None
        if not isinstance(tree, ast.List) or not tree.elts:
            return None
        calls = []
        for node in tree.elts:
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args):
                return None
            if node.func.id not in self.tool_names:
                return None
            try:
                arguments = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
            except ValueError:
                return None
            calls.append(PartialCall(node.func.id, json.dumps(arguments), True))
        return calls

    def render(self, calls: list[tuple[str, Any]]) -> str:
        def call(name: str, arguments: Any) -> str:
            items = arguments.items() if isinstance(arguments, dict) else []
            return f"{name}({', '.join(f'{k}={v!r}' for k, v in items)})"

        return "[" + ", ".join(call(n, a) for n, a in calls) + "]"


TOOL_CALL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser,
    "qwen25": HermesParser,
    "llama3": Llama3JsonParser,
    "pythonic": PythonicParser,
}


# ---- streaming ------------------------------------------------------------------------------------
class ToolCallStream:
    """One choice's tool calls as OpenAI stream deltas: what is new since the previous `update`.
    Each update gives at most one delta per call: the first carries the id, the name and the
    arguments so far, later ones more of the arguments. `max_calls` drops calls past it
    (`parallel_tool_calls: false`)."""

    def __init__(self, parser: ToolParser, *, max_calls: int | None = None):
        self.parser = parser
        self.max_calls = max_calls
        self.sent_content = 0
        self.sent_arguments: list[int] = []  # per call announced so far

    @property
    def num_calls(self) -> int:
        return len(self.sent_arguments)

    def update(self, text: str, *, final: bool) -> tuple[str, list[dict[str, Any]]]:
        """(new reply text, new `tool_calls` delta entries) for the output text so far."""
        content, calls = self.parser.parse(text, final=final)
        new_content = content[self.sent_content :]
        self.sent_content = max(self.sent_content, len(content))
        deltas: list[dict[str, Any]] = []
        for index, call in enumerate(calls[: self.max_calls]):
            if index == len(self.sent_arguments):
                self.sent_arguments.append(len(call.arguments))
                deltas.append({"index": index, "id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                               "function": {"name": call.name, "arguments": call.arguments}})
            elif len(call.arguments) > self.sent_arguments[index]:
                deltas.append({"index": index, "function": {"arguments": call.arguments[self.sent_arguments[index] :]}})
                self.sent_arguments[index] = len(call.arguments)
        return new_content, deltas


def merge_tool_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Stream deltas folded into the `message.tool_calls` of a non-streaming response."""
    calls: list[dict[str, Any]] = []
    for delta in deltas:
        if delta["index"] == len(calls):
            calls.append({"id": delta["id"], "type": "function",
                          "function": {"name": delta["function"]["name"], "arguments": ""}})
        calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    return calls
