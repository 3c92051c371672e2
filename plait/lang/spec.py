"""API speculative execution: one API call generates past the current `gen`, later ones are
matched out of the surplus (SGLang paper, section 4; pays off for per-call APIs).

Completion models: the executor keeps the surplus as `speculated_text`; a gen takes the text up
to its earliest stop string, a constant fill consumes the surplus if it matches.
Chat models: inside an assistant turn, fills and gens are recorded as a pattern and one chat
completion at the end of the turn is cut into the gens' values (`match_spec_pattern`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from plait.lang.interpreter import StreamExecutor
    from plait.lang.params import GenParams

SPEC_CHAT_RETRIES = 3


@dataclass
class SpecGen:
    """A gen recorded inside a speculative chat turn."""

    name: str | None
    stop: list[str]
    params: Any


def find_stop(text: str, stops: list[str]) -> int | None:
    """Position of the earliest occurrence of any stop string, or None."""
    positions = [p for p in (text.find(s) for s in stops if s) if p >= 0]
    return min(positions) if positions else None


def match_spec_pattern(pieces: list[str | SpecGen], output: str) -> list[str] | None:
    """Cut `output` into the gens' values, in order; None if a literal piece is not found.

    Literal pieces must appear where expected (whitespace at the joints is forgiven, since chat
    models often add or drop a space); a gen's value ends at its earliest stop string, else at the
    next literal piece, else at the end of the output.
    """
    values: list[str] = []
    pos = 0
    for i, piece in enumerate(pieces):
        if isinstance(piece, str):
            core = piece.strip()
            if output.startswith(piece, pos):
                pos += len(piece)
            elif not core:
                continue
            else:
                j = pos
                while j < len(output) and output[j].isspace():
                    j += 1
                if not output.startswith(core, j):
                    return None
                pos = j + len(core)
            continue
        rest = output[pos:]
        end = find_stop(rest, piece.stop)
        if end is None:
            nxt = next((p.strip() for p in pieces[i + 1:] if isinstance(p, str) and p.strip()), None)
            found = rest.find(nxt) if nxt else -1
            end = found if found >= 0 else len(rest)
        values.append(rest[:end])
        pos += end
    return values


def speculative_completion(ex: StreamExecutor, params: GenParams) -> tuple[str, Any]:
    """A gen on a completion model: served from the surplus when it holds a stop string, else one
    call that generates `num_api_spec_tokens` past it with no stop. Returns (value, meta)."""
    stops = list(params.sampling.stop)
    if not stops:  # without a stop there is nothing to cut at: an ordinary call
        ex.speculated_text = ""
        return ex.backend.generate(ex, params)
    meta: Any = {"api_speculative": "surplus"}
    at = find_stop(ex.speculated_text, stops)
    if at is None:
        budget = max(params.sampling.max_new_tokens or 0, ex.num_api_spec_tokens or 0)
        text, meta = ex.backend.generate(ex, params.replace(max_new_tokens=budget, stop=[]))
        ex.speculated_text = text
        at = find_stop(text, stops)
        if at is None:
            ex.speculated_text = ""
            if budget == params.sampling.max_new_tokens:
                return text, meta  # the gen's own length limit: exactly what it asked for
            return ex.backend.generate(ex, params)  # text cannot be cut at a token count: ask again
    value, ex.speculated_text = ex.speculated_text[:at], ex.speculated_text[at:]
    return value, meta


def finish_speculative_chat_turn(ex: StreamExecutor) -> None:
    """End of an assistant turn on a chat model: one call for the whole turn, cut into the
    recorded gens (retried if the answer does not fit), then appended in order."""
    pieces, ex.spec_pieces = ex.spec_pieces or [], None
    gens = [p for p in pieces if isinstance(p, SpecGen)]
    values: list[str] | None = []
    meta: Any = None
    if gens:
        params = gens[0].params.replace(max_new_tokens=ex.num_api_spec_tokens, stop=[])
        output = ""
        for _ in range(SPEC_CHAT_RETRIES):
            output, meta = ex.backend.generate(ex, params)
            values = match_spec_pattern(pieces, output)
            if values is not None:
                break
        if values is None:
            raise RuntimeError(f"the speculative chat answer does not fit the program's pattern "
                               f"after {SPEC_CHAT_RETRIES} tries; last answer: {output!r}")
    it = iter(values or [])
    for piece in pieces:
        if isinstance(piece, str):
            ex.append_text(piece)
        else:
            value = next(it)
            ex.var_text_pos[piece.name] = len(ex.text_)
            ex.append_text(value)
            ex.define_var(piece.name, value, meta)
