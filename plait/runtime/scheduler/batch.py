"""`StepBatch`: one step's batch, from scheduling until its sampled tokens are read back.

The scheduler fills it in phases (see scheduler.py): scheduling sets the requests and the forward
batch; launching adds the logits and the bookkeeping of which rows sample; sampling adds host
copies of the tokens and logprobs, which are valid only after `wait()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode
from plait.runtime.executor.model_runner import LogitsOutput
from plait.runtime.scheduler.output import InputLogprobs, OutputLogprobs
from plait.runtime.scheduler.request import Req


@dataclass
class StepBatch:
    forward: ForwardBatch
    reqs: list[Req]
    take_lens: list[int]  # new tokens each request computes
    first_positions: list[int | None]  # extend: first prompt position whose logprob this chunk records
    # Extend batches with mixed chunks: rows of running requests decoding their next token.
    mixed_decodes: list[int] = field(default_factory=list)
    # After launch.
    logits: LogitsOutput | None = None  # dropped once sampled
    input_logprobs: list[InputLogprobs | None] = field(default_factory=list)
    sample_rows: list[int] = field(default_factory=list)  # rows that sample a token (decodes, completed prompts)
    prefill_only: list[int] = field(default_factory=list)  # rows of completed prompts with max_new_tokens 0
    # After sampling: host copies, complete after `wait()`.
    sampled_rows: list[int] = field(default_factory=list)  # sample_rows whose request was still there
    next_token_ids: torch.Tensor | None = None  # [len(sampled_rows)]
    next_logprobs: torch.Tensor | None = None  # [len(sampled_rows)]
    output_logprobs: OutputLogprobs | None = None
    _copied: torch.cuda.Event | None = None

    @property
    def is_decode(self) -> bool:
        return self.forward.mode is ForwardMode.DECODE

    def mark_copies_started(self, device: torch.device) -> None:
        """Called after the last device-to-host copy of the step has been queued."""
        if device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()

    def wait(self) -> None:
        """Block until the host copies are complete (only the copies: later steps keep running)."""
        if self._copied is not None:
            self._copied.synchronize()
            self._copied = None
