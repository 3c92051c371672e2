"""The model runner: owns the weights, the KV pool and the attention backend, and turns a
`ForwardBatch` into logits.

It knows nothing of requests or scheduling; the scheduler (or the static batch loop) fills the
`req_to_token` rows and allocates `out_cache_loc` before calling `forward`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from plait.runtime.attention.base import create_attention_backend
from plait.runtime.config import MemoryConfig, ModelConfig
from plait.runtime.executor.forward_batch import ForwardBatch
from plait.runtime.memory.kv_pool import KVPool, ReqToTokenPool, SlotAllocator
from plait.runtime.models.registry import get_model_class

if TYPE_CHECKING:
    from plait.runtime.model_loader import ModelSource

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# On CPU without a size given, the KV pool takes this many bytes.
_CPU_KV_BUDGET_BYTES = 2 << 30


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


def resolve_dtype(name: str, config: dict, device: torch.device) -> torch.dtype:
    if name != "auto":
        if name not in _DTYPES:
            raise ValueError(f"unknown dtype {name!r}; choose from auto, {', '.join(_DTYPES)}")
        return _DTYPES[name]
    if device.type == "cpu":
        # CPU kernels for half types are only fast with bf16 matrix units; float32 is exact and safe.
        return torch.bfloat16 if _cpu_has_bf16_units() else torch.float32
    config_dtype = str(config.get("torch_dtype") or config.get("dtype") or "bfloat16").replace("torch.", "")
    return _DTYPES.get(config_dtype, torch.bfloat16) if config_dtype != "float32" else torch.bfloat16


def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "amx_bf16" in flags


class ModelRunner:
    def __init__(
        self, model_config: ModelConfig, memory_config: MemoryConfig | None = None, *, source: ModelSource | None = None
    ):
        """`source` overrides resolving `model_config.model_path` (tests hand in in-memory models)."""
        memory_config = memory_config or MemoryConfig()
        self.model_config = model_config
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
        self.dtype = resolve_dtype(model_config.dtype, self.config, self.device)
        self.model = self._load_model()
        self.arch = self.model.arch
        self.vocab_size = self.arch.vocab_size
        self.context_length = model_config.context_length or self.arch.max_position_embeddings
        if self.context_length > self.arch.max_position_embeddings:
            raise ValueError(
                f"context_length {self.context_length} exceeds the model's max_position_embeddings "
                f"({self.arch.max_position_embeddings})"
            )

        num_slots = self._num_kv_slots(memory_config)
        max_running = memory_config.max_running_requests or max(1, min(4096, num_slots // 16, 512))
        self.kv_pool = KVPool(
            num_slots=num_slots,
            num_layers=self.arch.num_layers,
            num_kv_heads=self.arch.num_kv_heads,
            head_dim=self.arch.head_dim,
            dtype=self.dtype,
            device=self.device,
        )
        self.req_to_token_pool = ReqToTokenPool(max_running, min(self.context_length, num_slots) + 1, self.device)
        self.allocator = SlotAllocator(num_slots, self.device)
        backend = model_config.attention_backend or "torch_native"
        self.attn_backend = create_attention_backend(backend, device=self.device)
        logger.info(
            "model %s loaded: %s, %.1fM parameters, dtype %s on %s; KV pool %d tokens, %d request rows",
            self.source.path, type(self.model).__name__, self.num_params / 1e6, self.dtype, self.device,
            num_slots, max_running,
        )

    @property
    def num_params(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _load_model(self) -> torch.nn.Module:
        model_cls = get_model_class(self.config)
        start = time.perf_counter()
        with torch.device("meta"):
            model = model_cls(self.config).to(self.dtype)
        model = model.to_empty(device=self.device)
        if self.source.load_format == "dummy":
            _init_dummy_weights(model)
        else:
            model.load_weights(self.source.iter_weights())
        logger.info("weights ready in %.1f s", time.perf_counter() - start)
        return model.eval()

    def _num_kv_slots(self, memory_config: MemoryConfig) -> int:
        per_token = KVPool.bytes_per_token(
            num_layers=self.arch.num_layers, num_kv_heads=self.arch.num_kv_heads, head_dim=self.arch.head_dim,
            dtype=self.dtype,
        )
        if memory_config.max_total_tokens:
            return memory_config.max_total_tokens
        if self.device.type == "cuda":
            fraction = memory_config.mem_fraction_static or 0.85
            free, total = torch.cuda.mem_get_info(self.device)
            budget = free - total * (1 - fraction)
            if budget <= per_token * 16:
                raise RuntimeError(
                    f"not enough GPU memory for the KV cache at mem_fraction_static={fraction}: "
                    f"{free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB after loading weights"
                )
            return int(budget // per_token)
        return max(256, min(_CPU_KV_BUDGET_BYTES // per_token, 1 << 20))

    @torch.inference_mode()
    def forward(self, batch: ForwardBatch) -> LogitsOutput:
        batch.attn_backend.init_forward_metadata(batch)
        hidden = self.model(batch)  # [num_tokens, hidden_size]
        last_index = torch.tensor(batch.extend_lens_cpu, device=hidden.device).cumsum(0) - 1
        if not batch.logits_start_lens or all(s is None for s in batch.logits_start_lens):
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
        ends = torch.tensor([len(r) for r in rows], device=hidden.device).cumsum(0) - 1
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
