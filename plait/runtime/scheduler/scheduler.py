"""The scheduler loop: receive, schedule, run, process, stream.

Each step runs either one extend batch (new prompts, or chunks of long ones, admitted under a
token budget and the free + evictable memory) or one decode step over every running request.
Requests share KV through the prefix cache: each admitted request locks its matched prefix,
computes only the rest, and hands its KV to the cache when it finishes.

A step has four phases. `_schedule` picks the batch and allocates its KV, which needs only
lengths; `_launch` runs the forward pass; `_sample` picks the next tokens, which needs every
earlier token (grammar masks, penalties, min_new_tokens); `_process` reads the tokens back and
applies them (stop checks, logprobs, outputs, freeing). Without overlap they run in that order.
With overlap scheduling (the default on CUDA) the tokens of step i are read back only after step
i+1 is scheduled and its forward launched, so the host's work on step i runs while the device
computes step i+1:

    receive -> schedule i+1 -> launch i+1 -> process i -> sample i+1

Step i+1's inputs are step i's tokens, which the host does not have yet: the sampler writes them
into `last_tokens` (a device buffer by req_to_token row) and the decode batch reads them from
there. A request that step i ends with a stop token or string is already in step i+1: its extra
token is dropped and the KV slot it wrote goes to the cache with the rest of its sequence. A
request that its token in flight ends by length is left out of step i+1.
"""

from __future__ import annotations

import logging
import queue
from typing import Callable

import torch

from plait.runtime.cache.hiradix_cache import HiRadixCache, build_hiradix_cache
from plait.runtime.cache.workflow import StepGraph
from plait.runtime.config import SchedulerConfig
from plait.runtime.executor.forward_batch import make_decode_batch, make_extend_batch
from plait.runtime.executor.model_runner import ModelRunner
from plait.runtime.memory.host import trim_malloc
from plait.runtime.sampling.sampler import Sampler, SamplingBatchInfo
from plait.runtime.scheduler.batch import StepBatch
from plait.runtime.scheduler.cache_manager import CacheManager
from plait.runtime.scheduler.constraints import ConstraintTracker
from plait.runtime.frontend.errors import InvalidRequestError
from plait.runtime.frontend.messages import (
    STATUS_BAD_REQUEST,
    STATUS_INTERNAL_ERROR,
    AbortRequest,
    GenerateRequest,
    RequestOutput,
    WorkflowUpdate,
)
from plait.runtime.frontend.validate import Limits, validate
from plait.runtime.scheduler.output import (
    append_token,
    compute_input_logprobs,
    compute_output_logprobs,
    new_detokenizer,
    record_input_logprobs,
    record_output_logprobs,
    take_output,
    to_host,
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
        self.cache = CacheManager(runner.allocator, runner.req_to_token_pool, prefix_cache=cache_kind,
                                  cache=_tiered_cache(config, runner) if cache_kind == "radix" else None)
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
        self.overlap = not config.disable_overlap_schedule and (on_gpu or config.enable_overlap_schedule)
        # Mixed chunks (on by default on the CPU, where every step reads all the weights): running
        # requests decode in the same step as a prefill chunk. Not with overlap, where their next
        # input may still be on the device.
        self.mixed_chunk = (config.enable_mixed_chunk or (not on_gpu and not config.disable_mixed_chunk)) \
            and not self.overlap
        self.inflight: StepBatch | None = None  # overlap: launched and sampled, tokens not read back yet
        # Overlap: each request's last sampled token, on the device, by req_to_token row.
        self.last_tokens = (
            torch.zeros(self.max_running + 1, dtype=torch.int64, device=runner.device) if self.overlap else None
        )
        self.limits = Limits(context_length=runner.context_length, vocab_size=runner.vocab_size,
                             max_total_tokens=runner.kv_pool.num_slots)
        self.stats = {"steps": 0, "extend_steps": 0, "decode_steps": 0, "retractions": 0, "generated_tokens": 0,
                      "overlapped_steps": 0}

    # ---- input, from any thread -------------------------------------------------------------
    def submit(self, msg: GenerateRequest | AbortRequest | WorkflowUpdate) -> None:
        self.inbox.put(msg)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running or self.chunked or self.constraints.pending) or self.inflight is not None

    # ---- the loop -------------------------------------------------------------------------------
    def step(self) -> None:
        self.stats["steps"] += 1
        self._receive()
        batch = self._schedule()
        if batch is None and self.inflight is None and self.cache.loads_pending:
            self.cache.poll_loads(wait_s=0.005)  # only loads can make progress: wait for one briefly
        if batch is not None:
            self._launch(batch)
        if self.inflight is not None:  # overlap: the previous step's tokens, while this one computes
            previous, self.inflight = self.inflight, None
            self._process(previous)
            if batch is not None:
                self.stats["overlapped_steps"] += 1
        if batch is not None:
            self._sample(batch)
            # Left in flight only while a next step can follow (else nothing would ever read it).
            if self.overlap and (self.waiting or self.running or self.chunked):
                self.inflight = batch
            else:
                self._process(batch)
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
                self._abort(msg.rid, message=msg.message, status_code=msg.status_code)
            elif isinstance(msg, WorkflowUpdate):
                self._publish_workflow(msg)
        self.cache.poll_loads()
        ready, failed = self.constraints.poll()
        self.waiting.extend(ready)
        for req, message, status in failed:
            self._reject(req, message, status)

    def _publish_workflow(self, msg: WorkflowUpdate) -> None:
        try:  # the front end validated it; a bad graph must still not stop the loop
            self.cache.publish_workflow(msg.workflow_id, StepGraph.from_dicts(msg.steps), msg.current_step)
        except (ValueError, KeyError, TypeError) as e:
            logger.warning("ignored the step graph of workflow %r: %s", msg.workflow_id, e)

    def _add_request(self, msg: GenerateRequest) -> None:
        """Admit a request to the queue, or reject it alone: nothing in a request's data may stop
        the loop. The front end ran the same `validate`; this is the defensive copy."""
        try:
            validate(msg, self.limits, check_grammar=False)
            req = Req(msg, eos_token_ids=self.eos_token_ids)
            req.detokenizer = new_detokenizer(req, self.runner.tokenizer)
        except InvalidRequestError as e:
            self._reject_message(msg, str(e), STATUS_BAD_REQUEST)
            return
        except Exception as e:  # a bug, but one that must fail this request only
            logger.exception("could not admit request %s", getattr(msg, "rid", "?"))
            self._reject_message(msg, f"internal error while admitting the request: {e}", STATUS_INTERNAL_ERROR)
            return
        if msg.workflow_id and msg.agent:
            self.cache.on_workflow_request(msg.workflow_id, msg.agent, budget=self._prefetch_budget(req))
        if self.constraints.needs_grammar(req):
            error = self.constraints.submit(req)  # joins `waiting` once its grammar is compiled
            if error:
                self._reject(req, error, STATUS_BAD_REQUEST)
            return
        self.waiting.append(req)

    def _reject_message(self, msg: GenerateRequest, message: str, status: int) -> None:
        rid = msg.rid if isinstance(getattr(msg, "rid", None), str) else ""
        self.on_output([RequestOutput(rid=rid, new_text="", new_output_ids=[], finished=True, finish_reason={
            "type": "abort", "message": message, "status_code": status, "err_type": _err_type(status)})])

    def _reject(self, req: Req, message: str, status: int) -> None:
        req.finish_reason = {"type": "abort", "message": message, "status_code": status, "err_type": _err_type(status)}
        self.cache.release(req)
        self.on_output([take_output(req)])

    def flush_cache(self) -> bool:
        """Drop the prefix cache and the compiled grammars; only when no request is in the scheduler."""
        if self.has_work or not self.inbox.empty():
            return False
        self.cache.flush()
        self.constraints.clear()
        # Nothing is cached or running: the KV pages and malloc's freed buffers can go back.
        self.runner.release_kv_memory()
        if self.cache.tiered is not None and self.cache.tiered.host is not None:
            self.cache.tiered.host.release_memory()
        trim_malloc()
        return True

    # ---- scheduling: needs only lengths ----------------------------------------------------------
    def _schedule(self) -> StepBatch | None:
        plan = self._schedule_extend()
        if plan is not None:
            return self._extend_batch(plan, mixed=self._decodable() if self.mixed_chunk else [])
        return self._decode_batch() if self.running else None

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

    def _spare_tokens(self) -> int:
        """KV slots free or evictable beyond what the running requests and a chunked prompt will need."""
        reserved = sum(self._future_tokens(r) for r in self.running)
        if self.chunked is not None:
            reserved += self.chunked.seq_len - self.chunked.kv_committed_len
        return self.cache.available_tokens - reserved

    def _prefetch_budget(self, arriving: Req) -> int:
        """Spare slots less what the requests already waiting (and the one arriving) will hold once
        admitted (their cached prefixes, counted as evictable now, get locked then): a prefetch for a
        later step must not evict what this step's requests are about to use."""
        waiting = sum(len(r.fill_ids) for r in self.waiting)
        return self._spare_tokens() - waiting - len(arriving.fill_ids)

    def _future_tokens(self, req: Req) -> int:
        left = min(req.remaining_new_tokens, self.runner.context_length - req.seq_len - req.inflight)
        return int(left * self.new_token_ratio)

    def _extend_batch(self, plan: PrefillPlan, *, mixed: list[Req]) -> StepBatch:
        """The plan's prompts (or chunks of them), plus the running requests' next tokens when `mixed`
        lists them (mixed chunks: one pass over the weights serves both, and decodes do not stall
        behind a long prefill)."""
        reqs, take_lens = plan.reqs + mixed, plan.take_lens + [1] * len(mixed)
        slots = self.cache.alloc_for(reqs, take_lens)
        if slots is None and mixed:  # no room for the decodes' tokens this step: the prompts alone
            mixed, reqs, take_lens = [], plan.reqs, plan.take_lens
            slots = self.cache.alloc_for(reqs, take_lens)
        assert slots is not None, "admission guaranteed these slots"
        chunks, logits_starts, first_positions = [], [], []
        for req, take in zip(reqs, take_lens):
            assert req.inflight == 0, "a request is admitted only once its tokens are all known"
            start = req.kv_committed_len
            chunks.append(req.fill_ids[start : start + take])
            first = self._input_logprob_start(req, start, take)
            first_positions.append(first)
            logits_starts.append(None if first is None else first - start)
        forward = make_extend_batch(
            req_pool_indices=[r.req_pool_idx for r in reqs],
            prefix_lens=[r.kv_committed_len for r in reqs],
            new_token_ids=chunks,
            out_cache_loc=slots,
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
            logits_start_lens=logits_starts,
        )
        if self.runner.attn_backend.supports_shared_prefix_extend:
            forward.shared_prefixes = self._shared_prefixes(reqs)
        return StepBatch(forward, reqs, take_lens, first_positions,
                         mixed_decodes=list(range(len(plan.reqs), len(reqs))))

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

    def _decode_batch(self) -> StepBatch | None:
        reqs = self._decodable()
        slots = self.cache.alloc_for(reqs, [1] * len(reqs)) if reqs else None
        while reqs and slots is None:
            self._retract_one(reqs)
            reqs = self._decodable()
            slots = self.cache.alloc_for(reqs, [1] * len(reqs)) if reqs else None
        if not reqs:
            return None
        rows = [r.req_pool_idx for r in reqs]
        if self.last_tokens is not None:  # overlap: the previous step's tokens, still on the device
            last_token_ids = self.last_tokens[_device_ids(rows, self.runner.device)]
        else:
            last_token_ids = [r.output_ids[-1] for r in reqs]
        seq_lens = [r.kv_committed_len + 1 for r in reqs]
        forward = make_decode_batch(
            req_pool_indices=rows,
            seq_lens=seq_lens,
            last_token_ids=last_token_ids,
            out_cache_loc=slots,
            req_to_token_pool=self.runner.req_to_token_pool,
            kv_pool=self.runner.kv_pool,
            attn_backend=self.runner.attn_backend,
        )
        forward.shared_prefixes = self._shared_prefixes(reqs)
        return StepBatch(forward, reqs, [1] * len(reqs), [None] * len(reqs))

    def _shared_prefixes(self, reqs: list[Req]) -> list[tuple[list[int], int]] | None:
        """The decode batch's shared-prefix groups, when the backend uses them and they save enough
        KV reads to pay for running the step outside a CUDA graph."""
        if (self.config.disable_shared_prefix_decode or len(reqs) < 2
                or not self.runner.attn_backend.supports_shared_prefix_decode):
            return None
        groups = self.cache.shared_prefix_groups(reqs)
        saved = sum((len(members) - 1) * prefix_len for members, prefix_len in groups)
        min_saved = self.config.shared_prefix_decode_min_tokens
        if min_saved is None:
            min_saved = self.runner.attn_backend.shared_prefix_min_saved_tokens
        if not groups or saved < max(1, min_saved):
            return None
        return groups

    def _decodable(self) -> list[Req]:
        """Running requests that need another decode step: not those whose token in flight is
        their last by length (overlap)."""
        return [
            r for r in self.running
            if not (r.inflight and (r.remaining_new_tokens == 0 or r.seq_len + r.inflight >= self.runner.context_length))
        ]

    def _retract_one(self, candidates: list[Req]) -> None:
        """Memory ran out: send the least advanced request back to the queue (its KV goes to the cache).
        A token it has in flight is appended when read back; it is admitted again only after that."""
        victim = min(candidates, key=lambda r: (len(r.output_ids) + r.inflight, -r.arrival_time))
        self.running.remove(victim)
        self.cache.release(victim)
        victim.num_retractions += 1
        self.waiting.append(victim)
        self.stats["retractions"] += 1
        self.new_token_ratio = self.config.init_new_token_ratio
        logger.debug("retracted %s", victim)

    # ---- launch, sample, process ----------------------------------------------------------------
    def _launch(self, batch: StepBatch) -> None:
        """Run the forward pass (queued on the device on CUDA) and advance the KV bookkeeping."""
        batch.logits = self.runner.forward(batch.forward)
        if batch.is_decode:
            self.stats["decode_steps"] += 1
            for req in batch.reqs:
                req.kv_committed_len += 1
            batch.sample_rows = list(range(len(batch.reqs)))
            return
        self.stats["extend_steps"] += 1
        batch.input_logprobs = [None] * len(batch.reqs)
        mixed = set(batch.mixed_decodes)
        for i, (req, take) in enumerate(zip(batch.reqs, batch.take_lens)):
            req.kv_committed_len += take
            if i in mixed:  # a running request's decode token, riding along
                batch.sample_rows.append(i)
                continue
            first = batch.first_positions[i]
            if first is not None:
                batch.input_logprobs[i] = compute_input_logprobs(req, batch.logits.input_token_logits[i], first)
            # Shareable from now on: any later step that reads this KV runs after this one wrote it.
            self.cache.cache_unfinished(req)
            if req.kv_committed_len < req.seq_len:
                self.chunked = req  # continues next step, ahead of the queue
                continue
            req.input_logprobs_done = True
            if req.max_new_tokens == 0:
                batch.prefill_only.append(i)
                continue
            batch.sample_rows.append(i)
            self.running.append(req)

    def _sample(self, batch: StepBatch) -> None:
        """Pick the next tokens on the device and start their copies to the host. With overlap this
        runs after the previous step is processed, so masks and penalties see every earlier token."""
        # Rows whose request ended or left (jump-forward) while the previous step was processed sample nothing.
        batch.sampled_rows = [
            i for i in batch.sample_rows if not batch.reqs[i].finished and batch.reqs[i].req_pool_idx is not None
        ]
        reqs = [batch.reqs[i] for i in batch.sampled_rows]
        if reqs:
            logits = batch.logits.next_token_logits
            if len(reqs) < logits.shape[0]:
                logits = logits[_device_ids(batch.sampled_rows, logits.device)]
            info = SamplingBatchInfo.build(
                [r.params for r in reqs],
                vocab_size=self.runner.vocab_size,
                device=logits.device,
                output_ids=[r.output_ids for r in reqs],
                prompt_ids=[r.prompt_ids for r in reqs],
                stop_token_ids_for_min=[
                    # A grammar's mask may allow only a stop token; min_new_tokens must not forbid it.
                    [] if r.matcher is not None
                    else ([] if r.params.ignore_eos else r.eos_token_ids) + r.params.stop_token_ids
                    for r in reqs
                ],
            )
            sampled = self.sampler(logits, info, vocab_mask=self.constraints.mask(reqs, logits.device),
                                   need_logprobs=any(r.msg.return_logprob for r in reqs))
            if self.last_tokens is not None:
                self.last_tokens[_device_ids([r.req_pool_idx for r in reqs], logits.device)] = sampled.next_token_ids
            batch.next_token_ids = to_host(sampled.next_token_ids)
            batch.next_logprobs = to_host(sampled.logprobs)
            batch.output_logprobs = compute_output_logprobs(reqs, logits)
            for req in reqs:
                req.inflight += 1
        batch.logits = None
        batch.mark_copies_started(self.runner.device)

    def _process(self, batch: StepBatch) -> None:
        """Read the step's tokens back and apply them: logprobs, stop checks, jump-forward, outputs."""
        batch.wait()
        reqs = batch.reqs
        ended_before = {id(r) for r in reqs if r.finished}  # aborted while the step was in flight
        for req, lp in zip(reqs, batch.input_logprobs):
            if lp is not None and not req.finished:
                record_input_logprobs(req, lp)
        for i in batch.prefill_only:
            if not reqs[i].finished:
                reqs[i].finish_reason = {"type": "length", "length": 0}
        sampled = [reqs[i] for i in batch.sampled_rows]
        if sampled:
            token_ids = batch.next_token_ids.tolist()
            logprobs = batch.next_logprobs.tolist()
            aborted = {j for j, r in enumerate(sampled) if r.finished}
            record_output_logprobs(sampled, batch.output_logprobs, token_ids, logprobs, skip=aborted)
            for j, (req, token_id) in enumerate(zip(sampled, token_ids)):
                req.inflight -= 1
                if j in aborted:
                    continue
                error = self.constraints.accept(req, token_id)
                if error:
                    req.finish_reason = {"type": "abort", "message": error.message, "status_code": error.status}
                    continue
                append_token(req, token_id, context_length=self.runner.context_length)
                if not req.finished and self.constraints.terminated(req):
                    req.finish_reason = {"type": "stop", "matched": token_id}
            self.stats["generated_tokens"] += len(sampled) - len(aborted)
        jumped: set[int] = set()
        if batch.is_decode or batch.mixed_decodes:
            decoders = sampled if batch.is_decode else [reqs[i] for i in batch.sampled_rows if i in set(batch.mixed_decodes)]
            jumped = {id(r) for r in decoders if not r.finished and self._jump_forward(r)}
            self.new_token_ratio = max(self.config.min_new_token_ratio, self.new_token_ratio - self.config.new_token_ratio_decay)
        self.running = [r for r in self.running if not r.finished and id(r) not in jumped]
        # A request retracted while its token was in flight may have ended on that token.
        if any(r.finished and r.req_pool_idx is None and id(r) not in ended_before for r in sampled):
            self.waiting = [r for r in self.waiting if not r.finished]
        self._finish_and_emit([r for r in reqs if id(r) not in ended_before])

    def _jump_forward(self, req: Req) -> bool:
        """Compressed FSM: a forced continuation is appended at once and computed as one extend."""
        retracted = req.req_pool_idx is None  # already back in the queue
        if not self.constraints.try_jump(req, release_kv=self.cache.release):
            return False
        if not retracted:
            self.waiting.insert(0, req)
        return True

    def _finish_and_emit(self, reqs: list[Req]) -> None:
        outputs = []
        for req in reqs:
            if req.finished:
                self.cache.release(req)
                outputs.append(take_output(req))
            elif req.msg.stream and self._stream_due(req):
                outputs.append(take_output(req))
        if outputs:
            self.on_output(outputs)

    def _stream_due(self, req: Req) -> bool:
        """A streamed request's tokens go out at once the first time, then every `stream_interval`."""
        held = len(req.pending.output_ids)
        if not held:
            return False
        interval = req.params.stream_interval or self.config.stream_interval
        return interval <= 1 or held >= interval or held == len(req.output_ids)

    # ---- aborts, integrity ---------------------------------------------------------------------------
    def _abort(self, rid: str, *, message: str, status_code: int) -> None:
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
            req.finish_reason = {"type": "abort", "message": message, "status_code": status_code}
            self.cache.release(req)
            self.cache.on_abort(req)
        self.on_output([take_output(r) for r in victims])

    def active_requests(self) -> list[Req]:
        reqs = self.running + ([self.chunked] if self.chunked else []) + self.waiting
        if self.inflight is not None:  # some of its requests are in no list until it is processed
            listed = {id(r) for r in reqs}
            reqs += [r for r in self.inflight.reqs if id(r) not in listed]
        return reqs

    def check_integrity(self) -> None:
        self.cache.check_integrity(self.active_requests())


def _tiered_cache(config: SchedulerConfig, runner: ModelRunner) -> HiRadixCache | None:
    """The tiered radix cache when the flags ask for tiers or a non-LRU order; None: the plain one."""
    if not config.enable_hierarchical_cache and config.radix_eviction_policy == "lru":
        if config.hicache_storage_backend:
            raise ValueError("--hicache-storage-backend needs --enable-hierarchical-cache")
        return None
    return build_hiradix_cache(
        runner.allocator, runner.kv_pool,
        enable_hierarchical_cache=config.enable_hierarchical_cache, hicache_ratio=config.hicache_ratio,
        hicache_size=config.hicache_size, hicache_write_policy=config.hicache_write_policy,
        hicache_storage_backend=config.hicache_storage_backend, hicache_storage_dir=config.hicache_storage_dir,
        radix_eviction_policy=config.radix_eviction_policy,
        prefetch=config.radix_eviction_policy == "workflow" and not config.disable_hicache_prefetch,
    )


def _device_ids(ids: list[int], device: torch.device) -> torch.Tensor:
    """An index tensor on the device without waiting for the device (`torch.tensor(..., device=)` would)."""
    return torch.tensor(ids, dtype=torch.int64).to(device, non_blocking=True)


def _err_type(status: int) -> str:
    return "BadRequest" if status < 500 else "InternalServerError"


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
