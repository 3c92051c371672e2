"""After a forward pass: append sampled tokens, record logprobs, detokenize, check stop conditions,
and package what each request produced into `RequestOutput` messages."""

from __future__ import annotations

import time

import torch

from plait.runtime.detokenizer import IncrementalDetokenizer
from plait.runtime.sampling.logprobs import ids_logprobs, token_logprobs, top_logprobs
from plait.runtime.scheduler.io import RequestOutput
from plait.runtime.scheduler.request import Req


def new_detokenizer(req: Req, tokenizer, *, context_ids: list[int] | None = None) -> IncrementalDetokenizer | None:
    """`context_ids`: text before the output (default: the prompt); jump-forward restarts with more."""
    if tokenizer is None:
        return None
    p = req.params
    detok = IncrementalDetokenizer(
        tokenizer.hf,
        prompt_ids=req.prompt_ids if context_ids is None else context_ids,
        skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
        stop=p.stop,
        no_stop_trim=p.no_stop_trim,
    )
    if len(req.output_ids) < p.min_new_tokens:
        detok.deactivate_stops()  # under min_new_tokens a stop string must not end the request
    return detok


def record_input_logprobs(req: Req, logits: torch.Tensor, first_pos: int) -> None:
    """Prompt logprobs from logits at positions [first_pos, first_pos + len(logits)) of the request.

    The logits at position p score prompt token p + 1; the very first prompt token has no score.
    """
    msg, pending = req.msg, req.pending
    prompt_len = len(req.prompt_ids)
    if msg.logprob_start_len == 0 and first_pos == 0:
        pending.input_token_logprobs.append((None, req.prompt_ids[0]))
        if msg.top_logprobs_num:
            pending.input_top_logprobs.append(None)
        if msg.token_ids_logprob:
            pending.input_token_ids_logprobs.append(None)
    n = max(0, min(len(logits), prompt_len - 1 - first_pos))
    if n == 0:
        return
    logits = logits[:n]
    targets = torch.tensor(req.prompt_ids[first_pos + 1 : first_pos + 1 + n], device=logits.device)
    lps = token_logprobs(logits, targets).tolist()
    pending.input_token_logprobs.extend(zip(lps, targets.tolist()))
    if msg.top_logprobs_num:
        top = top_logprobs(logits, msg.top_logprobs_num)
        pending.input_top_logprobs.extend(_pairs(top.values, top.ids))
    if msg.token_ids_logprob:
        values = ids_logprobs(logits, msg.token_ids_logprob)
        ids = torch.tensor(msg.token_ids_logprob).expand(n, -1)
        pending.input_token_ids_logprobs.extend(_pairs(values, ids))


def record_output_logprobs(reqs: list[Req], logits: torch.Tensor, token_ids: list[int], logprobs: list[float]) -> None:
    """Output logprobs for rows that asked: the sampled token's, top-k and given ids (raw distribution)."""
    want = [i for i, r in enumerate(reqs) if r.msg.return_logprob]
    if not want:
        return
    max_top = max(reqs[i].msg.top_logprobs_num for i in want)
    top = top_logprobs(logits[want], max_top) if max_top else None
    for j, i in enumerate(want):
        req = reqs[i]
        req.pending.output_token_logprobs.append((logprobs[i], token_ids[i]))
        k = req.msg.top_logprobs_num
        if k:
            req.pending.output_top_logprobs.append(_pairs(top.values[j : j + 1, :k], top.ids[j : j + 1, :k])[0])
        if req.msg.token_ids_logprob:
            values = ids_logprobs(logits[i : i + 1], req.msg.token_ids_logprob)
            ids = torch.tensor([req.msg.token_ids_logprob])
            req.pending.output_token_ids_logprobs.append(_pairs(values, ids)[0])


def _pairs(values: torch.Tensor, ids: torch.Tensor) -> list[list[tuple[float, int]]]:
    return [list(zip(v, t)) for v, t in zip(values.tolist(), ids.tolist())]


def append_token(req: Req, token_id: int, *, context_length: int) -> None:
    """Append one sampled token and finish the request if a stop condition holds (SGLang's order:
    token-based stops, then length, then stop strings)."""
    if req.first_token_time is None:
        req.first_token_time = time.perf_counter()
    req.output_ids.append(token_id)
    req.pending.output_ids.append(token_id)
    p = req.params
    out_len = len(req.output_ids)
    if out_len >= p.min_new_tokens:
        if (not p.ignore_eos and token_id in req.eos_token_ids) or token_id in p.stop_token_ids:
            req.finish_reason = {"type": "stop", "matched": token_id}
            if p.no_stop_trim:
                _detok(req, [token_id])
            _detok(req, [], finished=True)
            return
    if req.detokenizer is not None and out_len >= p.min_new_tokens:
        req.detokenizer.activate_stops()  # stops count from this token's text on
    _detok(req, [token_id])
    if req.detokenizer is not None and req.detokenizer.matched_stop is not None:
        req.finish_reason = {"type": "stop", "matched": req.detokenizer.matched_stop}
        return
    if out_len >= req.max_new_tokens or req.seq_len >= context_length:
        req.finish_reason = {"type": "length", "length": req.params.max_new_tokens or out_len}
        _detok(req, [], finished=True)


def _detok(req: Req, ids: list[int], *, finished: bool = False) -> None:
    if req.detokenizer is not None:
        req.pending.text += req.detokenizer.add_tokens(ids, finished=finished).delta


def take_output(req: Req) -> RequestOutput:
    """Package and clear what the request produced since its last message."""
    p = req.pending
    text = p.text
    out = RequestOutput(
        rid=req.rid,
        new_text=text,
        new_output_ids=p.output_ids,
        num_dropped_ids=p.num_dropped_ids,
        finished=req.finished,
        finish_reason=req.finish_reason,
        prompt_tokens=len(req.prompt_ids),
        completion_tokens=len(req.output_ids),
        cached_tokens=req.cached_tokens,
        num_retractions=req.num_retractions,
        input_token_logprobs=p.input_token_logprobs,
        output_token_logprobs=p.output_token_logprobs,
        input_top_logprobs=p.input_top_logprobs,
        output_top_logprobs=p.output_top_logprobs,
        input_token_ids_logprobs=p.input_token_ids_logprobs,
        output_token_ids_logprobs=p.output_token_ids_logprobs,
    )
    p.clear()
    return out
