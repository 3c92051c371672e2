"""Runtime configuration: frozen dataclasses, one per concern.

The command line and `Engine(**options)` are both generated from these fields, so every default
lives in exactly one place. Derived values are properties or resolved by the component that owns them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


def option(default: Any, help: str) -> Any:
    """A config field with its command-line help. The help says what the option does and, where the
    default is None or "auto", what that default means; the CLI adds "(default: X)" for other values."""
    return dataclasses.field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ModelConfig:
    model_path: str | None = option(
        None, "a Hugging Face folder (safetensors), a .gguf file, or with --load-format dummy a preset name; "
        "default: the bundled default model, SmolLM2-135M-Instruct (Q4_1 GGUF), fetched once into $PLAIT_CACHE_DIR")
    tokenizer_path: str | None = option(None, "a folder or .gguf to take the tokenizer from; default: the model's")
    load_format: str = option("auto", "how to read --model-path; auto: a .gguf file (or a folder holding one) is "
                                      "GGUF, a folder is safetensors; dummy: random weights of the model's shape")
    dtype: str = option("auto", "weights and activations; auto: on GPU the checkpoint's 16-bit type (bfloat16 "
                                "unless it is float16); on CPU float32 with the CPU kernels, else bfloat16 where "
                                "the CPU has bf16 instructions (AMX, AVX-512 BF16), else float32; on the CPU kernels bfloat16/float16 "
                                "store the float weights and the KV cache in that type and compute in float32")
    kv_cache_dtype: str = option(
        "auto", "KV cache storage (plain casts, no scales); auto: the model's dtype, but float16 on the CPU kernels "
        "when --dtype is auto too; float32/bfloat16/float16 on the CPU backends; int8 on the cpu backend (one scale "
        "per token and head); fp8_e5m2/fp8_e4m3 on CUDA (triton)")
    context_length: int | None = option(None, "longest prompt + answer in tokens; default: the model's "
                                              "max_position_embeddings")
    chat_template: str | None = option(None, "a Jinja chat template, or a file holding one; default: the tokenizer's")
    device: str = option("auto", "cpu, cuda or cuda:N; auto: cuda when a GPU is present, else cpu")
    attention_backend: str | None = option(
        None, "attention kernels; default: triton on CUDA, cpu with the CPU kernels, else torch_native")
    random_seed: int = option(0, "seed of the sampler's generator (requests with their own seed use that)")
    disable_cuda_graph: bool = option(False, "CUDA: run decode steps eagerly instead of replaying captured graphs")
    cuda_graph_max_bs: int = option(256, "CUDA: the largest decode batch captured as a graph; larger ones run eager")
    enable_torch_compile: bool = option(False, "CUDA: torch.compile the norms and MLPs inside the decode graphs")
    # The CPU kernels: weights read in their stored format (e.g. a GGUF's 4-bit blocks), attention over
    # the KV pool in place, fused small layers; used when they are built and the CPU has AVX2.
    disable_cpu_kernels: bool = option(
        False, "CPU: run PyTorch operations on dequantized weights instead of Plait's C++ kernels")
    cpu_decode_products: str = option(
        "auto", "CPU kernels: how decode-sized products (up to 8 rows) with GGUF block weights (Q4_0, Q4_1, Q8_0) "
        "multiply. int16: the activations rounded to int16 per 32 values (an error of at most 2^-16 of the block's "
        "largest value), integer products; int8: rounded to int8, as llama.cpp does (fastest, coarser); float: "
        "float32 products of the decoded weights. auto: int16 when --dtype is auto too, else float")
    cpu_prefill_products: str = option(
        "auto", "CPU kernels: how products of more than 8 rows (prefill, large batches) multiply. amx: on the AMX "
        "tile unit (Intel Xeon since Sapphire Rapids) in three bfloat16 passes over the two bfloat16 parts of the "
        "activations and of the weights (16 significant bits, near the float32 product; the weights packed once "
        "at load, 4 bytes a weight); amx-bf16: on AMX in one pass over bfloat16-rounded activations and "
        "weights (about twice as fast, bfloat16 precision, 2 bytes a weight); int14: GGUF block weights (Q4_0, "
        "Q4_1, Q8_0) rounded once at load to 14-bit integers per row (2 bytes a weight beside the stored ones) "
        "times the activations rounded to 14 bits per 32 values, in integers on AVX-512 VNNI (one scaling per "
        "block where int16 takes three); int16: the block weights' exact codes times the activations rounded to "
        "int16 per 32 values, as the int16 decode products, in integers on AVX-512 VNNI (twice the multiplies of "
        "float32 per instruction); float: the stored weights decoded into float32 panels, float32 products. "
        "auto: amx where the CPU and OS have it, --dtype is auto and the packed weights take at most half the "
        "memory available; else int14 where the CPU has AVX-512 VNNI and --dtype is auto (int16 where the int14 "
        "weights would take more than half the memory available); else float")
    cpu_prefill_attention: str = option(
        "auto", "CPU kernels: how the attention of prefill and extend steps (many query rows per request) "
        "multiplies. int16: queries and keys rounded to 13-bit integers per row, softmax weights (times the "
        "values' scales) and values to 14-bit integers per 32 keys, integer products on AVX-512 VNNI (twice "
        "the multiplies of float32 per instruction; head sizes 32, 64, 96, 128); float: float32 products. "
        "auto: int16 where the CPU has AVX-512 VNNI, --dtype is auto and the prefill products are not on AMX "
        "(with AMX products, attention runs on the AMX tiles too); else float. Decode steps read the KV "
        "cache in float32 either way")
    enable_cpu_int8_dot: bool = option(False, "CPU kernels: the same as --cpu-decode-products int8")
    # The CPU's counterpart of CUDA graphs: no per-operation dispatch from Python.
    disable_cpu_graph: bool = option(
        False, "CPU kernels: run the decoder stack layer by layer instead of one native call per step")


@dataclass(frozen=True)
class MemoryConfig:
    max_total_tokens: int | None = option(
        None, "KV cache size in tokens; default: on GPU what --mem-fraction-static leaves, on CPU 2 GiB or a "
        "quarter of available memory where that is less, between 2 and 16 contexts (--context-length)")
    mem_fraction_static: float | None = option(
        None, "GPU: share of the device memory for weights, KV cache and CUDA graphs; default: 0.85")
    max_running_requests: int | None = option(
        None, "requests decoded at once; default: one per 16 KV tokens, at most 512")


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
    schedule_policy: str = option("lpm", "order of the waiting queue: lpm (longest cached prefix first), "
                                         "dfs-weight, fcfs, lof (longest output first), random")
    disable_radix_cache: bool = option(False, "no prefix cache (the paper's \"no cache\" ablation)")
    prefix_cache: str = option("radix", "radix (a tree of prefixes), flat (whole-prefix table, the \"no tree\" "
                                        "ablation) or none")
    # The tiered cache: what the device pool cannot keep goes to host memory (and files) instead of
    # being dropped, and comes back by a copy before the prefill that needs it.
    enable_hierarchical_cache: bool = option(
        False, "keep KV evicted from the KV pool in a host-memory tier (and a file tier with "
        "--hicache-storage-backend) and load it back instead of recomputing it")
    hicache_ratio: float = option(2.0, "host tier size as a multiple of the KV pool's tokens")
    hicache_size: float = option(0.0, "host tier size in GiB; 0: use --hicache-ratio")
    hicache_write_policy: str = option(
        "write_through", "when KV is copied to the host: write_through (when cached), write_through_selective "
        "(once hit twice), write_back (when evicted from the KV pool)")
    hicache_storage_backend: str | None = option(
        None, "a third tier below the host one; file: KV files in --hicache-storage-dir; default: none")
    hicache_storage_dir: str | None = option(
        None, "folder of the file tier; default: a temporary folder removed at exit")
    radix_eviction_policy: str = option(
        "lru", "order in which cached prefixes leave the KV pool: lru, lfu, or workflow (largest "
        "steps-to-execution of the requests' agent workflows first, then lru)")
    disable_hicache_prefetch: bool = option(
        False, "with --radix-eviction-policy workflow and tiers: do not load the next workflow step's "
        "agent prefixes back ahead of their requests")
    chunked_prefill_size: int | None = option(
        None, "prompt tokens per prefill chunk, -1 for no chunking; default: 512 on CPU, 8192 on GPU")
    max_prefill_tokens: int | None = option(None, "token budget of one prefill batch; default: 2 x the chunk size")
    schedule_aging_rounds: int = option(16, "a request passed over this many admission rounds goes first")
    init_new_token_ratio: float = option(0.7, "share of max_new_tokens reserved for each running request ...")
    min_new_token_ratio: float = option(0.15, "... decaying to this share while no request is retracted ...")
    new_token_ratio_decay: float = option(0.002, "... by this much per step")
    grammar_backend: str = option("llguidance", "constrained decoding library: llguidance or xgrammar")
    disable_jump_forward: bool = option(False, "decode text a grammar forces token by token (the compressed-FSM "
                                               "ablation)")
    debug_check_integrity: bool = option(False, "check the cache's invariant after every step (slow; tests)")
    # Overlap scheduling (on by default on CUDA): step i+1 is scheduled and launched before step i's
    # tokens are read back. The CPU has nothing to overlap.
    disable_overlap_schedule: bool = option(False, "CUDA: schedule each step only after the last one's tokens "
                                                   "are read back")
    enable_overlap_schedule: bool = option(False, "overlap scheduling on the CPU too (off there by default)")
    # Mixed chunks: one pass over the weights serves a prefill chunk and the running decodes; on by
    # default on the CPU, where a step costs a full read of the weights whatever its size.
    enable_mixed_chunk: bool = option(False, "GPU: decode running requests in the same step as a prefill chunk "
                                             "(the CPU does so by default)")
    disable_mixed_chunk: bool = option(False, "CPU: run prefill chunks and decodes in separate steps")
    # Shared-prefix decode (docs/gpu-kernels.md): on triton such steps run eager, outside the CUDA graphs.
    disable_shared_prefix_decode: bool = option(
        False, "do not read a cached prefix shared by decoding requests once per group (triton, cpu backends)")
    shared_prefix_decode_min_tokens: int | None = option(
        None, "group decoding requests by shared prefix when that saves this many KV tokens a step; default: the "
        "backend's own threshold (triton 16384, cpu 64)")
    # Streaming: a streamed request's tokens go out on its first token, then every this many (and at the
    # end). Larger values cut the per-token work of the HTTP process and the client (SGLang's flag; a
    # request's own `stream_interval` sampling parameter takes precedence).
    stream_interval: int = option(1, "streamed tokens sent together after the first: 1 sends every token as it "
                                     "comes; more cut the per-token cost of the HTTP process and the client")

    def __post_init__(self) -> None:
        if self.stream_interval < 1:
            raise ValueError(f"--stream-interval must be at least 1, got {self.stream_interval}")
