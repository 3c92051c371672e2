"""Regular expressions as llama.cpp grammars (GBNF), so `gen(regex=...)` constrains llama-server too.

Covers what the workloads use: literals, character classes (with \\d \\w \\s), `.`, groups,
alternation and counted repetition. Anchors are dropped (a grammar always matches the whole
output); anything else (lookarounds, backreferences) raises ValueError.
"""

from __future__ import annotations

from re import _constants as C
from re import _parser

_CATEGORIES = {C.CATEGORY_DIGIT: "0-9", C.CATEGORY_WORD: "a-zA-Z0-9_", C.CATEGORY_SPACE: " \\t\\n\\r\\x0B\\x0C"}
_NEGATED = {C.CATEGORY_NOT_DIGIT: C.CATEGORY_DIGIT, C.CATEGORY_NOT_WORD: C.CATEGORY_WORD,
            C.CATEGORY_NOT_SPACE: C.CATEGORY_SPACE}


def regex_to_gbnf(pattern: str) -> str:
    """A GBNF grammar (one `root` rule) accepting exactly the strings `pattern` fully matches."""
    return "root ::= " + _sequence(list(_parser.parse(pattern)))


def _sequence(items: list) -> str:
    parts, literal = [], ""
    for op, arg in items:
        if op is C.LITERAL:
            literal += chr(arg)
            continue
        if literal:
            parts.append(_quote(literal))
            literal = ""
        part = _item(op, arg)
        if part:
            parts.append(part)
    if literal:
        parts.append(_quote(literal))
    return " ".join(parts) or '""'


def _item(op, arg) -> str:
    if op is C.NOT_LITERAL:
        return "[^" + _class_char(chr(arg)) + "]"
    if op is C.ANY:
        return "[^\\n]"
    if op is C.IN:
        return _char_class(arg)
    if op is C.BRANCH:
        return "(" + " | ".join(_sequence(list(branch)) for branch in arg[1]) + ")"
    if op is C.SUBPATTERN:
        return "(" + _sequence(list(arg[-1])) + ")"
    if op in (C.MAX_REPEAT, C.MIN_REPEAT, C.POSSESSIVE_REPEAT):
        low, high, body = arg
        inner = _sequence(list(body))
        if len(body) != 1 or body[0][0] is C.LITERAL and len(inner) > 3:
            inner = "(" + inner + ")"
        if high is C.MAXREPEAT:
            return inner + ("*" if low == 0 else "+" if low == 1 else f"{{{low},}}")
        if (low, high) == (0, 1):
            return inner + "?"
        return inner + (f"{{{low}}}" if low == high else f"{{{low},{high}}}")
    if op is C.AT:
        return ""
    raise ValueError(f"this regex feature ({op}) has no GBNF translation here")


def _char_class(items: list) -> str:
    negate, body = False, ""
    for op, arg in items:
        if op is C.NEGATE:
            negate = True
        elif op is C.LITERAL:
            body += _class_char(chr(arg))
        elif op is C.RANGE:
            body += _class_char(chr(arg[0])) + "-" + _class_char(chr(arg[1]))
        elif op is C.CATEGORY and arg in _CATEGORIES:
            body += _CATEGORIES[arg]
        elif op is C.CATEGORY and arg in _NEGATED and len(items) == 1:
            return "[^" + _CATEGORIES[_NEGATED[arg]] + "]"
        else:
            raise ValueError(f"this character-class item ({op} {arg}) has no GBNF translation here")
    return "[" + ("^" if negate else "") + body + "]"


def _class_char(c: str) -> str:
    if c in "\\]-^[":
        return "\\" + c
    return _escape(c)


def _quote(text: str) -> str:
    return '"' + "".join("\\" + c if c in '"\\' else _escape(c) for c in text) + '"'


def _escape(c: str) -> str:
    return {"\n": "\\n", "\r": "\\r", "\t": "\\t"}.get(c) or (c if c.isprintable() else f"\\x{ord(c):02X}")
