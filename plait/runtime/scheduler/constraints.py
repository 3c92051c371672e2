"""The scheduler's side of constrained decoding: compiling a request's grammar off the loop,
masking its logits, advancing its matcher, and jump-forward (the compressed FSM).

A constrained request waits in `pending` until its grammar is compiled (on the grammar manager's
worker thread); the done-callback wakes the scheduler. Its `output_ids` are at all times exactly
the tokens its matcher has accepted, across retraction and jump-forward.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from typing import TYPE_CHECKING, Callable, NamedTuple

import torch

from plait.runtime.constrained.base import GrammarError, grammar_key
from plait.runtime.constrained.jump_forward import apply_jump, retokenize_jump
from plait.runtime.scheduler.output import new_detokenizer
from plait.runtime.scheduler.request import Req

if TYPE_CHECKING:
    from plait.runtime.constrained.manager import GrammarManager

logger = logging.getLogger(__name__)


class GrammarRefusal(NamedTuple):
    message: str
    status: int  # 400: the constraint's fault; 500: ours


class ConstraintTracker:
    def __init__(self, *, backend_name: str, tokenizer, vocab_size: int, stop_token_ids: list[int],
                 jump_forward: bool, wake: Callable[[], None]):
        self.backend_name = backend_name
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.jump_forward = jump_forward
        self.wake = wake
        self._manager: GrammarManager | None = None
        self.pending: list[Req] = []
        self.stats = {"jumps": 0, "jump_forced_tokens": 0, "mask_rows": 0, "mask_seconds": 0.0}

    @property
    def manager(self) -> "GrammarManager":
        if self._manager is None:  # built on first use: unconstrained servers never pay for it
            from plait.runtime.constrained.manager import GrammarManager

            self._manager = GrammarManager(
                self.backend_name, self.tokenizer, self.vocab_size, stop_token_ids=self.stop_token_ids
            )
        return self._manager

    def needs_grammar(self, req: Req) -> bool:
        return grammar_key(req.params) is not None

    def submit(self, req: Req) -> str | None:
        """Start compiling the request's grammar; returns an error message instead when it cannot be."""
        if self.tokenizer is None:
            return "constrained decoding needs a tokenizer, and this model has none"
        future: Future = self.manager.request(req.params)
        req.grammar_future = future
        self.pending.append(req)
        future.add_done_callback(lambda _: self.wake())
        return None

    def poll(self) -> tuple[list[Req], list[tuple[Req, str, int]]]:
        """Requests whose grammar is ready (matcher attached), and failures (req, message, status)."""
        ready, failed, still = [], [], []
        for req in self.pending:
            future = req.grammar_future
            assert future is not None
            if not future.done():
                still.append(req)
                continue
            error = future.exception()
            if isinstance(error, GrammarError):
                failed.append((req, str(error), 400))
            elif error is not None:
                logger.error("grammar compilation failed: %r", error)
                failed.append((req, f"grammar compilation failed: {error}", 500))
            else:
                req.matcher = self.manager.new_matcher(future.result())
                req.grammar_future = None
                self.try_jump(req)  # a forced opening (`{"name": "`) joins the first prefill
                ready.append(req)
        self.pending = still
        return ready, failed

    def remove(self, match: Callable[[Req], bool]) -> list[Req]:
        gone = [r for r in self.pending if match(r)]
        self.pending = [r for r in self.pending if not match(r)]
        return gone

    def mask(self, reqs: list[Req], device: torch.device) -> torch.Tensor | None:
        """Allowed-token mask [bs, vocab] for the batch, or None when no row is constrained."""
        matchers = [r.matcher for r in reqs]
        if all(m is None for m in matchers):
            return None
        start = time.perf_counter()
        mask = self.manager.batch_mask(matchers, device=device)
        self.stats["mask_rows"] += sum(m is not None for m in matchers)
        self.stats["mask_seconds"] += time.perf_counter() - start
        return mask

    def accept(self, req: Req, token_id: int) -> GrammarRefusal | None:
        """Advance the matcher by the sampled token; why not, if the grammar refuses it."""
        matcher = req.matcher
        if matcher is None:
            return None
        if not matcher.accept_token(token_id):
            reason = matcher.error()
            if reason is not None:  # the engine hit a limit following the request's grammar: its fault
                return GrammarRefusal(f"the constraint exceeds the grammar engine's limits: {reason}", 400)
            return GrammarRefusal(f"internal error: the grammar refused sampled token {token_id}", 500)
        return None

    def terminated(self, req: Req) -> bool:
        matcher = req.matcher
        return matcher is not None and matcher.is_terminated()

    def try_jump(self, req: Req, *, release_kv: Callable[[Req], None] | None = None) -> bool:
        """Append the grammar's forced continuation without decoding. True when the request's
        tokens changed: it must then run its new tail as an extend (the caller re-queues it).
        `release_kv` is called first, while the request's ids still match its KV."""
        matcher = req.matcher
        if not self.jump_forward or matcher is None or req.msg.return_logprob or req.finished:
            return False
        forced = matcher.find_jump_forward()
        if not forced:
            return False
        jump = retokenize_jump(self.tokenizer, req.output_ids, forced)
        # Worth a re-prefill only if it saves decode steps; never past max_new_tokens.
        if jump is None or jump.gain < 2 or len(req.output_ids) + jump.gain > req.max_new_tokens:
            return False
        if not apply_jump(matcher, req.output_ids, jump):
            return False
        if release_kv is not None:
            release_kv(req)  # while output_ids still match the KV
        pending = req.pending
        if req.detokenizer is not None:
            pending.text += req.detokenizer.add_tokens([], finished=True).delta
        keep = len(req.output_ids) - jump.num_dropped
        from_pending = min(jump.num_dropped, len(pending.output_ids))
        if from_pending:
            del pending.output_ids[-from_pending:]
        pending.num_dropped_ids += jump.num_dropped - from_pending
        req.output_ids = req.output_ids[:keep] + list(jump.new_ids)
        pending.output_ids.extend(jump.new_ids)
        pending.text += jump.text
        # The detokenizer restarts after the jump, with everything so far as its context.
        req.detokenizer = new_detokenizer(req, self.tokenizer, context_ids=req.prompt_ids + req.output_ids)
        self.stats["jumps"] += 1
        self.stats["jump_forced_tokens"] += len(jump.new_ids)
        return True

    def clear(self) -> None:
        if self._manager is not None:
            self._manager.clear_cache()

    def shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
