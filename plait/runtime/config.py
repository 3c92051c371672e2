"""Runtime configuration: frozen dataclasses, one per concern.

The command line and `Engine(**options)` are both generated from these fields, so every default
lives in exactly one place. Derived values are properties or resolved by the component that owns them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = None  # None: the default model (SmolLM2-135M-Instruct)
    tokenizer_path: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    # The KV pool's storage type: auto (the model's dtype; float16 on the CPU kernels when dtype is auto
    # too) | float32 | bfloat16 | float16 (torch_native, cpu) | int8 (cpu: symmetric, one scale per
    # token and head, a quarter of float32's bytes) | fp8_e5m2 | fp8_e4m3 (half the bytes per token,
    # plain casts without scales; the triton attention backend only)
    kv_cache_dtype: str = "auto"
    context_length: int | None = None  # default: the model's max_position_embeddings
    chat_template: str | None = None  # a Jinja template or a path to one; default: the tokenizer's
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    attention_backend: str | None = None  # default: triton on CUDA, cpu with the CPU kernels, else torch_native
    random_seed: int = 0
    disable_cuda_graph: bool = False  # CUDA: decode steps replay captured graphs unless this is set
    cuda_graph_max_bs: int = 256  # largest decode batch captured; larger batches run eager
    enable_torch_compile: bool = False  # torch.compile the norms and MLPs inside the captured decode graphs
    # CPU: the model runs on Plait's C++ kernels (weights read in their stored format, e.g. a GGUF's
    # 4-bit blocks; attention over the KV pool in place; fused small layers) when they are built and
    # the CPU has AVX2; this turns them off (PyTorch operations on dequantized weights instead).
    disable_cpu_kernels: bool = False
    # CPU kernels: a step runs the whole decoder stack in one native call (no per-operation dispatch
    # from Python; the CPU's counterpart of CUDA graphs); this runs it layer by layer instead.
    disable_cpu_graph: bool = False


@dataclass(frozen=True)
class MemoryConfig:
    max_total_tokens: int | None = None  # KV pool size in tokens; default from memory
    mem_fraction_static: float | None = None  # GPU: fraction of memory for weights + KV pool
    max_running_requests: int | None = None  # rows of req_to_token; default derived from the pool


@dataclass(frozen=True)
class RuntimeConfig:
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    memory: MemoryConfig = dataclasses.field(default_factory=MemoryConfig)
    scheduler: "SchedulerConfig" = dataclasses.field(default_factory=lambda: SchedulerConfig())

    @classmethod
    def from_options(cls, **options: Any) -> "RuntimeConfig":
        """Route flat keyword options (as `Engine(**options)` and the CLI take them) to their section."""
        sections: dict[str, dict[str, Any]] = {}
        unknown = dict(options)
        for section_name, section_cls in cls.sections().items():
            names = {f.name for f in dataclasses.fields(section_cls)}
            sections[section_name] = {k: unknown.pop(k) for k in list(unknown) if k in names}
        if unknown:
            raise TypeError(f"unknown option(s): {', '.join(sorted(unknown))}")
        return cls(**{name: section_cls(**sections[name]) for name, section_cls in cls.sections().items()})

    @staticmethod
    def sections() -> dict[str, type]:
        return {"model": ModelConfig, "memory": MemoryConfig, "scheduler": SchedulerConfig}


@dataclass(frozen=True)
class SchedulerConfig:
    schedule_policy: str = "lpm"  # lpm | dfs-weight | fcfs | lof | random
    disable_radix_cache: bool = False  # the paper's "no cache" ablation
    prefix_cache: str = "radix"  # radix | flat (exact-prefix table, the "no tree" ablation) | none
    chunked_prefill_size: int | None = None  # tokens per prefill chunk; default 512 on CPU, 8192 on GPU; -1: off
    max_prefill_tokens: int | None = None  # token budget of one extend batch; default 2 x chunk size
    schedule_aging_rounds: int = 16  # a request passed over this many admission rounds goes first
    init_new_token_ratio: float = 0.7  # share of max_new_tokens reserved for running requests ...
    min_new_token_ratio: float = 0.15  # ... decaying to this while no retraction happens
    new_token_ratio_decay: float = 0.002
    grammar_backend: str = "llguidance"  # llguidance | xgrammar (docs/constrained.md)
    disable_jump_forward: bool = False  # the compressed-FSM ablation: decode forced text token by token
    debug_check_integrity: bool = False  # check the cache invariant after every step (tests)
    # Overlap scheduling (on by default on CUDA): step i+1 is scheduled and launched before step i's
    # tokens are read back. The CPU has nothing to overlap; `enable_overlap_schedule` forces it there.
    disable_overlap_schedule: bool = False
    enable_overlap_schedule: bool = False
    # Mixed chunks: running requests decode in the same step as a prefill chunk (one pass over the
    # weights for both; decodes never wait behind a long prompt). On by default on the CPU, where a
    # step costs a full read of the weights whatever its size; `enable_mixed_chunk` turns it on on GPUs.
    enable_mixed_chunk: bool = False
    disable_mixed_chunk: bool = False
    # Shared-prefix decode (attention backends that support it: triton, cpu): decoding requests that
    # share a cached prefix read it once per group, when that saves at least this many KV tokens a
    # step. Default: the backend's own threshold (triton 16384, since such steps run eager, outside
    # the CUDA graphs; cpu 64). docs/gpu-kernels.md.
    disable_shared_prefix_decode: bool = False
    shared_prefix_decode_min_tokens: int | None = None
