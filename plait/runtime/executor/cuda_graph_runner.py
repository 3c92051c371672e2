"""Decode steps replayed as CUDA graphs, one graph per batch size (SGLang's CudaGraphRunner).

A decode step of a small batch is a few hundred short kernels; launched one by one from Python,
the launches take longer than the kernels. Captured once per batch size at startup and replayed,
a step costs one launch. Captured: the model forward and the logits of each request's new token.

Inputs live in static buffers sized for the largest batch (`input_ids`, `positions`,
`out_cache_loc`, `req_pool_indices`, `seq_lens`); a batch is copied into them and padded up to the
next captured size. Padded rows are dummies that touch only reserved memory: req_pool_index 0
(req_to_token's padding row, whose entries are all slot 0), seq_len 1, position 0, out slot 0 (the
KV pool's dummy slot), input id 0. Their logits are dropped.

Runs eager instead (`can_run` is False): extend batches (their shapes vary too much to capture),
decode batches larger than the largest captured size, decode batches with shared-prefix groups
(the grid of their prefix kernel follows the groups), and batches that ask for logits at more than
the last token (`logits_start_lens`, prompt logprobs; decode batches never do).

With `enable_torch_compile`, the layers without attention (the RMSNorms and the MLPs) run through
`torch.compile` while the graphs are captured, so the replayed graph holds Inductor's fused
kernels; eager steps keep the plain modules.
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch

from plait.runtime.executor.forward_batch import ForwardBatch, ForwardMode

if TYPE_CHECKING:
    from plait.runtime.executor.model_runner import ModelRunner

logger = logging.getLogger(__name__)


def capture_batch_sizes(max_bs: int) -> list[int]:
    """1, 2, 4, 8, 16, 24, 32, then steps of 16 up to `max_bs`, which is always included."""
    assert max_bs >= 1
    sizes = [bs for bs in (1, 2, 4, 8, 16, 24, 32) if bs <= max_bs]
    sizes += list(range(48, max_bs + 1, 16))
    if sizes[-1] != max_bs:
        sizes.append(max_bs)
    return sizes


class CaptureStats(NamedTuple):
    batch_sizes: list[int]
    seconds: float
    memory_bytes: int  # device memory the graphs took: pool, static buffers, backend state, compiled code


class CudaGraphRunner:
    def __init__(self, runner: ModelRunner, *, max_bs: int, enable_torch_compile: bool = False):
        backend = runner.attn_backend
        assert runner.device.type == "cuda" and getattr(backend, "supports_cuda_graph", False)
        self.runner = runner
        self.model = runner.model
        self.backend = backend
        self.batch_sizes = capture_batch_sizes(max_bs)
        self.max_bs = max_bs
        self.enable_torch_compile = enable_torch_compile
        torch.cuda.synchronize(runner.device)
        free_before, _ = torch.cuda.mem_get_info(runner.device)
        start = time.perf_counter()
        self.inputs = StaticInputs(max_bs, runner.device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        # Every graph writes its logits here, so the graph pool holds only transient activations.
        self.logits = torch.empty(max_bs, runner.vocab_size, dtype=torch.float32, device=runner.device)
        self.num_replays = 0
        self._capture()
        torch.cuda.synchronize(runner.device)
        free_after, _ = torch.cuda.mem_get_info(runner.device)
        self.stats = CaptureStats(self.batch_sizes, time.perf_counter() - start, max(0, free_before - free_after))
        logger.info("captured %d CUDA graphs (batch sizes %d..%d%s) in %.1f s, %.2f GiB", len(self.batch_sizes),
                    self.batch_sizes[0], max_bs, ", torch.compile" if enable_torch_compile else "",
                    self.stats.seconds, self.stats.memory_bytes / 2**30)

    # ---- capture ----------------------------------------------------------------------------------
    def _static_batch(self, bs: int, seq_lens_cpu: list[int]) -> ForwardBatch:
        runner, inputs = self.runner, self.inputs
        return ForwardBatch(
            mode=ForwardMode.DECODE,
            input_ids=inputs.input_ids[:bs],
            positions=inputs.positions[:bs],
            out_cache_loc=inputs.out_cache_loc[:bs],
            req_pool_indices=inputs.req_pool_indices[:bs],
            seq_lens=inputs.seq_lens[:bs],
            seq_lens_cpu=seq_lens_cpu,
            prefix_lens_cpu=[n - 1 for n in seq_lens_cpu],
            extend_lens_cpu=[1] * bs,
            req_to_token_pool=runner.req_to_token_pool,
            kv_pool=runner.kv_pool,
            attn_backend=self.backend,
        )

    def _forward(self, batch: ForwardBatch) -> None:
        hidden = self.model(batch)  # [bs, hidden_size]: one new token per request
        self.logits[: batch.batch_size].copy_(self.model.compute_logits(hidden))  # [bs, vocab_size] float32

    @torch.inference_mode()
    def _capture(self) -> None:
        from tqdm import tqdm

        device = self.runner.device
        self.backend.init_cuda_graph_state(self.max_bs, self.runner.req_to_token_pool.req_to_token.shape[1])
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(device)
        compiled = _compiled_layers(self.model) if self.enable_torch_compile else contextlib.nullcontext()
        # Largest first: the smaller graphs then fit in the memory the largest one left in the shared pool.
        sizes = sorted(self.batch_sizes, reverse=True)
        stream.wait_stream(torch.cuda.current_stream(device))
        with compiled, torch.cuda.stream(stream):
            for bs in tqdm(sizes, desc="Capturing CUDA graphs", unit="graph", leave=False):
                batch = self._static_batch(bs, [1] * bs)
                self.backend.init_forward_metadata_capture_cuda_graph(batch)
                for _ in range(2):  # warm up outside the graph: lazy init, autotuning, compilation
                    self._forward(batch)
                stream.synchronize()
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=pool, stream=stream):
                    self._forward(batch)
                self.graphs[bs] = graph

    # ---- replay -----------------------------------------------------------------------------------
    def can_run(self, batch: ForwardBatch) -> bool:
        return (
            batch.mode is ForwardMode.DECODE
            and batch.batch_size <= self.max_bs
            and not batch.shared_prefixes
            and not (batch.logits_start_lens and any(s is not None for s in batch.logits_start_lens))
        )

    def captured_size(self, num_reqs: int) -> int:
        """The graph a batch of `num_reqs` requests replays: the next captured size."""
        return self.batch_sizes[bisect.bisect_left(self.batch_sizes, num_reqs)]

    def replay(self, batch: ForwardBatch) -> torch.Tensor:
        """Logits at each request's new token, [batch_size, vocab] float32 (a fresh tensor)."""
        num_reqs = batch.batch_size
        bs = self.captured_size(num_reqs)
        self.inputs.load(batch, bs)
        static = self._static_batch(bs, list(batch.seq_lens_cpu) + [1] * (bs - num_reqs))
        self.backend.init_forward_metadata_replay_cuda_graph(static, bs)
        self.graphs[bs].replay()
        self.num_replays += 1
        # A copy: the next replay overwrites the graph's buffer while a caller (overlap scheduling)
        # may still read this step's logits.
        return self.logits[:num_reqs].clone()


class StaticInputs:
    """The graphs' input buffers, `max_bs` rows each; rows past the real batch hold the dummy values."""

    def __init__(self, max_bs: int, device: torch.device | str):
        self.input_ids = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.out_cache_loc = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.req_pool_indices = torch.zeros(max_bs, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(max_bs, dtype=torch.int64, device=device)
        # Rows at or past a batch's size may hold an earlier, larger batch's values up to this mark;
        # past it every row still holds the dummy values.
        self._dirty_rows = 0

    def load(self, batch: ForwardBatch, bs: int) -> None:
        """Copy the decode `batch` into rows [0, batch_size) and make rows [batch_size, bs) dummies."""
        num_reqs = batch.batch_size
        assert num_reqs <= bs <= self.input_ids.shape[0]
        self.input_ids[:num_reqs].copy_(batch.input_ids, non_blocking=True)
        self.positions[:num_reqs].copy_(batch.positions, non_blocking=True)
        self.out_cache_loc[:num_reqs].copy_(batch.out_cache_loc, non_blocking=True)
        self.req_pool_indices[:num_reqs].copy_(batch.req_pool_indices, non_blocking=True)
        self.seq_lens[:num_reqs].copy_(batch.seq_lens, non_blocking=True)
        # Reset only rows an earlier batch dirtied: a steady batch size costs no extra launches.
        end = min(bs, self._dirty_rows)
        if end > num_reqs:
            for buf in (self.input_ids, self.positions, self.out_cache_loc, self.req_pool_indices):
                buf[num_reqs:end].zero_()
            self.seq_lens[num_reqs:end].fill_(1)
        if end >= self._dirty_rows:
            self._dirty_rows = num_reqs
        else:  # rows [bs, dirty) still hold old values
            self._dirty_rows = max(self._dirty_rows, num_reqs)


# ---- torch.compile ------------------------------------------------------------------------------------
def _fusable_modules(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Module]]:
    """(parent, attribute, module) for every RMSNorm and MLP: pure tensor functions, no attention."""
    from plait.runtime.layers.norm import RMSNorm
    from plait.runtime.models.llama import DecoderMLP

    found = []
    for parent in model.modules():
        for name, child in parent.named_children():
            if isinstance(child, (RMSNorm, DecoderMLP)):
                found.append((parent, name, child))
    return found


@contextlib.contextmanager
def _compiled_layers(model: torch.nn.Module) -> Iterator[None]:
    """Swap in `torch.compile`d norms and MLPs for the duration (the graph capture).

    Modules of one class share compiled code (parameters are graph inputs); the batch dimension
    turns dynamic after the first recompile, so the captured sizes cost a few compilations, not one
    each. The default mode, not "reduce-overhead": the graphs here are ours.
    """
    import torch._dynamo.config as dynamo_config

    swapped = _fusable_modules(model)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    with dynamo_config.patch(**{limit: max(64, getattr(dynamo_config, limit))}):
        for parent, name, module in swapped:
            setattr(parent, name, torch.compile(module))
        try:
            yield
        finally:
            for parent, name, module in swapped:
                setattr(parent, name, module)
