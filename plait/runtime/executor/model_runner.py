"""The model runner: owns the weights, the KV pool and the attention backend, and turns a
`ForwardBatch` into logits.

It knows nothing of requests or scheduling; the scheduler (or the static batch loop) fills the
`req_to_token` rows and allocates `out_cache_loc` before calling `forward`.

Under tensor parallelism (`tp`) there is one runner per rank, each holding its shard of the
weights and of the KV pool (its KV heads). Rank 0's `forward` first broadcasts the step to the
others (plait/runtime/distributed/lockstep.py), which run it in lock step.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from plait.runtime import huge_pages
from plait.runtime.attention.base import (
    AttentionBackend,
    create_attention_backend,
    default_attention_backend,
)
from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.cuda_graph_runner import CudaGraphRunner
from plait.runtime.executor.forward_batch import ForwardBatch, make_decode_batch
from plait.runtime.cpu import kernels as cpu_kernels
from plait.runtime.distributed.lockstep import ReleaseMemory, StepSender, StopWorkers, TableJournal
from plait.runtime.distributed.parallel import SINGLE, TensorParallel
from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool, SlotAllocator
from plait.runtime.models.registry import get_model_class

if TYPE_CHECKING:
    from plait.runtime.model_loader import ModelSource

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# On the CPU without --max-total-tokens, the KV pool takes this many bytes, which concurrent programs
# with shared prefixes need (24 programs of 700 tokens overflow two contexts of a small model) ...
_CPU_KV_BUDGET_BYTES = 2 << 30
# ... but no more than this share of the memory available at start ...
_CPU_KV_MEMORY_SHARE = 0.25
# ... and no more than this many full contexts; at least two (one request at the full context
# length and as much again for others), even where the budget is smaller.
_CPU_KV_MAX_CONTEXTS = 16
_CPU_KV_MIN_CONTEXTS = 2
# Without --max-running-requests: one request row per 16 KV tokens, at most this many.
_MAX_DEFAULT_RUNNING = 512
# Held back for CUDA graphs beyond the measured decode activations: the backend's static buffers.
_GRAPH_RESERVE_SLACK_BYTES = 256 << 20


def _default_max_running(num_slots: int) -> int:
    return max(1, min(num_slots // 16, _MAX_DEFAULT_RUNNING))


class MemoryReport(NamedTuple):
    """Where the model runner's memory went, logged at startup."""

    weights_bytes: int
    kv_pool_tokens: int
    kv_pool_bytes: int
    kv_dtype: str
    req_table_bytes: int
    max_running_requests: int
    graph_bytes: int  # measured across capture (0: no graphs)
    graph_reserve_bytes: int  # held back from the KV pool before capture
    graph_batch_sizes: tuple[int, ...]
    graph_capture_s: float
    device_total_bytes: int | None  # CUDA only
    device_free_bytes: int | None  # after setup

    def __str__(self) -> str:
        gib = 2**30
        text = (f"weights {self.weights_bytes / gib:.2f} GiB, KV pool {self.kv_pool_tokens} tokens "
                f"({self.kv_pool_bytes / gib:.2f} GiB, {self.kv_dtype}), request table {self.req_table_bytes / gib:.2f} GiB, "
                f"max running requests {self.max_running_requests}")
        if self.graph_batch_sizes:
            text += (f", CUDA graphs {self.graph_bytes / gib:.2f} GiB (held back {self.graph_reserve_bytes / gib:.2f}; "
                     f"{len(self.graph_batch_sizes)} batch sizes up to {max(self.graph_batch_sizes)}, "
                     f"captured in {self.graph_capture_s:.1f} s)")
        if self.device_total_bytes:
            text += f", {self.device_free_bytes / gib:.1f} of {self.device_total_bytes / gib:.1f} GiB free"
        return text


@dataclass
class LogitsOutput:
    next_token_logits: torch.Tensor  # [batch_size, vocab] float32: at the last new token of each request
    # Per request: logits at its new tokens from logits_start_lens[i] on ([n_i, vocab] float32), else None.
    input_token_logits: list[torch.Tensor | None]


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for but no CUDA device is available")
    return device


def resolve_dtype(name: str, config: dict, device: torch.device, *, cpu_kernels: bool = False) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        # The CPU kernels compute in float32 (their weights stay compact: GGUF blocks or 16 bits).
        # Without them, bf16 pays on CPUs with bf16 instructions (AMX, or AVX-512 BF16: the default
        # model's decode step at batch 8 took 58 ms against 89 in float32 on a 2-core AVX-512 BF16
        # machine, prefill 2x as fast); without those the half-type kernels are slow.
        if cpu_kernels:
            return torch.float32
        return torch.bfloat16 if _cpu_has_bf16_units() else torch.float32
    config_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPES.get(config_dtype, torch.bfloat16) if config_dtype != "float32" else torch.bfloat16


_KV_CACHE_DTYPES = {
    "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "int8": torch.int8,  # CPU kernels: per (token, head) scale
    "fp8_e5m2": torch.float8_e5m2, "fp8_e4m3": torch.float8_e4m3fn,
}


def resolve_kv_cache_dtype(name: str, model_dtype: torch.dtype, backend: AttentionBackend, *,
                           dtype_auto: bool = False) -> torch.dtype:
    """The KV pool's storage dtype. "auto": the model's, except on a backend that prefers a smaller
    one for an automatically chosen dtype (the CPU kernels compute in float32 and store float16 KV).
    Otherwise a dtype the backend must support."""
    if name == "auto":
        preferred = backend.preferred_kv_cache_dtype(model_dtype)
        return preferred if dtype_auto and preferred is not None else model_dtype
    if name not in _KV_CACHE_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose from auto, {', '.join(_KV_CACHE_DTYPES)}")
    dtype = _KV_CACHE_DTYPES[name]
    if dtype not in backend.kv_cache_dtypes(model_dtype):
        supported = ", ".join(sorted(k for k, v in _KV_CACHE_DTYPES.items() if v in backend.kv_cache_dtypes(model_dtype)))
        raise ValueError(f"kv_cache_dtype {name} is not supported by the {type(backend).__name__} attention backend "
                         f"for a {str(model_dtype).replace('torch.', '')} model; it supports {supported}")
    return dtype


def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def _to_empty(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model.to_empty(device=device)`: uninitialised storage of the same shapes, strides and dtypes.

    `to_empty` calls `empty_like` on the meta tensors, which runs PyTorch's Python reference code for
    it; the first such call imports sympy (a second of start-up on a small CPU). `empty_strided` is a
    plain factory call on the target device."""
    return model._apply(lambda t: torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, device=device))


class ModelRunner:
    def __init__(
        self, model_config: ModelConfig, memory_config: MemoryConfig | None = None, *, source: ModelSource | None = None,
        tp: TensorParallel | None = None,
    ):
        """`source` overrides resolving `model_config.model_path` (tests hand in in-memory models);
        `tp`: this process's rank in a tensor-parallel group (every rank constructs its runner at once)."""
        memory_config = memory_config or MemoryConfig()
        self.model_config = model_config
        self.tp = tp or SINGLE
        self.step_sender: StepSender | None = None  # rank 0 under TP, once the KV pool exists
        self.cpu_stack = None  # set once the KV pool exists; `forward` runs before that (the CUDA graph memory probe)
        self.device = resolve_device(model_config.device)
        torch.manual_seed(model_config.random_seed)
        if source is None:
            from plait.runtime.model_loader import resolve_model

            source = resolve_model(
            model_config.model_path,
                load_format=model_config.load_format,
                tokenizer_path=model_config.tokenizer_path,
                chat_template=model_config.chat_template,
            )
        self.source = source
        self.config = self.source.config
        self.tokenizer = self.source.tokenizer
        kernels_ok = (self.device.type == "cpu" and not model_config.disable_cpu_kernels and cpu_kernels.available())
        self.dtype = resolve_dtype(model_config.dtype, self.config, self.device, cpu_kernels=kernels_ok)
        # On the CPU kernels a 16-bit --dtype is the storage of the float weights and of the KV cache;
        # the kernels compute in float32 (they widen 16-bit values in registers, which costs nothing
        # against the memory they save; AVX2 has no 16-bit arithmetic to use instead).
        self.weight_dtype: torch.dtype | None = None
        if kernels_ok and self.dtype in (torch.bfloat16, torch.float16):
            self.weight_dtype, self.dtype = self.dtype, torch.float32
        self.use_cpu_kernels = kernels_ok and self.dtype == torch.float32
        self.execution: dict[str, str] = {}  # which paths run, for the startup log and /get_server_info
        self.model = self._load_model()
        self.arch = self.model.arch
        self.shard = self.model.shard  # this rank's heads: its KV pool holds shard.num_kv_heads
        self.vocab_size = self.arch.vocab_size
        self.context_length = model_config.context_length or self.arch.max_position_embeddings
        if self.context_length > self.arch.max_position_embeddings:
            raise ValueError(
                f"context_length {self.context_length} exceeds the model's max_position_embeddings "
                f"({self.arch.max_position_embeddings})"
            )

        backend = model_config.attention_backend or default_attention_backend(
            self.device, cpu_kernels=self.use_cpu_kernels)
        if backend == "cpu" and not self.use_cpu_kernels:
            raise ValueError("the cpu attention backend needs the CPU kernels (built, an AVX2 CPU) and dtype float32")
        self.execution["attention_backend"] = backend
        self.attn_backend = create_attention_backend(
            backend, device=self.device, prefill_attention=self.execution.get("prefill_attention", "float"))
        kv_name = model_config.kv_cache_dtype
        if kv_name == "auto" and self.weight_dtype is not None:
            kv_name = str(self.weight_dtype).replace("torch.", "")
        self.kv_dtype = resolve_kv_cache_dtype(kv_name, self.dtype, self.attn_backend,
                                               dtype_auto=model_config.dtype == "auto")
        self.graph_runner: CudaGraphRunner | None = None
        graph_max_bs = self._cuda_graph_max_bs(model_config, memory_config)
        # The graphs are captured against the final KV pool, so their memory is measured first (one
        # eager decode at the largest captured size over a throwaway pool) and held back from it.
        graph_reserve = self._graph_memory_reserve(graph_max_bs) if graph_max_bs else 0
        num_slots = self._num_kv_slots(memory_config, reserve_bytes=graph_reserve)
        max_running = memory_config.max_running_requests or _default_max_running(num_slots)
        self.kv_pool = KVPool(
            num_slots=num_slots,
            num_layers=self.arch.num_layers,
            num_kv_heads=self.shard.num_kv_heads,
            head_dim=self.arch.head_dim,
            dtype=self.kv_dtype,
            device=self.device,
        )
        self.req_to_token_pool = ReqToTokenPool(max_running, min(self.context_length, num_slots) + 1, self.device)
        if self.tp.size > 1:
            self.execution["tensor_parallel"] = (f"{self.tp.size} ranks over {self.tp.backend}; rank {self.tp.rank} "
                                                 f"holds {self.shard.num_heads} of {self.arch.num_heads} heads, "
                                                 f"{self.shard.num_kv_heads} of {self.arch.num_kv_heads} KV heads")
            if self.tp.is_driver:
                self.req_to_token_pool.journal = TableJournal()
                self.step_sender = StepSender(self.tp, self.req_to_token_pool.journal)
        self.allocator = SlotAllocator(num_slots, self.device)
        if self.device.type == "cuda":
            self.attn_backend.warm_up(self.kv_pool, self.req_to_token_pool.req_to_token,
                                      num_heads=self.shard.num_heads, dtype=self.dtype)
        if graph_max_bs:
            self.graph_runner = CudaGraphRunner(
                self, max_bs=min(graph_max_bs, max_running), enable_torch_compile=model_config.enable_torch_compile
            )
        self.cpu_stack = self._cpu_stack(model_config)
        self.memory_report = self._memory_report(graph_reserve)
        self._log_setup(model_config, memory_config)

    def _log_setup(self, model_config: ModelConfig, memory_config: MemoryConfig) -> None:
        """One readable line per concern: the model, its dtype, the KV pool."""
        report, gib = self.memory_report, 2**30
        logger.info("model: %s (%s, %.1fM parameters, %.2f GiB of weights, loaded in %.1f s)", self.source.path,
                    type(self.model).__name__, self.num_params / 1e6, report.weights_bytes / gib, self.load_seconds)
        why = ""
        if model_config.dtype == "auto" and self.device.type == "cpu":
            why = (" (auto: the CPU kernels compute in float32)" if self.use_cpu_kernels else
                   " (auto: this CPU has bf16 instructions)" if self.dtype == torch.bfloat16 else
                   " (auto: this CPU has no bf16 instructions)")
        if self.weight_dtype is not None:
            why = f" compute, {str(self.weight_dtype).replace('torch.', '')} weights (the CPU kernels)"
        logger.info("dtype: %s on %s%s", str(self.dtype).replace("torch.", ""), self.device, why)
        rule = ", taken as it fills" if self.device.type == "cpu" else ""
        if not memory_config.max_total_tokens and self.device.type == "cpu":
            rule += f"; {_CPU_KV_BUDGET_BYTES / gib:.0f} GiB or a quarter of available memory, " \
                   f"{_CPU_KV_MIN_CONTEXTS}-{_CPU_KV_MAX_CONTEXTS} contexts; --max-total-tokens sets it"
        logger.info("KV pool: %d tokens, %.2f GiB %s, up to %d running requests%s", report.kv_pool_tokens,
                    report.kv_pool_bytes / gib, report.kv_dtype, report.max_running_requests, rule)
        if report.graph_batch_sizes or report.device_total_bytes:
            logger.info("memory: %s", report)

    def _cpu_stack(self, model_config: ModelConfig):
        """The whole decoder stack as one native call per step (the CPU's "graph"), when it can run."""
        if not self.use_cpu_kernels or self.execution.get("attention_backend") != "cpu":
            return None
        from plait.runtime.cpu.stack import CpuDecoderStack

        reason = "--disable-cpu-graph" if model_config.disable_cpu_graph else CpuDecoderStack.unsupported(
            self.model, self.kv_pool)
        if reason is not None:
            self.execution["cpu_graph"] = f"off ({reason})"
            return None
        self.execution["cpu_graph"] = "on"
        return CpuDecoderStack(self.model, self.kv_pool, self.execution.get("prefill_attention", "float"))

    def execution_info(self) -> dict[str, Any]:
        """Which model-execution path runs (`internal_states[0].execution` of the server info):
        `self.execution`, filled as the paths are chosen, plus the settings every path has."""
        return {
            "dtype": str(self.dtype).replace("torch.", ""),
            **({"weight_dtype": str(self.weight_dtype).replace("torch.", "")} if self.weight_dtype else {}),
            "kv_cache_dtype": str(self.kv_dtype).replace("torch.", ""),
            "device": str(self.device),
            "cuda_graph": self.graph_runner is not None,
            "cuda_graph_batch_sizes": list(self.memory_report.graph_batch_sizes),
            "torch_compile": self.graph_runner is not None and self.model_config.enable_torch_compile,
            "huge_pages": huge_pages.asked(),
            "huge_page_bytes": huge_pages.huge_page_bytes(),
            **self.execution,
            **({"cpu_graph_steps": dict(self.cpu_stack.steps)} if self.cpu_stack is not None else {}),
        }

    @property
    def num_params(self) -> int:
        """Parameters of the model, counting the CPU kernels' stored matrices (shared ones once)."""
        from plait.runtime.cpu.linear import CpuEmbedding, CpuLinear

        stored = {id(m.stored): m.stored for m in self.model.modules() if isinstance(m, (CpuLinear, CpuEmbedding))}
        return (sum(p.numel() for p in self.model.parameters())
                + sum(w.out_features * w.in_features for w in stored.values()))

    def _load_model(self) -> torch.nn.Module:
        model_cls = get_model_class(self.config)
        start = time.perf_counter()
        with torch.device("meta"):
            model = model_cls(self.config, tp=self.tp).to(self.dtype)
        # Allocated but untouched: layers that take stored weights below free theirs unwritten.
        model = _to_empty(model, self.device)
        if self.source.load_format == "dummy":
            _init_dummy_weights(model)
        else:
            consumed: frozenset[str] = frozenset()
            if self.use_cpu_kernels:
                from plait.runtime.cpu.convert import attach_stored

                consumed = attach_stored(model, self.source.iter_stored_weights())
            model.load_weights(self.source.iter_weights(skip=consumed))
        if self.use_cpu_kernels:
            from plait.runtime.cpu.convert import convert_remaining
            from plait.runtime.cpu.linear import gather_stored
            from plait.runtime.cpu.products import configure_products

            summary = convert_remaining(model, self.weight_dtype)
            self.execution["cpu_kernels"] = cpu_kernels.isa()
            self.execution["weights"] = summary.describe()
            self.execution.update(configure_products(model, self.model_config, available_memory_bytes()))
            self.execution["stored_weight_bytes"] = gather_stored(model)
            logger.info("CPU kernels (%s): weights read as stored: %s", cpu_kernels.isa(), summary.describe())
        elif self.device.type == "cpu":
            self.execution["cpu_kernels"] = "off"
        self.load_seconds = time.perf_counter() - start
        return model.eval()

    def _num_kv_slots(self, memory_config: MemoryConfig, *, reserve_bytes: int = 0) -> int:
        """KV tokens that fit. On CUDA, `mem_fraction_static` of the device holds the weights, the KV
        pool, the request table and the CUDA graphs (`reserve_bytes`); the rest is for activations."""
        # Every rank's pool must have the same slots (rank 0 alone allocates them): the fewest any fits.
        return self.tp.min_int(self._local_kv_slots(memory_config, reserve_bytes=reserve_bytes))

    def _local_kv_slots(self, memory_config: MemoryConfig, *, reserve_bytes: int = 0) -> int:
        per_token = self.kv_bytes_per_token
        if memory_config.max_total_tokens:
            return memory_config.max_total_tokens
        if self.device.type == "cuda":
            fraction = memory_config.mem_fraction_static or 0.85
            free, total = torch.cuda.mem_get_info(self.device)
            rows = (memory_config.max_running_requests or _MAX_DEFAULT_RUNNING) + 1
            table_bytes = rows * (self.context_length + 1) * 8  # req_to_token at its widest, int64
            budget = free - total * (1 - fraction) - reserve_bytes - table_bytes
            if budget <= per_token * 16:
                raise RuntimeError(
                    f"not enough GPU memory for the KV cache at mem_fraction_static={fraction}: "
                    f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after loading weights, "
                    f"{reserve_bytes / 2**30:.2f} GiB held for CUDA graphs"
                )
            return int(budget // per_token)
        return cpu_default_kv_slots(per_token, self.context_length, available_memory_bytes())

    @property
    def kv_bytes_per_token(self) -> int:
        return KVPool.bytes_per_token(
            num_layers=self.arch.num_layers, num_kv_heads=self.shard.num_kv_heads, head_dim=self.arch.head_dim,
            dtype=self.kv_dtype,
        )

    # ---- CUDA graphs --------------------------------------------------------------------------------
    def _cuda_graph_max_bs(self, model_config: ModelConfig, memory_config: MemoryConfig) -> int:
        """The largest decode batch to capture; 0: no graphs."""
        if self.device.type != "cuda" or model_config.disable_cuda_graph or model_config.cuda_graph_max_bs < 1:
            if model_config.enable_torch_compile:
                logger.warning("--enable-torch-compile applies to the captured CUDA graphs only; ignored here")
            return 0
        if not self.attn_backend.supports_cuda_graph:
            logger.warning("CUDA graphs off: the %s attention backend cannot be captured",
                           type(self.attn_backend).__name__)
            return 0
        return min(model_config.cuda_graph_max_bs, memory_config.max_running_requests or model_config.cuda_graph_max_bs)

    @torch.inference_mode()
    def _graph_memory_reserve(self, max_bs: int) -> int:
        """Device memory to hold back for the graphs: the activation peak of one eager decode step at
        `max_bs` (the shared graph pool holds about that: the graphs are captured largest first and
        the smaller ones reuse its blocks), with room for the backend's static buffers and rounding."""
        pool = KVPool(num_slots=1, num_layers=self.arch.num_layers, num_kv_heads=self.shard.num_kv_heads,
                      head_dim=self.arch.head_dim, dtype=self.kv_dtype, device=self.device)
        table = ReqToTokenPool(1, 2, self.device)
        batch = make_decode_batch(
            req_pool_indices=[0] * max_bs, seq_lens=[1] * max_bs, last_token_ids=[0] * max_bs,
            out_cache_loc=torch.zeros(max_bs, dtype=torch.int64, device=self.device),
            req_to_token_pool=table, kv_pool=pool, attn_backend=self.attn_backend,
        )
        torch.cuda.synchronize(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        base = torch.cuda.memory_allocated(self.device)
        self.forward(batch)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device) - base
        return int(peak * 1.2) + _GRAPH_RESERVE_SLACK_BYTES

    def _memory_report(self, graph_reserve: int) -> MemoryReport:
        total = free = None
        if self.device.type == "cuda":
            free, total = torch.cuda.mem_get_info(self.device)
        stats = self.graph_runner.stats if self.graph_runner is not None else None
        report = MemoryReport(
            weights_bytes=sum(t.numel() * t.element_size() for t in [*self.model.parameters(), *self.model.buffers()]),
            kv_pool_tokens=self.kv_pool.num_slots,
            kv_pool_bytes=self.kv_pool.num_slots * self.kv_bytes_per_token,
            kv_dtype=str(self.kv_dtype).replace("torch.", ""),
            req_table_bytes=self.req_to_token_pool.req_to_token.numel() * 8,
            max_running_requests=self.req_to_token_pool.num_rows,
            graph_bytes=stats.memory_bytes if stats else 0,
            graph_reserve_bytes=graph_reserve,
            graph_batch_sizes=tuple(stats.batch_sizes) if stats else (),
            graph_capture_s=stats.seconds if stats else 0.0,
            device_total_bytes=total,
            device_free_bytes=free,
        )
        if stats and stats.memory_bytes > graph_reserve:
            logger.warning("CUDA graphs took %.2f GiB, more than the %.2f GiB held back for them; if prefill runs "
                           "out of memory, lower --mem-fraction-static", stats.memory_bytes / 2**30,
                           graph_reserve / 2**30)
        return report

    # ---- tensor parallelism: rank 0's messages to the other ranks -------------------------------------
    def release_kv_memory(self) -> None:
        """Give the KV pool's pages back (after a cache flush), on every rank."""
        if self.step_sender is not None:
            self.step_sender.send(ReleaseMemory())
        self.kv_pool.release_memory()

    def stop_workers(self) -> None:
        """Rank 0: let the other ranks' loops end (the scheduler is stopping)."""
        if self.step_sender is not None:
            self.step_sender.send(StopWorkers())
            self.step_sender = None

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        if self.step_sender is not None:
            self.step_sender.send_step(batch)
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return LogitsOutput(self.graph_runner.replay(batch), [None] * batch.batch_size)
        batch.attn_backend.init_forward_metadata(batch)
        # Index tensors are built on the host and copied without blocking: a tensor made directly on
        # the device would wait for the queued work (no overlap scheduling).
        last_rows = torch.tensor(batch.extend_lens_cpu).cumsum(0) - 1
        only_last = not batch.logits_start_lens or all(s is None for s in batch.logits_start_lens)
        if self.cpu_stack is not None:
            # [num_tokens, hidden_size]; without prompt logprobs only each request's last row is read
            hidden = self.cpu_stack.forward(batch, batch.attn_metadata, last_rows if only_last else None)
        else:
            hidden = self.model(batch)
        last_index = last_rows.to(hidden.device, non_blocking=True)
        if only_last:
            return LogitsOutput(self.model.compute_logits(hidden[last_index]), [None] * batch.batch_size)
        # Prompt logprobs: one logits pass over the union of the asked rows plus every last row.
        rows: list[torch.Tensor] = []
        spans: list[tuple[int, int] | None] = []
        q_start, offset = 0, 0
        for start, extend_len in zip(batch.logits_start_lens, batch.extend_lens_cpu):
            if start is None or start >= extend_len:
                start = extend_len - 1
                spans.append(None)
            else:
                spans.append((offset, extend_len - start))
            rows.append(torch.arange(q_start + start, q_start + extend_len, device=hidden.device))
            offset += extend_len - start
            q_start += extend_len
        logits = self.model.compute_logits(hidden[torch.cat(rows)])
        ends = (torch.tensor([len(r) for r in rows]).cumsum(0) - 1).to(hidden.device, non_blocking=True)
        inputs = [None if span is None else logits[span[0] : span[0] + span[1]] for span in spans]
        return LogitsOutput(logits[ends], inputs)


@torch.no_grad()
def _init_dummy_weights(model: torch.nn.Module) -> None:
    """Random weights of the real shapes: small normal values, norms at one (stable activations)."""
    for name, param in model.named_parameters():
        if "norm" in name:
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.normal_(0.0, 0.02)


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux); None where it cannot be read."""
    return huge_pages.proc_bytes("/proc/meminfo", "MemAvailable")


def cpu_default_kv_slots(bytes_per_token: int, context_length: int, available: int | None) -> int:
    """The CPU KV pool without --max-total-tokens: `_CPU_KV_BUDGET_BYTES`, or a quarter of the
    available memory where that is less, between 2 and 16 full contexts. The pool's pages are taken
    as KV is written, so an idle server pays nothing for the room."""
    budget = _CPU_KV_BUDGET_BYTES
    if available is not None:
        budget = min(budget, int(available * _CPU_KV_MEMORY_SHARE))
    tokens = budget // bytes_per_token
    floor = min(_CPU_KV_MIN_CONTEXTS * context_length, _CPU_KV_BUDGET_BYTES // bytes_per_token)
    return max(256, floor, min(tokens, _CPU_KV_MAX_CONTEXTS * context_length))
