"""Jump-forward decoding (the paper's compressed FSM): when the grammar forces the next characters,
append them without decoding, and retokenize the boundary so the model sees canonical tokens.

Appending the forced string's own tokenization would leave token sequences the model never saw in
training: after `"Alice"` the forced `, "age": ` would start with a lone `,` while the tokenizer
writes `",`. So we re-encode the last few output tokens together with the forced string and keep
the longest common prefix with the old tokens: `num_dropped` old tokens are replaced by `new_ids`.
The final token is held back: it may merge with text that follows (`": "` then `"`... or the
space before a number), and the model itself will produce the canonical version next step (the
grammar forces the same text). Text already produced is never taken back; a jump that would need
that is skipped.

The scheduler applies a jump by dropping `num_dropped` tokens (rolling back their KV) and running
`new_ids` as an extend, which computes them all in one forward instead of one decode step each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from plait.runtime.constrained.base import GrammarMatcher

REPLACEMENT_CHAR = "\ufffd"


class JumpForward(NamedTuple):
    num_dropped: int  # tokens removed from the end of the output (their KV is rolled back)
    new_ids: list[int]  # tokens appended after the drop (run as one extend)
    text: str  # text the output gains: a prefix of the forced string

    @property
    def gain(self) -> int:
        """Decode steps saved (output length after minus before)."""
        return len(self.new_ids) - self.num_dropped


def retokenize_jump(
    tokenizer: Any, output_ids: Sequence[int], forced: str, *, window: int = 8, hold_back_last: bool = True
) -> JumpForward | None:
    """How to append `forced` to `output_ids` so the tokens are the tokenizer's own (pure function).

    Re-encodes `decode(last window tokens) + forced`, widening the window while its first token
    changes (the window must start at a boundary the tokenizer keeps). Returns None when nothing can
    be appended: the forced string fits in the held-back token, the output ends inside a UTF-8
    character, or the text does not survive an encode/decode round trip.
    Guarantee: `decode(output_ids[:len - num_dropped] + new_ids) == decode(output_ids) + text`.
    """
    hf = getattr(tokenizer, "hf", tokenizer)
    if not forced or REPLACEMENT_CHAR in forced:
        return None
    num_out = len(output_ids)
    size = min(window, num_out)
    while True:
        start = num_out - size
        tail = list(output_ids[start:])
        tail_text = _decode(hf, tail)
        if tail_text.endswith(REPLACEMENT_CHAR):
            return None  # the output ends inside a character; wait for the rest of it
        text = tail_text + forced
        ids = hf.encode(text, add_special_tokens=False)
        if _decode(hf, ids) != text:
            return None
        common = _common_prefix_len(tail, ids)
        if common > 0 or not tail:
            break
        if start == 0:
            return None  # even the first output token would change: it fused with the prompt's text
        size = min(2 * size, num_out)
    keep = ids[:-1] if hold_back_last else ids
    while len(keep) > common and not text.startswith(_decode(hf, keep)):
        keep.pop()  # ends inside a character
    covered = _decode(hf, keep)
    if len(keep) <= common or len(covered) <= len(tail_text):
        return None
    new_ids = keep[common:]
    special = set(hf.all_special_ids)
    if any(t in special for t in new_ids):
        return None  # the forced text spells a special token; the grammar would reject its id
    return JumpForward(num_dropped=len(tail) - common, new_ids=new_ids, text=covered[len(tail_text) :])


def jump_forward_tokens(
    tokenizer: Any, matcher: GrammarMatcher, output_ids: Sequence[int], *, min_gain: int = 1, window: int = 8
) -> JumpForward | None:
    """Find the forced string, retokenize the boundary and advance `matcher` to match.

    `output_ids` must be exactly the tokens `matcher` has accepted. Returns None (matcher unchanged)
    when there is no jump saving at least `min_gain` decode steps. On success the matcher has already
    dropped `num_dropped` tokens and accepted `new_ids`; the caller must do the same to the request.
    """
    forced = matcher.find_jump_forward()
    if not forced:
        return None
    jump = retokenize_jump(tokenizer, output_ids, forced, window=window)
    if jump is None or jump.gain < min_gain:
        return None
    return jump if apply_jump(matcher, output_ids, jump) else None


def apply_jump(matcher: GrammarMatcher, output_ids: Sequence[int], jump: JumpForward) -> bool:
    """Roll the matcher back over the dropped tokens and accept the new ones. If the grammar
    refuses a new token, restore the old state and return False."""
    dropped = list(output_ids[len(output_ids) - jump.num_dropped :])
    matcher.rollback(jump.num_dropped)
    for accepted, token_id in enumerate(jump.new_ids):
        if not matcher.accept_token(token_id):
            matcher.rollback(accepted)
            for old in dropped:
                ok = matcher.accept_token(old)
                assert ok, "a token the matcher accepted before was refused after rollback"
            return False
    return True


def _decode(hf: Any, ids: Sequence[int]) -> str:
    return hf.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
