"""A GGUF's 4-bit weights kept packed for small CPU products: the blocks read back undequantized
match the dequantizer (rows un-permuted alike), the packed product matches the float one, larger
inputs use the bf16 weight, and every fused layer of a model gets its rows in the right place."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType as QType
from gguf.quants import quantize

from plait.runtime.layers.int4_linear import Int4Linear, attach_int4, int4_available
from plait.runtime.model_loader.gguf_file import iter_gguf_q4_weights, iter_gguf_weights
from plait.runtime.models.llama import LlamaForCausalLM

if not int4_available():
    pytest.skip("this torch has no CPU int4 kernels", allow_module_level=True)

CONFIG = {
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 96, "hidden_size": 64,
    "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
    "max_position_embeddings": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True,
}
# GGUF name -> [out, in]
SHAPES = {"attn_q": (64, 64), "attn_k": (32, 64), "attn_v": (32, 64), "attn_output": (64, 64),
          "ffn_gate": (128, 64), "ffn_up": (128, 64), "ffn_down": (64, 128)}


def fake_reader(seed: int) -> SimpleNamespace:
    """The tensors of a tiny llama GGUF: projections in Q4_0 and Q4_1 (alternating), the rest F32."""
    rng = np.random.default_rng(seed)
    tensors = []

    def add(name, array, qtype):
        data = array if qtype == QType.F32 else quantize(array, qtype)
        tensors.append(SimpleNamespace(name=name, tensor_type=qtype, data=data))

    add("token_embd.weight", rng.standard_normal((96, 64), dtype=np.float32), QType.F32)
    add("output_norm.weight", np.ones(64, dtype=np.float32), QType.F32)
    for layer in range(2):
        for i, (part, shape) in enumerate(SHAPES.items()):
            add(f"blk.{layer}.{part}.weight", rng.standard_normal(shape, dtype=np.float32) * 0.1,
                (QType.Q4_0, QType.Q4_1)[(i + layer) % 2])
        add(f"blk.{layer}.attn_norm.weight", np.ones(64, dtype=np.float32), QType.F32)
        add(f"blk.{layer}.ffn_norm.weight", np.ones(64, dtype=np.float32), QType.F32)
    return SimpleNamespace(tensors=tensors)


def test_undequantized_blocks_match_the_dequantizer():
    reader = fake_reader(0)
    floats = dict(iter_gguf_weights(reader, CONFIG, "fake.gguf"))
    seen = 0
    for name, codes, scale, zero in iter_gguf_q4_weights(reader, CONFIG):
        rows, cols = codes.shape
        assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scale.shape == (rows, cols // 32)
        w = ((codes.float() - 8).view(rows, -1, 32) * scale[..., None] + zero[..., None]).view(rows, cols)
        torch.testing.assert_close(w, floats[name], rtol=0, atol=1e-5)  # q/k rows un-permuted alike
        seen += 1
    assert seen == 2 * len(SHAPES)


def test_packed_product_matches_and_large_inputs_use_the_bf16_weight():
    reader = fake_reader(1)
    name, codes, scale, zero = next(iter_gguf_q4_weights(reader, CONFIG))
    floats = dict(iter_gguf_weights(reader, CONFIG, "fake.gguf"))
    linear = torch.nn.Linear(codes.shape[1], codes.shape[0], bias=False).to(torch.bfloat16)
    with torch.no_grad():
        linear.weight.copy_(floats[name])
    layer = Int4Linear(linear, codes, scale, zero, max_rows=4)
    for rows in (1, 4):
        x = torch.randn(rows, codes.shape[1], dtype=torch.bfloat16)
        exact = x.float() @ floats[name].t()
        err = float((layer(x).float() - exact).norm() / exact.norm())
        assert err < 1e-2, (rows, err)
    x = torch.randn(5, codes.shape[1], dtype=torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, linear.weight))


@torch.no_grad()
def test_attach_places_every_fused_layers_rows():
    reader = fake_reader(2)
    with torch.device("meta"):
        model = LlamaForCausalLM(CONFIG).to(torch.bfloat16)
    model = model.to_empty(device="cpu")
    model.load_weights(iter_gguf_weights(reader, CONFIG, "fake.gguf"))
    assert attach_int4(model, iter_gguf_q4_weights(reader, CONFIG)) == 2 * 4  # qkv, o, gate_up, down
    layers = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert len(layers) == 8
    for layer in layers:
        x = torch.randn(3, layer.weight.shape[1], dtype=torch.bfloat16)
        ref = F.linear(x.float(), layer.weight.float())
        err = float((layer(x).float() - ref).norm() / ref.norm())
        assert err < 1e-2, err  # a misplaced row block would be far off
