"""Tiny random Hugging Face models of every supported family, for mechanics and correctness tests."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch
import transformers

FAMILIES = ("llama", "llama3_rope", "mistral", "qwen2", "qwen3")


def tiny_hf_config(family: str, *, vocab_size: int = 320) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    if family == "llama":
        return transformers.LlamaConfig(**common, rope_theta=10000.0)
    if family == "llama3_rope":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64, "rope_theta": 500000.0}
        cfg = transformers.LlamaConfig(**{**common, "tie_word_embeddings": True}, rope_scaling=rope, rope_theta=500000.0)
        return cfg
    if family == "mistral":
        return transformers.MistralConfig(**common, rope_theta=10000.0, sliding_window=None)
    if family == "qwen2":
        return transformers.Qwen2Config(**common, rope_theta=10000.0)
    if family == "qwen3":
        return transformers.Qwen3Config(**common, head_dim=32, rope_theta=10000.0)
    raise ValueError(family)


def tiny_hf_model(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> transformers.PreTrainedModel:
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_hf_config(family), dtype=dtype).eval()
    # Random init leaves biases and norms at trivial values; perturb them so they are really tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    return model


@dataclass
class InMemorySource:
    """Quacks like `plait.runtime.model_loader.ModelSource`, over an in-memory HF model."""

    model: transformers.PreTrainedModel
    path: str = "in-memory"
    tokenizer: object = None
    load_format: str = "safetensors"
    generation_config: dict = field(default_factory=dict)

    @property
    def config(self) -> dict:
        cfg = self.model.config.to_dict()
        cfg["architectures"] = cfg.get("architectures") or [type(self.model).__name__]
        return cfg

    def iter_weights(self, skip: frozenset[str] = frozenset()) -> Iterator[tuple[str, torch.Tensor]]:
        yield from ((name, t) for name, t in self.model.state_dict().items() if name not in skip)

    def iter_stored_weights(self) -> Iterator[tuple[str, str, torch.Tensor]]:
        return iter(())
