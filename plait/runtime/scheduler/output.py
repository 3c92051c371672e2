"""After a forward pass: append sampled tokens, record logprobs, detokenize, check stop conditions,
and package what each request produced into `RequestOutput` messages.

Logprobs are computed on the device when the step runs (`compute_*`, copies to the host started
without waiting) and recorded when the step's tokens are read back (`record_*`), which with
overlap scheduling is one step later.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from plait.runtime.detokenizer import IncrementalDetokenizer
from plait.runtime.sampling.logprobs import (
    TopLogprobs,
    ids_logprobs,
    token_logprobs,
    top_logprobs,
)
from plait.runtime.frontend.messages import RequestOutput
from plait.runtime.scheduler.request import Req


def new_detokenizer(req: Req, tokenizer, *, context_ids: list[int] | None = None) -> IncrementalDetokenizer | None:
    """`context_ids`: text before the output (default: the prompt); jump-forward restarts with more."""
    if tokenizer is None:
        return None
    p = req.params
    detok = IncrementalDetokenizer(
        tokenizer.backend,
        prompt_ids=req.prompt_ids if context_ids is None else context_ids,
        skip_special_tokens=p.skip_special_tokens,
        spaces_between_special_tokens=p.spaces_between_special_tokens,
        stop=p.stop,
        no_stop_trim=p.no_stop_trim,
    )
    if len(req.output_ids) < p.min_new_tokens:
        detok.deactivate_stops()  # under min_new_tokens a stop string must not end the request
    return detok


@dataclass
class InputLogprobs:
    """Prompt logprobs of one extend chunk of a request, computed on the device right after the
    forward pass and copied to the host without waiting; read once the step's copies are done."""

    first_pos: int
    targets: list[int]  # the prompt tokens scored, from first_pos + 1 on
    token: torch.Tensor | None  # [n]
    top: TopLogprobs | None  # [n, top_logprobs_num]
    ids: torch.Tensor | None  # [n, len(token_ids_logprob)]


@dataclass
class OutputLogprobs:
    """Top-k and given-id logprobs of the sampled rows that asked, on their way to the host."""

    rows: list[int]  # rows of the sampled batch with return_logprob
    top: TopLogprobs | None  # [len(rows), max top_logprobs_num]
    ids: list[torch.Tensor | None]  # per row in `rows`: [1, len(token_ids_logprob)]


def to_host(t: torch.Tensor) -> torch.Tensor:
    """A host copy of a device tensor that does not wait for it: valid after the step's event."""
    return t.to("cpu", non_blocking=True) if t.device.type != "cpu" else t


def compute_input_logprobs(req: Req, logits: torch.Tensor, first_pos: int) -> InputLogprobs:
    """Prompt logprobs from logits at positions [first_pos, first_pos + len(logits)) of the request.

    The logits at position p score prompt token p + 1; the very first prompt token has no score.
    """
    msg = req.msg
    n = max(0, min(len(logits), len(req.prompt_ids) - 1 - first_pos))
    targets = req.prompt_ids[first_pos + 1 : first_pos + 1 + n]
    if n == 0:
        return InputLogprobs(first_pos, [], None, None, None)
    logits = logits[:n]
    token = to_host(token_logprobs(logits, torch.tensor(targets).to(logits.device, non_blocking=True)))
    top = None
    if msg.top_logprobs_num:
        values, ids = top_logprobs(logits, msg.top_logprobs_num)
        top = TopLogprobs(to_host(values), to_host(ids))
    ids_values = to_host(ids_logprobs(logits, msg.token_ids_logprob)) if msg.token_ids_logprob else None
    return InputLogprobs(first_pos, targets, token, top, ids_values)


def record_input_logprobs(req: Req, lp: InputLogprobs) -> None:
    msg, pending = req.msg, req.pending
    if msg.logprob_start_len == 0 and lp.first_pos == 0:
        pending.input_token_logprobs.append((None, req.prompt_ids[0]))
        if msg.top_logprobs_num:
            pending.input_top_logprobs.append(None)
        if msg.token_ids_logprob:
            pending.input_token_ids_logprobs.append(None)
    if not lp.targets:
        return
    pending.input_token_logprobs.extend(zip(lp.token.tolist(), lp.targets))
    if lp.top is not None:
        pending.input_top_logprobs.extend(_pairs(lp.top.values, lp.top.ids))
    if lp.ids is not None:
        ids = torch.tensor(msg.token_ids_logprob).expand(len(lp.targets), -1)
        pending.input_token_ids_logprobs.extend(_pairs(lp.ids, ids))


def compute_output_logprobs(reqs: list[Req], logits: torch.Tensor) -> OutputLogprobs | None:
    """Top-k and given-id logprobs (raw distribution) for the rows that asked, or None."""
    want = [i for i, r in enumerate(reqs) if r.msg.return_logprob]
    if not want:
        return None
    max_top = max(reqs[i].msg.top_logprobs_num for i in want)
    top = None
    if max_top:
        rows = logits if len(want) == len(reqs) else logits[torch.tensor(want).to(logits.device, non_blocking=True)]
        values, ids = top_logprobs(rows, max_top)
        top = TopLogprobs(to_host(values), to_host(ids))
    ids_values = [
        to_host(ids_logprobs(logits[i : i + 1], reqs[i].msg.token_ids_logprob)) if reqs[i].msg.token_ids_logprob
        else None
        for i in want
    ]
    return OutputLogprobs(want, top, ids_values)


def record_output_logprobs(
    reqs: list[Req], lp: OutputLogprobs | None, token_ids: list[int], logprobs: list[float], *, skip: set[int] = frozenset()
) -> None:
    """Record the sampled token's logprob and the extras for rows that asked (rows in `skip` left meanwhile)."""
    if lp is None:
        return
    for j, i in enumerate(lp.rows):
        if i in skip:
            continue
        req = reqs[i]
        req.pending.output_token_logprobs.append((logprobs[i], token_ids[i]))
        k = req.msg.top_logprobs_num
        if k:
            req.pending.output_top_logprobs.append(_pairs(lp.top.values[j : j + 1, :k], lp.top.ids[j : j + 1, :k])[0])
        if lp.ids[j] is not None:
            ids = torch.tensor([req.msg.token_ids_logprob])
            req.pending.output_token_ids_logprobs.append(_pairs(lp.ids[j], ids)[0])


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
