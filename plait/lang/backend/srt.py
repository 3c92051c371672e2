"""Frontend operations in terms of SGLang's `/generate` request shape, shared by the HTTP
endpoint and the in-process engine; a subclass supplies only the transport (`_generate`,
`_generate_stream`)."""

from __future__ import annotations

from typing import Any, Iterator

from plait.lang.backend.base import BaseBackend
from plait.lang.choices import ChoicesDecision, ChoicesSamplingMethod
from plait.lang.params import GenParams, srt_sampling_dict
from plait.lang.workflow import hint_fields

PREFILL_ONLY = {"max_new_tokens": 0}


class GenerateProtocolBackend(BaseBackend):
    # True/False: the server sends streamed text incrementally / cumulatively; None: detect.
    incremental_streaming_output: bool | None = None

    def _generate(self, body: dict[str, Any]) -> dict[str, Any] | list[dict[str, Any]]:
        raise NotImplementedError

    def _generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        raise NotImplementedError

    # ---- request bodies -----------------------------------------------------------------------
    @staticmethod
    def _image_fields(s: Any, batch: int | None = None) -> dict[str, Any]:
        if not s.images_:
            return {}
        images = [b64 for _, b64 in s.images_]
        one = images[0] if len(images) == 1 else images
        return {"image_data": one if batch is None else [one] * batch}

    def _body(self, s: Any, params: GenParams) -> dict[str, Any]:
        params = params.with_dtype_as_regex()
        return {"text": s.text_, "sampling_params": srt_sampling_dict(params.sampling),
                **params.logprob.request_fields(), **self._image_fields(s), **_hints(s)}

    # ---- the backend interface ----------------------------------------------------------------
    def cache_prefix(self, prefix_str: str) -> None:
        self._generate({"text": prefix_str, "sampling_params": dict(PREFILL_ONLY)})

    def commit_lazy_operations(self, s: Any) -> None:
        if s.text_:
            self._generate({"text": s.text_, "sampling_params": dict(PREFILL_ONLY), **self._image_fields(s),
                            **_hints(s)})

    def generate(self, s: Any, sampling_params: GenParams) -> tuple[Any, Any]:
        res = self._generate(self._body(s, sampling_params))
        if isinstance(res, list):  # n > 1
            return [r["text"] for r in res], [r["meta_info"] for r in res]
        return res["text"], res["meta_info"]

    def generate_stream(self, s: Any, sampling_params: GenParams) -> Iterator[tuple[str, dict]]:
        body = self._body(s, sampling_params)
        body["stream"] = True
        received = ""
        incremental = self.incremental_streaming_output
        for chunk in self._generate_stream(body):
            text, meta = chunk.get("text", ""), chunk.get("meta_info", {})
            if incremental is None:
                ids, count = chunk.get("output_ids"), meta.get("completion_tokens")
                if ids is not None and count is not None and len(ids) < count:
                    incremental = True  # fewer ids than tokens so far: each event is only the new piece
                elif received and not text.startswith(received):
                    incremental = True
            delta = text if incremental else text[len(received):]
            received = received + delta
            yield delta, meta

    def prompt_len(self, s: Any) -> int:
        """Tokens in the transcript so far, as the server counts them. Here: a prefill-only request,
        which any SGLang server answers; backends that can count without a scheduler step override
        it (a request the scheduler must fit into its next batch costs a whole step's wait)."""
        res = self._generate({"text": s.text_, "sampling_params": dict(PREFILL_ONLY), **self._image_fields(s)})
        return res["meta_info"]["prompt_tokens"]

    def select(self, s: Any, choices: list[str], temperature: float,
               choices_method: ChoicesSamplingMethod) -> ChoicesDecision:
        """Score every choice in one batched prefill-only request and let `choices_method` decide.
        The batch's requests share the prompt: it is usually cached already (the transcript's earlier
        requests), and the scheduler computes an uncached shared prefix once for the whole batch."""
        if temperature > 1e-5:
            raise ValueError("select scores the choices; it needs temperature 0")
        prompt_len = self.prompt_len(s) if s.text_ else 0
        # Two tokens early: the prompt's last token may merge with the choice's first ("token healing").
        # The prompt itself rides along (all cached, so nearly free): its last tokens' ids show
        # where each choice's own tokens begin.
        start = max(prompt_len - 2, 0)
        texts = ([s.text_] if prompt_len else []) + [s.text_ + c for c in choices]
        results = self._generate({
            "text": texts, "sampling_params": {"max_new_tokens": 0, "temperature": 0},
            "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": start,
            **self._image_fields(s, batch=len(texts)),
        })
        prompt_tail = results[0]["meta_info"]["input_token_logprobs"] if prompt_len else []
        results = results[1:] if prompt_len else results
        input_lps = [choice_token_logprobs(r["meta_info"]["input_token_logprobs"], prompt_tail) for r in results]
        output_lps = [r["meta_info"].get("output_token_logprobs", []) for r in results]
        normalized = [_mean(lps) for lps in input_lps]
        unconditional = None
        if choices_method.requires_unconditional_logprobs:
            ures = self._generate({
                "input_ids": [[e[1] for e in lps] for lps in input_lps], "sampling_params": dict(PREFILL_ONLY),
                "return_logprob": True, "return_text_in_logprobs": True, "logprob_start_len": 0,
            })
            unconditional = [r["meta_info"]["input_token_logprobs"] for r in ures]
        return choices_method(choices=choices, normalized_prompt_logprobs=normalized, input_token_logprobs=input_lps,
                              output_token_logprobs=output_lps, unconditional_token_logprobs=unconditional)


def _hints(s: Any) -> dict[str, str]:
    """The program's agent-workflow fields (`plait.lang.workflow`), if it runs as an agent."""
    return hint_fields(getattr(s, "workflow_hint", None))


def choice_token_logprobs(entries: list[list[Any]], prompt_tail: list[list[Any]]) -> list[list[Any]]:
    """The `[logprob, id, text]` entries of a choice's own tokens.

    `entries` score prompt+choice from the position where `prompt_tail` (the prompt alone, from
    the same position) starts. The two agree, token id for token id, up to where the choice
    begins; from the first difference on every token is the choice's (a prompt token merged with
    the choice's first counts as the choice's). Ids, not token texts: a token holding part of a
    multi-byte character has no text of its own, so texts cannot say how much of the choice it
    covers.
    """
    shared = 0
    while shared < min(len(entries), len(prompt_tail)) and entries[shared][1] == prompt_tail[shared][1]:
        shared += 1
    return entries[shared:] or entries[-1:]


def _mean(entries: list[list[Any]]) -> float:
    values = [e[0] for e in entries if e[0] is not None]
    return sum(values) / len(values) if values else 0.0
