"""What a resolved model is: `ModelSource`, its error type, and the one normal form of its config.

Every source (HF folder, GGUF file, dummy preset) ends in the same `ModelSource`, so the model
code never asks where weights came from. The config is an HF `config.json`-style dict, normalized
here so that both spellings transformers has used are present: `rope_theta`/`rope_scaling` next to
transformers 5's `rope_parameters`, and `torch_dtype` next to `dtype`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from plait.runtime.tokenizer import Tokenizer

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
LOAD_FORMATS = ("auto", "safetensors", "gguf", "dummy")


class ModelLoadError(Exception):
    """A model cannot be loaded; the message says what is wrong and where (path, tensor, key)."""


WeightIterator = Iterator[tuple[str, "torch.Tensor"]]


@dataclass
class ModelSource:
    """A resolved model: its config, tokenizer, and a lazy stream of its weights.

    `iter_weights()` yields `(hf_parameter_name, tensor)` one tensor at a time, so peak memory is
    one tensor beyond the model. Names are Hugging Face's (`model.layers.0.self_attn.q_proj.weight`).
    When `config["tie_word_embeddings"]` is true, `lm_head.weight` is normally absent (GGUF, dummy,
    most HF files); a file that stores it anyway yields it, and the model may ignore it.
    Each call starts a fresh pass over the weights.
    """

    path: str
    config: dict[str, Any]
    generation_config: dict[str, Any]
    tokenizer: Tokenizer | None
    load_format: str  # "safetensors" | "gguf" | "dummy"
    # Made by the loader that resolved the source; None means "random weights from the config".
    # Called with the names to skip (tensors the caller has already taken in their stored form).
    weight_reader: Callable[[frozenset[str]], WeightIterator] | None = field(default=None, repr=False, compare=False)
    # GGUF only: the 2-D tensors the CPU kernels can read as stored, undequantized (see
    # `gguf_file.iter_gguf_stored_weights`): `(hf_name, format name, tensor)`.
    stored_reader: Callable[[], Iterator[tuple[str, str, "torch.Tensor"]]] | None = field(
        default=None, repr=False, compare=False)

    def iter_weights(self, skip: frozenset[str] = frozenset()) -> WeightIterator:
        """Every weight not named in `skip`, as float32 (dequantized) or the checkpoint's float type."""
        if self.weight_reader is not None:
            return self.weight_reader(skip)
        if self.load_format == "dummy":
            from plait.runtime.model_loader.dummy import iter_dummy_weights

            return ((name, t) for name, t in iter_dummy_weights(self.config) if name not in skip)
        raise ModelLoadError(f"{self.path}: ModelSource with load_format={self.load_format!r} has no weight reader")

    def iter_stored_weights(self) -> Iterator[tuple[str, str, "torch.Tensor"]]:
        return iter(()) if self.stored_reader is None else self.stored_reader()


def check_architecture(config: dict[str, Any], where: str) -> str:
    """The config's architecture name, or ModelLoadError when Plait has no model code for it."""
    archs = config.get("architectures") or []
    if not archs:
        raise ModelLoadError(f"{where}: config has no 'architectures' entry; cannot tell which model this is")
    arch = archs[0]
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelLoadError(
            f"{where}: unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    quant = config.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "unknown") if isinstance(quant, dict) else quant
        raise ModelLoadError(
            f"{where}: quantized checkpoints ({method}) are not supported; use an unquantized checkpoint or a GGUF file"
        )
    return arch


_REQUIRED_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")


def normalize_config(raw: dict[str, Any], where: str = "config") -> dict[str, Any]:
    """A copy of an HF config dict with the keys `ModelSource.config` promises filled in.

    Keys already present are kept; missing ones get HF's defaults for the architecture.
    """
    config = dict(raw)
    missing = [k for k in _REQUIRED_KEYS if not config.get(k)]
    if missing:
        raise ModelLoadError(f"{where}: config lacks {', '.join(missing)}")
    arch = (config.get("architectures") or [""])[0]
    num_heads = config["num_attention_heads"]
    config.setdefault("num_key_value_heads", num_heads)
    if not config.get("head_dim"):
        config["head_dim"] = config["hidden_size"] // num_heads
    config.setdefault("rms_norm_eps", 1e-6)
    config.setdefault("hidden_act", "silu")
    config.setdefault("tie_word_embeddings", False)
    config.setdefault("max_position_embeddings", 4096)
    # Qwen2 always has q/k/v biases and its config has no flag for them.
    config.setdefault("attention_bias", arch == "Qwen2ForCausalLM")

    rope_params = dict(config.get("rope_parameters") or {})
    if not config.get("rope_theta"):
        config["rope_theta"] = float(rope_params.get("rope_theta", 10000.0))
    scaling = config.get("rope_scaling")
    if scaling is None and rope_params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope_params.items() if k != "rope_theta"}
    if scaling is not None:
        # Old configs spell the kind "type"; newer ones "rope_type". Keep both readable.
        scaling = dict(scaling)
        scaling.setdefault("rope_type", scaling.get("type", "default"))
        if scaling["rope_type"] == "default":
            scaling = None
    config["rope_scaling"] = scaling

    dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    config["torch_dtype"] = str(dtype).replace("torch.", "")
    return config
