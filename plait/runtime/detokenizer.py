"""Incremental detokenization and stop-string matching for one request.

Output ids arrive a few at a time; the client wants text deltas. Decoding one token alone is wrong
for most tokenizers (SentencePiece drops a token's leading space at the start of a string; byte-level
BPE and byte-fallback tokens split one character over several ids), so we decode a small window
`ids[surr:]` and subtract the decoded `ids[surr:read]` (SGLang's surr/read offset scheme). The window
moves forward ("commits") only at points where decoding cannot change when more ids arrive:

- the new text does not end in U+FFFD (an incomplete UTF-8 character renders as U+FFFD);
- the last id is not a byte-fallback piece (`<0xE4>`) or a skipped special token, because the
  ByteFallback decoder renders a whole run of byte pieces as one unit: all of it valid UTF-8, or one
  U+FFFD per byte. Cutting a window inside a run could show a character that the full decode
  would later render as U+FFFD. The price: characters spelled in byte pieces are shown when the
  next ordinary token arrives (or at the end).

With those rules the concatenation of all deltas equals
`tokenizer.decode(output_ids, skip_special_tokens=..., clean_up_tokenization_spaces=False)` for any id
sequence, when no stop string matched and no `prompt_ids` were given. With `prompt_ids`, the first
output token is decoded after a few prompt tokens, so it keeps its leading space (" Paris" rather
than "Paris"). `clean_up_tokenization_spaces` is always False: that cleanup rewrites text already
streamed (" ." -> ".") and is wrong for BPE. `spaces_between_special_tokens` is passed through; fast
tokenizers ignore it.

Stop strings are matched on the committed text. While the text ends with a proper prefix of some
stop string, that tail is held back from the deltas, so a stop string never leaks into streamed text
and nothing streamed ever has to be taken back.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

# Prompt tokens decoded before the first output token (SGLang's INIT_INCREMENTAL_DETOKENIZATION_OFFSET).
INIT_CONTEXT_LEN = 5
# Bound on how far the context may grow to avoid starting inside a byte-fallback run.
MAX_CONTEXT_LEN = 32

REPLACEMENT_CHAR = "\ufffd"
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


class DetokOutput(NamedTuple):
    delta: str  # text newly safe to show, since the previous call
    text: str  # all output text safe to show so far (the concatenation of all deltas)
    matched_stop: str | None  # the stop string that ended the text, once one has matched


class StopMatch(NamedTuple):
    start: int  # index in the text where the stop string begins
    stop: str


def find_stop(text: str, stops: Sequence[str], start: int = 0) -> StopMatch | None:
    """The first stop string to complete in `text`, searching occurrences that begin at or after `start`.

    "First to complete" is the occurrence that ends earliest (ties: the one that begins earliest, i.e.
    the longer stop), which is what a character-by-character stream would see first; so the answer
    does not depend on how the text was chunked. Empty stop strings never match.
    """
    best: tuple[int, int, str] | None = None  # (end, start, stop)
    for stop in stops:
        if not stop:
            continue
        idx = text.find(stop, max(start, 0))
        if idx < 0:
            continue
        key = (idx + len(stop), idx, stop)
        if best is None or key[:2] < best[:2]:
            best = key
    if best is None:
        return None
    return StopMatch(start=best[1], stop=best[2])


def stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string (0 if none).

    That tail must be held back from streaming: the next characters may complete the stop string.
    """
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text deltas for one request.

    `tokenizer` is a Hugging Face tokenizer (fast or slow): `decode`, `convert_ids_to_tokens` and
    `all_special_ids` are used. Call `add_tokens` with each step's new ids and `finished=True` on the
    last call (it flushes held-back text: an incomplete character, or a tail that only looked like the
    start of a stop string). Once `matched_stop` is set the request should finish; ids given after
    that are ignored, so an overlap scheduler may deliver one extra step.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
        spaces_between_special_tokens: bool = True,
        stop: Sequence[str] | str = (),
        no_stop_trim: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._spaces_between_special_tokens = spaces_between_special_tokens
        self._special_ids = frozenset(tokenizer.all_special_ids) if skip_special_tokens else frozenset()
        if isinstance(stop, str):
            stop = [stop]
        self._stops = [s for s in stop if s]
        # Stop strings may be switched off for a while (min_new_tokens) and then only count from a
        # text offset on: `activate_stops(start)`.
        self._stops_active = True
        self._stop_search_start = 0
        self._max_stop_len = max((len(s) for s in self._stops), default=0)
        self._no_stop_trim = no_stop_trim

        # The window is ids[surr:]; ids before surr are never decoded again, so they are not kept.
        # `_read_offset` (into the window) is where uncommitted ids begin.
        self._window: list[int] = self._prompt_context(prompt_ids or [])
        self._read_offset = len(self._window)
        self._surr_text: str | None = None  # decode(window[:read_offset]), cached until the next commit

        self._decoded = ""  # committed output text (cut at the stop string once one matches)
        self._sent_len = 0  # chars of `_decoded` already returned in deltas
        self._matched_stop: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """All output text safe to show so far; the final text once finished or a stop matched."""
        return self._decoded[: self._sent_len]

    @property
    def matched_stop(self) -> str | None:
        return self._matched_stop

    @property
    def finished(self) -> bool:
        return self._finished or self._matched_stop is not None

    def check_integrity(self) -> None:
        assert 0 <= self._read_offset <= len(self._window)
        assert 0 <= self._sent_len <= len(self._decoded)
        if self._matched_stop is not None:
            assert self._sent_len == len(self._decoded)
            assert self._decoded.endswith(self._matched_stop) or not self._no_stop_trim
        if self._finished:
            assert self._read_offset == len(self._window) and self._sent_len == len(self._decoded)

    def add_tokens(self, new_ids: Sequence[int], *, finished: bool = False) -> DetokOutput:
        """Append output ids; return the newly showable text, all text so far, and the matched stop."""
        if self._matched_stop is not None:
            return DetokOutput("", self.text, self._matched_stop)
        if self._finished:
            raise RuntimeError("add_tokens called after finished=True")
        self._finished = finished

        self._window.extend(new_ids)
        prev_len = len(self._decoded)
        self._commit(force=finished)
        if self._stops and self._stops_active:
            self._match_stops(prev_len)

        safe_end = len(self._decoded)
        if self._matched_stop is None and not finished and self._stops and self._stops_active:
            tail = self._decoded[self._stop_search_start :]
            safe_end -= min(stop_prefix_len(tail, self._stops), len(self._decoded) - self._sent_len)
        # Held-back tails only ever grow into a stop or get released, so we never take text back.
        assert self._sent_len <= safe_end <= len(self._decoded)
        delta = self._decoded[self._sent_len : safe_end]
        self._sent_len = safe_end
        return DetokOutput(delta, self.text, self._matched_stop)

    def _commit(self, *, force: bool) -> None:
        if self._read_offset == len(self._window):
            return
        if self._surr_text is None:
            self._surr_text = self._decode(self._window[: self._read_offset])
        read_text = self._decode(self._window)
        new_text = read_text[len(self._surr_text) :]
        # An empty new_text is not committed either: moving the window start onto ids that render as
        # nothing would let a SentencePiece decoder strip the next token's leading space.
        if not force and not (new_text and self._is_stable_end(new_text)):
            return
        self._decoded += new_text
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._surr_text = None

    def _is_stable_end(self, new_text: str) -> bool:
        if new_text.endswith(REPLACEMENT_CHAR):
            return False
        last_id = self._window[-1]
        if last_id in self._special_ids:
            return False
        return not self._is_byte_piece(last_id)

    def deactivate_stops(self) -> None:
        """Stop strings neither match nor hold text back until `activate_stops`."""
        self._stops_active = False

    def activate_stops(self) -> None:
        """From now on stop strings count, but only ones starting in text not yet decoded."""
        if not self._stops_active:
            self._stops_active = True
            self._stop_search_start = len(self._decoded)

    def _match_stops(self, prev_len: int) -> None:
        # Text before prev_len held no complete stop, so a match must end after it.
        start = max(prev_len - self._max_stop_len + 1, self._stop_search_start)
        match = find_stop(self._decoded, self._stops, start)
        if match is None:
            return
        end = match.start + (len(match.stop) if self._no_stop_trim else 0)
        self._decoded = self._decoded[:end]
        self._matched_stop = match.stop

    def _prompt_context(self, prompt_ids: Sequence[int]) -> list[int]:
        """The last few prompt ids, chosen so that they decode the same way inside the window.

        A byte-fallback run at the end of the prompt would merge with output byte pieces in the
        window, so it is left out; one cut at the start of the context is extended back to its first
        piece (or dropped, if very long), because ByteFallback renders a run as a whole.
        """
        byte = self._is_byte_piece
        end = len(prompt_ids)
        while end > 0 and byte(prompt_ids[end - 1]):
            end -= 1
            if len(prompt_ids) - end > MAX_CONTEXT_LEN:
                return []
        start = max(0, end - INIT_CONTEXT_LEN)
        run_start = start
        while (
            run_start > 0
            and end - run_start <= MAX_CONTEXT_LEN
            and byte(prompt_ids[run_start])
            and byte(prompt_ids[run_start - 1])
        ):
            run_start -= 1
        if end - run_start <= MAX_CONTEXT_LEN:
            start = run_start
        else:  # a very long run: leave all of it out
            while start < end and byte(prompt_ids[start]):
                start += 1
        context = list(prompt_ids[start:end])
        # A byte-level BPE prompt that ends inside a character would be completed by the output.
        while context and self._decode(context).endswith(REPLACEMENT_CHAR):
            context.pop()
        return context

    def _is_byte_piece(self, token_id: int) -> bool:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        return isinstance(piece, str) and _BYTE_PIECE.fullmatch(piece) is not None

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(
            ids,
            skip_special_tokens=self._skip_special_tokens,
            spaces_between_special_tokens=self._spaces_between_special_tokens,
            clean_up_tokenization_spaces=False,
        )
