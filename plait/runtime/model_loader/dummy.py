"""Random weights of the right shapes, for benchmarks and tests that need no real checkpoint.

`PRESETS` holds the published configs of the models we benchmark (values from their
`config.json`), so `--load-format dummy --model-path llama-3.1-8b` needs no download.
`param_shapes(config)` is the shape table of every parameter the HF model has; it allocates
nothing, so tests can check an 8B layout cheaply.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from plait.runtime.model_loader.source import normalize_config

if TYPE_CHECKING:
    import torch

_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}


def _llama(**kw: Any) -> dict[str, Any]:
    base = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu", attention_bias=False,
                mlp_bias=False, torch_dtype="bfloat16")
    return {**base, **kw}


def _qwen(arch: str, **kw: Any) -> dict[str, Any]:
    model_type = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}[arch]
    base = dict(architectures=[arch], model_type=model_type, hidden_act="silu", rms_norm_eps=1e-6,
                rope_theta=1000000.0, rope_scaling=None, attention_bias=arch == "Qwen2ForCausalLM",
                torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
    return {**base, **kw}


PRESETS: dict[str, dict[str, Any]] = {
    "llama-3.1-8b": _llama(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 8.0}, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama-3.2-1b": _llama(
        hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5, rope_theta=500000.0,
        rope_scaling={**_LLAMA3_ROPE, "factor": 32.0}, vocab_size=128256, max_position_embeddings=131072,
        tie_word_embeddings=True, bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "smollm2-135m": _llama(
        hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5, rope_theta=100000.0, rope_scaling=None,
        vocab_size=49152, max_position_embeddings=8192, tie_word_embeddings=True,
        bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "qwen2.5-7b": _qwen(
        "Qwen2ForCausalLM", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
        num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
        tie_word_embeddings=False),
    "qwen2.5-0.5b": _qwen(
        "Qwen2ForCausalLM", hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        tie_word_embeddings=True),
    "qwen3-8b": _qwen(
        "Qwen3ForCausalLM", hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=False),
    # Qwen3's head_dim (128) is not hidden_size / num_heads (64) here: a useful layout to test.
    "qwen3-0.6b": _qwen(
        "Qwen3ForCausalLM", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
        num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
        max_position_embeddings=40960, tie_word_embeddings=True),
}


def preset_config(name: str) -> dict[str, Any] | None:
    """The normalized config of a preset (case-insensitive), or None if there is no such preset."""
    raw = PRESETS.get(name.lower())
    return normalize_config(raw) if raw is not None else None


def param_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Shape of every parameter the HF model has, in HF state-dict order; allocates nothing.

    `lm_head.weight` is left out when the embeddings are tied, as HF checkpoints do.
    """
    config = normalize_config(config)
    arch = config["architectures"][0]
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim, num_heads, num_kv_heads = config["head_dim"], config["num_attention_heads"], config["num_key_value_heads"]
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    qkv_bias = bool(config["attention_bias"])
    # Qwen2 biases only q/k/v; Llama/Mistral/Qwen3's attention_bias also biases o_proj.
    o_bias = qkv_bias and arch != "Qwen2ForCausalLM"
    mlp_bias = bool(config.get("mlp_bias", False))

    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        attn = {"q_proj": (q_size, hidden), "k_proj": (kv_size, hidden), "v_proj": (kv_size, hidden)}
        for name, shape in attn.items():
            shapes[f"{p}self_attn.{name}.weight"] = shape
            if qkv_bias:
                shapes[f"{p}self_attn.{name}.bias"] = shape[:1]
        shapes[f"{p}self_attn.o_proj.weight"] = (hidden, q_size)
        if o_bias:
            shapes[f"{p}self_attn.o_proj.bias"] = (hidden,)
        if arch == "Qwen3ForCausalLM":
            shapes[f"{p}self_attn.q_norm.weight"] = (head_dim,)
            shapes[f"{p}self_attn.k_norm.weight"] = (head_dim,)
        mlp = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        for name, shape in mlp.items():
            shapes[f"{p}mlp.{name}.weight"] = shape
            if mlp_bias:
                shapes[f"{p}mlp.{name}.bias"] = shape[:1]
        shapes[f"{p}input_layernorm.weight"] = (hidden,)
        shapes[f"{p}post_attention_layernorm.weight"] = (hidden,)
    shapes["model.norm.weight"] = (hidden,)
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (config["vocab_size"], hidden)
    return shapes


def iter_dummy_weights(config: dict[str, Any], *, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Deterministic random weights: normal(0, 0.02) and norm weights 1, in the config's dtype."""
    import torch  # here: the package (and the tokenizer, which the server's HTTP process unpickles) stays torch-free

    dtype = getattr(torch, normalize_config(config)["torch_dtype"])
    gen = torch.Generator().manual_seed(seed)
    shapes = param_shapes(config)
    for name, shape in tqdm(shapes.items(), desc="Dummy weights", unit="tensor", file=sys.stderr):
        if name.endswith("norm.weight"):
            yield name, torch.ones(shape, dtype=dtype)
        else:
            yield name, torch.empty(shape, dtype=dtype).normal_(0.0, 0.02, generator=gen)
