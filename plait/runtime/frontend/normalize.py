"""Turn one `GenerateReqInput` (a prompt or a batch, each maybe with `n > 1`) into the scheduler's
`GenerateRequest`s, one per sequence to generate, each checked by `validate`.

Rids: a request keeps the rid it was given (a fresh uuid otherwise). A batch given one rid names
its items `<rid>_<i>`; `n > 1` names the copies of an item `<rid>_<j>`. Each request remembers the
rids its name was derived from (`parent_rids`), so an abort by such a rid reaches exactly its copies.
"""

from __future__ import annotations

import uuid
from typing import Any, NamedTuple

from plait.runtime.frontend.errors import InvalidRequestError
from plait.runtime.frontend.inputs import GenerateReqInput
from plait.runtime.frontend.messages import GenerateRequest
from plait.runtime.frontend.validate import Limits, validate
from plait.sampling_params import SamplingParams, SamplingParamsError


class Expanded(NamedTuple):
    """One sequence to generate, and the rids its own was derived from (none if it was given as is)."""

    request: GenerateRequest
    parent_rids: tuple[str, ...]


class Normalized(NamedTuple):
    items: list[Expanded]
    is_batch: bool  # the caller asked for a list of results


def normalize(inp: GenerateReqInput, tokenizer: Any, limits: Limits, *,
              default_sampling: dict[str, Any] | None = None) -> Normalized:
    if (inp.text is None) == (inp.input_ids is None):
        raise InvalidRequestError("exactly one of text or input_ids must be given")
    batch = inp.is_batch
    id_lists = _prompts(inp, tokenizer, batch)
    num = len(id_lists)
    for name in ("sampling_params", "rid", "return_logprob", "logprob_start_len", "top_logprobs_num", "workflow_id",
                 "agent"):
        value = getattr(inp, name)
        if isinstance(value, list) and not (name == "sampling_params" and not batch) and len(value) != num:
            raise InvalidRequestError(f"{name} has {len(value)} entries for {num} prompts", param=name)
    if isinstance(inp.sampling_params, list) and not batch:
        raise InvalidRequestError("sampling_params must be an object for a single prompt", param="sampling_params")
    ids_lp = inp.token_ids_logprob
    nested = bool(ids_lp) and not all(isinstance(t, int) for t in ids_lp)
    per_item_ids = batch and nested
    if per_item_ids and len(ids_lp) != num:
        raise InvalidRequestError(f"token_ids_logprob has {len(ids_lp)} lists for {num} prompts",
                                  param="token_ids_logprob")
    if nested and not per_item_ids:
        raise InvalidRequestError("token_ids_logprob must be a list of token ids for a single prompt",
                                  param="token_ids_logprob")
    items: list[Expanded] = []
    for i, ids in enumerate(id_lists):
        params = _sampling(_item(inp.sampling_params, i), default_sampling, limits)
        base_rid, parents = _rid(inp.rid, i, batch)
        lp_ids = ids_lp[i] if per_item_ids else ids_lp
        start, top = _item(inp.logprob_start_len, i), _item(inp.top_logprobs_num, i)
        for j in range(params.n):
            request = GenerateRequest(
                rid=base_rid if params.n == 1 else f"{base_rid}_{j}",
                input_ids=list(ids),
                sampling_params=params.clone(n=1),
                return_logprob=bool(_item(inp.return_logprob, i)),
                logprob_start_len=-1 if start is None else start,
                top_logprobs_num=0 if top is None else top,
                token_ids_logprob=list(lp_ids) if lp_ids else None,
                return_text_in_logprobs=bool(inp.return_text_in_logprobs),
                stream=bool(inp.stream),
                workflow_id=_item(inp.workflow_id, i),
                agent=_item(inp.agent, i),
            )
            if j == 0:
                validate(request, limits)  # its copies differ only in rid
            items.append(Expanded(request, parents if params.n == 1 else (base_rid, *parents)))
        if len(items) > limits.max_sequences:
            raise InvalidRequestError(f"more than {limits.max_sequences} sequences in one request")
    rids = [item.request.rid for item in items]
    if len(set(rids)) != len(rids):
        clash = next(r for r in rids if rids.count(r) > 1)
        raise InvalidRequestError(f"the rid {clash!r} is given to more than one request", param="rid")
    return Normalized(items, batch or len(items) > 1)


def _prompts(inp: GenerateReqInput, tokenizer: Any, batch: bool) -> list[list[int]]:
    if inp.text is not None:
        texts = inp.text if batch else [inp.text]
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send input_ids instead of text")
        if batch and not texts:
            raise InvalidRequestError("the batch is empty")
        if any(not t for t in texts):
            raise InvalidRequestError("the prompt is empty")
        return [tokenizer.encode(t) for t in texts]
    id_lists = inp.input_ids if batch else [inp.input_ids]
    if batch and not id_lists:
        raise InvalidRequestError("the batch is empty")
    return id_lists


def _item(value: Any, i: int) -> Any:
    """A field given once for the whole batch, or as a list with one value per item."""
    return value[i] if isinstance(value, list) else value


def _sampling(raw: dict[str, Any] | None, defaults: dict[str, Any] | None, limits: Limits) -> SamplingParams:
    try:
        params = SamplingParams.from_dict(raw, defaults=defaults)
    except (SamplingParamsError, TypeError) as e:
        raise InvalidRequestError(str(e), param="sampling_params") from None
    if params.n > limits.max_n:
        raise InvalidRequestError(f"n must be <= {limits.max_n}, got {params.n}", param="n")
    return params


def _rid(rid: str | list[str] | None, i: int, batch: bool) -> tuple[str, tuple[str, ...]]:
    """(the item's rid, the rids it was derived from)."""
    if isinstance(rid, list):
        return rid[i], ()
    if rid is not None:
        return (f"{rid}_{i}", (rid,)) if batch else (rid, ())
    return uuid.uuid4().hex, ()
