"""A GGUF file (llama.cpp's format): HF config from its metadata, HF-named float weights from its tensors.

Three things differ from an HF checkpoint and are undone here:
- names: `blk.3.attn_q.weight` is `model.layers.3.self_attn.q_proj.weight` (table below);
- layout: llama.cpp's converter permutes the rows of q_proj/k_proj of `llama` models from HF's
  "rotate halves" rotary layout to GGML's "rotate adjacent pairs" one; we permute them back;
- precision: quantized blocks are dequantized to float32 with `gguf.quants.dequantize`.
The reader memory-maps the file, so only the tensor being dequantized is in memory.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType
from gguf import GGUFReader, GGUFValueType
from gguf.gguf_reader import ReaderField, ReaderTensor
from gguf.quants import dequantize
from tqdm import tqdm

from plait.runtime.model_loader.source import ModelLoadError, normalize_config

GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}

# Block types gguf's numpy dequantizer handles and that real checkpoints of our models use.
SUPPORTED_TENSOR_TYPES = frozenset({
    QType.F32, QType.F16, QType.BF16, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0,
    QType.Q2_K, QType.Q3_K, QType.Q4_K, QType.Q5_K, QType.Q6_K,
})

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Precomputed llama3 rotary frequency divisors; we turn them back into config["rope_scaling"].
ROPE_FREQS = "rope_freqs.weight"
# Arrays of vocabulary size; read separately, and never needed as config values.
BIG_FIELDS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.scores", "tokenizer.ggml.merges")


class _FastGGUFReader(GGUFReader):
    """GGUFReader that parses the metadata in a fraction of the time, with the same results.

    - `_get` slices a plain ndarray view of the memory map instead of the np.memmap: the reader makes
      one slice per metadata value, and each np.memmap slice pays for memmap's __array_finalize__.
    - The vocabulary-sized arrays (`BIG_FIELDS`, ~150k values for a 49k-token vocabulary) are not
      split into one array per element: they are stepped over and kept as one opaque part (their
      `contents()` is empty). Nothing reads them from this reader: the tokenizer is built by
      transformers' own reader, or comes from the cache (`gguf_tokenizer`).
    """

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        plain = self.__dict__.get("_plain_data")
        if plain is None:
            plain = self._plain_data = self.data.view(np.ndarray)
        count = int(count)
        arr = plain[offset: offset + np.dtype(dtype).itemsize * count].view(dtype=dtype)[:count]
        return arr.view(arr.dtype.newbyteorder(self.byte_order if override_order is None else override_order))

    def _build_fields(self, offs: int, count: int) -> int:
        for _ in range(count):
            orig_offs = offs
            kv_klen, kv_kdata = self._get_str(offs)
            offs += int(kv_klen.nbytes + kv_kdata.nbytes)
            raw_kv_type = self._get(offs, np.uint32)
            offs += int(raw_kv_type.nbytes)
            parts: list[np.ndarray] = [kv_klen, kv_kdata, raw_kv_type]
            name = str(bytes(kv_kdata), encoding="utf-8")
            if name in BIG_FIELDS and raw_kv_type[0] == GGUFValueType.ARRAY:
                size, field_parts, field_idxs, field_types = self._skip_array(offs)
            else:
                size, field_parts, field_idxs, field_types = self._get_field_parts(offs, raw_kv_type[0])
            parts += field_parts
            self._push_field(ReaderField(orig_offs, name, parts, [i + 3 for i in field_idxs], field_types),
                             skip_sum=True)
            offs += size
        return offs

    def _skip_array(self, offs: int) -> tuple[int, list[np.ndarray], list[int], list[GGUFValueType]]:
        """(bytes, parts, data indices, types) of an array field, its values left unparsed."""
        raw_itype, alen = self._get(offs, np.uint32), self._get(offs + 4, np.uint64)
        itype, start, n = GGUFValueType(raw_itype[0]), offs + 12, int(alen[0])
        if itype == GGUFValueType.STRING:  # each item is a uint64 length and that many bytes
            lengths = memoryview(self._plain_data)
            end = start
            for _ in range(n):
                end += 8 + int.from_bytes(lengths[end: end + 8], "little" if self.byte_order != "S" else "big")
        else:
            end = start + n * np.dtype(self.gguf_scalar_to_np[itype]).itemsize
        return end - offs, [raw_itype, alen, self._plain_data[start:end]], [], [GGUFValueType.ARRAY, itype]


# `_get` and `_build_fields` are private to gguf: use the fast reader only while their signatures are
# the ones we replace (a newer gguf falls back to its own reader: slower, same results).
_READER = _FastGGUFReader if (
    list(inspect.signature(GGUFReader._get).parameters) == ["self", "offset", "dtype", "count", "override_order"]
    and list(inspect.signature(GGUFReader._build_fields).parameters) == ["self", "offs", "count"]
) else GGUFReader


def open_gguf(path: str) -> GGUFReader:
    try:
        return _READER(path)
    except Exception as e:  # ValueError, IndexError, struct errors: all mean a bad file
        raise ModelLoadError(f"{path}: corrupt or truncated GGUF file: {e}") from e


def hf_name(gguf_name: str) -> str | None:
    """The HF parameter name of a GGUF tensor; None when it has no HF counterpart."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.fullmatch(gguf_name)
    if m is None or m.group(2) not in _BLOCK_NAMES:
        return None
    return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """All key/value metadata except the vocabulary-sized arrays."""
    return {key: field.contents() for key, field in reader.fields.items() if key not in BIG_FIELDS}


def _shortest(x: float) -> float:
    # GGUF stores config floats as float32; the shortest decimal that rounds to the same float32
    # is the value the original config.json had (1e-05, not 9.99999974738e-06).
    return float(str(np.float32(x)))


def gguf_config(reader: GGUFReader, path: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(HF-style config, generation_config) from the file's metadata; checks the tensors can be read."""
    meta = read_metadata(reader)
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ModelLoadError(
            f"{path}: unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    tensors = {t.name: t for t in reader.tensors}
    _check_tensors(reader, path)

    def key(name: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{name}", default)
        if value is None:
            raise ModelLoadError(f"{path}: GGUF metadata lacks {arch}.{name}")
        return value

    hidden, num_heads = int(key("embedding_length")), int(key("attention.head_count"))
    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelLoadError(f"{path}: GGUF file has no token_embd.weight tensor")
    # The embedding's row count is the model's vocab; the token list may be shorter or padded.
    vocab_size = int(embd.shape[-1])
    head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // num_heads)
    config: dict[str, Any] = {
        "architectures": [GGUF_ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": int(key("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": _shortest(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": _shortest(key("rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "vocab_size": vocab_size,
        "max_position_embeddings": int(key("context_length")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "hidden_act": "silu",
        "torch_dtype": "float32",  # what iter_weights yields after dequantization
    }
    if ROPE_FREQS in tensors:
        divisors = dequantize(tensors[ROPE_FREQS].data, tensors[ROPE_FREQS].tensor_type)
        config["rope_scaling"] = fit_llama3_rope_scaling(divisors, head_dim, config["rope_theta"], path)
    elif meta.get(f"{arch}.rope.scaling.type", "none") != "none":
        config["rope_scaling"] = _metadata_rope_scaling(meta, arch)

    generation_config: dict[str, Any] = {}
    for gguf_key, hf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("padding_token_id", "pad_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in meta:
            generation_config[hf_key] = int(meta[f"tokenizer.ggml.{gguf_key}"])
    for gguf_key, hf_key in (("temp", "temperature"), ("top_p", "top_p"), ("top_k", "top_k"), ("min_p", "min_p")):
        value = meta.get(f"general.sampling.{gguf_key}")
        if value is not None:
            generation_config[hf_key] = int(value) if hf_key == "top_k" else _shortest(value)
    for hf_key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        if hf_key in generation_config:
            config[hf_key] = generation_config[hf_key]
    return normalize_config(config), generation_config


def _check_tensors(reader: GGUFReader, path: str) -> None:
    for t in reader.tensors:
        if t.tensor_type not in SUPPORTED_TENSOR_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TENSOR_TYPES))
            raise ModelLoadError(f"{path}: tensor {t.name} has unsupported GGUF quantization "
                                 f"{t.tensor_type.name}; supported: {supported}")
        if t.name != ROPE_FREQS and hf_name(t.name) is None:
            raise ModelLoadError(f"{path}: unexpected GGUF tensor {t.name!r} (not a dense Llama/Qwen layer)")


def _metadata_rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any]:
    kind = meta[f"{arch}.rope.scaling.type"]
    scaling: dict[str, Any] = {"rope_type": kind, "factor": _shortest(meta[f"{arch}.rope.scaling.factor"])}
    orig = meta.get(f"{arch}.rope.scaling.original_context_length")
    if orig is not None:
        scaling["original_max_position_embeddings"] = int(orig)
    return scaling


def llama3_rope_divisors(
    head_dim: int, rope_theta: float, factor: float, low_freq_factor: float, high_freq_factor: float, orig_len: int
) -> np.ndarray:
    """Per-frequency divisors of Llama 3's rotary scaling (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    smooth = (orig_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    divisors = 1.0 / ((1 - smooth) / factor + smooth)  # the band between the two cutoffs
    divisors = np.where(wavelen < orig_len / high_freq_factor, 1.0, divisors)  # high frequencies: kept
    return np.where(wavelen > orig_len / low_freq_factor, factor, divisors)  # low frequencies: / factor


def fit_llama3_rope_scaling(divisors: np.ndarray, head_dim: int, rope_theta: float, path: str) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling dict from llama.cpp's precomputed divisors.

    The file keeps only the divisors, so we search the parameter values Llama 3.x releases use.
    """
    factor = _shortest(float(divisors.max()))
    for orig_len in (8192, 4096, 2048, 16384, 32768):
        for low in (1.0, 2.0, 0.5):
            for high in (4.0, 2.0, 8.0):
                expected = llama3_rope_divisors(head_dim, rope_theta, factor, low, high, orig_len)
                if expected.shape == divisors.shape and np.allclose(expected, divisors, rtol=1e-4):
                    return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                            "high_freq_factor": high, "original_max_position_embeddings": orig_len}
    raise ModelLoadError(f"{path}: {ROPE_FREQS} does not match any Llama 3 rotary scaling; cannot build rope_scaling")


def unpermute_rotary_rows(w: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation: per head, GGUF row 2*i+j holds HF row j*(head_dim/2)+i."""
    # w: [num_heads * head_dim, ...] (a weight [out, in] or a bias [out])
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def _rotary_heads(config: dict[str, Any], hf_name: str) -> int | None:
    """The head count whose rotary rows llama.cpp permuted in this tensor (q_proj/k_proj of llama), else None."""
    if config["model_type"] != "llama":
        return None
    proj = hf_name.split(".")[-2]
    return {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}.get(proj)


def iter_gguf_weights(
    reader: GGUFReader, config: dict[str, Any], path: str, *, skip: frozenset[str] = frozenset()
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield `(hf_name, float32 tensor)` for every model tensor in the file not named in `skip`."""
    tensors = [t for t in reader.tensors if hf_name(t.name) is not None and hf_name(t.name) not in skip]
    # No bar where stderr is not a terminal (logs, CI), nor when nothing is left to dequantize.
    for t in tqdm(tensors, desc="Loading GGUF", unit="tensor", file=sys.stderr, leave=False,
                  disable=True if not tensors else None):
        name = hf_name(t.name)
        try:
            # Dequantized arrays already come in torch order ([out, in]); GGUF's own shape is reversed.
            array = _dequantize_q4(t) if _is_q4_matrix(t) else dequantize(t.data, t.tensor_type)
        except Exception as e:
            raise ModelLoadError(f"{path}: cannot read tensor {t.name}: {e}") from e
        if not array.flags.writeable:  # F32 data is a read-only view into the memory map
            array = array.copy()
        tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
        heads = _rotary_heads(config, name)
        if heads is not None:
            tensor = unpermute_rotary_rows(tensor, heads)
        yield name, tensor


# Q4_0/Q4_1 block sizes in bytes: a float16 scale (and for Q4_1 a float16 minimum), then 32 4-bit codes.
_Q4_BLOCK_BYTES = {QType.Q4_0: 18, QType.Q4_1: 20}


def _is_q4_matrix(t: ReaderTensor) -> bool:
    return t.tensor_type in _Q4_BLOCK_BYTES and len(t.data.shape) == 2


def _unpack_q4(t: ReaderTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """(codes [out, in / 32, 32] uint8 in 0..15, d [out, in / 32, 1] float32, m likewise or None for Q4_0)."""
    block_bytes = _Q4_BLOCK_BYTES[t.tensor_type]
    raw = np.asarray(t.data)  # [out, num_blocks * block_bytes] uint8, a view of the file
    rows, num_blocks = raw.shape[0], raw.shape[1] // block_bytes
    blocks = raw.reshape(rows, num_blocks, block_bytes)
    num_consts = 2 if t.tensor_type == QType.Q4_1 else 1  # float16 d (and m) open each block
    consts = np.ascontiguousarray(blocks[:, :, : 2 * num_consts]).view(np.float16).astype(np.float32)
    qs = blocks[:, :, 2 * num_consts:]
    # A block's 16 bytes hold its first 16 values in the low nibbles and the last 16 in the high ones.
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)
    return codes, consts[..., 0:1], consts[..., 1:2] if num_consts == 2 else None


def _dequantize_q4(t: ReaderTensor) -> np.ndarray:
    """[out, in] float32, by gguf's formulas (`d * q + m`, `d * (q - 8)`, the same bits) in a few whole-array
    operations: twice as fast as gguf's dequantizer, which works through groups of rows."""
    codes, d, m = _unpack_q4(t)
    w = d * codes.astype(np.float32) + m if m is not None else d * (codes.astype(np.int8) - np.int8(8)).astype(np.float32)
    return w.reshape(codes.shape[0], -1)


# Tensor types the CPU kernels read as stored (plait/runtime/cpu/kernels.py names the formats).
STORED_FORMATS = {QType.F32: "F32", QType.F16: "F16", QType.BF16: "BF16", QType.Q8_0: "Q8_0",
                  QType.Q4_0: "Q4_0", QType.Q4_1: "Q4_1"}


def iter_gguf_stored_weights(reader: GGUFReader, config: dict[str, Any]) -> Iterator[tuple[str, str, torch.Tensor]]:
    """Yield `(hf_name, format name, tensor)` for every 2-D tensor of a `STORED_FORMATS` type, not
    dequantized: uint8 [rows, row_bytes] for the block formats (GGUF's blocks, unchanged), the float
    tensor [rows, cols] otherwise. Rows are un-permuted like `iter_gguf_weights` (blocks lie within
    rows, so moving whole rows keeps them intact)."""
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None or t.tensor_type not in STORED_FORMATS or len(t.data.shape) != 2:
            continue
        rows = int(t.shape[-1])
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(rows, -1))
        if t.tensor_type == QType.F32:
            raw = raw.view(torch.float32)
        elif t.tensor_type in (QType.F16, QType.BF16):
            raw = raw.view(torch.float16 if t.tensor_type == QType.F16 else torch.bfloat16)
        heads = _rotary_heads(config, name)
        if heads is not None:
            raw = unpermute_rotary_rows(raw, heads).contiguous()
        yield name, STORED_FORMATS[t.tensor_type], raw
