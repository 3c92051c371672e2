"""The scheduler loop: receive, schedule, run, process, stream.

Each step runs either one extend batch (new prompts, or chunks of long ones, admitted under a
token budget and the free + evictable memory) or one decode step over every running request.
Requests share KV through the prefix cache: each admitted request locks its matched prefix,
computes only the rest, and hands its KV to the cache when it finishes.
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Callable

import torch

from plait.runtime.config import SchedulerConfig
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.sampling.sampler import Sampler, SamplingBatchInfo
from plait.runtime.scheduler.cache_manager import CacheManager
from plait.runtime.scheduler.constraints import ConstraintTracker
from plait.runtime.scheduler.io import AbortRequest, FlushCacheRequest, GenerateRequest, RequestOutput
from plait.runtime.scheduler.output import (
    append_token,
    new_detokenizer,
    record_input_logprobs,
    record_output_logprobs,
    take_output,
)
from plait.runtime.scheduler.policy import SchedulePolicy
from plait.runtime.scheduler.prefill import PrefillPlan, plan_prefill
from plait.runtime.scheduler.request import Req

logger = logging.getLogger(__name__)


class Scheduler:
    def __init__(
        self,
        runner: ModelRunner,
        config: SchedulerConfig,
        *,
        on_output: Callable[[list[RequestOutput]], None],
    ):
        self.runner = runner
        self.config = config
        self.on_output = on_output
        cache_kind = "none" if config.disable_radix_cache else config.prefix_cache
        self.cache = CacheManager(runner.allocator, runner.req_to_token_pool, prefix_cache=cache_kind)
        self.policy = SchedulePolicy(config.schedule_policy, aging_rounds=config.schedule_aging_rounds)
        self.sampler = Sampler()
        on_gpu = runner.device.type == "cuda"
        chunk = config.chunked_prefill_size or (8192 if on_gpu else 512)
        self.chunk_size = None if chunk < 0 else chunk
        self.max_prefill_tokens = config.max_prefill_tokens or max(2 * (self.chunk_size or 4096), 1024)
        self.max_running = runner.req_to_token_pool.num_rows
        self.new_token_ratio = config.init_new_token_ratio
        self.eos_token_ids = _eos_ids(runner)
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.waiting: list[Req] = []
        self.running: list[Req] = []  # decoding
        self.chunked: Req | None = None  # a prompt in the middle of a chunked prefill
        self.constraints = ConstraintTracker(
            backend_name=config.grammar_backend,
            tokenizer=runner.tokenizer,
            vocab_size=runner.vocab_size,
            stop_token_ids=self.eos_token_ids,
            jump_forward=not config.disable_jump_forward,
            wake=lambda: self.inbox.put(_WAKE),
        )
        self.stats = {"steps": 0, "extend_steps": 0, "decode_steps": 0, "retractions": 0, "generated_tokens": 0}

    # ---- input, from any thread -------------------------------------------------------------
    def submit(self, msg: GenerateRequest | AbortRequest | FlushCacheRequest) -> None:
        self.inbox.put(msg)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.constraints.pending)

    # ---- the loop -------------------------------------------------------------------------------
    def run_forever(self, stop: threading.Event) -> None:
        while not stop.is_set():
            if not (self.waiting or self.running or self.chunked):  # idle, or only grammars compiling
                try:
                    self.inbox.put(self.inbox.get(timeout=0.05))  # sleep until something arrives
                except queue.Empty:
                    continue
            self.step()

    def step(self) -> None:
        self.stats["steps"] += 1
        self._receive()
        plan = self._schedule_extend()
        if plan is not None:
            self._run_extend(plan)
        elif self.running:
            self._run_decode()
        if self.config.debug_check_integrity:
            self.check_integrity()

    def _receive(self) -> None:
        while True:
            try:
                msg = self.inbox.get_nowait()
            except queue.Empty:
                break
            if isinstance(msg, GenerateRequest):
                self._add_request(msg)
            elif isinstance(msg, AbortRequest):
                self._abort(msg.rid)
            elif isinstance(msg, FlushCacheRequest):
                if self.has_work:
                    logger.warning("flush_cache ignored: requests are running")
                else:
                    self.cache.flush()
                    self.constraints.clear()
        ready, failed = self.constraints.poll()
        self.waiting.extend(ready)
        for req, message, status in failed:
            self._reject(req, message, status)

    def _add_request(self, msg: GenerateRequest) -> None:
        req = Req(msg, eos_token_ids=self.eos_token_ids)
        error = self._validate(req)
        if error:
            self._reject(req, error, 400)
            return
        req.detokenizer = new_detokenizer(req, self.runner.tokenizer)
        if self.constraints.needs_grammar(req):
            error = self.constraints.submit(req)  # joins `waiting` once its grammar is compiled
            if error:
                self._reject(req, error, 400)
            return
        self.waiting.append(req)

    def _reject(self, req: Req, message: str, status: int) -> None:
        err_type = "BadRequest" if status < 500 else "InternalServerError"
        req.finish_reason = {"type": "abort", "message": message, "status_code": status, "err_type": err_type}
        self.cache.release(req)
        self.on_output([take_output(req)])

    def _validate(self, req: Req) -> str | None:
        prompt_len = len(req.prompt_ids)
        if prompt_len == 0:
            return "the prompt is empty"
        if prompt_len >= self.runner.context_length:
            return f"the prompt has {prompt_len} tokens, which does not fit the context length {self.runner.context_length}"
        if prompt_len + 1 > self.runner.kv_pool.num_slots:
            return f"the prompt has {prompt_len} tokens, more than the KV cache holds ({self.runner.kv_pool.num_slots})"
        if any(not 0 <= t < self.runner.vocab_size for t in req.prompt_ids):
            return f"input_ids must be in [0, {self.runner.vocab_size})"
        return None

    # ---- scheduling -------------------------------------------------------------------------------
    def _schedule_extend(self) -> PrefillPlan | None:
        if not self.waiting and self.chunked is None:
            return None
        reserved = sum(self._future_tokens(r) for r in self.running)
        plan = plan_prefill(
            waiting=self.waiting,
            chunked=self.chunked,
            cache=self.cache,
            policy=self.policy,
            token_budget=self.max_prefill_tokens,
            chunk_size=self.chunk_size,
            reserved_tokens=reserved,
            num_running=len(self.running),
            max_running=self.max_running,
            new_token_ratio=self.new_token_ratio,
        )
        if plan is None:
            return None
        admitted = {id(r) for r in plan.reqs}
        self.waiting = [r for r in self.waiting if id(r) not in admitted]
        self.chunked = None
        return plan

    def _future_tokens(self, req: Req) -> int:
        left = min(req.remaining_new_tokens, self.runner.context_length - req.seq_len)
        return int(left * self.new_token_ratio)

    # ---- extend -----------------------------------------------------------------------------------
    def _run_extend(self, plan: PrefillPlan) -> None:
        reqs, take_lens = plan.reqs, plan.take_lens
        slots = self.cache.alloc_slots(sum(take_lens))
        assert slots is not None, "admission guaranteed these slots"
        chunks, logits_starts, first_positions = [], [], []
        for req, take in zip(reqs, take_lens):
            start = req.kv_committed_len
            chunks.append(req.fill_ids[start : start + take])
            first = self._input_logprob_start(req, start, take)
            first_positions.append(first)
            logits_starts.append(None if first is None else first - start)
        batch = make_extend_batch(
            req_pool_indices=[r.req_pool_idx for r in reqs],
            prefix_lens=[r.kv_committed_len for r in reqs],
            new_token_ids=chunks,
            out_cache_loc=slots,
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
            logits_start_lens=logits_starts,
        )
        out = self.runner.forward(batch)
        self.stats["extend_steps"] += 1
        done_rows: list[int] = []
        for i, (req, take) in enumerate(zip(reqs, take_lens)):
            req.kv_committed_len += take
            if first_positions[i] is not None:
                record_input_logprobs(req, out.input_token_logits[i], first_positions[i])
            if req.kv_committed_len < req.seq_len:
                self.chunked = req  # continues next step, ahead of the queue
                self.cache.cache_unfinished(req)
                continue
            req.input_logprobs_done = True
            if req.max_new_tokens == 0:
                req.finish_reason = {"type": "length", "length": 0}
            else:
                done_rows.append(i)
        self._sample_and_process([reqs[i] for i in done_rows], out.next_token_logits[done_rows] if done_rows else None)
        for req in reqs:
            if req.finished:
                continue
            if req is not self.chunked:
                self.cache.cache_unfinished(req)
                self.running.append(req)
        self._finish_and_emit(reqs)

    def _input_logprob_start(self, req: Req, start: int, take: int) -> int | None:
        """First position of this chunk whose logits prompt logprobs need, or None."""
        if req.input_logprobs_done:
            return None
        prompt_len = len(req.prompt_ids)
        need = max(req.msg.logprob_start_len - 1, 0)
        if req.msg.logprob_start_len >= prompt_len:
            req.input_logprobs_done = True
            return None
        lo, hi = max(need, start), min(start + take, prompt_len - 1)
        if lo < hi or (req.msg.logprob_start_len == 0 and start == 0):
            return lo
        return None

    # ---- decode -----------------------------------------------------------------------------------
    def _run_decode(self) -> None:
        slots = self.cache.alloc_slots(len(self.running))
        while slots is None:
            self._retract_one()
            if not self.running:
                return
            slots = self.cache.alloc_slots(len(self.running))
        reqs = self.running
        batch = make_decode_batch(
            req_pool_indices=[r.req_pool_idx for r in reqs],
            seq_lens=[r.kv_committed_len + 1 for r in reqs],
            last_token_ids=[r.output_ids[-1] for r in reqs],
            out_cache_loc=slots,
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
        )
        out = self.runner.forward(batch)
        self.stats["decode_steps"] += 1
        for req in reqs:
            req.kv_committed_len += 1
        self._sample_and_process(reqs, out.next_token_logits)
        self.running = [r for r in reqs if not r.finished and not self._jump_forward(r)]
        self._finish_and_emit(reqs)
        self.new_token_ratio = max(self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay)

    def _jump_forward(self, req: Req) -> bool:
        """Compressed FSM: a forced continuation is appended at once and computed as one extend."""
        if not self.constraints.try_jump(req, release_kv=self.cache.release):
            return False
        self.waiting.insert(0, req)
        return True

    def _retract_one(self) -> None:
        """Memory ran out: send the least advanced request back to the queue (its KV goes to the cache)."""
        victim = min(self.running, key=lambda r: (len(r.output_ids), -r.arrival_time.__float__()))
        self.running.remove(victim)
        self.cache.release(victim)
        victim.num_retractions += 1
        self.waiting.append(victim)
        self.stats["retractions"] += 1
        self.new_token_ratio = self.config.init_new_token_ratio
        logger.debug("retracted %s", victim)

    # ---- sampling and outputs -------------------------------------------------------------------
    def _sample_and_process(self, reqs: list[Req], logits: torch.Tensor | None) -> None:
        if not reqs:
            return
        info = SamplingBatchInfo.build(
            [r.params for r in reqs],
            vocab_size=self.runner.vocab_size,
            device=logits.device,
            output_ids=[r.output_ids for r in reqs],
            prompt_ids=[r.prompt_ids for r in reqs],
            stop_token_ids_for_min=[
                # A grammar's mask may allow only a stop token; min_new_tokens must not forbid it.
                [] if getattr(r, "matcher", None) is not None
                else ([] if r.params.ignore_eos else r.eos_token_ids) + r.params.stop_token_ids
                for r in reqs
            ],
        )
        sampled = self.sampler(logits, info, vocab_mask=self.constraints.mask(reqs, logits.device))
        token_ids = sampled.next_token_ids.tolist()
        logprobs = sampled.logprobs.tolist()
        record_output_logprobs(reqs, logits, token_ids, logprobs)
        for req, token_id in zip(reqs, token_ids):
            error = self.constraints.accept(req, token_id)
            if error:
                req.finish_reason = {"type": "abort", "message": error, "status_code": 500}
                continue
            append_token(req, token_id, context_length=self.runner.context_length)
            if not req.finished and self.constraints.terminated(req):
                req.finish_reason = {"type": "stop", "matched": token_id}
        self.stats["generated_tokens"] += len(reqs)

    def _finish_and_emit(self, reqs: list[Req]) -> None:
        outputs = []
        for req in reqs:
            if req.finished:
                self.cache.release(req)
                outputs.append(take_output(req))
            elif req.msg.stream and req.pending.output_ids:
                outputs.append(take_output(req))
        if outputs:
            self.on_output(outputs)

    # ---- aborts, integrity ---------------------------------------------------------------------------
    def _abort(self, rid: str) -> None:
        def match(r: Req) -> bool:
            return rid == "" or r.rid == rid

        victims = [r for r in self.waiting if match(r)] + [r for r in self.running if match(r)]
        victims += self.constraints.remove(match)
        if self.chunked is not None and match(self.chunked):
            victims.append(self.chunked)
            self.chunked = None
        if not victims:
            return
        self.waiting = [r for r in self.waiting if not match(r)]
        self.running = [r for r in self.running if not match(r)]
        for req in victims:
            req.finish_reason = {"type": "abort", "message": "aborted by the client", "status_code": 499}
            self.cache.release(req)
        self.on_output([take_output(r) for r in victims])

    def active_requests(self) -> list[Req]:
        return self.running + ([self.chunked] if self.chunked else []) + self.waiting

    def check_integrity(self) -> None:
        self.cache.check_integrity(self.active_requests())


_WAKE = object()  # put into the inbox to wake a sleeping loop (a grammar finished compiling)


def _eos_ids(runner: ModelRunner) -> list[int]:
    ids: set[int] = set()
    eos = runner.source.generation_config.get("eos_token_id")
    if isinstance(eos, int):
        ids.add(eos)
    elif isinstance(eos, list):
        ids.update(eos)
    if runner.tokenizer is not None:
        ids.update(runner.tokenizer.eos_token_ids)
    return sorted(ids)
