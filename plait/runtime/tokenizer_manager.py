"""The front end's half of a request, shared by `Engine` and the HTTP server: turning user input
(SGLang's `/generate` fields) into scheduler messages, and scheduler outputs back into SGLang-shaped
results (`text`, `output_ids`, `meta_info`)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from plait.runtime.constrained.base import validate_constraint
from plait.runtime.scheduler.io import GenerateRequest, RequestOutput
from plait.sampling_params import SamplingParams


class InvalidRequestError(ValueError):
    """The request is malformed; the message says which field and why."""


@dataclass
class GenerateInput:
    """SGLang's `GenerateReqInput`: one prompt or a batch."""

    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict | list[dict] | None = None
    rid: str | list[str] | None = None
    return_logprob: bool | list[bool] = False
    logprob_start_len: int | list[int] | None = None
    top_logprobs_num: int | list[int] | None = None
    token_ids_logprob: list[int] | list[list[int]] | None = None
    return_text_in_logprobs: bool = False
    stream: bool = False

    @property
    def is_batch(self) -> bool:
        if self.text is not None:
            return isinstance(self.text, list)
        return bool(self.input_ids) and isinstance(self.input_ids[0], list)


def _per_item(value: Any, i: int, batch: bool, *, is_list_value: bool = False) -> Any:
    """A field that may be given once for the whole batch or as a list with one value per item."""
    if batch and isinstance(value, list) and (not is_list_value or (value and isinstance(value[0], list))):
        return value[i]
    return value


def normalize(inp: GenerateInput, tokenizer, *, default_sampling: dict | None = None) -> tuple[list[GenerateRequest], bool]:
    """Expand a (batch) input into one GenerateRequest per sequence to generate (n > 1 included).

    Returns the requests and whether the caller asked for a batch (a list answer).
    """
    if (inp.text is None) == (inp.input_ids is None):
        raise InvalidRequestError("exactly one of text or input_ids must be given")
    batch = inp.is_batch
    if inp.text is not None:
        texts = inp.text if batch else [inp.text]
        if not all(isinstance(t, str) for t in texts):
            raise InvalidRequestError("text must be a string or a list of strings")
        if tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: send input_ids")
        id_lists = [tokenizer.encode(t) for t in texts]
    else:
        id_lists = inp.input_ids if batch else [inp.input_ids]
        if not all(isinstance(ids, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in ids) for ids in id_lists):
            raise InvalidRequestError("input_ids must be a list of integers or a list of such lists")
    if batch and not id_lists:
        raise InvalidRequestError("the batch is empty")
    for ids in id_lists:
        if not ids:
            raise InvalidRequestError("the prompt is empty")
    num = len(id_lists)
    if isinstance(inp.sampling_params, list) and len(inp.sampling_params) != num:
        raise InvalidRequestError(f"sampling_params has {len(inp.sampling_params)} entries for {num} prompts")
    if isinstance(inp.rid, list) and len(inp.rid) != num:
        raise InvalidRequestError(f"rid has {len(inp.rid)} entries for {num} prompts")
    requests: list[GenerateRequest] = []
    for i, ids in enumerate(id_lists):
        raw_params = _per_item(inp.sampling_params, i, batch) if isinstance(inp.sampling_params, list) else inp.sampling_params
        if raw_params is not None and not isinstance(raw_params, dict):
            raise InvalidRequestError("sampling_params must be an object")
        try:
            params = SamplingParams.from_dict(raw_params, defaults=default_sampling)
            validate_constraint(params)  # a syntax check here; the scheduler compiles off its loop
        except (TypeError, ValueError) as e:  # GrammarError is a ValueError
            raise InvalidRequestError(str(e)) from None
        if isinstance(inp.rid, list):
            base_rid = inp.rid[i]
        elif inp.rid is not None:
            base_rid = f"{inp.rid}_{i}" if batch else inp.rid
        else:
            base_rid = uuid.uuid4().hex
        return_logprob = bool(_per_item(inp.return_logprob, i, batch))
        start = _per_item(inp.logprob_start_len, i, batch)
        top_num = _per_item(inp.top_logprobs_num, i, batch)
        ids_lp = _per_item(inp.token_ids_logprob, i, batch, is_list_value=True)
        start = -1 if start is None else int(start)
        top_num = 0 if top_num is None else int(top_num)
        if top_num < 0:
            raise InvalidRequestError("top_logprobs_num must be >= 0")
        for n in range(params.n):
            requests.append(
                GenerateRequest(
                    rid=base_rid if params.n == 1 else f"{base_rid}_{n}",
                    input_ids=list(ids),
                    sampling_params=params.clone(n=1),
                    return_logprob=return_logprob,
                    logprob_start_len=start,
                    top_logprobs_num=top_num,
                    token_ids_logprob=list(ids_lp) if ids_lp else None,
                    return_text_in_logprobs=inp.return_text_in_logprobs,
                    stream=inp.stream,
                )
            )
    return requests, batch or len(requests) > 1


@dataclass
class RequestState:
    """Accumulates a request's outputs into the SGLang response shape."""

    request: GenerateRequest
    tokenizer: Any
    created: float = field(default_factory=time.perf_counter)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    finished: bool = False
    meta: dict[str, Any] = field(default_factory=dict)
    logprobs: dict[str, list] = field(default_factory=lambda: {
        "input_token_logprobs": [], "output_token_logprobs": [], "input_top_logprobs": [],
        "output_top_logprobs": [], "input_token_ids_logprobs": [], "output_token_ids_logprobs": [],
    })
    last_delta: str = ""

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.last_delta = out.new_text
        if out.num_dropped_ids:  # jump-forward retokenized the tail
            del self.output_ids[-out.num_dropped_ids :]
        self.output_ids.extend(out.new_output_ids)
        self.finished = out.finished
        self.meta = {
            "id": self.request.rid,
            "finish_reason": out.finish_reason,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": out.completion_tokens,
            "cached_tokens": out.cached_tokens,
        }
        if out.num_retractions:
            self.meta["num_retractions"] = out.num_retractions
        if out.finished:
            self.meta["e2e_latency"] = time.perf_counter() - self.created
        if self.request.return_logprob:
            for key in self.logprobs:
                self.logprobs[key].extend(getattr(out, key))

    def result(self) -> dict[str, Any]:
        meta = dict(self.meta)
        if self.request.return_logprob:
            with_text = self.request.return_text_in_logprobs
            for key, entries in self.logprobs.items():
                if key.endswith("token_logprobs"):
                    meta[key] = [self._triple(lp, tid, with_text) for lp, tid in entries]
                elif key.endswith("top_logprobs"):
                    if self.request.top_logprobs_num:
                        meta[key] = [None if e is None else [self._triple(lp, t, with_text) for lp, t in e] for e in entries]
                elif self.request.token_ids_logprob:
                    meta[key] = [None if e is None else [self._triple(lp, t, with_text) for lp, t in e] for e in entries]
        return {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}

    def _triple(self, logprob: float | None, token_id: int, with_text: bool) -> list:
        text = self.tokenizer.id_to_token_text(token_id) if (with_text and self.tokenizer is not None) else None
        return [logprob, token_id, text]
